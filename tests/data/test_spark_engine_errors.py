"""A Spark failure ends a prep with one message naming the cause and the setting to change, never a py4j traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchard.config import SparkSpec
from orchard.data import EngineError
from orchard.data.errors import OOM_EXIT, explain
from orchard.data.session import spark_for


def orchard(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env.pop("ORCHARD_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchard.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_spec(tmp_path: Path, source: str, driver_memory: str) -> Path:
    spec = {"name": "engine-error", "kind": "train", "train": {"epochs": 1},
            "data": {"source": source, "output": str(tmp_path / "prepared"),
                     "spark": {"master": "local[2]", "driver_memory": driver_memory}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_one_clean_message(out: subprocess.CompletedProcess, *expected: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    for phrase in expected:
        assert phrase in text, text
    assert "Traceback" not in text, text
    assert "py4j" not in text.lower(), text
    assert "engine log: " in text, text


@pytest.mark.slow
def test_prep_that_exhausts_the_jvm_heap_exits_1_naming_driver_memory(tmp_path):
    # One 300 MB line: reading it needs more than a 512m heap holds (Spark refuses to start below ~450m),
    # so the JVM dies of OutOfMemoryError in its first task, in seconds rather than minutes of shuffling.
    csv = tmp_path / "huge.csv"
    with open(csv, "w") as fh:
        fh.write("f0,f1,label\n")
        fh.writelines(f"{i},{2 * i},{i % 2}\n" for i in range(100))
        fh.write("1," + "9" * 300_000_000 + ",1\n")
    out = orchard("prep", str(write_spec(tmp_path, str(csv), "512m")), cwd=tmp_path)
    csv.unlink()
    assert_one_clean_message(out, "ran out of memory", "java.lang.OutOfMemoryError", "data.spark.driver_memory")
    assert not list((tmp_path / "prepared").glob("*/manifest.json"))


@pytest.mark.slow
def test_run_with_a_driver_heap_spark_refuses_exits_1_naming_the_setting(tmp_path):
    out = orchard("run", str(write_spec(tmp_path, "sklearn:breast_cancer", "64m")), cwd=tmp_path)
    assert_one_clean_message(out, "INVALID_DRIVER_MEMORY", "data.spark.driver_memory (now 64m)")


def test_a_spark_analysis_error_becomes_an_engine_error_and_the_session_survives(spark):
    with pytest.raises(EngineError) as caught, spark_for(SparkSpec(master="local[2]")) as session:
        session.range(3).select("no_such_column").collect()
    assert "UNRESOLVED_COLUMN" in str(caught.value)
    assert "data.spark" in str(caught.value)
    assert spark.range(3).count() == 3


def test_orchard_errors_inside_a_spark_job_pass_through_unchanged(spark):
    with pytest.raises(ValueError, match="not an engine failure"), spark_for(SparkSpec(master="local[2]")):
        raise ValueError("not an engine failure")


def test_a_dead_jvm_is_explained_from_its_exit_code_and_the_log():
    lost = ConnectionRefusedError(111, "Connection refused")
    assert "data.spark.driver_memory (now 1g)" in explain(lost, SparkSpec(driver_memory="1g"), OOM_EXIT, "")
    log = "WARN TaskSetManager: Lost task 0.0: java.lang.OutOfMemoryError: Java heap space\n"
    on_cluster = explain(lost, SparkSpec(master="spark://10.0.0.1:7077"), 1, log)
    assert "java.lang.OutOfMemoryError: Java heap space" in on_cluster
    assert "spark.executor.memory" in on_cluster
    assert "exited with code 137" in explain(lost, SparkSpec(), 137, "")
