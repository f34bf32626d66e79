"""Round checkpoints of a federation: global arrays, strategy state, round number and history.

Layout (one folder per round, the two newest kept; a folder is complete once renamed into place)::

    <root>/round-00003/arrays.safetensors    the global model after round 3
    <root>/round-00003/strategy.safetensors  server optimizer state (FedAdam/FedYogi/FedAdagrad m_t, v_t;
                                             FedAvgM momentum), keyed "<depth>.<attr>.<key>"
    <root>/round-00003/state.json            round, history rows, per-client rows, scalar strategy state,
                                             DP releases (round, noise multiplier) for the privacy ledger,
                                             early-stopping state
    <root>/round-00003/best.safetensors      federated.early_stopping: the best round's global model so far

No pickle: tensors in safetensors, everything else JSON (as ``orchard.engine.checkpoint``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ARRAYS_FILE, STRATEGY_FILE, STATE_FILE = "arrays.safetensors", "strategy.safetensors", "state.json"
BEST_FILE = "best.safetensors"
TENSOR_ATTRS = ("m_t", "v_t", "momentum_vector")  # FedOpt family moments; FedAvgM momentum
SCALAR_ATTRS = ("clipping_norm",)  # adaptive DP clipping's current bound
KEEP = 2


@dataclass
class RoundCheckpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    strategy_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    strategy_scalars: dict[str, float] = field(default_factory=dict)
    # (round, noise multiplier) of every DP release so far: the privacy budget carries across a resume.
    privacy_releases: list[tuple[int, float]] = field(default_factory=list)
    best_arrays: dict[str, torch.Tensor] | None = None  # federated.early_stopping: the best round's model
    stopper: dict[str, Any] | None = None  # EarlyStopper.state()


def _chain(strategy: Any) -> list[Any]:
    """The strategy and every strategy it wraps (ours: ``.inner``; Flower's DP wrappers: ``.strategy``)."""
    out = []
    while strategy is not None and len(out) < 8:
        out.append(strategy)
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return out


def strategy_state(strategy: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, float] = {}
    for depth, s in enumerate(_chain(strategy)):
        for attr in TENSOR_ATTRS:
            value = getattr(s, attr, None)
            items = value.items() if isinstance(value, dict) else enumerate(value or [])
            for key, arr in items:
                tensors[f"{depth}.{attr}.{key}"] = torch.from_numpy(np.ascontiguousarray(arr))
        for attr in SCALAR_ATTRS:
            if isinstance(getattr(s, attr, None), int | float):
                scalars[f"{depth}.{attr}"] = float(getattr(s, attr))
    return tensors, scalars


def restore_strategy(strategy: Any, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
    chain = _chain(strategy)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        depth, attr, key = name.split(".", 2)
        found.setdefault((int(depth), attr), {})[key] = t.numpy()
    for (depth, attr), values in found.items():
        # FedAvgM keeps a list ordered like the model's arrays; FedOpt keeps a dict keyed by array name.
        value = [values[str(i)] for i in range(len(values))] if attr == "momentum_vector" else values
        setattr(chain[depth], attr, value)
    for name, v in scalars.items():
        depth, attr = name.split(".", 1)
        setattr(chain[int(depth)], attr, v)


def save_round(root: Path, ckpt: RoundCheckpoint) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{ckpt.round:05d}"
    tmp = root / f".round-{ckpt.round:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.arrays.items()}, str(tmp / ARRAYS_FILE))
    save_file(ckpt.strategy_tensors, str(tmp / STRATEGY_FILE))
    if ckpt.best_arrays is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.best_arrays.items()}, str(tmp / BEST_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({"round": ckpt.round, "history": ckpt.history,
                                              "clients": ckpt.clients, "strategy": ckpt.strategy_scalars,
                                              "privacy_releases": [list(r) for r in ckpt.privacy_releases],
                                              "stopper": ckpt.stopper}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic: a kill leaves either the old or the complete new round
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> RoundCheckpoint | None:
    """The newest complete round under ``root``, or None when there is none."""
    done = sorted(p for p in root.glob("round-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    if not done:
        return None
    folder = done[-1]
    state = json.loads((folder / STATE_FILE).read_text())
    return RoundCheckpoint(round=int(state["round"]), arrays=load_file(str(folder / ARRAYS_FILE)),
                           history=state["history"], clients=state["clients"],
                           strategy_tensors=load_file(str(folder / STRATEGY_FILE)),
                           strategy_scalars=state.get("strategy", {}),
                           privacy_releases=[(int(r), float(z)) for r, z in state.get("privacy_releases", [])],
                           best_arrays=load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).is_file() else None,
                           stopper=state.get("stopper"))
