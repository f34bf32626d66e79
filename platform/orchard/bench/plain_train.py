"""The end-to-end baseline of ``orchard bench train``: a plain PyTorch script, run as its own process.

``python -m orchard.bench.plain_train PREPARED_FOLDER SPEC_JSON`` reads the prepared Parquet with pyarrow (an
``orchard prep`` folder, or the pandas baseline's of ``orchard bench spec-to-model``),
trains the spec's model for the spec's epochs with the same optimizer as the platform
(``engine.build_optimizer``: fused Adam/SGD kernels), one torch thread per ``scaling.cpus_per_worker``,
then evaluates on the test split and prints ``{"test/accuracy": ...}``. No Spark, Ray or MLflow.
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
    """A split as ``orchard bench prep``'s pandas script writes it: ``SPLIT/part-00000.parquet``, no manifest."""
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


def main(folder: str, spec_json: str) -> dict[str, float]:
    spec = JobSpec.model_validate(json.loads(spec_json))
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)
    manifest, split_of = _splits(folder, spec)
    x, y = (torch.from_numpy(a) for a in split_of("train"))
    model = build_model(spec, manifest)
    opt = build_optimizer(model, spec.train)
    loss_fn, bs = nn.CrossEntropyLoss(), spec.train.batch_size
    for _ in range(spec.train.epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    xt, yt = (torch.from_numpy(a) for a in split_of("test"))
    with torch.no_grad():
        correct = sum(int((model(xt[i : i + 4 * bs]).argmax(1) == yt[i : i + 4 * bs]).sum())
                      for i in range(0, len(yt), 4 * bs))
    return {"test/accuracy": correct / max(1, len(yt))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
