"""The one place that imports mlflow. A sink: engines return results and report through a ``RunLogger``.

``run.py`` is the run lifecycle (``JobRun``), ``logger.py`` the picklable per-step logger, ``watch.py``
the outage watch and system metrics, ``buffer.py`` the on-disk buffer for outages, ``outputs.py`` and
``federated.py`` what a finished engine run leaves on the run, ``plots.py`` its figures. Importing this
package does not import mlflow.
"""

from orchard.tracking.buffer import TrackingUnavailable, sync_buffer
from orchard.tracking.logger import RunLogger
from orchard.tracking.run import JobRun, check_reachable, resolve_uri

__all__ = ["JobRun", "RunLogger", "TrackingUnavailable", "check_reachable", "resolve_uri", "sync_buffer"]
