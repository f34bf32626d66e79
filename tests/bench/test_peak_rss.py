"""PeakRSS counts a process tree's memory once: a child caught between fork and exec is its parent's pages."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from orchard.bench import PeakRSS

MiB = 1 << 20

# The parent fills 300 MiB, then either forks a copy that never execs (what the JVM does for an instant
# each time it starts a process), forks a copy that then fills 200 MiB of its own (a forked worker), or
# starts a new program that fills 300 MiB of its own.
_SCRIPT = textwrap.dedent("""
    import ctypes, os, subprocess, sys, threading, time
    block = bytearray(300 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    if sys.argv[1].startswith("fork"):
        def spawn():
            # Forked from a thread with a name of its own, as a JVM forks from its "process reaper" thread:
            # the child takes that thread's name, not the process's.
            ctypes.CDLL(None).prctl(15, b"process reaper", 0, 0, 0)  # PR_SET_NAME
            if os.fork() == 0:
                if sys.argv[1] == "fork-write":
                    own = bytearray(200 << 20)
                    for i in range(0, len(own), 4096):
                        own[i] = 1
                    open(sys.argv[2], "w").close()
                time.sleep(60)
                os._exit(0)
        thread = threading.Thread(target=spawn)
        thread.start()
        thread.join()
        while sys.argv[1] == "fork-write" and not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
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


def _peak_of(mode: str, tmp_path) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, str(tmp_path / "written")],
                            stdout=subprocess.PIPE, text=True)
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


def test_a_forked_copy_is_not_counted_twice(tmp_path):
    peak = _peak_of("fork", tmp_path)
    assert 300 * MiB <= peak < 450 * MiB, peak / MiB


def test_what_a_forked_child_writes_is_counted_once(tmp_path):
    peak = _peak_of("fork-write", tmp_path)
    assert 500 * MiB <= peak < 650 * MiB, peak / MiB


def test_a_child_with_memory_of_its_own_is_counted(tmp_path):
    peak = _peak_of("spawn", tmp_path)
    assert peak > 600 * MiB, peak / MiB
