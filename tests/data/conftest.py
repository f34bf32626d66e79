"""One real local[2] Spark session for the whole data suite, and small helpers around prepare()."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchard.config import JobSpec, SparkSpec, validate_spec
from orchard.data import PreparedData, prepare, spark_session


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    # Started before any prepare() so that prepare() reuses it (and leaves it running).
    session = spark_session(SparkSpec(master="local[2]", shuffle_partitions=2))
    yield session
    session.stop()


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., JobSpec]:
    """A train spec whose data section is ``data`` (output defaults to a temp folder)."""

    def make(**data: Any) -> JobSpec:
        data.setdefault("output", str(tmp_path / "prepared"))
        return validate_spec({"name": "data-test", "kind": "train", "data": data})

    return make


@pytest.fixture(scope="session")
def digits_raw(spark, tmp_path_factory) -> PreparedData:
    """sklearn digits, unnormalized: the raw rows of each split, shared by several tests."""
    out = tmp_path_factory.mktemp("digits-raw")
    spec = validate_spec({"name": "d", "kind": "train", "data": {"normalize": "none", "output": str(out)}})
    return prepare(spec)
