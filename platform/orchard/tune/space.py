"""The spec's ``tune.space`` as a Ray Tune param space, and a trial's config back as spec values.

Distribution strings were parsed and checked against the schema by ``config`` before any compute; here
they become ``ray.tune`` samplers. Choices that are not plain scalars (``model.hidden: choice([[64],
[128, 64]])``) travel as JSON strings: Optuna's categorical distribution takes only scalars, and the
config shown by Tune, Optuna and the trials table stays readable.
"""

from __future__ import annotations

import json
from typing import Any

from orchard.config import TuneSpec, parse_distribution

SCALARS = (str, int, float, bool, type(None))


def _encoded(values: list[Any]) -> bool:
    return any(not isinstance(v, SCALARS) for v in values)


def param_space(tune_spec: TuneSpec) -> tuple[dict[str, Any], list[str]]:
    """(Ray Tune param space, keys whose values are JSON strings)."""
    from ray import tune

    space: dict[str, Any] = {}
    encoded: list[str] = []
    for key, text in tune_spec.space.items():
        name, args = parse_distribution(text)
        if name in ("choice", "grid"):
            values = list(args[0])
            if _encoded(values):
                encoded.append(key)
                values = [json.dumps(v) for v in values]
            grid = name == "grid" or tune_spec.searcher == "grid"
            space[key] = tune.grid_search(values) if grid else tune.choice(values)
        elif name == "uniform":
            space[key] = tune.uniform(float(args[0]), float(args[1]))
        elif name == "loguniform":
            space[key] = tune.loguniform(float(args[0]), float(args[1]))
        else:  # randint: both ends included (Ray's upper bound is exclusive)
            space[key] = tune.randint(int(args[0]), int(args[1]) + 1)
    return space, encoded


def decode(config: dict[str, Any], encoded: list[str]) -> dict[str, Any]:
    """A trial's config as spec values (JSON-encoded choices decoded)."""
    return {k: json.loads(v) if k in encoded and isinstance(v, str) else v for k, v in config.items()}
