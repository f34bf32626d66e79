"""The tracking server goes away for 60 s in the middle of a submitted training job: it must not notice.

The job is submitted with ``orchard submit --follow`` to a real 2-node Ray cluster (``ray start``).

A real ``mlflow server`` (PostgreSQL backend when ``ORCHARD_TEST_PG_URI`` is set, else SQLite) is
stopped once epoch 1 is logged, kept down for 60 s (the issue's figure) and restarted on the same port
with the same backend. This test takes ~3-4 minutes on a 2-core box: the outage alone is 60 s plus a
server restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.remote.test_cluster import Stack
from tests.tracking.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# ~1.8-2.1 s an epoch here (2 Ray workers, digits CNN): training spans most of the outage, and a job whose
# training ends first waits for the server at the end of its run (tracking.outage_grace_s, 300 s). 40, not
# 25: on 2026-12-06 CI, with a heavy test beside it, epoch 1 reached the server only ~35 s into training
# and the remaining 24 epochs were all logged before the server went down.
EPOCHS = 40
OUTAGE_S = 60


def _first_run(client: MlflowClient, deadline: float, job: subprocess.Popen):
    while time.monotonic() < deadline and job.poll() is None:
        exp = client.get_experiment_by_name("digits-cnn")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val/accuracy"):
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no epoch logged (job rc={job.poll()})")


def test_job_survives_a_60s_tracking_outage_and_its_run_holds_every_epoch(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    cluster = Stack()
    dashboard = cluster.ray_cluster()
    out = tmp_path / "job.out"
    job = None
    try:
        cluster.wait_nodes(dashboard, 2)
        job = subprocess.Popen(
            [sys.executable, "-m", "orchard.cli", "submit", "jobs/digits-cnn.yaml", "--follow",
             "--address", dashboard, "--set", f"train.epochs={EPOCHS}"],
            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": server.uri},
            stdout=open(out, "w"), stderr=subprocess.STDOUT)
        client = MlflowClient(server.uri)
        run_id = _first_run(client, time.monotonic() + 240, job)
        server.stop()
        down_ms = int(time.time() * 1000)
        time.sleep(OUTAGE_S)
        assert job.poll() is None, "job ended while the server was down:\n" + out.read_text()[-3000:]
        up_ms = int(time.time() * 1000)
        server.start()  # same port, same backend
        assert job.wait(timeout=600) == 0, out.read_text()[-3000:]

        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run_id, "val/accuracy")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch, exactly once
        # Metrics logged while the server was down kept their own timestamps: they were buffered, not late.
        assert any(down_ms <= m.timestamp <= up_ms for m in history)
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert any(down_ms <= m.timestamp <= up_ms for m in cpu), "system metrics kept sampling through the outage"
        assert client.search_logged_models([run.info.experiment_id]), "model logged after the outage"

        # The job ran in the shipped copy of the project on the cluster; its log and buffer are there.
        shipped = Path(cluster.tmp)
        log = next(shipped.rglob(".orchard/runs/digits-cnn-*/engine.log")).read_text()
        # Warned once per outage, not per epoch. Under CI load a request can also time out before the
        # planned outage (QUICK_TIMEOUT_S, 15 s: on 2026-12-07 one did, 8 metrics were buffered and flushed
        # seconds later); that is an outage of its own as the job sees it, announced and closed once.
        outages = log.count("tracking server unreachable")
        assert 1 <= outages <= 3, f"warned once per outage, not per epoch: {outages} in {EPOCHS} epochs"
        assert log.count("tracking server back") == outages, "every outage announced is closed once"
        assert "Retrying (" not in log  # no per-request retry flood from urllib3
        assert not list(shipped.rglob(".orchard/tracking-buffer/*.jsonl"))  # all replayed
        followed = out.read_text()
        assert "SUCCEEDED" in followed
        assert followed.count("tracking server unreachable") == outages  # the user saw each one once
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        cluster.close()
        server.close()
