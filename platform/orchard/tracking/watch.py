"""Driver-side threads that keep tracking honest through an outage: the outage watch and system metrics."""

from __future__ import annotations

import logging
import threading
import time

from orchard.tracking.buffer import announce_outage, announce_recovery, log_or_buffer
from orchard.tracking.logger import RunLogger

_log = logging.getLogger("orchard.tracking")


class OutageWatch:
    """Driver-side thread: announces an outage seen by any process, and replays the buffer when it can.

    The Ray Train controller logs to Ray's own files, so its warning would never reach the user; this
    thread makes the driver say it (once per outage) and notices recovery even when no epoch is logged.
    """

    def __init__(self, logger: RunLogger, poll_s: float = 1.0, retry_s: float = 5.0) -> None:
        self.logger, self.poll_s, self.retry_s = logger, poll_s, retry_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchard-tracking-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        buf, uri, last_try = self.logger.buffer, self.logger.tracking_uri, 0.0
        while not self._stop.wait(self.poll_s):
            try:
                if not buf.pending():
                    announce_recovery(buf, uri)
                    continue
                announce_outage(buf, uri)
                if time.monotonic() - last_try >= self.retry_s:
                    last_try = time.monotonic()
                    log_or_buffer(buf, uri, self.logger.run_id, [])
            except Exception as exc:  # noqa: BLE001 - a watcher must never take the job down
                _log.debug("tracking watch: %s", exc)


def buffered_system_monitor(logger: RunLogger, interval_s: float, resumed: bool):
    """MLflow's system-metrics monitor, publishing through the buffered ``RunLogger``.

    MLflow's own loop calls ``get_run`` every sample and quits the thread for good on its first error
    (after minutes of retries that ``finish`` would wait on); this one keeps sampling through an outage.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class BufferedSystemMetricsMonitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                try:
                    self.publish_metrics(self.aggregate_metrics())
                except Exception as exc:  # noqa: BLE001 - a rejected request (not an outage) ends monitoring
                    _log.debug("system metrics stopped: %s", exc)
                    return

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
            logger.log_metrics({prefix + k: v for k, v in metrics.items()}, self._logging_step)
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

    return BufferedSystemMetricsMonitor(logger.run_id, sampling_interval=interval_s, resume_logging=resumed,
                                        tracking_uri=logger.tracking_uri)
