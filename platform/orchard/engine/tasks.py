"""What a model's outputs mean: the loss that trains them and the metrics that judge them.

Every metric is built from what can be combined across ranks exactly: sums that are all-reduced (a
weighted loss's numerator and denominator, a confusion matrix, error sums) and, for ROC-AUC, every row's
score, gathered. So sharded evaluation, at any batch size, gives the same figures as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchard.config import TrainSpec
from orchard.engine.metrics import classification_metrics


@dataclass
class Task:
    kind: Literal["multiclass", "binary", "regression"]
    num_classes: int
    loss_fn: nn.Module = field(repr=False)

    @property
    def classification(self) -> bool:
        return self.kind != "regression"

    @property
    def single_output(self) -> bool:
        return isinstance(self.loss_fn, nn.BCEWithLogitsLoss) or self.kind == "regression"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.single_output:
            return self.loss_fn(out.squeeze(-1).float(), y.to(torch.float32))
        return self.loss_fn(out.float(), y)

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's summed loss and the denominator ``loss_fn``'s mean divides it by.

        A class-weighted cross-entropy's mean is sum(w[y]·l) / sum(w[y]): averaging per-batch means would
        make a split's loss depend on the batch size and the number of ranks. Summing both parts over the
        split and dividing once is the mean over all its rows at once.
        """
        fn, n = self.loss_fn, y.new_tensor(float(y.shape[0]), dtype=torch.float64)
        # Row losses are summed in float64, so the split's sum barely depends on how rows are batched.
        if isinstance(fn, nn.CrossEntropyLoss) and not self.single_output:
            rows = F.cross_entropy(out.float(), y, weight=fn.weight, ignore_index=fn.ignore_index,
                                   reduction="none", label_smoothing=fn.label_smoothing)
            kept = y != fn.ignore_index
            denom = fn.weight[y[kept]].double().sum() if fn.weight is not None else kept.sum().double()
            return rows.double().sum(), denom
        pred, target = out.squeeze(-1).float(), y.to(torch.float32)
        if isinstance(fn, nn.BCEWithLogitsLoss):  # pos_weight scales rows; the mean is still over rows
            rows = F.binary_cross_entropy_with_logits(pred, target, pos_weight=fn.pos_weight, reduction="none")
        elif isinstance(fn, nn.MSELoss):
            rows = F.mse_loss(pred, target, reduction="none")
        elif isinstance(fn, nn.HuberLoss):
            rows = F.huber_loss(pred, target, reduction="none", delta=fn.delta)
        else:
            return self.loss(out, y).double() * n, n  # any other loss: taken as an unweighted mean over rows
        return rows.double().sum(), n

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Class index (classification) or value (regression) per row."""
        if self.kind == "regression":
            return out.squeeze(-1)
        if self.single_output:
            return (out.squeeze(-1) > 0).long()
        return out.argmax(-1)

    def positive_score(self, out: torch.Tensor) -> torch.Tensor | None:
        if self.kind != "binary":
            return None
        if self.single_output:
            return torch.sigmoid(out.squeeze(-1).float())
        return torch.softmax(out.float(), -1)[:, 1]


def make_task(manifest: dict, spec: TrainSpec, class_counts: list[int] | None = None) -> Task:
    """The task a prepared dataset implies, with the loss the spec asks for (auto picks the usual one)."""
    if manifest.get("task") == "regression":
        loss = spec.loss if spec.loss != "auto" else "mse"
        if loss not in ("mse", "huber"):
            raise ValueError(f"train.loss: {loss} does not fit a regression task (use mse or huber)")
        fn = nn.MSELoss() if loss == "mse" else nn.HuberLoss(delta=spec.huber_delta)
        return Task("regression", 0, fn)
    k = int(manifest["num_classes"])
    kind = "binary" if k == 2 else "multiclass"
    loss = spec.loss if spec.loss != "auto" else ("bce" if kind == "binary" else "cross_entropy")
    if loss in ("mse", "huber"):
        raise ValueError(f"train.loss: {loss} does not fit a classification task (use cross_entropy or bce)")
    if loss == "bce" and kind != "binary":
        raise ValueError(f"train.loss: bce needs two classes; this data has {k}")
    weights = _class_weights(spec, k, class_counts)
    if loss == "bce":
        pos_weight = None if weights is None else weights[1:2] / weights[0]
        return Task(kind, k, nn.BCEWithLogitsLoss(pos_weight=pos_weight))
    return Task(kind, k, nn.CrossEntropyLoss(weight=weights, label_smoothing=spec.label_smoothing))


def _class_weights(spec: TrainSpec, k: int, counts: list[int] | None) -> torch.Tensor | None:
    if spec.class_weights == "none":
        return None
    if spec.class_weights == "balanced":
        if not counts:
            raise ValueError("train.class_weights: balanced needs the training split's class counts")
        c = np.maximum(np.asarray(counts, dtype=np.float64), 1)
        return torch.tensor(c.sum() / (k * c), dtype=torch.float32)
    if len(spec.class_weights) != k:
        raise ValueError(f"train.class_weights: {len(spec.class_weights)} weights for {k} classes")
    return torch.tensor(spec.class_weights, dtype=torch.float32)


class EvalSums:
    """Sums and scores for one evaluation pass, kept on the device; ``all_reduce`` combines the ranks'."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        z = lambda n, dt=torch.float64: torch.zeros(n, device=device, dtype=dt)  # noqa: E731
        self.loss = z(1)  # sum of row losses (class-weighted where the loss is)
        self.weight = z(1)  # what the loss's mean divides by: the rows' class weights, or the row count
        self.count = z(1)
        k = max(task.num_classes, 1)
        self.confusion = z(k * k, torch.int64)
        self.reg = z(5)  # sum |e|, sum e^2, sum y, sum y^2, n
        # Binary tasks keep each row's positive-class score for an exact ROC-AUC: 12 bytes a row.
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        total, denom = self.task.loss_sum(out, y)
        self.loss += total
        self.weight += denom
        self.count += n
        if self.task.kind == "regression":
            pred, yf = out.squeeze(-1).double(), y.double()
            e = pred - yf
            self.reg += torch.stack([e.abs().sum(), (e * e).sum(), yf.sum(), (yf * yf).sum(),
                                     torch.tensor(float(n), device=yf.device, dtype=torch.float64)])
            return
        k = self.task.num_classes
        self.confusion += torch.bincount(y * k + self.task.predict(out), minlength=k * k)
        score = self.task.positive_score(out)
        if score is not None:
            self.scores.append(score.detach().float())
            self.labels.append(y.detach())

    def tensors(self) -> list[torch.Tensor]:
        """What ranks sum; the scores are gathered instead (``all_reduce``)."""
        return [self.loss, self.weight, self.count, self.confusion, self.reg]

    def all_reduce(self) -> None:
        """Combine every rank's pass: afterwards each rank holds the whole split's sums and scores."""
        for t in self.tensors():
            dist.all_reduce(t)
        if self.task.kind == "binary":
            scores, labels = _all_gather_rows(torch.stack(self.score_arrays()))
            self.scores, self.labels = [scores], [labels]

    def score_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, labels) as float64 tensors on the device, for every row seen (or gathered)."""
        if not self.scores:
            empty = torch.zeros(0, device=self.loss.device, dtype=torch.float64)
            return empty, empty
        return torch.cat(self.scores).double(), torch.cat(self.labels).double()

    def metrics(self) -> dict[str, float]:
        w = self.weight.item()
        out = {"loss": self.loss.item() / w if w > 0 else 0.0}
        if self.task.kind == "regression":
            abs_e, sq_e, sy, syy, m = self.reg.tolist()
            m = max(m, 1.0)
            var = syy / m - (sy / m) ** 2
            out |= {"mae": abs_e / m, "rmse": (sq_e / m) ** 0.5, "r2": 1 - (sq_e / m) / var if var > 0 else 0.0}
            return out
        out |= classification_metrics(self.confusion_matrix())
        if self.task.kind == "binary":
            scores, labels = self.score_arrays()
            out["roc_auc"] = roc_auc(scores.cpu().numpy(), labels.cpu().numpy())
        return out

    def confusion_matrix(self) -> np.ndarray:
        k = max(self.task.num_classes, 1)
        return self.confusion.reshape(k, k).cpu().numpy()


def _all_gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(2, n_rank)`` rows, concatenated in rank order; ranks may hold different counts."""
    world = dist.get_world_size()
    size = torch.tensor([local.shape[1]], device=local.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad to the longest rank, then cut each back to its own count.
    padded = torch.zeros(2, max(counts), device=local.device, dtype=local.dtype)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = torch.cat([p[:, :c] for p, c in zip(parts, counts, strict=True)], dim=1)
    return rows[0], rows[1]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC-AUC: P(score_pos > score_neg) + ½ P(tie) over all pairs (Mann-Whitney U / (P·N)).

    From mid-ranks: a group of tied scores shares the mean of the ranks it spans, which counts every
    tied positive-negative pair as half. NaN when a class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(labels).ravel() == 1
    p = int(pos.sum())
    n = len(scores) - p
    if p == 0 or n == 0:
        return float("nan")
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks; exact halves in float64
    rank_sum = mid_rank[group.ravel()[pos]].sum()
    return float((rank_sum - p * (p + 1) / 2.0) / (p * n))
