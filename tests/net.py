"""Loopback helpers for tests that start real servers: a free port, a listening check, a bounded wait."""

from __future__ import annotations

import socket
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
