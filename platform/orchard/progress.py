"""The progress file: an engine's latest step, for the driver's progress bar.

Written by whichever process runs the loop (the Ray Train controller's callback, the federation's
round hook) and read by the driver's poller. A write goes to a temporary file renamed over the old
one, so a reader sees the previous state or the new one, never half a JSON document.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

FILE_NAME = "progress.json"


def progress_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE_NAME


def write_progress(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer: a second writer (a restarted controller) never renames someone else's half file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_progress(path: str | Path) -> dict[str, Any] | None:
    """The last state written, or None if there is none yet."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
