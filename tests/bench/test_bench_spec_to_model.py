"""``orchard bench spec-to-model``: its baseline side runs for real; its spec is the job the baseline trains.

The platform side is ``orchard run`` of that spec (tests/cli covers the command); a whole bench, even at a
small scale, is a minute of Spark and Ray start-up that CI's budget does not hold. The figures come from
``orchard bench spec-to-model`` (README).
"""

from __future__ import annotations

import importlib

import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_the_baseline_prepares_with_pandas_then_trains_and_tests_the_same_model(tmp_path):
    from orchard.bench import prep
    from orchard.bench.spec_to_model import BATCH, THREADS, plain_side
    from orchard.bench.train import _subprocess_env

    source = tmp_path / "images.parquet"
    prep._write_images(source, 3_000)
    out = tmp_path / "pandas"
    seconds, accuracy, (prep_s, train_s) = plain_side(str(source), out, 1, _subprocess_env(tmp_path))
    assert prep_s > 0 and train_s > 0 and seconds == pytest.approx(prep_s + train_s)
    # 10 classes of noisy templates: 0.936 after one epoch on this table when measured; chance is 0.1.
    assert accuracy > 0.6
    assert not out.exists()  # each baseline run prepares afresh, as each orchard run does
    assert BATCH == 256 and THREADS == 2


def test_the_platform_spec_names_the_model_epochs_and_threads_the_baseline_uses(tmp_path):
    from orchard.bench.spec_to_model import MODEL, THREADS, spec
    from orchard.config import JobSpec

    job = JobSpec.model_validate(spec("in.parquet", str(tmp_path / "out"), str(tmp_path / "ray"), 5))
    assert job.train.epochs == 5 and job.model.family == MODEL["family"] == "cnn"
    # plain_train takes its thread count from cpus_per_worker; the pandas script standardizes too.
    assert job.scaling.num_workers == 1 and job.scaling.cpus_per_worker == THREADS
    assert job.data.image_shape == [1, 28, 28] and job.data.normalize == "standard"


def test_every_bench_the_cli_offers_resolves_to_a_function():
    from orchard.bench import BENCHES
    from orchard.cli import _parser

    assert "spec-to-model" in BENCHES
    for name, target in BENCHES.items():
        assert _parser().parse_args(["bench", name]).name == name  # the CLI offers exactly BENCHES
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), target


def test_plain_train_reads_the_pandas_layout(tmp_path):
    import numpy as np
    import pyarrow as pa

    from orchard.bench.plain_train import _splits
    from orchard.config import JobSpec

    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        (tmp_path / split).mkdir()
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        table = pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                          "label": np.arange(n) % 3})
        pq.write_table(table, tmp_path / split / "part-00000.parquet")
    job = JobSpec.model_validate({"name": "t", "kind": "train", "data": {"source": "x.csv", "label": "y"}})
    manifest, split_of = _splits(str(tmp_path), job)
    assert manifest["feature_dim"] == 4 and manifest["num_classes"] == 3
    xt, yt = split_of("test")
    assert xt.shape == (10, 4) and yt.tolist() == [i % 3 for i in range(10)]
    assert split_of("train")[0].shape == (40, 4)
