"""A light job for tracking fault tests: Orchard's real run lifecycle (``JobRun``/``RunLogger``), no engine.

``python -m tests.tracking.tracking_job URI EXPERIMENT STEPS KEYS INTERVAL_S`` opens a run like ``orchard run``
does (tags, spec params, ``spec/resolved.yaml``), logs ``KEYS`` metrics per step for ``STEPS`` steps, one
``INTERVAL_S`` apart, through the buffered ``RunLogger``, logs an artifact before and after, and finishes the
run. Values are ``value(step, key)``, so a test can say exactly what the store must hold. It prints
``RUN <run_id>`` first and ``BUFFERED <n>`` (steps that went to the on-disk buffer) last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ("before/payload.txt", "after/payload.txt")


def value(step: int, key: int) -> float:
    return step * 1000.0 + key


def payload(run_id: str, where: str) -> str:
    return f"{where} {run_id}\n" + "x" * 4096


def main(uri: str, experiment: str, steps: int, keys: int, interval_s: float) -> None:
    from orchard.config import load_spec
    from orchard.tracking.run import JobRun

    spec = load_spec(ROOT / "jobs/diabetes-mlp.yaml",
                     [f"tracking.uri={uri}", f"tracking.experiment={experiment}", "tracking.outage_grace_s=120"])
    buffered = 0
    with JobRun(spec, buffer_dir=Path.cwd() / "buffer") as job:
        print("RUN", job.run_id, flush=True)
        job.log_text(payload(job.run_id, "before"), ARTIFACTS[0])
        for step in range(steps):
            sent = job.logger.log_metrics({f"m{k}": value(step, k) for k in range(keys)}, step)
            buffered += not sent
            time.sleep(interval_s)
        job.log_text(payload(job.run_id, "after"), ARTIFACTS[1])
    print("BUFFERED", buffered, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
