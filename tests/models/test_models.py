import pytest
import torch

from orchard.config import JobSpec, ModelSpec
from orchard.models import build_from_dims, build_model


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"])
def test_families_map_rows_to_class_logits(family, norm, act):
    spec = ModelSpec(family=family, norm=norm, activation=act, hidden=[16], channels=[4, 8])
    model = build_from_dims(spec, 64, 10, [1, 8, 8])
    out = model(torch.randn(5, 64))
    assert out.shape == (5, 10)
    out.sum().backward()  # every family is trainable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_without_image_shape_is_refused():
    with pytest.raises(ValueError, match="image_shape"):
        build_from_dims(ModelSpec(family="cnn"), 64, 10, None)


def test_cnn_with_wrong_image_shape_is_refused():
    with pytest.raises(ValueError, match="holds 49 values"):
        build_from_dims(ModelSpec(family="cnn"), 64, 10, [1, 7, 7])


def test_dropout_is_active_only_in_training():
    model = build_from_dims(ModelSpec(family="mlp", dropout=0.5, hidden=[64]), 8, 2, None)
    x = torch.randn(4, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("cfg", [
    {"family": "rnn", "cell": "lstm", "bidirectional": True, "rnn_layers": 2},
    {"family": "rnn", "cell": "gru", "pooling": "last"},
    {"family": "transformer", "d_model": 32, "heads": 4, "layers": 2, "pooling": "cls"},
    {"family": "transformer", "d_model": 32, "heads": 2, "layers": 1, "pooling": "mean", "activation": "gelu"},
])
def test_sequence_models_read_a_row_as_steps(cfg):
    from orchard.models import sequence_shape

    spec = ModelSpec(hidden=[16], **cfg)
    assert sequence_shape(64, [1, 8, 8]) == (8, 8)
    model = build_from_dims(spec, 64, 10, [1, 8, 8])
    out = model(torch.randn(3, 64))
    assert out.shape == (3, 10)
    out.sum().backward()


def test_transformer_heads_must_divide_width():
    with pytest.raises(ValueError, match="must divide"):
        ModelSpec(family="transformer", d_model=30, heads=4)


def test_regression_model_predicts_in_target_units():
    manifest = {"feature_dim": 4, "num_classes": 0, "task": "regression", "target_stats": {"mean": 150.0, "std": 50.0}}
    model = build_model(JobSpec.model_validate({"name": "t", "kind": "train", "model": {"hidden": [8]}}), manifest)
    torch.nn.init.zeros_(model.body.head.weight)
    torch.nn.init.zeros_(model.body.head.bias)
    assert torch.allclose(model(torch.randn(2, 4)), torch.full((2, 1), 150.0))
