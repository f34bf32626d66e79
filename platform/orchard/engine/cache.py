"""Replay a worker's data from memory after the first epoch.

The first pass streams from Ray Data and keeps each batch on the training device; later epochs reshuffle
those rows on the device, with no per-step conversion, host copy or feeder thread competing with the
training loop for the GIL. Only when the shard fits the budget; otherwise every epoch streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
CPU_BUDGET_BYTES = 1 << 30  # per worker: small and medium tables fit, large ones keep streaming


def cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.25)  # leave the rest to activations and the optimizer
    return CPU_BUDGET_BYTES


class EpochCache:
    def __init__(self, stream: Callable[[], Iterable[Batch]], device: torch.device, batch_size: int,
                 shuffle: bool, budget_bytes: int, seed: int = 0) -> None:
        self.stream, self.device, self.batch_size = stream, device, batch_size
        self.shuffle, self.budget = shuffle, budget_bytes
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.too_big = budget_bytes <= 0
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def cached(self) -> bool:
        return self.x is not None

    def __iter__(self) -> Iterator[Batch]:
        if self.x is not None:
            yield from self._replay()
            return
        xs: list[torch.Tensor] | None = [] if not self.too_big else None
        ys: list[torch.Tensor] = []
        size = 0
        for x, y in self.stream():
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if xs is not None:
                size += x.numel() * x.element_size() + y.numel() * y.element_size()
                if size > self.budget:
                    xs, ys, self.too_big = None, [], True
                else:
                    xs.append(x)
                    ys.append(y)
            yield x, y
        if xs is not None:  # an empty shard is cached too (as nothing): every rank replays, none streams
            self.x, self.y = (torch.cat(xs), torch.cat(ys)) if xs else (torch.empty(0), torch.empty(0))

    def _replay(self) -> Iterator[Batch]:
        n = self.y.shape[0]
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]
