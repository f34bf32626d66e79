"""PeakRSS counts a process tree's memory once: a child caught between fork and exec is its parent's pages."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from orchard.bench import PeakRSS

MiB = 1 << 20

# The parent fills 300 MiB, then either forks a copy that never execs (what the JVM does for an instant
# each time it starts a process) or starts a new program that fills 300 MiB of its own.
_SCRIPT = textwrap.dedent("""
    import ctypes, os, subprocess, sys, threading, time
    block = bytearray(300 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    if sys.argv[1] == "fork":
        def spawn():
            # Forked from a thread with a name of its own, as a JVM forks from its "process reaper" thread:
            # the child takes that thread's name, not the process's.
            ctypes.CDLL(None).prctl(15, b"process reaper", 0, 0, 0)  # PR_SET_NAME
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        thread = threading.Thread(target=spawn)
        thread.start()
        thread.join()
    else:
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time\\nb = bytearray(300 << 20)\\n"
                                  "for i in range(0, len(b), 4096): b[i] = 1\\n"
                                  "print('filled', flush=True)\\ntime.sleep(60)"],
                                 stdout=subprocess.PIPE)
        child.stdout.readline()
    print("ready", flush=True)
    time.sleep(60)
""")


def _peak_of(mode: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with PeakRSS(proc.pid) as peak:
            time.sleep(0.5)
        return peak.peak
    finally:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_a_forked_copy_is_not_counted_twice():
    peak = _peak_of("fork")
    assert 300 * MiB <= peak < 450 * MiB, peak / MiB


def test_a_child_with_memory_of_its_own_is_counted():
    peak = _peak_of("spawn")
    assert peak > 600 * MiB, peak / MiB
