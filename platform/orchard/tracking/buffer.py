"""A durable local buffer for metrics that could not reach the tracking server.

Training must not die, or stall for minutes, because the MLflow server is down. A failed ``log_batch``
appends its metrics (with their original timestamps and steps) to ``<folder>/<run_id>.jsonl``; the next
successful call, ``JobRun.finish`` or ``sync_buffer`` replays the file in order. The file is on disk and
guarded by an ``flock``, so the Ray Train controller (another process) and the driver share one buffer
per run, a restarted process finds it, and nothing is lost if the driver dies.

Each process says "unreachable" once per outage and "back" once when the buffer drains, not per epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("orchard.tracking")

# A dead server answers a refused connection at once; a hung one gets this long per attempt. MLflow's own
# default (7 retries, backoff factor 2, 120 s timeout) would stall one epoch for minutes.
QUICK_TIMEOUT_S = 15
BATCH_LIMIT = 1000  # metrics per log_batch request (MLflow's limit)
SYNC_VERB = "orchard sync-tracking"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached where it is required (run start, model logging)."""


def is_outage(exc: BaseException) -> bool:
    """True for failures a server restart cures (refused, timed out, 5xx); False for a rejected request."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # MLflow wraps refused connections and exhausted retries as INTERNAL_ERROR (500); a request the
        # server (or a local store) rejected maps to a 4xx and must not sit in the buffer forever.
        return exc.get_http_status_code() >= 500
    return isinstance(exc, requests.RequestException | OSError | TimeoutError)


# MLflow's file and SQL stores (its DATABASE_ENGINES, with or without a "+driver"): nothing to ask over HTTP.
_LOCAL_SCHEMES = frozenset({"", "file", "sqlite", "postgresql", "mysql", "mssql"})


def _rest_creds(uri: str):
    """The REST store's host credentials for ``uri``, or None for a local (SQLite, file) store.

    A file or database URI is told by its scheme, without importing mlflow or opening the store (2-4 s
    at a run's start, while Ray starts beside it); any other scheme asks MLflow which store it gets.
    """
    from urllib.parse import urlparse

    if urlparse(uri).scheme.split("+", 1)[0].lower() in _LOCAL_SCHEMES:
        return None
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking import MlflowClient

    store = MlflowClient(uri)._tracking_client.store
    return store.get_host_creds() if isinstance(store, RestStore) else None


def _quick_call(uri: str, endpoint: str, method: str, body: dict[str, Any] | None = None) -> None:
    """One REST request with no retries and a short timeout (per call: no process-wide env change).

    No retries also keeps urllib3 from logging a "Retrying ..." warning per failed attempt.
    """
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    kwargs = {"json": body} if body is not None else {}
    resp = http_request(_rest_creds(uri), endpoint, method, max_retries=0, backoff_factor=0,
                        backoff_jitter=0, timeout=QUICK_TIMEOUT_S, **kwargs)
    verify_rest_response(resp, endpoint)


def send_metrics(uri: str, run_id: str, metrics: list[list[Any]]) -> None:
    """Log ``[key, value, timestamp_ms, step]`` rows to ``run_id``; raises what MLflow raises."""
    from mlflow.entities import Metric

    for i in range(0, len(metrics), BATCH_LIMIT):
        chunk = metrics[i : i + BATCH_LIMIT]
        if _rest_creds(uri) is None:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in chunk])
            continue
        rows = [{"key": k, "value": float(v), "timestamp": int(t), "step": int(s)} for k, v, t, s in chunk]
        _quick_call(uri, "/api/2.0/mlflow/runs/log-batch", "POST", {"run_id": run_id, "metrics": rows})


def send_terminated(uri: str, run_id: str, status: str, end_time: int) -> None:
    from mlflow.tracking import MlflowClient

    if _rest_creds(uri) is None:
        MlflowClient(uri).set_terminated(run_id, status=status, end_time=end_time)
    else:
        _quick_call(uri, "/api/2.0/mlflow/runs/update", "POST",
                    {"run_id": run_id, "status": status, "end_time": end_time})


def reachable(uri: str) -> bool:
    """Whether the tracking server answers at all (any HTTP answer counts); local stores always do."""
    if _rest_creds(uri) is None:
        return True
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(_rest_creds(uri), "/health", "GET", max_retries=0, backoff_factor=0, backoff_jitter=0,
                     timeout=QUICK_TIMEOUT_S)
        return True
    except Exception:  # noqa: BLE001 - any failure to get an answer means unreachable
        return False


class MetricBuffer:
    """The on-disk queue of one run's unsent records: ``{"uri", "run_id", "metrics"|"terminate", ...}``."""

    def __init__(self, folder: str | Path, run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id
        self.path = self.folder / f"{run_id}.jsonl"
        self._lock_path = self.folder / f"{run_id}.lock"
        self._count_path = self.folder / f"{run_id}.flushed"  # metrics replayed so far, for "flushed N"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes: appends and replays never interleave."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path), open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def pending(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def metric_count(self) -> int:
        return sum(len(r.get("metrics", ())) for r in self.records())

    def flushed_total(self) -> int:
        try:
            return int(self._count_path.read_text())
        except (OSError, ValueError):
            return 0

    def append(self, record: dict[str, Any]) -> None:
        """Call under ``locked()``. fsync'd: a driver that dies right after still leaves the line."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def replay(self, uri: str | None = None) -> int:
        """Call under ``locked()``. Send records in order; on the first failure keep the rest and raise.

        Returns the number of metrics sent. A record whose send failed midway may be sent again later:
        MLflow stores an identical (key, value, timestamp, step) once, so a replay is idempotent.
        """
        records, sent, done = self.records(), 0, 0
        try:
            for rec in records:
                try:
                    sent += self._send(rec, uri or rec["uri"])
                except Exception as exc:
                    if is_outage(exc):
                        raise
                    # Rejected for good (e.g. the run was deleted): keeping it would block every later record.
                    log.error("tracking server rejected a buffered record of run %s, dropped: %s", rec["run_id"], exc)
                done += 1
        finally:
            self._keep(records[done:])
            if sent:
                self._count_path.write_text(str(self.flushed_total() + sent))
        return sent

    @staticmethod
    def _send(rec: dict[str, Any], uri: str) -> int:
        if "terminate" in rec:
            send_terminated(uri, rec["run_id"], rec["terminate"], rec["end_time"])
            return 0
        send_metrics(uri, rec["run_id"], rec["metrics"])
        return len(rec["metrics"])

    def _keep(self, rest: list[dict[str, Any]]) -> None:
        if not rest:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rest))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Drop the bookkeeping files once the buffer is empty and the run is closed."""
        if self.pending():
            return
        for p in (self.path, self._lock_path, self._count_path):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # only if no other run's buffer is left there


_thread_locks: dict[Path, threading.Lock] = {}
_registry_lock = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    # flock is per open file description: two threads of one process need their own lock as well.
    with _registry_lock:
        return _thread_locks.setdefault(path, threading.Lock())


# -- warn once per outage, per process ----------------------------------------------------------------
_outages: dict[Path, int] = {}  # buffer path -> flushed_total when the outage was announced


def announce_outage(buf: MetricBuffer, uri: str, exc: BaseException | None = None) -> None:
    with _registry_lock:
        if buf.path in _outages:
            return
        _outages[buf.path] = buf.flushed_total()
    reason = f" ({type(exc).__name__})" if exc is not None else ""
    log.warning("tracking server unreachable at %s%s, buffering metrics to %s; training continues",
                uri, reason, buf.path)


def announce_recovery(buf: MetricBuffer, uri: str) -> None:
    with _registry_lock:
        start = _outages.pop(buf.path, None)
    if start is not None:
        log.warning("tracking server back at %s, flushed %d metrics from %s", uri,
                    buf.flushed_total() - start, buf.path)


def in_outage(buf: MetricBuffer) -> bool:
    with _registry_lock:
        return buf.path in _outages


def log_or_buffer(buf: MetricBuffer, uri: str, run_id: str, metrics: list[list[Any]]) -> bool:
    """Replay what is pending, then send ``metrics``; on an outage append them instead. True if sent."""
    with buf.locked():
        try:
            if buf.pending():
                buf.replay(uri)  # the caller's server is the run's server (it may have moved since)
            if metrics:
                send_metrics(uri, run_id, metrics)
        except Exception as exc:
            if not is_outage(exc):
                raise
            if metrics:
                buf.append({"uri": uri, "run_id": run_id, "metrics": metrics})
            announce_outage(buf, uri, exc)
            return False
    announce_recovery(buf, uri)
    return True


def drain(buf: MetricBuffer, uri: str, grace_s: float, poll_s: float = 2.0) -> bool:
    """Replay the buffer, retrying for up to ``grace_s`` while the server is down. True when empty."""
    deadline = time.monotonic() + grace_s
    while True:
        if log_or_buffer(buf, uri, buf.run_id, []) and not buf.pending():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def sync_command(folder: Path) -> str:
    return f"{SYNC_VERB} {folder}"


def sync_buffer(path: str | Path, uri: str | None = None) -> int:
    """Replay buffered records to the tracking server: ``path`` is one ``<run_id>.jsonl`` or a folder of them.

    ``uri`` overrides the server each record names (e.g. the server moved). Returns the number of metrics
    sent; raises ``TrackingUnavailable`` (what is left stays on disk) if the server is still down.
    """
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no tracking buffer (<run_id>.jsonl) there")
    total = 0
    for f in files:
        buf = MetricBuffer(f.parent, f.stem)
        with buf.locked():
            try:
                total += buf.replay(uri)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                raise TrackingUnavailable(f"tracking server still unreachable ({exc}); {f} kept, "
                                          f"{buf.metric_count()} metrics pending") from exc
        buf.remove()
    return total
