"""Cluster-ready data paths: file:// URIs are local files; unknown schemes and remote hosts are refused."""

from __future__ import annotations

import pytest

from orchard.config import DataSpec, SpecError
from orchard.data.source import content_hash, resolve
from tests.data.prep_helpers import write_csv


def test_a_file_uri_is_the_same_source_as_its_path(tmp_path):
    csv = write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[1, 2, 0], [3, 4, 1], [5, 6, 0]])
    plain = DataSpec(source=str(csv))
    uri = DataSpec(source=csv.as_uri())
    a, b = resolve(plain), resolve(uri)
    assert (a.kind, a.features, a.location) == (b.kind, b.features, b.location)
    assert content_hash(a, plain) == content_hash(b, plain)


@pytest.mark.parametrize("source, message", [("ftp://host/x.csv", "unsupported URI scheme ftp://"),
                                             ("file://otherhost/x.csv", "must be local"),
                                             ("file:///no/such/file.csv", "does not exist")])
def test_bad_uris_are_refused_naming_the_field(source, message):
    with pytest.raises(SpecError, match="data.source") as err:
        resolve(DataSpec(source=source))
    assert message in str(err.value)
