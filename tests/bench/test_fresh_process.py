"""``orchard bench federated`` measures each side in its own fresh process, not in the bench's."""

from __future__ import annotations

import os
import time

import numpy as np

from orchard.bench.federated import _fresh


def _hold(mib: int) -> tuple[int, int]:
    """Touch ``mib`` MiB and hold it a while, then report this process's pid and the size held."""
    block = np.ones(mib * 2**20, np.uint8)
    time.sleep(0.5)  # several of PeakRSS's 0.1 s samples
    return os.getpid(), int(block.sum()) // 2**20


def test_a_run_gets_its_own_process_and_only_its_memory_is_counted():
    ballast = np.ones(1024 * 2**20, np.uint8)  # the bench process's own heap: must not count
    *_, idle = _fresh(_hold, 0)  # a fresh interpreter with what the bench module imports
    pid, held, peak = _fresh(_hold, 300)
    assert pid != os.getpid() and held == 300
    # Not this process's GiB of ballast: a fresh interpreter with the bench's imports is ~400 MiB here.
    assert idle < 1024, idle
    # And the child's own 300 MiB on top of its interpreter.
    assert 250 <= peak - idle < 600, (idle, peak)
    assert ballast[0] == 1
