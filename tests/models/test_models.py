import pytest
import torch

from orchard.config import ModelSpec
from orchard.models import build_model


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"])
def test_families_map_rows_to_class_logits(family, norm, act):
    spec = ModelSpec(family=family, norm=norm, activation=act, hidden=[16], channels=[4, 8])
    model = build_model(spec, 64, 10, [1, 8, 8])
    out = model(torch.randn(5, 64))
    assert out.shape == (5, 10)
    out.sum().backward()  # every family is trainable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_without_image_shape_is_refused():
    with pytest.raises(ValueError, match="image_shape"):
        build_model(ModelSpec(family="cnn"), 64, 10, None)


def test_cnn_with_wrong_image_shape_is_refused():
    with pytest.raises(ValueError, match="holds 49 values"):
        build_model(ModelSpec(family="cnn"), 64, 10, [1, 7, 7])


def test_dropout_is_active_only_in_training():
    model = build_model(ModelSpec(family="mlp", dropout=0.5, hidden=[64]), 8, 2, None)
    x = torch.randn(4, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
