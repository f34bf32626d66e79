"""``orchard bench NAME``: throughput measured against a baseline in the same run (ratios).

A ratio comes with ``spread``: the lowest and highest of its per-repeat ratios (each repeat's measurement
over the baseline measured next to it), over ``repeats`` repeats.
"""

from __future__ import annotations

import json
import os
import platform
import threading
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


_PF_FORKNOEXEC = 0x40  # task flag: forked, has not exec'd since (include/linux/sched.h)


def _own_pages(pid: int, rss: dict[int, int]) -> int:
    """What a process adds to its tree's memory: its RSS, or, for a child that has forked and not exec'd
    (the JVM spawning a process, Spark's daemon forking a worker, a fork pool), only its private pages.

    Such a child maps its parent's pages (shared copy-on-write, or after vfork the very same address
    space), so its RSS counts the parent again; the pages it has written since the fork, or that its parent
    has dropped, are its own (``Private_*`` in ``smaps_rollup``). The RSS alone cannot tell them apart: a
    fresh copy's RSS differs from its parent's by the shared-library pages either has touched since (a few
    MiB, more than 2% of a small parent). A root whose parent is outside the tree is counted whole.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # The name sits in parentheses and may hold spaces; the fields after it start with state, ppid.
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, flags = int(fields[1]), int(fields[6])
        if not flags & _PF_FORKNOEXEC or ppid not in rss:
            return rss[pid]
    except (OSError, ValueError, IndexError):
        return rss[pid]
    private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_"):
                    private += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0  # gone since its stat was read: its own pages went with it
    return private


class PeakRSS:
    """Peak resident memory of a process (this one by default) and all its descendants, sampled every 0.1 s.

    Descendants include Spark's JVM and Python workers, Ray's raylet and workers.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        rss: dict[int, int] = {}
        for p in tree:
            try:
                rss[p.pid] = p.memory_info().rss
            except psutil.Error:
                pass
        return sum(_own_pages(pid, rss) for pid in rss)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> PeakRSS:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


BENCHES = {"train": "orchard.bench.train:run", "train-gpu": "orchard.bench.gpu:run",
           "federated": "orchard.bench.federated:run", "prep": "orchard.bench.prep:run",
           "serve": "orchard.bench.serve:run", "spec-to-model": "orchard.bench.spec_to_model:run"}
