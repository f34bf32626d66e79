"""``orchard bench train-gpu``: the Transformer reference on one GPU, platform vs a plain loop.

Reference (issue "Training engine"): 8 layers, d=512, 8 heads, sequence 256, batch 64, bf16 autocast.
Both sides use the same model, batch, fused AdamW and bf16; throughput is steady state (epoch 1 warms up).
MFU counts 6·N·tokens for the dense weights plus 12·L·T²·d for attention per sample, against the GPU's
dense bf16 peak.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from orchard.bench import Result
from orchard.bench.synthetic import write_classification
from orchard.bench.train import _steady
from orchard.config import JobSpec
from orchard.data.manifest import read_split
from orchard.models import build_model

LAYERS, D, HEADS, SEQ, FEATS, BATCH, EPOCHS, ROWS = 8, 512, 8, 256, 16, 64, 3, 64 * 150
# (tag, torch.compile, train.cache): cache "none" streams every epoch through Ray Data.
VARIANTS = (("eager", False, "auto"), ("eager-streaming", False, "none"), ("compiled", True, "auto"))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _spec(storage: Path, compile_: bool, cache: str = "auto") -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench-gpu", "kind": "train",
        "data": {"sequence_shape": [SEQ, FEATS]},
        "model": {"family": "transformer", "d_model": D, "heads": HEADS, "layers": LAYERS, "ff_mult": 4,
                  "hidden": [], "dropout": 0.0, "pooling": "mean", "activation": "gelu"},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "optimizer": "adamw", "lr": 3e-4, "precision": "bf16",
                  "compile": compile_, "cache": cache},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "storage_path": str(storage),
                    "keep_checkpoints": 1},
    })


def _flops_per_sample(model: nn.Module) -> float:
    n = sum(p.numel() for p in model.parameters())
    return 6 * n * SEQ + 12 * LAYERS * SEQ * SEQ * D


def _plain(spec: JobSpec, prepared, compile_: bool) -> float:
    dev = torch.device("cuda")
    x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
    x, y = x.to(dev), y.to(dev)  # the fastest possible feed: everything already on the GPU
    torch.manual_seed(0)
    model = build_model(spec, prepared.manifest).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    step_model = torch.compile(model) if compile_ else model
    loss_fn = nn.CrossEntropyLoss()
    epochs = []
    for _ in range(EPOCHS):
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for i in range(0, len(y) - BATCH + 1, BATCH):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(step_model(x[i : i + BATCH]), y[i : i + BATCH])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += BATCH
        torch.cuda.synchronize()
        epochs.append((n, time.perf_counter() - t0))
    return _steady(epochs)


def run(progress=print) -> list[Result]:
    if not torch.cuda.is_available():
        raise SystemExit("orchard bench train-gpu needs a CUDA GPU")
    from orchard.raystart import start_ray
    from orchard.train import run_training

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    start_ray(8)
    results = []
    with tempfile.TemporaryDirectory(prefix="orchard-gpu-bench-") as tmp:
        prepared = write_classification(Path(tmp, "data"), ROWS, SEQ * FEATS, 10, None, files=8)
        flops = _flops_per_sample(build_model(_spec(Path(tmp), False), prepared.manifest))
        plain = {}
        for tag, compile_, cache in VARIANTS:
            if compile_ not in plain:
                plain[compile_] = _plain(_spec(Path(tmp), compile_), prepared, compile_)
                progress(f"plain loop ({'compiled' if compile_ else 'eager'}): {plain[compile_]:,.0f} samples/s")
            spec = _spec(Path(tmp, f"ray-{tag}"), compile_, cache)
            t0 = time.perf_counter()
            res = run_training(spec, prepared)
            wall = time.perf_counter() - t0
            ours = _steady([(h["train/samples"], h["train/epoch_seconds"]) for h in res.history])
            progress(f"{tag}: platform {ours:,.0f} samples/s (run wall {wall:.1f} s)")
            base = plain[compile_]
            results.append(Result(f"transformer-{tag}", "platform / plain loop", "samples/s", ours, base, ours / base))
            if peak:
                results.append(Result(f"transformer-{tag}", "platform MFU", "%", 100 * ours * flops / peak,
                                      note=f"{flops / 1e9:.1f} GFLOP/sample, peak {peak / 1e12:.0f} TFLOP/s"))
    return results
