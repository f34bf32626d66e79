"""``orchard bench NAME``: throughput measured against a baseline in the same run (ratios).

A ratio comes with ``spread``: the lowest and highest of its per-repeat ratios (each repeat's measurement
over the baseline measured next to it), over ``repeats`` repeats.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Result:
    case: str
    metric: str
    unit: str
    value: float
    baseline: float | None = None
    ratio: float | None = None
    note: str = ""
    spread: list[float] | None = None  # [lowest, highest] per-repeat ratio (or value, for a row without a ratio)
    repeats: int | None = None


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_report(name: str, results: list[Result], path: str | Path | None) -> dict[str, Any]:
    report = {"bench": name, "machine": machine(), "results": [asdict(r) for r in results]}
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
    return report


def spread_text(r: dict[str, Any]) -> str:
    """``0.91–0.97 (n=3)``, as printed next to a ratio; empty without a spread."""
    if not r.get("spread"):
        return ""
    lo, hi = r["spread"]
    fmt = (lambda v: f"{v:.2f}") if r.get("ratio") is not None or abs(hi) < 100 else (lambda v: f"{v:,.0f}")
    return f"{fmt(lo)}–{fmt(hi)} (n={r.get('repeats')})"


BENCHES = {"train": "orchard.bench.train:run", "train-gpu": "orchard.bench.gpu:run",
           "federated": "orchard.bench.federated:run"}
