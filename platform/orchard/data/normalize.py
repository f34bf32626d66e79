"""Feature scaling fitted on the training split only, then applied to every split.

Stats are stored as computed (a constant feature has std 0 / range 0); when applied, a zero scale
counts as 1 so such a feature becomes 0 (standard) or stays shifted to 0 (minmax) instead of NaN.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from orchard.config import SpecError
from orchard.data.clean import value_col


def fit(train: DataFrame, method: str, n_features: int) -> dict[str, list[float]]:
    """Per-feature statistics of ``train`` in one aggregate: {"mean","std"}, {"min","max"} or {}."""
    if method == "none":
        return {}
    first, second = ("mean", "std") if method == "standard" else ("min", "max")
    agg_first, agg_second = (F.avg, F.stddev_pop) if method == "standard" else (F.min, F.max)
    cols = [value_col(i) for i in range(n_features)]
    row = train.agg(*[agg_first(c) for c in cols], *[agg_second(c) for c in cols]).first()
    values = list(row)
    if values[0] is None:
        raise SpecError(
            "data.split: the training split is empty; there are too few clean rows for this split"
        )
    return {first: [float(v) for v in values[:n_features]], second: [float(v) for v in values[n_features:]]}


def apply(method: str, stats: dict[str, list[float]], n_features: int) -> list[Column]:
    """The scaled value of each feature, as float32 columns."""
    cols = []
    for i in range(n_features):
        x = F.col(value_col(i))
        if method == "standard":
            x = (x - stats["mean"][i]) / _nonzero(stats["std"][i])
        elif method == "minmax":
            x = (x - stats["min"][i]) / _nonzero(stats["max"][i] - stats["min"][i])
        cols.append(x.cast("float"))
    return cols


def _nonzero(scale: float) -> float:
    return scale if scale != 0 else 1.0
