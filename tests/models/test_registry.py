"""The family registry and the one entry point from a job spec + manifest to a model."""

import hashlib
import subprocess
import sys
import typing

import pytest
import torch

from orchard.config import JobSpec, ModelSpec
from orchard.models import FAMILIES, build_from_dims, build_model

# case: (spec.model, spec.data / spec.train extras, manifest)
CASES = {
    "mlp_categorical": ({"family": "mlp", "hidden": [16, 8], "norm": "batch", "activation": "gelu"}, {},
                        {"feature_dim": 6, "num_classes": 3,
                         "categorical": [{"cardinality": 5}, {"cardinality": 120}]}),
    "mlp_binary_bce": ({"family": "mlp", "hidden": [8], "norm": "layer"}, {},
                       {"feature_dim": 10, "num_classes": 2}),
    "mlp_binary_cross_entropy": ({"family": "mlp", "hidden": [8]}, {"loss": "cross_entropy"},
                                 {"feature_dim": 10, "num_classes": 2}),
    "mlp_regression": ({"family": "mlp", "hidden": [8, 4]}, {},
                       {"feature_dim": 5, "num_classes": 0, "task": "regression",
                        "target_stats": {"mean": 150.0, "std": 50.0}}),
    "cnn_layer_avg": ({"family": "cnn", "channels": [4, 8], "norm": "layer", "pool": "avg", "hidden": [16]},
                      {}, {"feature_dim": 64, "num_classes": 10, "image_shape": [1, 8, 8]}),
    "cnn_batch_max": ({"family": "cnn", "channels": [6], "norm": "batch", "kernel_size": 5, "hidden": [],
                       "activation": "silu"}, {}, {"feature_dim": 108, "num_classes": 4, "image_shape": [3, 6, 6]}),
    "rnn_lstm_bidirectional": ({"family": "rnn", "cell": "lstm", "bidirectional": True, "rnn_layers": 2,
                                "rnn_hidden": 12, "norm": "layer", "hidden": [16]}, {"sequence_shape": [8, 8]},
                               {"feature_dim": 64, "num_classes": 10}),
    "rnn_gru_last": ({"family": "rnn", "cell": "gru", "pooling": "last", "rnn_hidden": 10, "hidden": [8]}, {},
                     {"feature_dim": 12, "num_classes": 3}),
    "transformer_cls_image": ({"family": "transformer", "d_model": 32, "heads": 4, "layers": 2, "pooling": "cls",
                               "hidden": [16]}, {}, {"feature_dim": 64, "num_classes": 10, "image_shape": [1, 8, 8]}),
    "transformer_mean": ({"family": "transformer", "d_model": 16, "heads": 2, "layers": 1, "activation": "gelu",
                          "ff_mult": 2, "hidden": []}, {"sequence_shape": [16, 4]},
                         {"feature_dim": 64, "num_classes": 5}),
}

# Computed with the pre-refactor builder (orchard.models.model_from_manifest(spec.model, manifest,
# spec.data.sequence_shape, spec.train.loss) at commit bd241c4, torch 2.13 CPU) after torch.manual_seed(1234):
# (parameter count, hash of the state_dict's names and shapes, position-weighted sum of the initial
# state_dict, weighted sum of the eval-mode output on a fixed input). Any change here changes a model
# (or the checkpoints it can load); it is not a number to update to make the test pass.
EXPECTED = {
    "mlp_categorical": (7154, "d308e7984bba885a", 219.48235876526815, 2.4922428280115128),
    "mlp_binary_bce": (113, "fce93df9863cec4f", 19.97109718900174, -1.897803246974945),
    "mlp_binary_cross_entropy": (106, "90ebf5e5300cfef9", 1.189636898227036, 7.412662044167519),
    "mlp_regression": (89, "e15ce656b75b4e28", 243.85175243462436, 837.788818359375),
    "cnn_layer_avg": (1090, "6a0b8c7ab5fe0bff", 237.9444141730528, 38.86279806494713),
    "cnn_batch_max": (688, "09733a671a9dd6ab", 52.454250600345404, -1.9708211980760098),
    "rnn_lstm_bidirectional": (6410, "41794c266c35ae45", 575.1811221769531, 62.80143006145954),
    "rnn_gru_last": (505, "f3c890c8bad81eb6", 5.056384182542388, -1.6990141719579697),
    "transformer_cls_image": (26778, "6a7f5b8c291935ba", 2645.913168302346, 29.487044364213943),
    "transformer_mean": (2677, "6e36416b858d39a6", 470.32463823744183, -12.937225669622421),
}


def _job(case: str) -> JobSpec:
    model, extra, _ = CASES[case]
    data = {"sequence_shape": extra["sequence_shape"]} if "sequence_shape" in extra else {}
    train = {"loss": extra["loss"]} if "loss" in extra else {}
    return JobSpec.model_validate({"name": f"fp-{case}", "kind": "train", "data": data, "model": model,
                                   "train": train})


def _fingerprint(model: torch.nn.Module, feature_dim: int) -> tuple[int, str, float, float]:
    state = model.state_dict()
    layout = ";".join(f"{k}:{list(v.shape)}" for k, v in state.items())
    x = (torch.arange(3 * feature_dim) % 5).float().reshape(3, feature_dim) / 5
    model.eval()
    with torch.no_grad():
        out = model(x).double()
    return (
        sum(p.numel() for p in model.parameters()),
        hashlib.sha256(layout.encode()).hexdigest()[:16],
        # Position-weighted, so two tensors trading values changes it too.
        sum((i + 1) * float(t.double().sum()) for i, t in enumerate(state.values())),
        float(out.sum() + (out * torch.arange(out.numel()).reshape(out.shape)).sum()),
    )


@pytest.mark.parametrize("case", CASES)
def test_every_family_builds_the_same_model_as_before_the_split(case):
    manifest = CASES[case][2]
    torch.manual_seed(1234)
    params, layout, weights, output = _fingerprint(build_model(_job(case), manifest), manifest["feature_dim"])
    exp_params, exp_layout, exp_weights, exp_output = EXPECTED[case]
    assert (params, layout) == (exp_params, exp_layout)
    assert weights == pytest.approx(exp_weights, rel=1e-6)
    assert output == pytest.approx(exp_output, rel=1e-5, abs=1e-5)


def test_the_registry_covers_exactly_the_families_the_spec_accepts():
    assert set(FAMILIES) == set(typing.get_args(ModelSpec.model_fields["family"].annotation))


def test_an_unknown_family_is_named_with_the_valid_ones():
    spec = ModelSpec.model_construct(**{**ModelSpec().model_dump(), "family": "gnn"})  # skips validation
    with pytest.raises(ValueError, match=r"model.family: unknown family 'gnn'; valid: mlp, cnn, rnn, transformer"):
        build_from_dims(spec, 8, 2)


def test_build_model_reads_the_loss_and_sequence_shape_from_the_job():
    manifest = {"feature_dim": 12, "num_classes": 2}
    bce = build_model(JobSpec.model_validate({"name": "t", "kind": "train", "train": {"loss": "bce"}}), manifest)
    ce = build_model(JobSpec.model_validate({"name": "t", "kind": "train", "train": {"loss": "cross_entropy"}}),
                     manifest)
    assert (bce.head.out_features, ce.head.out_features) == (1, 2)
    rnn = build_model(JobSpec.model_validate({"name": "t", "kind": "train", "model": {"family": "rnn"},
                                              "data": {"sequence_shape": [3, 4]}}), manifest)
    assert rnn.seq_shape == (3, 4)


def test_models_import_no_engine():
    code = ("import sys, orchard.models; "
            "print([m for m in ('ray', 'flwr', 'mlflow', 'pyspark') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
