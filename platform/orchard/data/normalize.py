"""Feature scaling fitted on the training split only, then applied to every split.

Stats are stored as computed (a constant feature has std 0 / range 0); when applied, a zero scale
counts as 1 so such a feature becomes 0 (standard) or stays shifted to 0 (minmax) instead of NaN.
The fit is one streaming pass over the packed feature vectors (``rowparse.Moments`` per Arrow batch,
merged on the driver); applying them is vectorized numpy in ``rowparse.Scaler``.
"""

from __future__ import annotations

import math

from pyspark.sql import DataFrame

from orchard.config import SpecError
from orchard.data import rowparse

EMPTY_TRAIN = "data.split: the training split is empty; there are too few clean rows for this split"


def fit(train: DataFrame | None, method: str, n_features: int) -> dict[str, list[float]]:
    """Per-feature statistics of ``train``'s ``_v``: {"mean","std"} (population), {"min","max"} or {}."""
    # The parser travels by value to Spark's workers (see readers.parse).
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(rowparse)
    if train is None:
        raise SpecError(EMPTY_TRAIN)
    if method == "none":
        return {}
    first, second = ("mean", "std") if method == "standard" else ("min", "max")
    if n_features == 0:
        return {first: [], second: []}
    parts = train.select("_v").mapInArrow(rowparse.Moments(n_features), rowparse.Moments.SCHEMA).collect()
    n, mean, m2, low, high = rowparse.merge(parts, n_features)
    if n == 0:
        raise SpecError(EMPTY_TRAIN)
    if method == "standard":
        return {"mean": [float(v) for v in mean], "std": [math.sqrt(max(v, 0.0) / n) for v in m2]}
    return {"min": [float(v) for v in low], "max": [float(v) for v in high]}
