"""Fault injection for the failure tests: a worker dies at a named point, as a real crash would.

Armed only by ``$ORCHARD_TRAIN_FAULT`` (never set by Orchard itself), which Ray workers inherit from the
driver's environment. Its value is JSON::

    {"point": "epoch" | "upload", "epoch": 3, "rank": 1, "times": 2, "count_file": "/tmp/deaths"}

``epoch``: the worker exits as it starts that epoch. ``upload``: rank 0 dies while Ray copies that epoch's
checkpoint to storage, half-way through the model file. Each death appends a line to ``count_file`` (it
outlives the worker), so a restarted worker group dies again only while fewer than ``times`` deaths are recorded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

ENV = "ORCHARD_TRAIN_FAULT"


def _armed(point: str, epoch: int, rank: int) -> dict[str, Any] | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    fault = json.loads(raw)
    if fault["point"] != point or int(fault["epoch"]) != epoch or int(fault.get("rank", 0)) != rank:
        return None
    path = Path(fault["count_file"])
    deaths = len(path.read_text().splitlines()) if path.is_file() else 0
    return fault if deaths < int(fault.get("times", 1)) else None


def _die(fault: dict[str, Any], note: str) -> None:
    with open(fault["count_file"], "a") as f:
        f.write(f"{note} pid={os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os._exit(1)  # no cleanup, no exception for Ray to report: the process is simply gone


def at_epoch_start(epoch: int, rank: int) -> None:
    fault = _armed("epoch", epoch, rank)
    if fault is not None:
        import ray.train

        # Blocks until the controller has taken in every earlier report: a death before that would race the
        # controller's next poll and could drop the previous epoch's report (and checkpoint) with it.
        ray.train.get_all_reported_checkpoints()
        _die(fault, f"epoch {epoch} rank {rank}")


def upload_fn(epoch: int, rank: int):
    """A ``checkpoint_upload_fn`` for ``ray.train.report`` that dies mid-copy, or None when not armed."""
    fault = _armed("upload", epoch, rank)
    if fault is None:
        return None

    def upload(checkpoint, dir_name: str):
        import ray.train
        from ray.train.v2._internal.execution.context import get_train_context

        from orchard.engine.checkpoint import MODEL_FILE

        # As at_epoch_start: first wait until the controller has taken in every earlier report, else this death
        # can drop the previous epoch's report and checkpoint too, and the restart begins from scratch. (Not
        # ray.train.get_all_reported_checkpoints(): inside report() its index already counts this report.)
        ctx = get_train_context()
        ray.get(ctx.controller_actor.get_all_reported_checkpoints.remote(ctx.report_call_index - 1))

        storage = ray.train.get_context().get_storage()
        dest = Path(storage.build_checkpoint_path_from_name(dir_name))
        dest.mkdir(parents=True, exist_ok=True)
        src = Path(checkpoint.path)
        for f in sorted(src.iterdir(), key=lambda p: p.name == MODEL_FILE):  # the model file last
            if f.name != MODEL_FILE:
                shutil.copy(f, dest / f.name)
        data = (src / MODEL_FILE).read_bytes()
        (dest / MODEL_FILE).write_bytes(data[: len(data) // 2])
        _die(fault, f"upload epoch {epoch} rank {rank} into {dest}")

    return upload
