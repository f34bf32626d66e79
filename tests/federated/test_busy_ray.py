"""A federation on a Ray where other work holds CPUs is refused with a reason, not left to hang.

Flower sizes its ClientApp actor pool from every CPU of the cluster; an actor that cannot be placed never
answers its client calls and the simulation waits forever (seen with a notebook's actors still alive).
"""
from __future__ import annotations

import threading
import time

import pytest

from orchard.config import validate_spec


def _spec(tmp_path):
    return validate_spec({
        "name": "busy-ray", "kind": "federated",
        "model": {"family": "mlp", "hidden": [16]},
        "train": {"batch_size": 32, "lr": 3e-3},
        "federated": {"clients": 2, "rounds": 1, "local_epochs": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


@pytest.fixture
def ray_with_a_busy_cpu():
    """A local Ray of 2 CPUs, this process's own, with an actor holding one of them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    try:
        yield holder
    finally:
        ray.shutdown()


@pytest.mark.timeout(100)
def test_a_federation_is_refused_while_other_work_holds_cpus(ray_with_a_busy_cpu, fresh_digits, tmp_path,
                                                             monkeypatch):
    from orchard.federated import run_federated, simulation

    monkeypatch.setattr(simulation, "FREE_CPUS_WAIT_S", 2.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"needs all 2 CPUs .* 1 are still held by other work after 2 s"):
        run_federated(_spec(tmp_path), fresh_digits)
    assert time.monotonic() - started < 60


@pytest.mark.timeout(100)
def test_the_wait_ends_once_the_other_work_lets_go(ray_with_a_busy_cpu):
    import ray

    from orchard.federated.simulation import _wait_for_free_cpus

    threading.Timer(2.0, ray.kill, args=(ray_with_a_busy_cpu,)).start()
    started = time.monotonic()
    _wait_for_free_cpus(timeout_s=60)
    waited = time.monotonic() - started
    assert 1.5 < waited < 60
    assert ray.available_resources().get("CPU", 0) == 2
