"""`data.spark.master: spark://HOST:PORT`: a real standalone master and worker prepare what local mode prepares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchard.config import SpecError, validate_spec
from orchard.data import load_manifest, prepare
from orchard.data.manifest import SPLITS, read_split
from tests.net import free_port, listening, stop_group, wait_for

DATA = {"source": "sklearn:breast_cancer", "split": {"seed": 7}}
# Written per run, not part of the content.
VOLATILE = ("created_at",)


def spark_env(tmp_path: Path) -> dict[str, str]:
    import pyspark

    # Loopback only: the driver, master, worker and executors all run on this machine.
    return {**os.environ, "SPARK_HOME": os.path.dirname(pyspark.__file__), "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOG_DIR": str(tmp_path / "spark-logs"), "SPARK_WORKER_DIR": str(tmp_path / "spark-work")}


def spark_class(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([f"{env['SPARK_HOME']}/bin/spark-class", *args], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def sorted_rows(prepared, split: str) -> np.ndarray:
    x, y = read_split(prepared, split)
    rows = np.column_stack([x.astype(np.float64), y.astype(np.float64)])
    return rows[np.lexsort(rows.T[::-1])]


def test_spark_master_accepts_cluster_urls_and_names_the_key_of_a_typo():
    for master in ("local[2]", "spark://10.0.0.5:7077", "k8s://https://10.0.0.1:6443", "yarn"):
        assert validate_spec({"name": "m", "kind": "train", "data": {"spark": {"master": master}}})
    with pytest.raises(SpecError, match=r"data\.spark\.master"):
        validate_spec({"name": "m", "kind": "train", "data": {"spark": {"master": "spark://no-port"}}})
    with pytest.raises(SpecError, match=r"data\.spark\.master instead"):
        validate_spec({"name": "m", "kind": "train", "data": {"spark": {"conf": {"spark.master": "yarn"}}}})


@pytest.mark.slow
def test_a_standalone_cluster_prepares_the_same_content_as_local_mode(spark, tmp_path):
    local = prepare(validate_spec({"name": "s", "kind": "train",
                                   "data": {**DATA, "output": str(tmp_path / "local")}}))

    env = spark_env(tmp_path)
    port, ui, worker_ui = free_port(), free_port(), free_port()
    master_log, worker_log = tmp_path / "master.log", tmp_path / "worker.log"
    master = spark_class(env, master_log, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                         "--port", str(port), "--webui-port", str(ui))
    worker = None
    try:
        wait_for(lambda: listening(port), "Spark master", master_log, timeout_s=180)
        worker = spark_class(env, worker_log, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                             "--cores", "1", "--memory", "1g", "--webui-port", str(worker_ui))
        wait_for(lambda: "Successfully registered with master" in worker_log.read_text(errors="replace"),
                 "registered Spark worker", worker_log, timeout_s=180)
        spec = {"name": "s", "kind": "train", "data": {**DATA, "output": str(tmp_path / "cluster"),
                                                      "spark": {"master": f"spark://127.0.0.1:{port}"}}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        out = subprocess.run([sys.executable, "-m", "orchard.cli", "prep", "job.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        # The app really ran on the cluster: the worker launched an executor for it.
        assert "Launching executor" in worker_log.read_text(errors="replace") or \
            "Asked to launch executor" in worker_log.read_text(errors="replace")
    finally:
        stop_group(*(p for p in (master, worker) if p is not None))

    (cluster_path,) = (tmp_path / "cluster").iterdir()
    cluster = load_manifest(cluster_path)
    # The content hash keys the folder: the same spec prepared anywhere is the same dataset.
    assert cluster_path.name == local.path.name
    a, b = ({k: v for k, v in p.manifest.items() if k not in VOLATILE} for p in (local, cluster))
    assert a == b
    for split in SPLITS:
        np.testing.assert_array_equal(sorted_rows(local, split), sorted_rows(cluster, split))
