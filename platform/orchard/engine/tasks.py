"""What a model's outputs mean: the loss that trains them and the metrics that judge them.

Every metric is built from sums that can be all-reduced across ranks (a confusion matrix, score
histograms, error sums), so sharded evaluation gives the same figures as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from orchard.config import TrainSpec
from orchard.engine.metrics import classification_metrics

AUC_BINS = 4096  # score histogram resolution for ROC-AUC; ties inside a bin count as half


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
    """Device-resident sums for one evaluation pass; ``tensors()`` is what ranks all-reduce."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        z = lambda n, dt=torch.float64: torch.zeros(n, device=device, dtype=dt)  # noqa: E731
        self.loss = z(1)
        self.count = z(1)
        k = max(task.num_classes, 1)
        self.confusion = z(k * k, torch.int64)
        self.pos_hist, self.neg_hist = z(AUC_BINS), z(AUC_BINS)
        self.reg = z(5)  # sum |e|, sum e^2, sum y, sum y^2, n

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss += self.task.loss(out, y).double() * n
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
            b = (score.clamp(0, 1) * (AUC_BINS - 1)).long()
            self.pos_hist += torch.bincount(b[y == 1], minlength=AUC_BINS).double()
            self.neg_hist += torch.bincount(b[y == 0], minlength=AUC_BINS).double()

    def tensors(self) -> list[torch.Tensor]:
        return [self.loss, self.count, self.confusion, self.pos_hist, self.neg_hist, self.reg]

    def metrics(self) -> dict[str, float]:
        n = max(self.count.item(), 1.0)
        out = {"loss": self.loss.item() / n}
        if self.task.kind == "regression":
            abs_e, sq_e, sy, syy, m = self.reg.tolist()
            m = max(m, 1.0)
            var = syy / m - (sy / m) ** 2
            out |= {"mae": abs_e / m, "rmse": (sq_e / m) ** 0.5, "r2": 1 - (sq_e / m) / var if var > 0 else 0.0}
            return out
        out |= classification_metrics(self.confusion_matrix())
        if self.task.kind == "binary":
            out["roc_auc"] = roc_auc_from_histograms(self.pos_hist.cpu().numpy(), self.neg_hist.cpu().numpy())
        return out

    def confusion_matrix(self) -> np.ndarray:
        k = max(self.task.num_classes, 1)
        return self.confusion.reshape(k, k).cpu().numpy()


def roc_auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score_pos > score_neg) + ½ P(tie), with scores binned; the Mann-Whitney form of ROC-AUC."""
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (p * n))
