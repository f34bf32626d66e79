"""``orchard bench spec-to-model``: the figure a user feels, spec to tested model on a 70,000 × 784 table.

Platform: ``orchard run`` of a CNN spec on ``orchard bench prep``'s case (a) (70,000 × 784 uint8 Parquet, one
column per pixel, written once under ``.orchard/bench/prep``) into a fresh output folder, so the run does
everything a user's first run does: Spark prep, Ray Train, the test pass, MLflow logging (model, plots) to a
SQLite store. Baseline: bench prep's pandas/pyarrow script (the same prep steps in one process) and then
``bench/plain_train.py`` training the same model for the same epochs with the same optimizer (fused Adam,
``engine.build_optimizer``) and the same thread count, and testing it: two processes, their wall times summed.
Every side is a fresh process timed from outside; they alternate (baseline, platform, baseline, ...), each
repeat's ratio taken against the mean of the baselines either side of it. Above 1 is slower. Issue 11's
target: ≤ 1.5×. ``ORCHARD_BENCH_S2M_REPEATS`` (default 2) and ``ORCHARD_BENCH_S2M_EPOCHS`` (default 8)
change the run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchard.bench import Result
from orchard.bench.train import _brackets, _figures, _interleaved, _subprocess_env, _timed, ratio_row

EPOCHS, REPEATS, BATCH, THREADS = 8, 2, 256, 2
IMAGE_SHAPE = [1, 28, 28]
MODEL = {"family": "cnn", "channels": [16, 32], "hidden": [64], "dropout": 0.0}
METRIC = "spec to tested model, wall (orchard run incl. MLflow logging ÷ pandas prep + plain PyTorch)"


def spec(source: str, output: str, storage: str, epochs: int) -> dict:
    """The job both sides run: the platform as a spec, the baseline the same model, epochs and threads."""
    return {
        "name": "bench-spec-to-model", "kind": "train",
        "data": {"source": source, "label": "label", "normalize": "standard", "image_shape": IMAGE_SHAPE,
                 "output": output},
        "model": MODEL,
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "adam", "lr": 1e-3, "precision": "fp32",
                  "seed": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": THREADS, "use_gpu": False, "storage_path": storage},
    }


def run(progress: Callable[[str], None] = print, rows: int | None = None, epochs: int | None = None,
        repeats: int | None = None) -> list[Result]:
    """``rows`` other than 70,000 writes its own smaller table (a smoke run, not a measurement)."""
    from orchard.bench import prep

    epochs = epochs or int(os.environ.get("ORCHARD_BENCH_S2M_EPOCHS", EPOCHS))
    repeats = repeats or int(os.environ.get("ORCHARD_BENCH_S2M_REPEATS", REPEATS))
    with tempfile.TemporaryDirectory(prefix="orchard-bench-s2m-") as name:
        tmp = Path(name)
        if rows is None or rows == 70_000:
            source = str(Path(prep._input("a", progress)[0]).resolve())  # the sides run in ``tmp``
        else:
            source = str(tmp / f"images-{rows}.parquet")
            prep._write_images(Path(source), rows)
        env = _subprocess_env(tmp)
        accuracy: dict[str, list[float]] = {"orchard": [], "plain": []}
        parts: dict[str, list[float]] = {"pandas prep": [], "plain train + test": [], "orchard prepare": []}

        def baseline() -> float:
            out = tmp / f"pandas-{time.time_ns()}"
            seconds, acc, (prep_s, train_s) = plain_side(source, out, epochs, env)
            accuracy["plain"].append(acc)
            parts["pandas prep"].append(prep_s)
            parts["plain train + test"].append(train_s)
            progress(f"spec-to-model: pandas prep {prep_s:.1f} s + plain PyTorch {train_s:.1f} s, "
                     f"test accuracy {acc:.3f}")
            return seconds

        def platform() -> float:
            seconds, acc, prepare = orchard_side(source, tmp, epochs, env)
            accuracy["orchard"].append(acc)
            parts["orchard prepare"].append(prepare)
            progress(f"spec-to-model: orchard run {seconds:.1f} s (Spark prep {prepare:.1f} s), "
                     f"test accuracy {acc:.3f}")
            return seconds

        bases, got = _interleaved(baseline, {"orchard": platform}, repeats)
    case = f"a {(rows or 70_000) / 1000:g}k×784 uint8 Parquet, CNN [16, 32]"
    note = (f"{epochs} epochs; alternating: baseline {_figures(bases, '.1f')} s; "
            f"orchard {_figures(got['orchard'], '.1f')} s; "
            + "; ".join(f"{k} {_figures(v, '.1f')} s" for k, v in parts.items())
            + "; test accuracy " + ", ".join(f"{k} {_figures(v, '.3f')}" for k, v in accuracy.items()))
    results = [ratio_row(case, METRIC, "s", got["orchard"], _brackets(bases), note=note)]
    for side, accs in accuracy.items():
        results.append(Result(case, f"test accuracy, {side}", "", float(np.mean(accs)),
                              spread=[min(accs), max(accs)], repeats=len(accs)))
    return results


def plain_side(source: str, out: Path, epochs: int, env: dict[str, str]
               ) -> tuple[float, float, tuple[float, float]]:
    """(seconds, test accuracy, (prep s, train s)): the pandas prep script, then the plain PyTorch script."""
    cwd = out.parent
    prep_s, _ = _timed([sys.executable, "-m", "orchard.bench.prep", source, "label", str(out)], cwd, env)
    job = json.dumps(spec(source, str(out), str(cwd / "unused"), epochs))
    train_s, printed = _timed([sys.executable, "-m", "orchard.bench.plain_train", str(out), job], cwd, env)
    shutil.rmtree(out, ignore_errors=True)
    accuracy = float(json.loads(printed.strip().splitlines()[-1])["test/accuracy"])
    return prep_s + train_s, accuracy, (prep_s, train_s)


def orchard_side(source: str, tmp: Path, epochs: int, env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds, test accuracy, Spark prep seconds) of ``orchard run`` on a fresh output folder."""
    from orchard.runner import TIMINGS_FILE

    stamp = time.time_ns()
    output = tmp / f"data-{stamp}"
    path = tmp / f"spec-{stamp}.yaml"
    path.write_text(json.dumps(spec(source, str(output), str(tmp / f"ray-{stamp}"), epochs)))  # JSON is YAML
    before = set((tmp / ".orchard" / "runs").glob("*"))
    seconds, _ = _timed([sys.executable, "-m", "orchard.cli", "run", str(path)], tmp, env)
    (folder,) = set((tmp / ".orchard" / "runs").glob("*")) - before
    timings = json.loads((folder / TIMINGS_FILE).read_text())
    shutil.rmtree(output, ignore_errors=True)
    return seconds, _test_accuracy(tmp), float(timings.get("prepare", float("nan")))


def _test_accuracy(tmp: Path) -> float:
    """test/accuracy of the newest run in the bench's own SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("bench-spec-to-model")
    (latest,) = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                   max_results=1)
    return float(latest.data.metrics["test/accuracy"])
