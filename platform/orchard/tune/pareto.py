"""The Pareto front of a search: trials no other trial beats on every objective at once."""

from __future__ import annotations

from collections.abc import Sequence

# model.* keys that change the network's shape (not its regularisation): a search over them is an
# architecture search, and its parent run gets the accuracy / size / latency front.
ARCH_KEYS = ("model.family", "model.hidden", "model.channels", "model.kernel_size", "model.pool",
             "model.activation", "model.norm", "model.cell", "model.rnn_hidden", "model.rnn_layers",
             "model.bidirectional", "model.d_model", "model.heads", "model.layers", "model.ff_mult",
             "model.pooling")


def is_architecture_search(keys: Sequence[str]) -> bool:
    return any(k in ARCH_KEYS for k in keys)


def pareto_front(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[bool]:
    """For each point, whether no other point is at least as good on every objective and better on one.

    ``senses`` gives each objective's direction ("max" or "min").
    """
    signed = [[v if s == "max" else -v for v, s in zip(p, senses, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    return [not any(dominates(o, p) for j, o in enumerate(signed) if j != i) for i, p in enumerate(signed)]
