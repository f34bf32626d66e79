"""Fault tolerance for real: SIGKILL a Ray Train worker (or the whole driver) mid-epoch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from orchard.config import JobSpec
from orchard.engine.checkpoint import load_checkpoint
from orchard.models import build_model
from orchard.progress import FILE_NAME, read_progress

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
    states = [read_progress(p) or {} for p in root.glob(f".orchard/runs/*/{FILE_NAME}")]
    return max((int(s.get("epoch", 0)) for s in states), default=0)


def _wait_for_epoch(root: Path, epoch: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _progress_epoch(root) < epoch:
        assert time.time() < deadline, f"epoch {epoch} never finished"
        time.sleep(0.2)


def _kill_one_train_worker(driver: subprocess.Popen) -> int:
    """SIGKILL one Ray Train worker of *this* job: only the driver's descendants are candidates."""
    deadline = time.time() + 60
    while time.time() < deadline:
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if any("RayTrainWorker" in part for part in _cmdline(p))]
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            return workers[-1].pid
        time.sleep(0.2)
    raise AssertionError("no Ray Train worker process found under the driver")


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _start(spec: JobSpec, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """`orchard run` as a user starts it, in its own process group (so a test can kill the whole driver)."""
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-m", "orchard.cli", "run", str(path), *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, metric)]


def _only_run(spec: JobSpec):
    client = MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _run_killing_a_worker(spec: JobSpec, tmp_path: Path) -> tuple[int, str]:
    """Start the job, SIGKILL one of its workers inside epoch KILL_IN, return (exit code, output)."""
    driver = _start(spec, tmp_path)
    _wait_for_epoch(tmp_path, KILL_IN - 1)
    _kill_one_train_worker(driver)
    out, _ = driver.communicate(timeout=600)
    return driver.returncode, out


def test_a_killed_worker_is_replaced_and_training_resumes_in_the_same_run(tmp_path, data_root):
    spec = _spec(tmp_path, data_root, max_failures=1)
    code, out = _run_killing_a_worker(spec, tmp_path)
    assert code == 0, out[-3000:]
    client, run = _only_run(spec)
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS + 1))  # each epoch once
    resumed = run.data.metrics.get("train/resumed_from")
    assert resumed is not None and resumed >= KILL_IN - 1
    assert run.data.metrics["test/accuracy"] > 0.9


def test_without_retries_a_killed_worker_fails_the_run_cleanly(tmp_path, data_root):
    spec = _spec(tmp_path, data_root, max_failures=0)
    code, out = _run_killing_a_worker(spec, tmp_path)
    assert code == 1, out[-3000:]
    assert "failed:" in out
    _, run = _only_run(spec)
    assert run.info.status == "FAILED"
    checkpoints = sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert checkpoints, "the epochs before the kill left checkpoints"
    from orchard.data.manifest import load_manifest

    prepared = load_manifest(next(p.parent for p in data_root.glob("*/manifest.json")))
    for ckpt in checkpoints:
        state = load_checkpoint(ckpt, build_model(spec, prepared.manifest))
        assert 1 <= state["epoch"] < EPOCHS


def test_a_killed_driver_resumes_from_its_last_checkpoint(tmp_path, data_root):
    spec = _spec(tmp_path, data_root, max_failures=0)
    first = _start(spec, tmp_path)
    try:
        _wait_for_epoch(tmp_path, KILL_IN - 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    time.sleep(2)
    second = _start(spec, tmp_path, "--resume")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    client, run = _only_run(spec)
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS + 1))
    assert run.data.metrics["train/resumed_from"] >= KILL_IN - 1


def test_resume_without_an_unfinished_run_is_refused(tmp_path, data_root):
    import yaml

    spec = _spec(tmp_path, data_root, max_failures=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "orchard.cli", "run", str(path), "--resume"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "no unfinished run" in out.stdout
