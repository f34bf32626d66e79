"""A run's tracking store: a local one is told by its URI alone, and it opens in the background before use."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from orchard.tracking import open_store_early


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/m.db", "{tmp}/mlruns", "file://{tmp}/mlruns",
                                 "postgresql+psycopg2://orchard@127.0.0.1:1/orchard"])
def test_a_file_or_database_store_needs_no_mlflow_import_to_be_reachable(uri, tmp_path):
    code = ("import sys; from orchard.tracking import check_reachable; "
            f"check_reachable({uri.format(tmp=tmp_path)!r}); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_store_opened_early_holds_the_schema_and_is_the_one_a_run_gets(tmp_path):
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _get_store

    uri = f"sqlite:///{tmp_path}/m.db"
    thread = open_store_early(uri)
    thread.join(timeout=120)
    assert not thread.is_alive()
    with sqlite3.connect(tmp_path / "m.db") as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
    assert {"experiments", "runs", "metrics", "alembic_version"} <= tables
    opened = _get_store(uri)
    assert MlflowClient(uri)._tracking_client.store is opened  # the run reuses it, nothing opens twice


def test_a_store_that_cannot_open_early_raises_nothing_in_the_background(tmp_path, monkeypatch):
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    (tmp_path / "file").write_text("not a folder")
    thread = open_store_early(f"sqlite:///{tmp_path}/file/m.db")  # its folder is a file: no database there
    thread.join(timeout=120)
    assert not thread.is_alive() and raised == []
