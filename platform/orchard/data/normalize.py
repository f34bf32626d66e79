"""Feature scaling fitted on the training split only, then applied to every split.

Stats are stored as computed (a constant feature has std 0 / range 0); when applied, a zero scale
counts as 1 so such a feature becomes 0 (standard) or stays shifted to 0 (minmax) instead of NaN.
The fit is one streaming aggregate over the feature vectors (Spark ML's ``Summarizer``: one
expression whatever the width); applying them is vectorized numpy in ``rowparse.Scaler``.
"""

from __future__ import annotations

import math

from pyspark.sql import DataFrame

from orchard.config import SpecError

EMPTY_TRAIN = "data.split: the training split is empty; there are too few clean rows for this split"


def fit(train: DataFrame | None, method: str, n_features: int) -> dict[str, list[float]]:
    """Per-feature statistics of ``train``'s ``_v``: {"mean","std"} (population), {"min","max"} or {}."""
    if train is None:
        raise SpecError(EMPTY_TRAIN)
    if method == "none":
        return {}
    first, second = ("mean", "std") if method == "standard" else ("min", "max")
    if n_features == 0:
        return {first: [], second: []}
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.stat import Summarizer

    metrics = ("mean", "variance", "count") if method == "standard" else ("min", "max", "count")
    got = train.select(Summarizer.metrics(*metrics).summary(array_to_vector("_v")).alias("s")).first()["s"]
    n = int(got["count"])
    if n == 0:
        raise SpecError(EMPTY_TRAIN)
    if method == "standard":
        # Summarizer's variance is the sample variance; the stats are population ones (like numpy's std).
        spread = [math.sqrt(max(v, 0.0) * (n - 1) / n) for v in got["variance"].toArray()]
        return {"mean": [float(v) for v in got["mean"].toArray()], "std": spread}
    return {"min": [float(v) for v in got["min"].toArray()], "max": [float(v) for v in got["max"].toArray()]}
