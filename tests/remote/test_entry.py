"""The Ray job's first step: the interpreter that runs it, and what it says when that one lacks the stack."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchard import job_entry as entry
from orchard.remote import jobs

ROOT = Path(__file__).resolve().parents[2]


def test_the_entrypoint_runs_the_given_interpreter_through_the_entry_check():
    cmd = jobs.entrypoint("jobs/digits-cnn.yaml", ["train.epochs=2"], True, "/opt/venv/bin/python3")
    assert cmd == ("PYTHONPATH=platform${PYTHONPATH:+:$PYTHONPATH} /opt/venv/bin/python3 -m orchard.job_entry "
                   "run jobs/digits-cnn.yaml --set train.epochs=2")


def test_this_interpreter_has_the_whole_stack():
    assert entry.missing_modules() == []


def test_an_interpreter_without_the_stack_stops_naming_itself_and_what_it_lacks():
    bare = [p for p in (shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),) if p]
    if not bare or subprocess.run([bare[0], "-c", "import rich"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 without rich here")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([bare[0], "-m", "orchard.job_entry", "run", "jobs/digits-cnn.yaml"], cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT / "platform")}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "lacks rich" in out.stderr and "Traceback" not in out.stderr
    assert "this Ray job runs /" in out.stderr and sys.executable not in out.stderr
