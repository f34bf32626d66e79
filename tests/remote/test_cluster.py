"""`orchard submit` against a real 2-node Ray cluster, tracking into a real MLflow server on PostgreSQL.

The services start from `orchard.remote.services` (what docker-compose runs): `ray start --head`, a second
`ray start --address=...` node, and `mlflow server` backed by the machine's PostgreSQL (`make services`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from orchard.remote import services
from tests.net import free_port, kill_strays, stop_group, wait_for
from tests.tracking.leaks import leaks, secret_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG = os.environ.get("ORCHARD_TEST_PG_URI", "postgresql://orchard:orchard@127.0.0.1:5432/orchard")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class Stack:
    """Processes in their own sessions, killed (with Ray's daemons under our temp dir) at the end."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="orc-cl-", dir="/tmp")  # short: Ray's socket paths live under it
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        argv = [str(BIN / argv[0]), *argv[1:]]
        proc = subprocess.Popen(argv, env=env, start_new_session=True, cwd=self.tmp,
                                stdout=open(f"{self.tmp}/{log}", "wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def ray_cluster(self, extra_env: dict[str, str] | None = None, nodes: int = 2) -> str:
        env = {**os.environ, "RAY_TMPDIR": self.tmp, "PATH": f"{BIN}:{os.environ['PATH']}",
               "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
        env.pop("RAY_ADDRESS", None)
        gcs, dash = free_port(), free_port()
        agent = [f"--dashboard-agent-listen-port={free_port()}"]
        self.start(services.ray_head(port=gcs, dashboard_port=dash, num_cpus=2) + agent, env, f"head-{gcs}.log")
        for i in range(nodes - 1):
            # Its own temp dir, as a separate machine would have: nodes sharing one would unpack each
            # job's working_dir into the same folder, deleting it under the running driver.
            agent = [f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.tmp}/w{gcs % 1000}{i}"]
            self.start(services.ray_worker(f"127.0.0.1:{gcs}", num_cpus=2) + agent, env, f"worker-{gcs}-{i}.log")
        return f"http://127.0.0.1:{dash}"

    def wait_nodes(self, dashboard: str, n: int, token: str | None = None, timeout_s: float = 300) -> None:
        """Until ``n`` nodes are ALIVE; failing (or as soon as a `ray start` exits) with every log's tail."""
        deadline = time.monotonic() + timeout_s  # minutes on a busy 2-core box (two test workers)
        while (alive := _nodes_alive(dashboard, token)) != n:
            exited = [p.args for p in self.procs if p.poll() is not None and "ray" in Path(p.args[0]).name]
            if exited or time.monotonic() > deadline:
                logs = sorted(Path(self.tmp).glob("*.log")) + sorted(Path(self.tmp).rglob("session_latest/logs/raylet.out"))
                tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
                waited = timeout_s - (deadline - time.monotonic())
                raise AssertionError(f"{alive} of {n} Ray nodes alive after {waited:.0f} s; exited: {exited}\n{tails}")
            time.sleep(1)

    def close(self) -> None:
        stop_group(*self.procs)
        kill_strays(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _nodes_alive(dashboard: str, token: str | None = None) -> int:
    import json

    req = urllib.request.Request(f"{dashboard}/nodes?view=summary",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return sum(n["raylet"]["state"] == "ALIVE" for n in json.loads(r.read())["data"]["summary"])
    except OSError:
        return 0


@pytest.fixture(scope="module")
def pg_database():
    import psycopg2

    name = f"orchard_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(PG)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
    yield f"{base}/{name}"
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def stack(pg_database):
    s = Stack()
    try:
        port = free_port()
        s.start(services.mlflow_server(pg_database, f"{s.tmp}/artifacts", port=port),
                {**os.environ, **services.MLFLOW_SERVER_ENV, "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port},localhost:{port}"}, "mlflow.log")
        s.mlflow = f"http://127.0.0.1:{port}"
        s.dashboard = s.ray_cluster()
        wait_for(lambda: _up(f"{s.mlflow}/health"), "MLflow server")
        s.wait_nodes(s.dashboard, 2)
        yield s
    finally:
        s.close()


def orchard(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "orchard"), *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_submit_follow_succeeds_and_the_run_lands_in_the_mlflow_server(stack, tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    experiment = f"cluster-{uuid.uuid4().hex[:6]}"
    # The submitter's credentials (MLflow's password travels to the job in its runtime env; the cluster has
    # no token auth, so the Ray token is carried but unused): none may surface anywhere (issue 13).
    secrets = secret_env()
    out = orchard("submit", "jobs/digits-cnn.yaml", "--address", stack.dashboard, "--follow",
                  "--set", "train.epochs=2", "--set", "scaling.num_workers=2", "--set", f"tracking.experiment={experiment}",
                  env={"MLFLOW_TRACKING_URI": stack.mlflow, **secrets})
    print(out.stdout[-3000:], out.stderr[-2000:])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "submitted" in out.stdout and "SUCCEEDED" in out.stdout
    assert "storage_path=.orchard/ray_results is a local folder, but this Ray cluster has 2 nodes" in out.stdout

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [1, 2]
    assert run.data.metrics["test/accuracy"] > 0.5
    # The model artifact comes back through the server (artifacts are proxied, not read from disk).
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.source_run_id == run.info.run_id
    assert model.artifact_location.startswith("mlflow-artifacts:")  # served by the server, not a local path
    local = download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path),
                               tracking_uri=stack.mlflow)
    assert (Path(local) / "MLmodel").exists()
    assert any(p.stat().st_size > 10_000 for p in Path(local).rglob("*") if p.is_file())  # the weights

    job_id = next(w for w in out.stdout.split() if w.startswith("raysubmit_"))
    logs = orchard("jobs", "logs", job_id, "--address", stack.dashboard, env=secrets)
    assert logs.returncode == 0 and "orchard run digits-cnn" in logs.stdout
    texts = {"submit --follow": out.stdout + out.stderr, "jobs logs": logs.stdout + logs.stderr}
    texts |= {str(p): p.read_text(errors="replace") for p in Path(stack.tmp).rglob(".orchard/runs/*/engine.log")}
    assert len(texts) > 2, "the engine log of the shipped job is searched too"
    found, searched = leaks(stack.mlflow, run.info.run_id, secrets, texts, tmp_path / "scan")
    print(f"secrets: {len(secrets)} values searched in {searched} places, found in {len(found)}")
    assert not found, found


def test_a_failed_job_makes_follow_exit_non_zero(stack):
    out = orchard("submit", "jobs/digits-cnn.yaml", "--address", stack.dashboard, "--follow",
                  "--set", "data.source=no/such/file.csv")
    assert out.returncode == 1, out.stdout[-2000:]
    assert "FAILED" in out.stdout and "no/such/file.csv" in out.stdout


def test_stop_logs_and_list(stack):
    out = orchard("submit", "jobs/digits-cnn.yaml", "--address", stack.dashboard, "--set", "train.epochs=200")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = next(w for w in out.stdout.split() if w.startswith("raysubmit_"))
    wait_for(lambda: orchard("jobs", "status", job_id, "--address", stack.dashboard).stdout.strip() == "RUNNING",
              "running job", timeout_s=60)
    listed = orchard("jobs", "list", "--address", stack.dashboard)
    assert job_id in listed.stdout
    stopped = orchard("jobs", "stop", job_id, "--address", stack.dashboard)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout
    assert orchard("jobs", "status", job_id, "--address", stack.dashboard).stdout.strip() == "STOPPED"
    logs = orchard("jobs", "logs", job_id, "--address", stack.dashboard)
    assert logs.returncode == 0 and "orchard run digits-cnn" in logs.stdout
    unknown = orchard("jobs", "status", "raysubmit_nosuchjob", "--address", stack.dashboard)
    assert unknown.returncode == 1 and "error" in unknown.stdout


def test_token_auth_refuses_a_submission_without_the_token_and_accepts_it_with(stack):
    token = uuid.uuid4().hex + uuid.uuid4().hex
    secure = Stack()
    try:
        dashboard = secure.ray_cluster({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, nodes=1)
        secure.wait_nodes(dashboard, 1, token)
        without = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run([str(BIN / "orchard"), "submit", "jobs/digits-cnn.yaml", "--address", dashboard],
                                 cwd=ROOT, env=without, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert "requires token authentication" in refused.stdout and "RAY_AUTH_TOKEN" in refused.stdout
        accepted = orchard("submit", "jobs/digits-cnn.yaml", "--address", dashboard, "--set", "train.epochs=1",
                           env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert accepted.returncode == 0 and "submitted raysubmit_" in accepted.stdout, accepted.stdout
    finally:
        secure.close()


def test_a_head_started_outside_its_venv_runs_the_job_with_the_venv_python(tmp_path):
    """`.venv/bin/ray start --head` with the venv not on PATH: `python` there is another interpreter."""
    from ray.job_submission import JobSubmissionClient

    from orchard.remote import jobs

    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    system_python = shutil.which("python3", path=path)
    bare = Stack()
    try:
        dashboard = bare.ray_cluster({"PATH": path}, nodes=1)
        bare.wait_nodes(dashboard, 1)
        client = JobSubmissionClient(dashboard)
        assert jobs.cluster_python(client) == str(BIN / "python3")  # what the head's Ray workers run

        out = orchard("submit", "jobs/breast-cancer-mlp.yaml", "--address", dashboard, "--follow",
                      "--set", "train.epochs=1", "--set", "scaling.num_workers=1", "--set", "tracking.log_model=false")
        assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
        assert "No module named" not in out.stdout

        # The head's own `python` (what the job ran before): the job stops at once and says why.
        lacks = subprocess.run([system_python, "-c", "import rich"], capture_output=True) if system_python else None
        if lacks is not None and lacks.returncode != 0:
            job_id = client.submit_job(entrypoint=jobs.entrypoint("jobs/breast-cancer-mlp.yaml", [], True, "python3"),
                                       runtime_env=jobs.runtime_env(ROOT))
            assert jobs.wait(job_id, dashboard, timeout_s=300) == "FAILED"
            log = client.get_job_logs(job_id)
            assert "lacks rich" in log and "this Ray job runs /" in log and "Traceback" not in log, log[-2000:]
    finally:
        bare.close()
