"""Fault tolerance for real: Ray Train workers killed (SIGKILL, a death mid-checkpoint-copy, K+1 deaths),
a rank stopped inside a collective, the whole driver killed."""

import json
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
from orchard.engine.checkpoint import is_complete, load_checkpoint
from orchard.models import build_model
from orchard.progress import FILE_NAME, read_progress

pytestmark = pytest.mark.slow
EPOCHS, KILL_IN = 6, 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared")  # shared, so Spark prepares digits once for the module


def _spec(tmp_path: Path, data_root: Path, max_failures: int, batch_size: int = 4, **scaling) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"ft-{max_failures}", "kind": "train",
        "data": {"source": "sklearn:digits", "output": str(data_root), "spark": {"master": "local[1]"}},
        # Small batches make an epoch take seconds, so the kill lands inside one.
        "model": {"family": "mlp", "hidden": [256, 256]},
        "train": {"epochs": EPOCHS, "batch_size": batch_size, "optimizer": "adam", "lr": 0.001},
        "scaling": {"num_workers": 2, "use_gpu": False, "max_failures": max_failures,
                    "storage_path": str(tmp_path / "ray"), **scaling},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def _fault(tmp_path: Path, point: str, epoch: int, rank: int, times: int) -> dict[str, str]:
    """The environment that arms orchard.train.faults in the job's Ray workers (they inherit it)."""
    fault = {"point": point, "epoch": epoch, "rank": rank, "times": times, "count_file": str(tmp_path / "deaths")}
    return {"ORCHARD_TRAIN_FAULT": json.dumps(fault)}


def _deaths(tmp_path: Path) -> list[str]:
    path = tmp_path / "deaths"
    return path.read_text().splitlines() if path.is_file() else []


def _checkpoints(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir())


def _progress_epoch(root: Path) -> int:
    states = [read_progress(p) or {} for p in root.glob(f".orchard/runs/*/{FILE_NAME}")]
    return max((int(s.get("epoch", 0)) for s in states), default=0)


def _wait_for_epoch(root: Path, epoch: int, timeout: float = 600) -> None:  # Spark prep included
    deadline = time.time() + timeout
    while _progress_epoch(root) < epoch:
        assert time.time() < deadline, f"epoch {epoch} never finished"
        time.sleep(0.2)


def _kill_one_train_worker(driver: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Signal one Ray Train worker of *this* job: only the driver's descendants are candidates."""
    deadline = time.time() + 60
    while time.time() < deadline:
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if any("RayTrainWorker" in part for part in _cmdline(p))]
        if workers:
            os.kill(workers[-1].pid, sig)
            return workers[-1].pid
        time.sleep(0.2)
    raise AssertionError("no Ray Train worker process found under the driver")


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _start(spec: JobSpec, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`orchard run` as a user starts it, in its own process group (so a test can kill the whole driver)."""
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-m", "orchard.cli", "run", str(path), *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def _steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, metric)]


def _only_run(spec: JobSpec):
    client = MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _reported_after_death(root: Path, epoch: int) -> bool:
    """The progress file shows ``epoch`` reported by a worker group started after the injected death."""
    deaths = root / "deaths"
    if not deaths.is_file():
        return False
    died = deaths.stat().st_mtime
    states = [read_progress(p) or {} for p in root.glob(f".orchard/runs/*/{FILE_NAME}")]
    return any(int(s.get("epoch", 0)) >= epoch and float(s.get("report_at", 0)) > died for s in states)


def _run_killing_a_worker(spec: JobSpec, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start the job; once the injected death has happened and the restarted group has reported epoch
    KILL_IN - 1, SIGKILL one of its workers (inside epoch KILL_IN); return (exit code, output)."""
    driver = _start(spec, tmp_path, env=env)
    deadline = time.time() + 600  # Spark prep included
    while not _reported_after_death(tmp_path, KILL_IN - 1):
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        assert time.time() < deadline, f"epoch {KILL_IN - 1} was never reported after the injected death"
        time.sleep(0.2)
    _kill_one_train_worker(driver)
    out, _ = driver.communicate(timeout=600)
    return driver.returncode, out


def _values(client: MlflowClient, run_id: str, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)]


def test_killed_workers_are_replaced_and_training_resumes_from_the_last_complete_checkpoint(tmp_path, data_root):
    # Two failures: rank 0 dies while Ray copies epoch 2's checkpoint to storage (half the model file
    # written), then, after the restart, a worker is SIGKILLed inside epoch KILL_IN.
    spec = _spec(tmp_path, data_root, max_failures=2)
    code, out = _run_killing_a_worker(spec, tmp_path, env=_fault(tmp_path, "upload", 2, rank=0, times=1))
    assert code == 0, out[-3000:]
    assert len(_deaths(tmp_path)) == 1
    client, run = _only_run(spec)
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS + 1))  # each epoch once
    assert _values(client, run.info.run_id, "train/restarts") == [1, 2]
    history = client.get_metric_history(run.info.run_id, "train/resumed_from")
    resumed = [m.value for m in sorted(history, key=lambda m: m.timestamp)]
    # The interrupted epoch-2 checkpoint was never used: the first restart went back to epoch 1's.
    assert resumed[0] == 1 and resumed[-1] >= KILL_IN - 1, ([(m.step, m.value) for m in history], out[-3000:])
    partial = [c for c in _checkpoints(tmp_path) if not is_complete(c)]
    assert len(partial) == 1, "the copy killed half-way left one incomplete folder in storage"
    assert run.data.metrics["test/accuracy"] > 0.9


def _load_all(spec: JobSpec, data_root: Path, checkpoints: list[Path]) -> list[int]:
    from orchard.data.manifest import load_manifest

    prepared = load_manifest(next(p.parent for p in data_root.glob("*/manifest.json")))
    return [load_checkpoint(c, build_model(spec, prepared.manifest))["epoch"] for c in checkpoints]


def test_max_failures_k_with_k_plus_1_worker_deaths_fails_after_exactly_k_restarts(tmp_path, data_root):
    k = 1
    spec = _spec(tmp_path, data_root, max_failures=k, batch_size=32)
    # Rank 1 exits as it starts epoch 3, on the first attempt and again on each restart (from epoch 2's checkpoint).
    driver = _start(spec, tmp_path, env=_fault(tmp_path, "epoch", 3, rank=1, times=k + 2))
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 1, out[-3000:]
    assert "failed:" in out
    assert len(_deaths(tmp_path)) == k + 1  # the (k+1)th death was final: no further attempt started
    client, run = _only_run(spec)
    assert run.info.status == "FAILED"
    assert _values(client, run.info.run_id, "train/restarts") == list(range(1, k + 1))
    assert _steps(client, run.info.run_id, "train/loss") == [1, 2]
    # Every checkpoint Ray registered (the two epochs before the deaths) is complete and loads.
    assert sorted(_load_all(spec, data_root, _checkpoints(tmp_path))) == [1, 2]


def test_a_rank_stopped_inside_a_collective_fails_the_job_within_collective_timeout(tmp_path, data_root):
    timeout_s = 10
    spec = _spec(tmp_path, data_root, max_failures=0, collective_timeout_s=timeout_s)
    # Ray's own teardown waits 30 s (TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S) for the stopped rank to leave
    # its process group; 5 s here keeps the test short without changing what is bounded.
    driver = _start(spec, tmp_path, env={"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"})
    stopped = None
    try:
        _wait_for_epoch(tmp_path, 1)
        # SIGSTOP one rank mid-epoch: the other blocks in its next gradient all-reduce, waiting for it.
        stopped = _kill_one_train_worker(driver, signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = driver.communicate(timeout=300)
        took = time.monotonic() - t0
    finally:
        if stopped is not None and psutil.pid_exists(stopped):
            os.kill(stopped, signal.SIGCONT)
            os.kill(stopped, signal.SIGKILL)
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    print(f"stopped rank: job ended {took:.1f} s after SIGSTOP (collective_timeout_s={timeout_s})")
    assert driver.returncode == 1, out[-3000:]
    _, run = _only_run(spec)
    assert run.info.status == "FAILED"
    # The timeout, then Ray's bounded teardown of the group (5 s process-group shutdown wait on the stopped
    # rank, 5 s for the workers) and the driver's: never the hours of a collective without a timeout.
    assert timeout_s <= took < 120, took


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
    # Resubmitted with --resume once it finished: refused, never a silent resume of the finished run.
    again = _start(spec, tmp_path, "--resume")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 2 and "finished: nothing to resume" in out, out[-3000:]
    assert _only_run(spec)[1].info.run_id == run.info.run_id


def test_resume_without_an_unfinished_run_is_refused(tmp_path, data_root):
    import yaml

    spec = _spec(tmp_path, data_root, max_failures=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "orchard.cli", "run", str(path), "--resume"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "no unfinished run" in out.stdout
