"""Fault tolerance for real: SIGKILL a Ray Train worker (or the whole driver) mid-epoch."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orchard.config import JobSpec
from orchard.engine.checkpoint import load_checkpoint
from orchard.models import model_from_manifest

pytestmark = pytest.mark.slow
EPOCHS, KILL_IN = 6, 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared")  # shared, so Spark prepares digits once for the module


def _spec(tmp_path: Path, data_root: Path, max_failures: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"ft-{max_failures}", "kind": "train",
        "data": {"source": "sklearn:digits", "output": str(data_root), "spark": {"master": "local[1]"}},
        # Small batches make an epoch take seconds, so the kill lands inside one.
        "model": {"family": "mlp", "hidden": [256, 256]},
        "train": {"epochs": EPOCHS, "batch_size": 4, "optimizer": "adam", "lr": 0.001},
        "scaling": {"num_workers": 2, "use_gpu": False, "max_failures": max_failures,
                    "storage_path": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def _progress_epoch(root: Path) -> int:
    for p in root.glob(".orchard/runs/*/progress.json"):
        try:
            return int(json.loads(p.read_text()).get("epoch", 0))
        except (OSError, ValueError):
            return 0
    return 0


def _wait_for_epoch(root: Path, epoch: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _progress_epoch(root) < epoch:
        assert time.time() < deadline, f"epoch {epoch} never finished"
        time.sleep(0.2)


def _kill_one_train_worker() -> int:
    workers = [p for p in psutil.process_iter(["pid", "cmdline"])
               if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
    assert workers, "no Ray Train worker process found"
    victim = workers[-1]
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def _run_in_thread(spec: JobSpec, cwd: Path):
    from orchard.runner import run_job

    outcome: dict = {}

    def target():
        os.chdir(cwd)
        try:
            outcome["summary"] = run_job(spec)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    return t, outcome


def _steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, metric)]


def test_a_killed_worker_is_replaced_and_training_resumes_in_the_same_run(tmp_path, data_root, monkeypatch):
    here = os.getcwd()
    spec = _spec(tmp_path, data_root, max_failures=1)
    thread, outcome = _run_in_thread(spec, tmp_path)
    try:
        _wait_for_epoch(tmp_path, KILL_IN - 1)
        _kill_one_train_worker()
        thread.join(600)
    finally:
        os.chdir(here)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    client = MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(client, summary.run_id, "train/loss") == list(range(1, EPOCHS + 1))  # each epoch once
    resumed = runs[0].data.metrics.get("train/resumed_from")
    assert resumed is not None and resumed >= KILL_IN - 1
    assert summary.headline[1] > 0.9


def test_without_retries_a_killed_worker_fails_the_run_cleanly(tmp_path, data_root):
    here = os.getcwd()
    spec = _spec(tmp_path, data_root, max_failures=0)
    thread, outcome = _run_in_thread(spec, tmp_path)
    try:
        _wait_for_epoch(tmp_path, KILL_IN - 1)
        _kill_one_train_worker()
        thread.join(600)
    finally:
        os.chdir(here)
    assert "error" in outcome, "the job should fail"
    client = MlflowClient(spec.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])[0]
    assert run.info.status == "FAILED"
    checkpoints = sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert checkpoints, "the epochs before the kill left checkpoints"
    from orchard.data.manifest import load_manifest

    prepared = load_manifest(next(p.parent for p in data_root.glob("*/manifest.json")))
    for ckpt in checkpoints:
        state = load_checkpoint(ckpt, model_from_manifest(spec.model, prepared.manifest))
        assert 1 <= state["epoch"] < EPOCHS


def test_a_killed_driver_resumes_from_its_last_checkpoint(tmp_path, data_root):
    import yaml

    spec = _spec(tmp_path, data_root, max_failures=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "orchard.cli", "run", str(path)]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_for_epoch(tmp_path, KILL_IN - 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    time.sleep(2)
    second = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    client = MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(client, runs[0].info.run_id, "train/loss") == list(range(1, EPOCHS + 1))
    assert runs[0].data.metrics["train/resumed_from"] >= KILL_IN - 1


def test_resume_without_an_unfinished_run_is_refused(tmp_path, data_root):
    import yaml

    spec = _spec(tmp_path, data_root, max_failures=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "orchard.cli", "run", str(path), "--resume"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "no unfinished run" in out.stdout
