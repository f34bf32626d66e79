"""The outage buffer against a real ``mlflow server``: a closed port stands for the server being down."""

from __future__ import annotations

import logging
import time

import pytest
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from orchard.tracking import RunLogger, TrackingUnavailable, check_reachable, sync_buffer
from orchard.tracking.buffer import MetricBuffer
from tests.tracking.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def buf_dir(tmp_path):
    return tmp_path / "buffer"  # a folder of its own: a full sync removes it


@pytest.fixture
def run_id(server):
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("buffer-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("buffer-tests")
    return client.create_run(exp_id).info.run_id


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "orchard.tracking" and text in r.getMessage()]


def test_closed_port_buffers_each_epoch_fast_warns_once_and_sync_replays_with_original_steps_and_times(
        server, run_id, buf_dir, caplog):
    caplog.set_level(logging.WARNING, logger="orchard.tracking")
    down = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, str(buf_dir))
    for epoch in (1, 2, 3):
        t0 = time.perf_counter()
        assert down.log_metrics({"val/accuracy": epoch / 10, "train/loss": 1 / epoch}, epoch) is False
        # MLflow's default retries would hold one epoch for minutes; the buffered call must not.
        assert time.perf_counter() - t0 < 5
    assert len(_warnings(caplog, "unreachable")) == 1
    buf = MetricBuffer(buf_dir, run_id)
    stamps = {r["metrics"][0][3]: r["metrics"][0][2] for r in buf.records()}  # step -> timestamp
    assert buf.metric_count() == 6 and sorted(stamps) == [1, 2, 3]

    assert sync_buffer(buf_dir, uri=server.uri) == 6
    history = MlflowClient(server.uri).get_metric_history(run_id, "val/accuracy")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [(s, s / 10, stamps[s]) for s in (1, 2, 3)]
    assert not buf_dir.exists()  # buffer, lock and counter (and the emptied folder) removed after a full sync


def test_next_call_that_gets_through_replays_the_buffer_first_and_says_so_once(server, run_id, buf_dir, caplog):
    caplog.set_level(logging.WARNING, logger="orchard.tracking")
    down = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, str(buf_dir))
    for epoch in (1, 2):
        down.log_metrics({"val/accuracy": epoch / 10}, epoch)
    up = RunLogger(server.uri, run_id, str(buf_dir))
    assert up.log_metrics({"val/accuracy": 0.3}, 3) is True
    assert up.log_metrics({"val/accuracy": 0.4}, 4) is True
    steps = sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "val/accuracy"))
    assert steps == [1, 2, 3, 4]  # each epoch exactly once
    assert not MetricBuffer(buf_dir, run_id).pending()
    assert len(_warnings(caplog, "unreachable")) == 1
    back = _warnings(caplog, "back")
    assert len(back) == 1 and "flushed 2 metrics" in back[0]


def test_request_the_server_rejects_is_raised_not_buffered(server, buf_dir):
    logger = RunLogger(server.uri, "0" * 32, str(buf_dir))  # no such run: a 404, not an outage
    with pytest.raises(RestException):
        logger.log_metrics({"val/accuracy": 0.5}, 1)
    assert not MetricBuffer(buf_dir, "0" * 32).pending()


def test_sync_while_server_still_down_keeps_the_buffer(run_id, buf_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    RunLogger(dead, run_id, str(buf_dir)).log_metrics({"val/accuracy": 0.5}, 1)
    with pytest.raises(TrackingUnavailable, match="still unreachable"):
        sync_buffer(buf_dir)
    assert MetricBuffer(buf_dir, run_id).metric_count() == 1


def test_unreachable_server_at_run_start_fails_fast_with_the_uri(server):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailable, match=dead):
        check_reachable(dead)
    assert time.perf_counter() - t0 < 5
    check_reachable(server.uri)  # a live one passes
