"""Simulated adversity, applied inside the ClientApp: faults (crash, timeout, dropout) and attacks.

Both are drawn from seeds in the spec so a run repeats exactly: faults per (client, round) from
``federated.faults.seed``; the malicious clients once per run from ``federated.attack.seed``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from orchard.config import JobSpec


class ClientCrash(RuntimeError):
    """A simulated client crash (federated.faults.crash)."""


def fault_for(spec: JobSpec, client: int, server_round: int) -> str | None:
    """'crash', 'timeout', 'dropout' or None for this client in this round."""
    f = spec.federated.faults
    if f.crash + f.timeout + f.dropout == 0:
        return None
    u = np.random.default_rng([f.seed, client, server_round]).random()
    for kind, p in (("crash", f.crash), ("timeout", f.timeout), ("dropout", f.dropout)):
        if u < p:
            return kind
        u -= p
    return None


def act_out(kind: str, spec: JobSpec, client: int, server_round: int) -> None:
    """Crash raises (Flower turns it into an error reply); timeout sleeps past the round deadline."""
    if kind == "crash":
        raise ClientCrash(f"client {client} crashed in round {server_round} (federated.faults.crash)")
    if kind == "timeout":
        time.sleep(spec.federated.round_timeout_s + 1.0)


def malicious_clients(spec: JobSpec) -> frozenset[int]:
    a, n = spec.federated.attack, spec.federated.clients
    if a.kind == "none" or a.fraction == 0:
        return frozenset()
    k = round(a.fraction * n)
    return frozenset(int(c) for c in np.random.default_rng(a.seed).choice(n, size=k, replace=False))


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """label_flip: y -> C-1-y."""
    return num_classes - 1 - y


def poison(spec: JobSpec, global_sd: dict[str, torch.Tensor], local_sd: dict[str, torch.Tensor],
           seed: int) -> dict[str, torch.Tensor]:
    """The state dict a malicious client sends instead of its honest ``local_sd``."""
    a = spec.federated.attack
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, local in local_sd.items():
        g = global_sd[key]
        if not local.is_floating_point():
            out[key] = local
        elif a.kind == "sign_flip":
            out[key] = g - a.scale * (local - g)
        elif a.kind == "scale":
            out[key] = g + a.scale * (local - g)
        elif a.kind == "gaussian":
            out[key] = g + a.noise_std * torch.randn(local.shape, generator=gen, dtype=local.dtype)
        else:
            out[key] = local
    return out


EXTRA_ARRAY = "orchard.extra"
INFLATED_EXAMPLES = 10**9


def tamper(spec: JobSpec, state: dict[str, torch.Tensor], num_examples: int
           ) -> tuple[dict[str, torch.Tensor], int]:
    """What a malicious client does to a well-formed reply: an array the model does not have
    (extra_arrays), one of the model's arrays left out (missing_arrays), or a claim of 10**9 training rows
    (inflate_examples). The server must reject the first two and cap the third's weight."""
    kind = spec.federated.attack.kind
    if kind == "extra_arrays":
        return {**state, EXTRA_ARRAY: torch.zeros(3)}, num_examples
    if kind == "missing_arrays":
        return dict(list(state.items())[:-1]), num_examples
    if kind == "inflate_examples":
        return state, INFLATED_EXAMPLES
    return state, num_examples
