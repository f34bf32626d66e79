"""The picklable handle that logs metrics into an existing run from any process.

Anything that logs from another process (the Ray Train controller's callback) gets a ``RunLogger``
holding only the tracking URI and run id, so a restarted worker group can never open a second run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from orchard.tracking.buffer import MetricBuffer, log_or_buffer

BUFFER_DIR = ".orchard/tracking-buffer"


def default_buffer_dir() -> Path:
    """Where unsent metrics wait during a tracking outage (absolute: Ray actors run from another folder)."""
    return (Path.cwd() / BUFFER_DIR).resolve()


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle for logging metrics into an existing run from any process.

    During a tracking-server outage the metrics go to the run's on-disk buffer (see ``buffer.py``) and are
    replayed, in order, by the next call that gets through: training never waits on MLflow's retries.
    """

    tracking_uri: str
    run_id: str
    buffer_dir: str | None = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    @property
    def buffer(self) -> MetricBuffer:
        return MetricBuffer(self.buffer_dir or default_buffer_dir(), self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> bool:
        """Log one step's metrics (one request: sync log_metric costs ~2 ms each on SQLite).

        Returns False if they were buffered because the server is unreachable.
        """
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, int(step)] for k, v in metrics.items() if v is not None]
        if not rows:
            return True
        return log_or_buffer(self.buffer, self.tracking_uri, self.run_id, rows)
