"""One train/evaluate loop for every caller.

Batches are ``(features, label)`` tensor pairs from any iterable: a Ray Data shard on a Ray Train worker,
a DataLoader over a Flower client's partition, or in-memory tensors in a benchmark. When
``torch.distributed`` is initialised, ``evaluate`` all-reduces its sums so every rank returns the global
figures for the whole (sharded) split.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchard.config import TrainSpec
from orchard.engine.metrics import classification_metrics

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    samples: int
    confusion: np.ndarray | None = field(default=None, repr=False)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/accuracy": self.accuracy}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
) -> EpochResult:
    """One pass over ``batches``. Loss/accuracy are averaged over every rank's samples."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.train()
    # Sums stay on the device: a .item() per step would force a host sync every batch.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        if proximal_mu > 0 and global_params is not None:
            # FedProx: keep the local model near the round's global weights.
            prox = sum((p - g).pow(2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
            loss = loss + proximal_mu / 2 * prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += int(y.shape[0])
    total_loss, total_correct, total_seen = _reduce([loss_sum.item(), float(correct.item()), float(seen)], device)
    n = max(total_seen, 1.0)
    return EpochResult(loss=total_loss / n, accuracy=total_correct / n, samples=int(total_seen))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    num_classes: int,
    loss_fn: nn.Module | None = None,
) -> EpochResult:
    """Loss, accuracy and the confusion matrix over ``batches`` (global across ranks)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    cm = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += loss_fn(logits, y).double()
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(cm)
    confusion = cm.reshape(num_classes, num_classes).cpu().numpy()
    n = int(confusion.sum())
    acc = classification_metrics(confusion)["accuracy"] if n else 0.0
    return EpochResult(loss=loss_sum.item() / max(n, 1), accuracy=acc, samples=n, confusion=confusion)
