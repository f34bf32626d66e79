"""A real prepared dataset (sklearn digits) written without Spark, by ``orchard.data.synthetic``."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchard.data.manifest import load_manifest, prepared_folder
from orchard.data.synthetic import write_prepared


def _split(y: np.ndarray, fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """Stratified train/val/test row indices: each class is cut in the same proportions."""
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        a = round(len(rows) * fractions[0])
        b = a + round(len(rows) * fractions[1])
        for i, part in enumerate((rows[:a], rows[a:b], rows[b:])):
            out[i].append(part)
    return [rng.permutation(np.concatenate(p)) for p in out]


def write_digits(root: Path, seed: int = 42) -> Path:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    train, val, test = _split(y, (0.7, 0.15, 0.15), seed)
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0  # constant border pixels: leave them at 0 rather than divide by 0
    xs = (x - mean) / std
    content_hash = hashlib.sha256(xs.tobytes() + y.tobytes()).hexdigest()
    path = prepared_folder(root, "digits", content_hash)
    write_prepared(
        path, xs, y, {"train": train, "val": val, "test": test},
        source="sklearn:digits", dataset="digits", content_hash=content_hash,
        features=[f"pixel_{i}" for i in range(x.shape[1])], image_shape=[1, 8, 8], classes=list(range(10)),
        num_classes=10, normalize="standard", stats={"mean": mean.tolist(), "std": std.tolist()},
        split={"train": 0.7, "val": 0.15, "test": 0.15, "seed": seed, "stratify": True},
    )
    return path


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    return load_manifest(write_digits(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def _fresh_ray_for_federations(request):
    """A Flower simulation in this process must start its own local Ray. Flower sizes its client-actor pool
    to the node's total CPUs, so on a Ray that an earlier in-process test of this worker left up (its Ray
    Data or Train actors still holding CPUs) some client actors never start and ``run_simulation`` waits on
    them forever (seen in CI)."""
    if "federat" in request.node.nodeid and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture
def fresh_digits(tmp_path):
    """A private copy, for tests that write partitions and must not see another test's."""
    return load_manifest(write_digits(tmp_path))


# -- Parallel runs (`pytest -n 2`, as `make test` does) ------------------------------------------------
# pytest-xdist sends whole groups of tests to one worker: a test file is its own group (its module fixtures
# start once), and files that share one outside service run on one worker, one after another: PostgreSQL
# (test_pg_faults stops and restarts the machine's server under the others) and Flower's SuperLink.
# (xdist's own `--dist loadgroup` cannot be used: with pytest 9 its node-id suffix no longer takes effect.)
SERIAL_GROUPS = {
    "postgresql": ["tests/cluster/test_compose.py", "tests/cluster/test_mlflow_service.py",
                   "tests/remote/test_cluster.py", "tests/tracking/test_buffer.py",
                   "tests/tracking/test_outage.py", "tests/tracking/test_pg_faults.py"],
    "superlink": ["tests/federated/test_deployment.py", "tests/federated/test_flower_app.py",
                  "tests/cluster/test_flower_register.py"],
}
_GROUP_OF = {path: group for group, paths in SERIAL_GROUPS.items() for path in paths}
# Seconds each long group took in CI (serial run, 2 cores): the longest start first, so that the two
# workers finish together instead of one waiting on a long group picked up last.
_SECONDS = {"postgresql": 800, "tests/train/test_fault_tolerance.py": 420, "tests/bench/test_bench_train.py": 230,
            "superlink": 220, "tests/cli/test_cli_end_to_end.py": 170, "tests/tracking/test_dashboard_view.py": 100,
            "tests/train/test_fsdp.py": 75, "tests/federated/test_federated_resume.py": 75}


def group_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return _GROUP_OF.get(path, path)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        """xdist's scope scheduler with our groups as scopes, longest first."""

        _ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:
                self._ordered = True
                units = sorted(self.workqueue.items(), key=lambda kv: -_SECONDS.get(kv[0], 2 * len(kv[1])))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return FileGroups(config, log)


# -- Watchdog (the controlling process): a test still running after 10 minutes is named on stderr every 5
# minutes, so a CI log cut off by its time limit still says what was running.
_started: dict[str, float] = {}


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid, location):
    _started.pop(nodeid, None)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: its controller watches
        return

    def watch() -> None:
        while True:
            time.sleep(300)
            now = time.monotonic()
            for nodeid, t0 in list(_started.items()):
                if now - t0 > 600:
                    print(f"\n[watchdog] still running after {now - t0:.0f} s: {nodeid}", file=sys.stderr, flush=True)

    threading.Thread(target=watch, name="test-watchdog", daemon=True).start()
