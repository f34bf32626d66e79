"""The end-to-end baseline of ``orchard bench train``: a plain PyTorch script, run as its own process.

``python -m orchard.bench.plain_train PREPARED_FOLDER SPEC_JSON`` reads the prepared Parquet with pyarrow (an
``orchard prep`` folder, or the pandas baseline's of ``orchard bench spec-to-model``),
trains the spec's model for the spec's epochs with the same optimizer as the platform
(``engine.build_optimizer``: fused Adam/SGD kernels), one torch thread per ``scaling.cpus_per_worker``,
scoring the validation split after every epoch (as ``orchard run`` does), then evaluates on the test split
and prints ``{"val/loss": ..., "val/accuracy": ..., "test/accuracy": ...}``. No Spark, Ray or MLflow.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchard.config import JobSpec
from orchard.data.manifest import FEATURES_COL, load_manifest, read_split, read_xy
from orchard.engine import build_optimizer
from orchard.models import build_model


def _pandas_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split as ``orchard bench prep``'s pandas script writes it: ``SPLIT/part-00000.parquet``, no
    manifest."""
    import pyarrow.parquet as pq

    file = folder / split / "part-00000.parquet"
    dim = pq.read_schema(file).field(FEATURES_COL).type.list_size
    return read_xy([file], dim, np.int64)


def _splits(folder: str, spec: JobSpec) -> tuple[dict, Callable[[str], tuple[np.ndarray, np.ndarray]]]:
    """(manifest, split reader) of an orchard-prepared folder, or of the pandas baseline's (``bench
    spec-to-model``), whose manifest is what the model needs: width, classes, image shape."""
    root = Path(folder)
    if (root / "manifest.json").is_file():
        prepared = load_manifest(folder)
        return prepared.manifest, lambda split: read_split(prepared, split)
    x, y = _pandas_split(root, "train")
    manifest = {"feature_dim": x.shape[1], "num_classes": int(y.max()) + 1, "task": "classification",
                "image_shape": spec.data.image_shape}
    return manifest, lambda split: (x, y) if split == "train" else _pandas_split(root, split)


def _scored(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, loss_fn) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on (x, y), in batches of ``bs``."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            out = model(x[i : i + bs])
            loss += float(loss_fn(out, y[i : i + bs])) * len(out)
            correct += int((out.argmax(1) == y[i : i + bs]).sum())
    return loss / max(1, len(y)), correct / max(1, len(y))


def main(folder: str, spec_json: str) -> dict[str, float]:
    """Train, scoring the validation split after every epoch as ``orchard run`` does (its learning curve
    and early-stopping figure), then test."""
    spec = JobSpec.model_validate(json.loads(spec_json))
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)
    manifest, split_of = _splits(folder, spec)
    x, y = (torch.from_numpy(a) for a in split_of("train"))
    xv, yv = (torch.from_numpy(a) for a in split_of("val"))
    model = build_model(spec, manifest)
    opt = build_optimizer(model, spec.train)
    loss_fn, bs = nn.CrossEntropyLoss(), spec.train.batch_size
    val = []
    for _ in range(spec.train.epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        val.append(_scored(model, xv, yv, 4 * bs, loss_fn))
    xt, yt = (torch.from_numpy(a) for a in split_of("test"))
    loss, accuracy = val[-1] if val else (float("nan"), float("nan"))
    test = _scored(model, xt, yt, 4 * bs, loss_fn)[1]
    return {"val/loss": loss, "val/accuracy": accuracy, "test/accuracy": test}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
