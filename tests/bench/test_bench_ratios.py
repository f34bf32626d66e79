"""How ``orchard bench`` turns alternated measurements into a ratio with its spread (no engines run)."""

from __future__ import annotations

import pytest

from orchard.bench import spread_text
from orchard.bench.train import _brackets, ratio_row


def test_each_repeat_is_compared_with_the_baselines_either_side_of_it():
    assert _brackets([100.0, 120.0, 80.0]) == [110.0, 100.0]


def test_ratio_is_the_ratio_of_the_means_and_the_spread_its_lowest_and_highest_repeat():
    r = ratio_row("mlp", "m", "samples/s", [55.0, 90.0], [110.0, 100.0])
    assert r.ratio == pytest.approx(145 / 210)
    assert r.spread == pytest.approx([0.5, 0.9])
    assert r.repeats == 2
    assert r.spread[0] <= r.ratio <= r.spread[1]


def test_printed_spread_names_its_range_and_repeats():
    assert spread_text({"ratio": 0.7, "spread": [0.5, 0.9], "repeats": 2}) == "0.50–0.90 (n=2)"
    assert spread_text({"ratio": None, "spread": None}) == ""
