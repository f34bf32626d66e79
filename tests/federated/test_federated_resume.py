"""Resume for real: SIGKILL `orchard run` of a federation after a round, then `orchard run --resume`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchard.config import JobSpec
from orchard.progress import FILE_NAME, read_progress

pytestmark = pytest.mark.slow
ROUNDS, KILL_AFTER = 8, 2


def _spec(tmp_path: Path) -> JobSpec:
    return JobSpec.model_validate({
        "name": "fed-resume", "kind": "federated",
        "data": {"source": "sklearn:digits", "output": str(tmp_path / "prepared"), "spark": {"master": "local[1]"}},
        "model": {"family": "mlp", "hidden": [64]},
        # Small batches make a round take a second or two, so the kill lands between rounds 2 and 8.
        "train": {"batch_size": 8, "lr": 3e-3},
        # FedAdam: its server moments must survive the restart too.
        "federated": {"clients": 3, "rounds": ROUNDS, "local_epochs": 2, "strategy": {"name": "fedadam", "server_lr": 0.01}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False},
    })


def _start(spec: JobSpec, tmp_path: Path, *extra: str) -> subprocess.Popen:
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-m", "orchard.cli", "run", str(path), *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _round(root: Path) -> int:
    states = [read_progress(p) or {} for p in root.glob(f".orchard/runs/*/{FILE_NAME}")]
    return max((int(s.get("round", 0)) for s in states), default=0)


def test_a_killed_federation_resumes_after_its_last_round_in_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    spec = _spec(tmp_path)
    first = _start(spec, tmp_path)
    try:
        deadline = time.time() + 240
        while _round(tmp_path) < KILL_AFTER:
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.time() < deadline, "round 2 never finished"
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver, its ServerApp thread and the Ray it started
        first.wait()
    killed_at = _round(tmp_path)
    assert killed_at < ROUNDS, "the federation finished before the kill: make rounds slower"
    ckpts = sorted((tmp_path / ".orchard/federated").glob("*/round-*"))
    assert ckpts and ckpts[-1].name >= f"round-{KILL_AFTER:05d}"

    time.sleep(2)
    second = _start(spec, tmp_path, "--resume")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]

    client = MlflowClient(spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("fed/val_accuracy", "fed/clients", "fed/bytes_sent"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), (key, steps)  # every round exactly once
    assert run.data.metrics["fed/resumed_from"] >= KILL_AFTER
    # Energy per round, continued across the resume: the totals never go back.
    energy = sorted(client.get_metric_history(run.info.run_id, "energy/kwh"), key=lambda m: (m.step, m.timestamp))
    assert energy and all(m.value > 0 for m in energy)
    assert [m.value for m in energy] == sorted(m.value for m in energy)
    assert run.data.metrics["energy/co2_kg"] > 0
    assert run.data.metrics["test/accuracy"] > 0.8
