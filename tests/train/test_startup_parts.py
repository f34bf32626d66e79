"""The fixed-cost parts a Ray Train run records, from its wall-clock stamps and the controller's report times."""

from __future__ import annotations

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
