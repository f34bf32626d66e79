"""Terminal output: engines' floods go to a log file, the user sees progress and a summary.

Spark's JVM and Ray's processes write to the file descriptors they inherit, so redirecting Python's
``sys.stdout`` is not enough: fds 1 and 2 are pointed at the run's log file while engines work, and the
rich console writes to a duplicate of the original terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

ENGINE_LOGGERS = ("ray", "flwr", "py4j", "pyspark", "mlflow", "alembic", "filelock", "urllib3", "matplotlib")


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(f"[yellow]warning:[/] {record.getMessage()}", highlight=False)
        except Exception:  # noqa: BLE001 - a closed terminal must not break the job
            self.handleError(record)


@contextlib.contextmanager
def engine_output_to(log_path: Path, console: Console) -> Iterator[Console]:
    """Within the block, fds 1/2 and engine loggers write to ``log_path``; yields a console on the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    term = os.fdopen(os.dup(saved_out), "w", buffering=1)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    touched = []
    for name in ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        touched.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [handler]
        lg.propagate = False
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    shown = Console(file=term, force_terminal=console.is_terminal, width=console.width, no_color=console.no_color)
    # Orchard's own warnings (e.g. the tracking server went away) are for the user: log file and terminal.
    ours = logging.getLogger("orchard")
    to_term = _ConsoleHandler(shown)
    touched.append((ours, ours.handlers[:], ours.propagate))
    # A handler of its own: ray.init(configure_logging=True) gives the "ray" logger's handlers (the
    # engines' one above) Ray's formatter, which Orchard's lines must not pick up.
    own = logging.FileHandler(log_path)
    own.setFormatter(handler.formatter)
    ours.handlers, ours.propagate = [own, to_term], False
    # Orchard's INFO lines (a prep's step timings, what a run chose) belong in the log file; the
    # terminal handler stays at WARNING. Left unset, the root logger's WARNING would drop them.
    level = ours.level
    if level == logging.NOTSET or level > logging.INFO:
        ours.setLevel(logging.INFO)
    try:
        yield shown
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        term.close()
        for lg, handlers, propagate in touched:
            lg.handlers, lg.propagate = handlers, propagate
        ours.setLevel(level)
        handler.close()
        own.close()
