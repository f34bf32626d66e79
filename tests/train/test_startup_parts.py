"""The fixed-cost parts a Ray Train run records, from its wall-clock stamps and the controller's report times;
the actor the controller first waits for is created early, in a process Ray pre-started; the controller and
the training workers run in processes started for them before ``fit()`` (``launcher.prewarm``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from orchard.progress import write_progress
from orchard.train.launcher import startup_parts

STAMPS = {"start": 100.0, "ray_started": 102.5, "data_planned": 104.0, "fit": 104.5, "fit_returned": 120.0}
HISTORY = [{"train/epoch_seconds": 3.0}, {"train/epoch_seconds": 1.0}, {"train/epoch_seconds": 1.2}]


def test_startup_parts_split_the_fixed_cost_by_stamp_and_report_time(tmp_path):
    path = tmp_path / "progress.json"
    write_progress(path, {"epoch": 3, "first_report_at": 110.0, "report_at": 118.5})
    parts = startup_parts(STAMPS, HISTORY, path)
    assert parts["ray_start"] == pytest.approx(2.5)
    assert parts["data_plan"] == pytest.approx(1.5)
    assert parts["worker_group"] == pytest.approx(110.0 - 104.5 - 3.0)  # less epoch 1's training
    assert parts["first_epoch_extra"] == pytest.approx(3.0 - 1.1)  # over the median later epoch
    assert parts["teardown"] == pytest.approx(1.5)


def test_startup_parts_without_a_progress_file_leave_out_what_needs_report_times():
    parts = startup_parts(STAMPS, HISTORY, None)
    assert set(parts) == {"ray_start", "data_plan", "first_epoch_extra"}


_COORDINATOR = textwrap.dedent("""
    import json, time
    import psutil, ray
    from orchard.raystart import start_ray
    from orchard.train.launcher import _autoscaling_coordinator_now

    def workers(title):
        found = set()
        for child in psutil.Process().children(recursive=True):
            try:
                if any(a.startswith(title) for a in child.cmdline()):
                    found.add(child.pid)
            except psutil.Error:
                pass
        return found

    start_ray(2)
    deadline = time.time() + 60
    while not workers("ray::IDLE") and time.time() < deadline:  # the workers Ray pre-starts for a driver
        time.sleep(0.2)
    idle = workers("ray::IDLE")
    _autoscaling_coordinator_now()
    actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(actor.get_allocated_resources.remote("probe"), timeout=60)
    print(json.dumps({"idle": sorted(idle), "host": sorted(workers("ray::_AutoscalingCoordinatorActor"))}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_the_autoscaling_coordinator_is_created_early_on_a_worker_ray_pre_started():
    out = subprocess.run([sys.executable, "-c", _COORDINATOR], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["idle"], "Ray pre-started no worker for the driver"
    # The actor Ray Train's controller waits for runs in a pre-started process, not in a fresh one.
    assert len(got["host"]) == 1 and got["host"][0] in got["idle"], got


_PREWARMED = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import psutil, ray
    from orchard.config import JobSpec
    from orchard.data.manifest import load_manifest
    from orchard.raystart import start_ray
    from orchard.train.launcher import prewarm, run_training

    def titled():
        found = {}
        for child in psutil.Process().children(recursive=True):
            try:
                found[child.pid] = (child.cmdline() or [""])[0].strip()
            except psutil.Error:
                pass
        return found

    def torch_loaded(pid):
        try:
            return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False

    spec = JobSpec.model_validate({
        "name": "prewarm", "kind": "train", "model": {"family": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 64},
        "scaling": {"num_workers": 2, "use_gpu": False, "storage_path": sys.argv[2]}})
    start_ray(3)
    time.sleep(3)  # Ray's own idle workers for the driver are up
    before = set(titled())
    prewarm(spec)
    # Every process asked for, or 90 s: on a loaded machine the raylet can drop a queued request (seen in
    # CI: one of the two training workers), and that process then starts fresh, as without prewarm.
    wanted = 1 + spec.scaling.num_workers + 2
    deadline = time.time() + 90
    while time.time() < deadline:
        idle = {p for p, t in titled().items() if t == "ray::IDLE" and p not in before}
        if len(idle) >= wanted and sum(map(torch_loaded, idle)) >= spec.scaling.num_workers:
            break
        time.sleep(0.2)
    preloaded = {p for p in idle if torch_loaded(p)}
    seen, stop = {}, threading.Event()

    def watch():
        while not stop.is_set():
            for pid, title in titled().items():
                if title in ("ray::TrainController", "ray::RayTrainWorker", "ray::PlacementGroupCleaner"):
                    seen.setdefault(title, set()).add(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_training(spec, load_manifest(Path(sys.argv[1])))
    stop.set()
    watcher.join()
    print(json.dumps({"idle": sorted(idle), "preloaded": sorted(preloaded), "wanted": wanted,
                      "seen": {k: sorted(v) for k, v in seen.items()}, "epochs": len(result.history)}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_runs_controller_and_workers_take_the_processes_prewarm_started_with_torch_imported(
        digits_prepared, tmp_path):
    # Ray Train gives its controller and workers a runtime env; a worker started for another env (or a
    # string that serializes it differently) would not serve them and they would start fresh processes.
    out = subprocess.run([sys.executable, "-c", _PREWARMED, str(digits_prepared.path), str(tmp_path / "ray")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["epochs"] == 1
    assert got["preloaded"], got  # a training worker's setup hook imported torch while it was idle
    seen = got["seen"]
    assert len(seen["ray::RayTrainWorker"]) == 2, got
    # Every worker pre-started with torch served the run as a training worker (its env string matched).
    assert set(got["preloaded"]) <= set(seen["ray::RayTrainWorker"]), got
    # The controller ran in a process started for it, without the workers' setup hook.
    assert seen["ray::TrainController"] and set(seen["ray::TrainController"]) <= set(got["idle"]) - set(got["preloaded"]), got
