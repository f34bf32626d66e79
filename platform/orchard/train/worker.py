"""The per-worker training function: plain PyTorch with Ray at marked points only.

Ray appears in four places: the dataset shard, ``prepare_model`` (DDP; FSDP is PyTorch's own
``fully_shard``), ``get_checkpoint`` and ``report``. Every worker calls ``report`` the same number of times
(it is a barrier); every rank gathers the checkpoint's tensors (a collective under FSDP) and only rank 0
attaches it. Every rank sees the same all-reduced validation metrics, so every rank takes the same
early-stopping decision and the report counts stay equal.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from orchard.config import JobSpec
from orchard.data.manifest import label_dtype as manifest_label_dtype
from orchard.engine import LoopOptions, build_optimizer, evaluate, make_task, seed_everything, train_epoch
from orchard.engine.cache import EpochCache, cache_budget
from orchard.engine.checkpoint import (
    incomplete,
    is_sharded,
    load_checkpoint,
    load_model_state,
    model_state,
    optimizer_state,
    write_checkpoint,
)
from orchard.engine.early_stopping import EarlyStopper
from orchard.models import build_model
from orchard.train import faults
from orchard.train.feed import tensor_batches

log = logging.getLogger("orchard.train")

TEST_FILE = "test.json"
BEST_FILE = "best.safetensors"


def preload() -> None:
    """Run by Ray as a training worker's process starts (``launcher.WORKER_ENV_VARS``): importing this
    module imported torch, Ray Train and the loop; the actor class Ray Train runs it in comes next. A worker
    pre-started for a run (``launcher.prewarm``) does this while idle, before the run asks for it."""
    import ray.train.v2._internal.execution.worker_group.worker  # noqa: F401 - RayTrainWorker


def train_loop(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(config["spec"])
    manifest = config["manifest"]
    label_dtype = getattr(torch, np.dtype(manifest_label_dtype(manifest)).name)  # torch.int64 / torch.float32
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    seed_everything(spec.train.seed)

    device = ray.train.torch.get_device()
    task = make_task(manifest, spec.train, manifest.get("class_counts"))
    task.loss_fn.to(device)
    model = build_model(spec, manifest)
    model = _parallelize(model, spec.scaling.strategy, device, world)
    if spec.train.compile:
        model = torch.compile(model)
    # The same weights on every rank (seeded above), then a stream per rank: its own dropout masks.
    seed_everything(spec.train.seed + rank)
    optimizer = build_optimizer(model, spec.train, device)
    rows = manifest["counts"]["train"] // world
    steps = math.ceil(math.ceil(rows / spec.train.batch_size) / spec.train.grad_accum)
    opts = LoopOptions.from_spec(spec.train, device, optimizer, steps)
    stopper = EarlyStopper(spec.train.early_stopping)

    start, history, best = _resume(model, optimizer, opts, stopper)
    # val/test shards are disjoint whole blocks, so ranks hold different batch counts (even none): they
    # evaluate in lockstep, a rank out of batches forwarding a dummy row. An FSDP forward is a collective,
    # and so is a DDP forward's buffer broadcast (its first after training).
    pad = torch.zeros(1, manifest["feature_dim"]) if world > 1 else None
    train_rows = manifest["counts"]["train"]
    pin = device.type == "cuda"
    train_shard, val_ds = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    budget = _agreed(cache_budget(device) if spec.train.cache == "auto" else 0, device, world)
    bs = spec.train.batch_size
    # Every rank caches the same way: equal shards (streaming_split equal=True) keep DDP step counts equal.
    block_rng = np.random.default_rng(spec.train.seed + rank)  # a new block order every streamed epoch
    train_data = EpochCache(lambda: tensor_batches(train_shard, bs, label_dtype, pin=pin, rng=block_rng), device, bs,
                            True, budget, seed=spec.train.seed + rank)
    # A rank that streams its val shard while another replays its cache would wait at the split's epoch
    # barrier forever: cache only when the whole split fits, so every rank's (unequal) shard does.
    val_budget = budget // 4 if manifest["counts"]["val"] * (manifest["feature_dim"] * 4 + 8) <= budget // 4 else 0
    val_data = EpochCache(lambda: tensor_batches(val_ds, bs * 4, label_dtype, pin=pin), device, bs * 4,
                          False, val_budget)
    for epoch in range(start, spec.train.epochs + 1):
        faults.at_epoch_start(epoch, rank)  # a no-op unless a failure test armed it
        t0 = time.perf_counter()
        tr = train_epoch(model, train_data, optimizer, device, task, opts)
        train_s = time.perf_counter() - t0  # train_epoch ends in an all-reduce, so every rank has finished
        va = evaluate(model, val_data, device, task, opts, pad)
        dropped = train_rows - tr.samples  # streaming_split(equal=True) cuts the split to a multiple of world
        if dropped and epoch == start:
            log.warning("train: %d of %d training rows are left out each epoch to give %d workers equal shards",
                        dropped, train_rows, world)
        metrics = {"epoch": epoch, **tr.as_metrics("train"), **va.as_metrics("val"),
                   "train/samples": tr.samples, "train/rows_dropped_per_epoch": dropped,
                   "train/lr": optimizer.param_groups[0]["lr"],
                   "train/epoch_seconds": train_s, "train/samples_per_s": tr.samples / max(train_s, 1e-9)}
        if epoch == start and start > 1:
            metrics["train/resumed_from"] = start - 1  # visible in MLflow: where a restart picked up
        if stopper.update(metrics, epoch):
            # Without early stopping best stays None: the last epoch is used. Collective under FSDP (rank 0 holds it).
            best = model_state(model)
        history.append(metrics)
        state = {"epoch": epoch, "history": history, "stopper": stopper.state(), "scheduler": _sched_state(opts)}
        _report(metrics | {"best_epoch": stopper.best_epoch or epoch}, rank, model, optimizer, state, best)
        if stopper.should_stop:
            break

    # The best epoch's weights (by the early-stopping metric, else the last) are the ones tested and logged.
    if best is not None:
        load_model_state(model, best)
    te = evaluate(model, tensor_batches(ray.train.get_dataset_shard("test"), bs * 4, label_dtype, pin=pin),
                  device, task, opts, pad)
    test_metrics = te.as_metrics("test")
    confusion = te.confusion.tolist() if te.confusion is not None else None
    last = history[-1]["epoch"] if history else spec.train.epochs
    final = {"epoch": last, "history": history, "final": True, "stopper": stopper.state()}
    _report(test_metrics | {"epoch": last}, rank, model, optimizer, final, best,
            extra={TEST_FILE: {"metrics": test_metrics, "confusion": confusion, "best_epoch": stopper.best_epoch}})


def _agreed(budget: int, device: torch.device, world: int) -> int:
    """The smallest cache budget of all ranks (free GPU memory differs): every rank then caches, or streams,
    the same shards, as the streaming splits' per-epoch barrier needs."""
    if world == 1:
        return budget
    import torch.distributed as dist

    t = torch.tensor([budget], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _resume(model: nn.Module, optimizer, opts: LoopOptions, stopper: EarlyStopper):
    """Continue from the latest checkpoint after a worker-group restart or ``orchard run --resume``."""
    ckpt = _restore_point()
    if ckpt is None:
        return 1, [], None
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        state = load_checkpoint(d, model, optimizer)
        best = load_file(str(Path(d, BEST_FILE))) if Path(d, BEST_FILE).is_file() else None
    if opts.scheduler is not None and state.get("scheduler"):
        opts.scheduler.load_state_dict(state["scheduler"])
    stopper.load_state(state.get("stopper"))
    history = [h for h in state.get("history", []) if h["epoch"] <= state["epoch"]]
    return state["epoch"] + 1, history, best


def _restore_point():
    """The latest checkpoint Ray holds, or, if its files are incomplete (storage that lost a write), the
    newest complete one reported before it. Ray registers a checkpoint only after its copy to storage
    finished, so a worker killed mid-copy leaves an orphan folder that is never offered here."""
    latest = ray.train.get_checkpoint()
    if latest is None or _complete(latest):
        return latest
    log.warning("checkpoint %s is incomplete: resuming from the newest complete one before it", latest.path)
    reported = [r.checkpoint for r in ray.train.get_all_reported_checkpoints()]
    return next((c for c in reversed(reported) if c.path != latest.path and _complete(c)), None)


def _complete(ckpt) -> bool:
    with ckpt.as_directory() as d:
        why = incomplete(d)
    if why is not None:
        log.warning("checkpoint %s: %s", ckpt.path, why)
    return why is None


def _sched_state(opts: LoopOptions) -> dict[str, Any] | None:
    if opts.scheduler is None:
        return None
    # LambdaLR's state holds the lambda itself; everything else is JSON-safe numbers and lists.
    return {k: v for k, v in opts.scheduler.state_dict().items() if k != "lr_lambdas"}


def _parallelize(model: nn.Module, strategy: str, device: torch.device, world: int) -> nn.Module:
    """DDP through Ray's ``prepare_model``; FSDP with PyTorch's FSDP2 ``fully_shard``, which runs on CPUs
    (gloo) as well as GPUs (Ray's own ``parallel_strategy="fsdp"`` is FSDP1 and refuses CPUs)."""
    if strategy != "fsdp" or world == 1:
        return ray.train.torch.prepare_model(model, parallel_strategy=strategy)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    # Bottom-up, one group per top-level block: a block's parameters are gathered just before its forward
    # and freed after, so at most one block is ever whole; the root takes what no block owns.
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _report(metrics: dict[str, Any], rank: int, model, optimizer, state: dict[str, Any],
            best: dict[str, torch.Tensor] | None, extra: dict[str, Any] | None = None) -> None:
    # Under FSDP gathering the full tensors is a collective: every rank takes part, rank 0 receives them.
    gather = rank == 0 or is_sharded(model)
    weights, optim = (model_state(model), optimizer_state(model, optimizer)) if gather else ({}, {})
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(Path(tmp, BEST_FILE)))
        for name, payload in (extra or {}).items():
            Path(tmp, name).write_text(json.dumps(payload))
        write_checkpoint(tmp, weights, optim, state)  # last: its state.json seals every file in the folder
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_fn=faults.upload_fn(int(metrics["epoch"]), rank))
