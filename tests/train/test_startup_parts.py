"""The fixed-cost parts a Ray Train run records, from its wall-clock stamps and the controller's report times;
the actor the controller first waits for is created early, in a process Ray pre-started."""

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
