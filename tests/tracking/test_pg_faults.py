"""The tracking stack's database under stress: PostgreSQL restarted under a live server and job, and eight
jobs logging to one server at once. A real ``mlflow server`` on a fresh database of the machine's
PostgreSQL (``make services``), jobs in their own processes through Orchard's real ``JobRun``/``RunLogger``
(``tests/tracking/tracking_job.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.tracking.mlflow_server import MlflowServer
from tests.tracking.tracking_job import ARTIFACTS, payload, value

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PG = os.environ.get("ORCHARD_TEST_PG_URI", "postgresql://orchard:orchard@127.0.0.1:5432/orchard")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for both tests (a start costs ~25 s here): the second also shows it outlived the restart."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCHARD_TEST_PG_URI", PG)  # these tests are about PostgreSQL: never SQLite
        s = MlflowServer(tmp_path_factory.mktemp("pg-mlflow"))
        assert s.backend.startswith("postgresql")
        try:
            s.start(timeout_s=300)
            yield s
        finally:
            s.close()


def _job(server: MlflowServer, cwd: Path, experiment: str, steps: int, keys: int, interval_s: float):
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "tests.tracking.tracking_job", server.uri, experiment,
                             str(steps), str(keys), str(interval_s)], cwd=cwd, env=env,
                            stdout=open(cwd / "job.out", "w"), stderr=subprocess.STDOUT)


def _run_id(out: Path, job: subprocess.Popen, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("RUN "):
                return line.split()[1]
        assert job.poll() is None, out.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no run started: {out.read_text()[-3000:]}")


def _check_run(client: MlflowClient, run_id: str, steps: int, keys: int, tmp: Path) -> int:
    """Every metric, every artifact, status FINISHED; returns the number of metric values found."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "mlp" and run.data.tags["orchard.kind"] == "train"
    found = 0
    for k in range(keys):
        history = client.get_metric_history(run_id, f"m{k}")
        got = sorted((m.step, m.value) for m in history)
        assert got == [(s, value(s, k)) for s in range(steps)], f"run {run_id} m{k}: {len(got)}/{steps}"
        found += len(got)
    for path in ARTIFACTS:
        local = client.download_artifacts(run_id, path, str(tmp / run_id))
        assert Path(local).read_text() == payload(run_id, path.split("/")[0])
    assert client.download_artifacts(run_id, "spec/resolved.yaml", str(tmp / run_id))
    return found


def _pg_restart(down_s: float) -> float:
    """Stop PostgreSQL, keep it down ``down_s``, start it: a bare ``restart`` is down for ~0.1 s here,
    too short to be sure the job's calls meet it. Returns the seconds the database was away."""
    t0 = time.monotonic()
    pg = ["pg_ctlcluster", "15", "main"]
    subprocess.run([*pg, "stop"], check=True, capture_output=True, timeout=120)
    try:
        time.sleep(down_s)
    finally:
        subprocess.run([*pg, "start"], check=True, capture_output=True, timeout=120)
    return time.monotonic() - t0


def test_postgres_restart_under_a_live_server_and_job_loses_no_run_metric_or_artifact(server, tmp_path):
    steps, keys = 40, 3  # ~10 s of logging, one step every 0.25 s
    experiment = f"pg-restart-{uuid.uuid4().hex[:6]}"
    job = _job(server, tmp_path / "job", experiment, steps, keys, 0.25)
    out = tmp_path / "job" / "job.out"
    try:
        run_id = _run_id(out, job)
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 60
        while not client.get_metric_history(run_id, "m0"):  # the job is logging: restart under it
            assert time.monotonic() < deadline and job.poll() is None, out.read_text()[-3000:]
            time.sleep(0.2)
        took = _pg_restart(3.0)
        assert job.wait(timeout=300) == 0, out.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert server.proc.poll() is None, "the MLflow server survived its database's restart"
    found = _check_run(client, run_id, steps, keys, tmp_path)
    assert found == steps * keys
    buffered = int(out.read_text().split("BUFFERED")[-1].split()[0])
    print(f"postgres down {took:.1f} s; metrics present {found}/{steps * keys}; steps buffered {buffered}")
    assert buffered > 0, "the job's logging met the restart (else this test proves nothing)"
    assert not (tmp_path / "job" / "buffer" / f"{run_id}.jsonl").exists(), "buffer replayed and removed"
    # The server answers new work after the restart too (its pool reconnected).
    assert client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_eight_jobs_logging_to_one_server_at_once_keep_every_metric(server, tmp_path):
    jobs_n, steps, keys = 8, 25, 4
    experiment = f"eight-{uuid.uuid4().hex[:6]}"
    jobs = [_job(server, tmp_path / f"job{i}", experiment, steps, keys, 0.0) for i in range(jobs_n)]
    try:
        for i, job in enumerate(jobs):
            assert job.wait(timeout=300) == 0, (tmp_path / f"job{i}" / "job.out").read_text()[-3000:]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == jobs_n, "one run per job, no duplicate from a retried create"
    assert not [r for r in runs if r.info.status != "FINISHED"], "no run left RUNNING"
    found = sum(_check_run(client, r.info.run_id, steps, keys, tmp_path) for r in runs)
    print(f"eight jobs: metrics present {found}/{jobs_n * steps * keys}")
    assert found == jobs_n * steps * keys
