"""A run's tracking store: a local one is told by its URI alone, before mlflow is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/m.db", "{tmp}/mlruns", "file://{tmp}/mlruns",
                                 "postgresql+psycopg2://orchard@127.0.0.1:1/orchard"])
def test_a_file_or_database_store_needs_no_mlflow_import_to_be_reachable(uri, tmp_path):
    code = ("import sys; from orchard.tracking import check_reachable; "
            f"check_reachable({uri.format(tmp=tmp_path)!r}); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
