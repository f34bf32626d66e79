"""Checkpoint format: safetensors for tensors, JSON for everything else. No pickle anywhere.

Layout of a checkpoint folder::

    model.safetensors      the model's full state_dict (unwrapped from DDP, gathered from FSDP shards)
    optimizer.safetensors  every tensor of the optimizer state, keyed "<param index>.<name>"
    state.json             epoch, metrics, history, optimizer scalars and param_groups, and the size of
                           every other file in the folder: written last, it seals the checkpoint

A checkpoint is complete when state.json exists and every file it lists has the recorded size: a write or a
copy to storage that was killed half-way is refused on load (``CheckpointError``) and skipped when
choosing where to resume (``is_complete``). Each file is written under a temporary name and renamed.

The format is the same whatever wrote it: a checkpoint saved by FSDP workers loads into a plain model, and
one saved by a single process loads into an FSDP-sharded model. Under FSDP (``torch.distributed.fsdp.
fully_shard``) gathering and loading are collectives: every rank calls ``model_state``/``optimizer_state``/
``load_checkpoint``; only rank 0 holds (and writes) the full tensors, and rank 0's are broadcast on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was wrapped by FSDP2's ``fully_shard`` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def _full_options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU snapshot of the full weights. Collective under FSDP: rank 0 gets them, the other ranks ``{}``."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(unwrap(model), options=_full_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full weights. Collective under FSDP: rank 0's ``weights`` are broadcast, the others' ignored."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # Each rank loading its own full copy fails on unevenly sharded dims (33 rows over 2 ranks, torch 2.13
    # CPU): broadcast from rank 0 instead. The copy: the broadcast replaces the dict's values by shards.
    set_model_state_dict(unwrap(model), dict(weights) if _rank() == 0 else {},
                         options=_full_options(broadcast_from_rank0=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full tensors, keyed by parameter index.

    Collective under FSDP: rank 0 gets the state, the other ranks ``{}``."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options(cpu_offload=True))
    if not sd:
        return {}
    # FSDP keys state by parameter name; the file keys it by index, as a plain optimizer does.
    index = {fqn: i for i, fqn in enumerate(p for g in sd["param_groups"] for p in g["params"])}
    return {"state": {index[k]: v for k, v in sd["state"].items()},
            "param_groups": [g | {"params": [index[p] for p in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if _rank() == 0:
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        sd = {"state": {fqns[int(i)]: v for i, v in sd["state"].items()},
              "param_groups": [g | {"params": [fqns[int(i)] for i in g["params"]]}
                               for g in sd["param_groups"]]}
    set_optimizer_state_dict(unwrap(model), optimizer, sd if _rank() == 0 else {},
                             options=_full_options(broadcast_from_rank0=True))


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    state: dict[str, Any] | None = None) -> Path:
    """One process's checkpoint. Distributed workers gather with ``model_state``/``optimizer_state`` on every
    rank and call ``write_checkpoint`` on rank 0."""
    optim = optimizer_state(model, optimizer) if optimizer is not None else None
    return write_checkpoint(folder, model_state(model), optim, state)


def write_checkpoint(folder: str | Path, weights: dict[str, torch.Tensor],
                     optim: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into ``folder``; files already there (best weights, test results) are sealed too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / MODEL_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in weights.items()}, tmp))
    meta: dict[str, Any] = dict(state or {})
    if optim is not None:
        tensors, scalars = _split_optimizer_state(optim)
        _atomic(folder / OPTIM_FILE, lambda tmp: save_file(tensors, tmp))
        meta["optimizer"] = scalars
    meta[FILES_KEY] = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                       if p.is_file() and p.name != STATE_FILE and not p.name.startswith(".")}
    text = json.dumps(meta, default=_json_default)
    _atomic(folder / STATE_FILE, lambda tmp: Path(tmp).write_text(text))  # last: the seal
    return folder


FILES_KEY = "files"


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file under the final name."""
    tmp = path.with_name(f".{path.name}.partial")
    write(str(tmp))
    os.replace(tmp, path)


def incomplete(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (missing seal, missing or truncated file), or None."""
    folder = Path(folder)
    for name in (MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            return f"no {name}"
    try:
        files = json.loads((folder / STATE_FILE).read_text()).get(FILES_KEY)
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    for name, size in (files or {}).items():  # checkpoints from before the seal list no files
        have = (folder / name).stat().st_size if (folder / name).is_file() else None
        if have != size:
            return f"{name} has {have} bytes, {size} were written"
    return None


def is_complete(folder: str | Path) -> bool:
    return incomplete(folder) is None


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns state.json. Refuses any other format.

    Collective under FSDP: every rank calls it on the same folder."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / STATE_FILE).is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(f"{folder}: not an Orchard checkpoint (need {MODEL_FILE} and {STATE_FILE}; found {found})")
    why = incomplete(folder)
    if why is not None:
        raise CheckpointError(f"{folder}: incomplete checkpoint ({why}): its write was interrupted")
    state = json.loads((folder / STATE_FILE).read_text())
    reads = not is_sharded(model) or _rank() == 0  # under FSDP the other ranks get rank 0's tensors
    load_model_state(model, load_file(str(folder / MODEL_FILE)) if reads else {})
    if optimizer is not None and "optimizer" in state and (folder / OPTIM_FILE).is_file():
        sd = _join_optimizer_state(load_file(str(folder / OPTIM_FILE)), state["optimizer"]) if reads else {}
        load_optimizer_state(model, optimizer, sd)
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
