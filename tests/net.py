"""Loopback helpers for tests that start real servers: a free port, a listening check, a bounded wait."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], what: str, log: Path | None = None, timeout_s: float = 120.0) -> None:
    """Poll ``predicate`` until true; past ``timeout_s`` fail with ``what`` and the tail of ``log``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        tail = f":\n{log.read_text()[-3000:]}" if log is not None and log.is_file() else ""
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s{tail}"
        time.sleep(0.3)


def stop_group(*procs: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM each process group started with ``start_new_session``; SIGKILL those still up after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def kill_strays(marker: str) -> None:
    """Ray's daemons outlive `ray start` if it dies badly; they are ours when an argument names ``marker``."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in p.info["cmdline"] or []):
            p.kill()
