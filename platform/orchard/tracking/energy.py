"""Energy and CO₂ of a run, measured with CodeCarbon in offline mode (nothing is sent anywhere).

CodeCarbon runs in its ``machine`` tracking mode on the driver: it measures the whole machine, so the Ray
Train workers, Flower's simulated clients, Spark's JVM and Python workers — and anything else running on
the machine meanwhile — are counted, not just the driver process. On a multi-node Ray cluster only the
node the driver runs on is measured.

Power comes from the best source CodeCarbon can read: Intel RAPL (``/sys/class/powercap``) for the CPU
package and NVML for NVIDIA GPUs when readable; otherwise CodeCarbon's documented estimate (the CPU
model's TDP scaled by the measured CPU load, or a constant per-core figure when the model is unknown).
RAM is always CodeCarbon's estimate from the installed memory. The run's ``orchard.energy_source`` tag says
which was used. CO₂ is energy × the carbon intensity of the grid of ``tracking.energy_country``
(CodeCarbon's bundled energy-mix table; default ``$ORCHARD_ENERGY_COUNTRY`` or ``USA``).

CodeCarbon's hardware probe takes seconds, so the meter starts in a background thread at the start of the
job (before Spark) and the job does not wait for it; energy before the probe finishes is not counted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from functools import cache
from importlib import resources

log = logging.getLogger(__name__)

DEFAULT_COUNTRY = "USA"
INTERVAL_S = 5.0


@cache
def known_countries() -> frozenset[str]:
    """The ISO 3166-1 alpha-3 codes CodeCarbon's offline energy-mix table covers."""
    path = resources.files("codecarbon") / "data" / "private_infra" / "global_energy_mix.json"
    return frozenset(json.loads(path.read_text()))


def default_country() -> str:
    return os.environ.get("ORCHARD_ENERGY_COUNTRY", DEFAULT_COUNTRY).upper()


class EnergyMeter:
    """Whole-machine energy (kWh) and emissions (kg CO₂eq) since :meth:`start`; readable while running."""

    def __init__(self, country: str | None = None, interval_s: float = INTERVAL_S) -> None:
        self.country = (country or default_country()).upper()
        if self.country not in known_countries():
            raise ValueError(f"energy country '{self.country}' is not in CodeCarbon's energy-mix table "
                             "(3-letter ISO codes such as USA, DEU, FRA)")
        self.interval_s = interval_s
        self._tracker = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> EnergyMeter:
        self._thread = threading.Thread(target=self._start, name="orchard-energy", daemon=True)
        self._thread.start()
        return self

    def _start(self) -> None:
        try:
            for name in ("codecarbon",):
                logging.getLogger(name).setLevel(logging.ERROR)
            from codecarbon import OfflineEmissionsTracker

            tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, measure_power_secs=self.interval_s, tracking_mode="machine",
                save_to_file=False, log_level="error", allow_multiple_runs=True)
            tracker.start()
            self._tracker = tracker
        except Exception as exc:  # noqa: BLE001 - a meter that cannot start must not fail the job
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("energy metering unavailable: %s", self.error)
        finally:
            self._ready.set()

    def _wait(self, timeout_s: float = 60.0):
        self._ready.wait(timeout_s)
        return self._tracker

    def read(self) -> tuple[float, float] | None:
        """(kWh, kg CO₂eq) so far, or None if the meter could not start."""
        return self._totals(final=False)

    def stop(self) -> tuple[float, float] | None:
        """Final (kWh, kg CO₂eq); the meter stops measuring."""
        return self._totals(final=True)

    def _totals(self, final: bool) -> tuple[float, float] | None:
        tracker = self._wait()
        if tracker is None:
            return None
        with self._lock:
            if final:
                tracker.stop()
                data = tracker.final_emissions_data
            else:
                tracker.flush()
                data = tracker._prepare_emissions_data()  # what flush() just computed: the totals so far
        return float(data.energy_consumed), float(data.emissions)

    @property
    def source(self) -> str:
        """Where the figures come from, e.g. ``cpu=estimate:cpu_load+tdp ram=estimate gpu=none``."""
        tracker = self._wait()
        if tracker is None:
            return f"unavailable ({self.error})"
        parts = {"cpu": "none", "ram": "none", "gpu": "none"}
        for hw in getattr(tracker, "_hardware", []):
            kind = type(hw).__name__
            if kind == "CPU":
                mode = getattr(hw, "_mode", "")
                parts["cpu"] = "rapl" if "rapl" in mode else f"estimate:{mode}" if mode else "estimate"
            elif kind == "GPU":
                parts["gpu"] = "nvml"
            elif kind == "RAM":
                parts["ram"] = "estimate"
            elif kind == "AppleSiliconChip":
                parts["cpu"] = "powermetrics"
        return " ".join(f"{k}={v}" for k, v in parts.items())
