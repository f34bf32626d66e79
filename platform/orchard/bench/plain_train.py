"""The end-to-end baseline of ``orchard bench train``: a plain PyTorch script, run as its own process.

``python -m orchard.bench.plain_train PREPARED_FOLDER SPEC_JSON`` reads the prepared Parquet with pyarrow,
trains the spec's model for the spec's epochs with the same optimizer as the platform
(``engine.build_optimizer``: fused Adam/SGD kernels), one torch thread per ``scaling.cpus_per_worker``,
then evaluates on the test split and prints ``{"test/accuracy": ...}``. No Spark, Ray or MLflow.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from orchard.config import JobSpec
from orchard.data.manifest import load_manifest, read_split
from orchard.engine import build_optimizer
from orchard.models import build_model


def main(folder: str, spec_json: str) -> dict[str, float]:
    spec = JobSpec.model_validate(json.loads(spec_json))
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)
    prepared = load_manifest(folder)
    x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
    model = build_model(spec, prepared.manifest)
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
    xt, yt = (torch.from_numpy(a) for a in read_split(prepared, "test"))
    with torch.no_grad():
        correct = sum(int((model(xt[i : i + 4 * bs]).argmax(1) == yt[i : i + 4 * bs]).sum())
                      for i in range(0, len(yt), 4 * bs))
    return {"test/accuracy": correct / max(1, len(yt))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
