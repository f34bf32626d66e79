"""``orchard bench train`` runs end to end (at a small scale: a smoke run, not a measurement)."""

from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_bench_train_reports_every_ratio_of_every_case(tmp_path):
    from orchard.bench import write_report
    from orchard.bench.train import CASES, run

    results = run(progress=lambda _msg: None, scale=0.02)
    report = write_report("train", results, tmp_path / "bench.json")
    got = {(r["case"], r["metric"]) for r in report["results"]}
    for case in CASES:
        assert {(case, "platform / plain loop"), (case, "Ray Data fed / in-memory fed"),
                (case, "fixed cost of a run")} <= got
    assert ("mlp", "2 workers / 1 worker") in got
    for r in report["results"]:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        if r["ratio"] is not None:
            # Throughput ratios of the same work: far outside this band means a side measured nothing.
            assert 0.05 < r["ratio"] < 20, r
    assert (tmp_path / "bench.json").is_file()
