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
    ballast = np.ones(400 * 2**20, np.uint8)  # the bench process's own heap: must not count
    pid, held, peak = _fresh(_hold, 300)
    assert pid != os.getpid() and held == 300
    # Its 300 MiB and an interpreter with numpy, not this process's 400 MiB of ballast.
    assert 300 <= peak < 300 + 350, peak
    assert ballast[0] == 1
