"""Spark failures as one exception, ``EngineError``, whose message names the cause and the setting to change.

No pyspark import here: the CLI catches ``EngineError`` without starting an engine. The evidence is
read from three places because the Python side often sees only the symptom: after the JVM died of
``OutOfMemoryError`` py4j reports an empty answer or a refused connection, while the cause is in the
JVM's exit code (Spark exits with 52 on OOM) and in the engine log the JVM wrote.
"""

from __future__ import annotations

from pathlib import Path

from orchard.config import SparkSpec

OOM_EXIT = 52  # org.apache.spark.util.SparkExitCode.OOM
_OOM = "java.lang.OutOfMemoryError"
_EXECUTOR_LOST = ("ExecutorLostFailure", "executor lost", "Executor lost")


class EngineError(RuntimeError):
    """The data engine (Spark) failed; ``str()`` is the one message for the user, ``log_path`` the log to read."""

    def __init__(self, message: str, log_path: Path | None = None):
        super().__init__(message)
        self.log_path = log_path


def is_engine_failure(exc: BaseException) -> bool:
    """Failures raised by Spark or the py4j bridge to it (not orchard's own errors)."""
    module = type(exc).__module__ or ""
    return module.startswith(("py4j", "pyspark")) or isinstance(exc, ConnectionError)


def explain(exc: BaseException, spec: SparkSpec, jvm_exit: int | None, log_text: str,
            text: str | None = None) -> str:
    """The one-paragraph message for ``exc``: what failed, and which spec setting to change.

    ``text`` is the exception's text as ``java_text`` read it (read here when not given).
    """
    text = (java_text(exc) if text is None else text) or type(exc).__name__
    local = spec.master.startswith("local")
    if jvm_exit == OOM_EXIT or _OOM in text or _OOM in log_text:
        where = _first_line_with(_OOM, text) or _first_line_with(_OOM, log_text) or f"{_OOM}"
        if local:
            fix = (f"raise data.spark.driver_memory (now {spec.driver_memory}): in local mode the "
                   "executors share the driver's JVM heap")
        else:
            fix = ("raise the executors' heap with data.spark.conf: {spark.executor.memory: ...} (or "
                   f"data.spark.driver_memory, now {spec.driver_memory}, if the driver failed), or "
                   "raise data.spark.shuffle_partitions so each task holds less")
        return f"Spark ran out of memory (JVM heap exhausted: {where}); {fix}."
    if any(marker in text or marker in log_text for marker in _EXECUTOR_LOST):
        where = next(filter(None, (_first_line_with(m, text) for m in _EXECUTOR_LOST)), "executor lost")
        return (f"a Spark executor was lost ({where}); on a cluster this is usually its memory limit: raise "
                "spark.executor.memory / spark.executor.memoryOverhead in data.spark.conf, or check the "
                f"cluster at data.spark.master ({spec.master}).")
    if jvm_exit is not None:
        return (f"the Spark JVM exited with code {jvm_exit} while preparing data; the engine log says why "
                "(memory: data.spark.driver_memory; other settings: data.spark.conf).")
    return f"Spark failed: {_summary(exc, text)}; {_setting_for(text, spec)}."


def java_text(exc: BaseException) -> str | None:
    """The exception's text, or None when reading it needs a JVM that no longer answers.

    A Py4JJavaError's ``str()`` asks the JVM for the Java stack trace.
    """
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - py4j raises whatever the dead socket raised
        return None


def _summary(exc: BaseException, text: str) -> str:
    condition = None
    if hasattr(exc, "getCondition"):
        try:
            condition = exc.getCondition()
        except Exception:  # noqa: BLE001 - needs the JVM for captured exceptions
            condition = None
    # The message runs up to the first stack frame; py4j prefixes "An error occurred while calling o42.x.".
    lines = []
    for line in (ln.strip() for ln in text.splitlines()):
        if line.startswith(("at ", "Caused by", "JVM stacktrace")):
            break
        if line and not line.startswith("An error occurred while calling"):
            lines.append(line.removeprefix(": "))
    first = " ".join(lines) or type(exc).__name__
    first = first if len(first) <= 300 else first[:297] + "..."
    return f"[{condition}] {first}" if condition and condition not in first else first


def _setting_for(text: str, spec: SparkSpec) -> str:
    low = text.lower()
    if "memory" in low or "heap" in low:
        return f"check data.spark.driver_memory (now {spec.driver_memory}) and data.spark.conf"
    if "master" in low or "spark://" in low:
        return f"check data.spark.master (now {spec.master})"
    return "see the engine log; Spark settings are data.spark.master, data.spark.driver_memory and data.spark.conf"


def _first_line_with(marker: str, text: str) -> str | None:
    for line in text.splitlines():
        if marker in line:
            line = line.strip()
            return line[line.find(marker):][:200]
    return None
