"""The one place a SparkSession is made: local mode, no UI, and Spark's log flood kept off the terminal.

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
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from pyspark import SparkConf, SparkContext
from pyspark.java_gateway import launch_gateway
from pyspark.sql import SparkSession

from orchard.config import SparkSpec

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
    """A session for one job: stopped afterwards only if this call started it (tests share theirs)."""
    started = SparkContext._active_spark_context is None
    session = spark_session(spec, log_path)
    try:
        with quiet_pyspark_warnings():
            yield session
    finally:
        if started:
            session.stop()


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
