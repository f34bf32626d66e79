"""Attributions of a model's output to its input features, with Captum, on a fixed sample of rows.

Plain PyTorch in, NumPy out: no MLflow, no prepared-data reading (``orchard.explain`` does both).
The target is the predicted class (argmax, or for a single-logit binary model its one output) or, for
regression, the output itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchard.config import ExplainSpec

TRAIN_MEAN_ROWS = 10_000  # train rows are shuffled at prep time: the first ones are a random sample
INTERNAL_BATCH = 4096  # IG evaluates rows x steps points: forward them in chunks of at most this many


@dataclass
class Attribution:
    """One explained sample: rows, what was explained for each, and the attributions (same shape as ``x``)."""

    rows: np.ndarray  # indices into the test split
    x: np.ndarray  # (n, feature_dim)
    target: np.ndarray  # (n,) output index explained; -1 for a single output
    predicted: np.ndarray  # (n,) predicted class (classification) or predicted value (regression)
    values: np.ndarray  # (n, feature_dim) attributions
    delta: np.ndarray | None  # IG only: sum(attributions) - (F(x) - F(baseline)), per row
    gap: np.ndarray | None  # IG only: F(x) - F(baseline), per row, the amount the attributions share


def sample_rows(n: int, samples: int, seed: int) -> np.ndarray:
    """``min(samples, n)`` distinct row indices out of ``n``, sorted; the same for the same (n, samples, seed)."""
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def baseline_for(x: np.ndarray, kind: str, train_head: np.ndarray | None = None, categorical: int = 0) -> np.ndarray:
    """The IG reference input per row. Categorical index columns (the last ``categorical`` ones) keep each
    row's own value: an embedding lookup has no gradient, so a path through them could not be attributed."""
    base = np.zeros_like(x)
    if kind == "train_mean":
        if train_head is None or not len(train_head):
            raise ValueError("explain.baseline=train_mean: the train split has no rows")
        base[:] = train_head.mean(0, dtype=np.float64).astype(np.float32)
    if categorical:
        base[:, -categorical:] = x[:, -categorical:]
    return base


def _targets(out: torch.Tensor, classification: bool) -> tuple[np.ndarray, np.ndarray, int | torch.Tensor | None]:
    """(target per row, prediction per row, Captum's ``target`` argument) for a model output ``out``."""
    if out.ndim == 1:
        pred = (out > 0).long() if classification else out
        return np.full(len(out), -1), pred.numpy(), None
    if out.shape[1] == 1:
        pred = (out[:, 0] > 0).long() if classification else out[:, 0]
        return np.full(len(out), -1), pred.numpy(), 0
    target = out.argmax(1)
    return target.numpy(), target.numpy(), target


def attribute(model: nn.Module, x: np.ndarray, spec: ExplainSpec, baseline: np.ndarray,
              classification: bool = True, batch: int = 64) -> Attribution:
    """Attributions of ``model`` on rows ``x`` (float32, (n, D)) by ``spec.method``, in batches of ``batch`` rows.

    The model must already be on the CPU in eval mode. Integrated Gradients also returns Captum's
    convergence delta: by completeness the attributions of a row sum to F(x) - F(baseline), and the
    delta is how far the Riemann/Gauss-Legendre sum over ``spec.steps`` points misses that.
    """
    from captum.attr import IntegratedGradients, Saliency

    parts: list[tuple] = []
    for lo in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[lo : lo + batch], dtype=np.float32))
        bb = torch.from_numpy(np.ascontiguousarray(baseline[lo : lo + batch], dtype=np.float32))
        with torch.no_grad():
            out, out_base = model(xb), model(bb)
        target, pred, captum_target = _targets(out, classification)
        if spec.method == "integrated_gradients":
            ig = IntegratedGradients(model)
            values, delta = ig.attribute(xb, baselines=bb, target=captum_target, n_steps=spec.steps,
                                         internal_batch_size=INTERNAL_BATCH, return_convergence_delta=True)
            gap = _pick(out, captum_target) - _pick(out_base, captum_target)
            parts.append((target, pred, values.detach().numpy(), delta.detach().numpy(), gap.numpy()))
        else:
            values = Saliency(model).attribute(xb.requires_grad_(), target=captum_target, abs=False)
            parts.append((target, pred, values.detach().numpy(), None, None))
    if not parts:
        raise ValueError("explain: the test split has no rows to explain")
    joined = [np.concatenate(p) if p[0] is not None else None for p in zip(*parts, strict=True)]
    return Attribution(rows=np.arange(len(x)), x=x, target=joined[0], predicted=joined[1], values=joined[2],
                       delta=joined[3], gap=joined[4])


def _pick(out: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return out
    if isinstance(target, int):
        return out[:, target]
    return out.gather(1, target.unsqueeze(1)).squeeze(1)
