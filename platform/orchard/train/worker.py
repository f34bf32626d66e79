"""The per-worker training function: plain PyTorch with Ray at marked points only.

Ray appears in four places: the dataset shard, ``prepare_model``, ``get_checkpoint`` and ``report``.
Every worker calls ``report`` the same number of times (it is a barrier); only rank 0 attaches a checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import ray.train
import ray.train.torch
from orchard.config import JobSpec
from orchard.engine import build_optimizer, evaluate, seed_everything, train_epoch
from orchard.engine.checkpoint import load_checkpoint, save_checkpoint
from orchard.engine.metrics import classification_metrics
from orchard.models import model_from_manifest

TEST_FILE = "test.json"


def _batches(it, batch_size: int, rank_slice: tuple[int, int] | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, label) pairs from a Ray Data iterator; rank_slice=(rank, world) deals batches round-robin."""
    for i, b in enumerate(it.iter_torch_batches(batch_size=batch_size, prefetch_batches=2,
                                                dtypes={"features": torch.float32, "label": torch.int64}
                                                )):
        if rank_slice is None or i % rank_slice[1] == rank_slice[0]:
            yield b["features"], b["label"]


def train_loop(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(config["spec"])
    manifest = config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    seed_everything(spec.train.seed)

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model_from_manifest(spec.model, manifest))
    optimizer = build_optimizer(model, spec.train)
    num_classes = manifest["num_classes"]

    start_epoch, history = 1, []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
        start_epoch, history = state["epoch"] + 1, state.get("history", [])

    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, spec.train.epochs + 1):
        tr = train_epoch(model, _batches(train_shard, spec.train.batch_size), optimizer, device)
        va = evaluate(model, _batches(val_ds, spec.train.batch_size * 4, (rank, world)), device, num_classes)
        metrics = {"epoch": epoch, **tr.as_metrics("train"), **va.as_metrics("val"), "train/samples": tr.samples}
        history.append(metrics)
        _report(metrics, rank, model, optimizer, {"epoch": epoch, "history": history})

    test_ds = ray.train.get_dataset_shard("test")
    te = evaluate(model, _batches(test_ds, spec.train.batch_size * 4, (rank, world)), device, num_classes)
    scores = classification_metrics(te.confusion)
    test_metrics = {f"test/{k}": v for k, v in scores.items()} | {"test/loss": te.loss}
    final_state = {"epoch": spec.train.epochs, "history": history, "final": True}
    _report(test_metrics | {"epoch": spec.train.epochs}, rank, model, optimizer, final_state,
             extra={TEST_FILE: {"metrics": test_metrics, "confusion": te.confusion.tolist()}})


def _report(metrics: dict[str, Any], rank: int, model, optimizer, state: dict[str, Any],
            extra: dict[str, Any] | None = None) -> None:
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, optimizer, state)
        for name, payload in (extra or {}).items():
            Path(tmp, name).write_text(json.dumps(payload))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
