"""``orchard bench train``: the platform's training throughput against a plain PyTorch loop.

Every ratio compares two measurements taken in this run on this machine, with the same model, batch,
optimizer and thread count:
  platform/plain      Ray Train (1 worker, Ray Data shard) ÷ a hand-written loop over in-memory tensors
  raydata/memory      the same hand-written loop fed by Ray Data from the Parquet ÷ fed from memory
  2 workers/1 worker  Ray Train throughput with 2 workers ÷ with 1
Throughput is steady state (the first epoch warms up and is not counted). The fixed cost of a run is
its wall time minus epochs × the steady epoch time: Ray start, worker group, data planning, eval, checkpoints.

A shared machine drifts by several percent within a minute (epochs of one loop measured here ranged
over ±10%), so the two loops of raydata/memory alternate epoch by epoch, and platform/plain alternates
whole measurements: plain, platform, plain, platform, plain; the ratio is of the means, and every figure
goes in the result's note.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchard.bench import Result
from orchard.bench.synthetic import write_classification
from orchard.config import JobSpec
from orchard.data.manifest import read_split
from orchard.models import build_model

BATCH, EPOCHS, THREADS, REPEATS = 256, 4, 1, 2
CASES = {
    "mlp": ({"family": "mlp", "hidden": [256, 256], "dropout": 0.0}, 120_000, None),
    "cnn": ({"family": "cnn", "channels": [16, 32], "hidden": [64], "dropout": 0.0}, 24_000, [1, 8, 8]),
    "transformer": ({"family": "transformer", "d_model": 64, "heads": 4, "layers": 2, "hidden": [],
                     "dropout": 0.0}, 12_000, [1, 8, 8]),
}


def _spec(model: dict, workers: int, storage: Path) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench-train", "kind": "train", "model": model,
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "optimizer": "adam", "lr": 1e-3, "precision": "fp32"},
        "scaling": {"num_workers": workers, "cpus_per_worker": THREADS, "use_gpu": False,
                    "storage_path": str(storage), "keep_checkpoints": 1},
    })


def _plain_epochs(model: nn.Module, batches_fn, epochs: int) -> list[tuple[int, float]]:
    """The baseline: the loop anyone writes first. Returns (samples, seconds) per epoch."""
    return _alternating([(model, batches_fn)], epochs)[0]


def _alternating(loops: list[tuple[nn.Module, object]], epochs: int) -> list[list[tuple[int, float]]]:
    """Epoch 1 of every loop, then epoch 2 of every loop...: (samples, seconds) per epoch, per loop."""
    loss_fn = nn.CrossEntropyLoss()
    opts = [torch.optim.Adam(model.parameters(), lr=1e-3) for model, _ in loops]
    out: list[list[tuple[int, float]]] = [[] for _ in loops]
    for _ in range(epochs):
        for i, ((model, batches_fn), opt) in enumerate(zip(loops, opts, strict=True)):
            model.train()
            n, t0 = 0, time.perf_counter()
            for x, y in batches_fn():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
                n += len(y)
            out[i].append((n, time.perf_counter() - t0))
    return out


def _steady(epochs: list[tuple[int, float]]) -> float:
    rest = epochs[1:] or epochs
    return sum(n for n, _ in rest) / sum(s for _, s in rest)


def _memory_batches(x: torch.Tensor, y: torch.Tensor):
    def gen():
        perm = torch.randperm(len(y))
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            yield x[idx], y[idx]
    return gen


def _raydata_batches(prepared):
    """The same Ray Data → tensor path the Ray Train workers use."""
    from orchard.train import feed

    ds = feed.read_split(str(prepared.split_path("train").resolve()), prepared.manifest["counts"]["train"],
                         prepared.manifest["feature_dim"], shuffle_files=True)
    rng = np.random.default_rng(0)
    return lambda: feed.tensor_batches(ds, BATCH, rng=rng)


def _platform(spec: JobSpec, prepared) -> tuple[float, float]:
    """Steady samples/s inside the Ray Train worker, and the run's fixed cost in seconds."""
    from orchard.train import run_training

    t0 = time.perf_counter()
    res = run_training(spec, prepared)
    wall = time.perf_counter() - t0
    epochs = [(h["train/samples"], h["train/epoch_seconds"]) for h in res.history]
    rate = _steady(epochs)
    steady_epoch = epochs[-1][1] if len(epochs) == 1 else float(np.mean([s for _, s in epochs[1:]]))
    return rate, wall - len(epochs) * steady_epoch


def run(progress=print, scale: float = 1.0) -> list[Result]:
    """Every case and ratio; ``scale`` shrinks the row counts (a smoke run, not a measurement).

    Leaves the process as it found it: its torch thread count, and no Ray instance it started itself.
    """
    import ray

    from orchard.raystart import start_ray

    threads, started = torch.get_num_threads(), not ray.is_initialized()
    torch.set_num_threads(THREADS)
    start_ray(2 * THREADS + 1)
    try:
        return _cases(progress, scale)
    finally:
        torch.set_num_threads(threads)
        if started:
            ray.shutdown()


def _cases(progress, scale: float) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        for name, (model_cfg, rows, shape) in CASES.items():
            prepared = write_classification(Path(tmp, name), max(2_000, int(rows * scale)), 64, 10, shape)
            spec = _spec(model_cfg, 1, Path(tmp, "unused"))
            x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
            torch.manual_seed(0)
            mem_epochs, fed_epochs = _alternating(
                [(build_model(spec, prepared.manifest), _memory_batches(x, y)),
                 (build_model(spec, prepared.manifest), _raydata_batches(prepared))], EPOCHS + 1)
            plain, fed = _steady(mem_epochs), _steady(fed_epochs)
            progress(f"{name}: plain loop {plain:,.0f} samples/s, Ray Data fed loop {fed:,.0f} samples/s")
            plains, runs = [plain], []
            for i in range(REPEATS):
                # A fresh storage folder: a run name seen before would resume its finished checkpoint.
                runs.append(_platform(_spec(model_cfg, 1, Path(tmp, f"ray-{name}-{i}")), prepared))
                plains.append(_steady(_plain_epochs(build_model(spec, prepared.manifest),
                                                    _memory_batches(x, y), EPOCHS)))
            ours, fixed = float(np.mean([r for r, _ in runs])), float(np.mean([f for _, f in runs]))
            base = float(np.mean(plains))
            progress(f"{name}: platform (Ray Train, 1 worker) {', '.join(f'{r:,.0f}' for r, _ in runs)} samples/s, "
                     f"fixed cost {fixed:.1f} s; plain loop {', '.join(f'{p:,.0f}' for p in plains)} samples/s")
            results += [
                Result(name, "platform / plain loop", "samples/s", ours, base, ours / base,
                       note="alternating: plain " + ", ".join(f"{p:,.0f}" for p in plains)
                       + "; platform " + ", ".join(f"{r:,.0f}" for r, _ in runs)),
                Result(name, "Ray Data fed / in-memory fed", "samples/s", fed, plain, fed / plain),
                Result(name, "fixed cost of a run", "s", fixed, note="wall − epochs × steady epoch"),
            ]
            if name == "mlp":
                two, _ = _platform(_spec(model_cfg, 2, Path(tmp, "ray-2-workers")), prepared)
                progress(f"{name}: platform, 2 workers {two:,.0f} samples/s")
                results.append(Result(name, "2 workers / 1 worker", "samples/s", two, ours, two / ours))
    return results
