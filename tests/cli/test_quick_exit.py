"""The `orchard` command's exit: the Ray it started is stopped before Ray's atexit hook, the heap is frozen."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import gc, sys, time
    import ray
    from orchard.cli import quick_exit_prep
    from orchard.raystart import start_ray

    assert start_ray() and ray.is_initialized()
    garbage = [[] for _ in range(100_000)]
    t0 = time.perf_counter()
    quick_exit_prep()
    print(f"{ray.is_initialized()} {gc.get_freeze_count()} {time.perf_counter() - t0:.2f}")
""")


@pytest.mark.slow
def test_quick_exit_stops_ray_and_freezes_the_heap():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    running, frozen, seconds = out.stdout.split()
    assert running == "False"  # Ray's own processes are gone before the interpreter's exit starts
    assert int(frozen) > 100_000  # every live container, the test's 100,000 lists included
    assert float(seconds) < 10


def test_the_console_script_exits_through_entry():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["orchard"] == "orchard.cli:entry"
