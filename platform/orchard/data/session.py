"""The one place a SparkSession is made: the spec's master (local by default), no UI, quiet logs,
and Spark failures turned into one ``EngineError`` (see ``orchard.data.errors``).

The JVM is started once per Python process; settings that only apply at launch (driver memory, the
log4j config, where the JVM's stdout/stderr go) are fixed by whoever starts it first. Later callers
get the running session with their SQL settings applied.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import SparkSession

from orchard.config import SparkSpec
from orchard.data.errors import EngineError, explain, is_engine_failure, java_text

log = logging.getLogger("orchard.data")

_LOG4J = """\
# Root stays at WARN: for pyspark-shell Spark compares it with WARN and, when they differ, prints a
# banner and resets the level. The console threshold does the filtering instead.
rootLogger.level = warn
rootLogger.appenderRef.console.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = {level}
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
"""


def spark_session(spec: SparkSpec | None = None, log_path: Path | None = None) -> SparkSession:
    """The process's SparkSession, started from ``spec`` if none is running.

    With ``log_path`` the JVM's stdout/stderr (Spark's log4j output included, at WARN) and Python's
    ``py4j`` logging go to that file; without it Spark logs only errors.
    """
    spec = spec or SparkSpec()
    _route_py4j_logging(log_path)
    with quiet_pyspark_warnings():
        session = _get_or_start(spec, log_path)
    session.sparkContext.setLogLevel("WARN" if log_path else "ERROR")
    # Runtime SQL settings: applied even when the session was started by someone else.
    session.conf.set("spark.sql.shuffle.partitions", str(spec.shuffle_partitions))
    return session


@contextlib.contextmanager
def spark_for(spec: SparkSpec | None = None, log_path: Path | None = None) -> Iterator[SparkSession]:
    """A session for one job: stopped afterwards only if this call started it (tests share theirs).

    A Spark or py4j failure, at start or inside the block, leaves as one ``EngineError`` naming the cause
    and the setting to change; orchard's own errors pass through unchanged.
    """
    spec = spec or SparkSpec()
    started = SparkContext._active_spark_context is None
    log_from = _log_size(log_path)
    try:
        session = spark_session(spec, log_path)
        try:
            with quiet_pyspark_warnings():
                yield session
        except BaseException:
            if started and _jvm_exit() is None:
                # The job's error is the one to report, not a failed stop of a broken session.
                with contextlib.suppress(Exception):
                    session.stop()
            raise
        if started:
            session.stop()
    except Exception as exc:
        if not is_engine_failure(exc):
            raise
        raise _engine_error(exc, spec, log_path, log_from) from exc


def _engine_error(exc: BaseException, spec: SparkSpec, log_path: Path | None, log_from: int) -> EngineError:
    text = java_text(exc)
    # A JVM that no longer answers is usually going down: wait for its exit code, which tells why.
    lost = text is None or isinstance(exc, ConnectionError) or type(exc).__name__ == "Py4JNetworkError"
    exit_code = _jvm_exit(wait_s=15 if lost else 0)
    message = explain(exc, spec, exit_code, _log_since(log_path, log_from), text or type(exc).__name__)
    if exit_code is not None:
        _forget_dead_jvm()
    return EngineError(message, log_path)


def _jvm_exit(wait_s: float = 0) -> int | None:
    """The JVM's exit code once it has died, else None (also None when no JVM was started here)."""
    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=wait_s) if wait_s else proc.poll()
    except subprocess.TimeoutExpired:
        return None


def _forget_dead_jvm() -> None:
    """Let a later session in this process start a fresh JVM instead of calling the dead one."""
    SparkContext._active_spark_context = None
    SparkContext._gateway = None
    SparkContext._jvm = None
    SparkSession._instantiatedSession = None
    SparkSession._activeSession = None


def _log_size(log_path: Path | None) -> int:
    try:
        return Path(log_path).stat().st_size if log_path else 0
    except OSError:
        return 0


def _log_since(log_path: Path | None, offset: int) -> str:
    """What the JVM wrote to the engine log during this job (capped: the cause is near the start)."""
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read(8 << 20).decode(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def quiet_pyspark_warnings() -> Iterator[None]:
    # pyspark 4.3 warns about pandas >= 3 whenever it checks for pandas, even where pandas is unused.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
        yield


def _get_or_start(spec: SparkSpec, log_path: Path | None) -> SparkSession:
    if SparkContext._active_spark_context is not None:
        return SparkSession.builder.getOrCreate()
    conf = _conf(spec, "warn" if log_path else "error")
    if SparkContext._gateway is None:
        _launch(conf, log_path)
    return SparkSession.builder.config(conf=conf).getOrCreate()


def _conf(spec: SparkSpec, level: str) -> SparkConf:
    conf = _base_conf(spec, level)
    for key, value in spec.conf.items():
        if key == "spark.driver.extraJavaOptions":  # keep ours: it carries the log4j config
            value = f"{conf.get(key)} {value}"
        conf.set(key, value)
    return conf


def _worker_python(spec: SparkSpec) -> str:
    """The interpreter of Spark's Python workers (Arrow UDFs such as image decoding).

    pyspark reads it from $PYSPARK_PYTHON when the context starts, else runs whatever ``python3`` is on PATH,
    which may lack pyarrow (a venv that is not activated). A cluster whose workers keep Python elsewhere
    sets ``spark.pyspark.python`` in ``data.spark.conf``.
    """
    python = spec.conf.get("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON") or sys.executable
    os.environ["PYSPARK_PYTHON"] = python
    return python


def _base_conf(spec: SparkSpec, level: str) -> SparkConf:
    return (
        SparkConf()
        .setMaster(spec.master)
        .setAppName("orchard-data")
        .set("spark.ui.enabled", "false")
        .set("spark.ui.showConsoleProgress", "false")
        .set("spark.driver.memory", spec.driver_memory)
        .set("spark.sql.shuffle.partitions", str(spec.shuffle_partitions))
        .set("spark.sql.session.timeZone", "UTC")
        .set("spark.sql.execution.arrow.pyspark.enabled", "true")
        .set("spark.pyspark.python", _worker_python(spec))
        # Spark reads this when it launches the driver JVM (client mode), before any log line.
        .set("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{_log4j_file(level)}")
    )


def _launch(conf: SparkConf, log_path: Path | None) -> None:
    """Start the JVM; with a log file its stdout/stderr go there for the life of the process."""
    if log_path is None:
        SparkContext(conf=conf)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as sink:
        # Popen dups the descriptor into the child, so closing ours afterwards is safe.
        gateway = launch_gateway(conf, popen_kwargs={"stdout": sink, "stderr": sink})
    SparkContext(conf=conf, gateway=gateway)


@functools.cache
def _log4j_file(level: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"orchard-log4j2-{level}-", suffix=".properties")
    with os.fdopen(fd, "w") as fh:
        fh.write(_LOG4J.format(level=level))
    atexit.register(_unlink, path)
    return path


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _route_py4j_logging(log_path: Path | None) -> None:
    py4j = logging.getLogger("py4j")
    py4j.setLevel(logging.WARNING)
    if log_path is None:
        return
    target = str(Path(log_path).resolve())
    if not any(getattr(h, "baseFilename", None) == target for h in py4j.handlers):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        py4j.addHandler(logging.FileHandler(target))
    # py4j's connection chatter is not the user's business on the terminal.
    py4j.propagate = False
