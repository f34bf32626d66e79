"""Checkpoint format: safetensors for tensors, JSON for everything else. No pickle anywhere.

Layout of a checkpoint folder::

    model.safetensors      the model's state_dict (unwrapped from DDP)
    optimizer.safetensors  every tensor of the optimizer state, keyed "<param index>.<name>"
    state.json             epoch, metrics, history, optimizer scalars and param_groups
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or not in Orchard's format."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/FSDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    state: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(folder / MODEL_FILE))
    meta: dict[str, Any] = dict(state or {})
    if optimizer is not None:
        tensors, scalars = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(folder / OPTIM_FILE))
        meta["optimizer"] = scalars
    (folder / STATE_FILE).write_text(json.dumps(meta, default=_json_default))
    return folder


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns state.json. Refuses any other format."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / STATE_FILE).is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(f"{folder}: not an Orchard checkpoint (need {MODEL_FILE} and {STATE_FILE}; found {found})")
    state = json.loads((folder / STATE_FILE).read_text())
    unwrap(model).load_state_dict(load_file(str(folder / MODEL_FILE)))
    if optimizer is not None and "optimizer" in state and (folder / OPTIM_FILE).is_file():
        optimizer.load_state_dict(_join_optimizer_state(load_file(str(folder / OPTIM_FILE)), state["optimizer"]))
    return state


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    # JSON turned tuples (Adam's betas) into lists; optimizers expect them back as tuples.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if torch.is_tensor(o):
        return o.item() if o.numel() == 1 else o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
