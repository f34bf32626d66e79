"""The one place that starts (or joins) Ray for an engine: Ray Train and the Flower simulation alike.

Top level rather than under ``train/`` or ``federated/`` so that neither imports the other; ``engine/``
stays free of Ray. Ray itself is imported only when a function here is called.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any


def start_ray(min_cpus: float = 0, *, task_cpus: float = 0, task_setting: str = "task_cpus") -> bool:
    """Join $RAY_ADDRESS if set, else start a quiet local instance; do nothing if Ray is already up.

    Returns True only if this call started Ray, so the caller shuts down its own instance and no other.
    A local instance gets at least ``min_cpus`` logical CPUs: train workers reserve theirs for the whole
    run and Ray Data's read tasks need one more, else the job waits forever on a small machine.
    ``task_cpus`` (named ``task_setting`` in the error) is one task's reservation, e.g. a Flower
    client's: if no node has that many CPUs nothing could ever be scheduled, so refuse now.
    """
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}
        if not os.environ.get("RAY_ADDRESS"):
            # "local", not None: with no address Ray joins the latest `ray start` cluster on this machine
            # (/tmp/ray/ray_current_cluster), e.g. someone else's; a local run starts its own instance.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(min_cpus))
        cwd = os.getcwd()
        with _inherited_pythonpath(not os.environ.get("RAY_ADDRESS")):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level=logging.WARNING, **kwargs)
        # Inside a Ray job whose project was shipped as working_dir, joining the cluster re-extracts that
        # folder: the old directory (our cwd) is gone and relative paths fail until we enter the new one.
        os.chdir(cwd)
        started = True
    if task_cpus:
        biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if biggest < task_cpus:
            if started:
                ray.shutdown()
            raise ValueError(f"{task_setting}={task_cpus:g}, but no Ray node has more than {biggest:g} CPUs: "
                             "nothing that needs them could run")
    return started


@contextlib.contextmanager
def _inherited_pythonpath(local: bool) -> Iterator[None]:
    """Actors import orchard from wherever this process does: a local instance's raylet, started inside
    ``ray.init``, inherits this PYTHONPATH and hands it to every worker it starts.

    Not as a job runtime env, as Flower's RayBackend does: workers are then started per runtime env, so
    the raylet's pre-started idle workers (plain env) never serve the job and every task and actor of a
    run waits for a fresh interpreter. Not on a cluster, whose job runtime env (its working_dir) is the
    same on every node; our paths are not. This process's own environment is restored afterwards.
    """
    if not local:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [before])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
