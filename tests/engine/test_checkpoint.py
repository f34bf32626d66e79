import json
import pickle

import pytest
import torch

from orchard.config import ModelSpec, TrainSpec
from orchard.engine import build_optimizer
from orchard.engine.checkpoint import CheckpointError, is_complete, load_checkpoint, save_checkpoint
from orchard.models import build_from_dims


def _model_and_opt(kind="adamw"):
    torch.manual_seed(0)
    model = build_from_dims(ModelSpec(family="mlp", hidden=[8]), 4, 3, None)
    return model, build_optimizer(model, TrainSpec(optimizer=kind))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_checkpoint_round_trips_model_and_optimizer(tmp_path, kind):
    model, opt = _model_and_opt(kind)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {"epoch": 3, "history": [{"epoch": 3}]})
    model2, opt2 = _model_and_opt(kind)
    state = load_checkpoint(tmp_path, model2, opt2)
    assert state["epoch"] == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for idx in s1["state"]:
        for k, v in s1["state"][idx].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][idx][k]))


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "model.pt").write_bytes(pickle.dumps(Boom()))
    model, _ = _model_and_opt()
    with pytest.raises(CheckpointError, match="not an Orchard checkpoint"):
        load_checkpoint(tmp_path, model)
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_seals_every_file_and_leaves_no_partial_names(tmp_path):
    model, opt = _model_and_opt()
    (tmp_path / "best.safetensors").write_bytes(b"x" * 10)  # written before the checkpoint: sealed too
    save_checkpoint(tmp_path, model, opt, {"epoch": 1})
    assert is_complete(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "optimizer.safetensors", "best.safetensors"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncate_model", "drop_optimizer", "no_seal", "half_seal"])
def test_an_interrupted_checkpoint_is_refused_not_half_loaded(tmp_path, damage):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, model, opt, {"epoch": 2})
    files = {"model": tmp_path / "model.safetensors", "optim": tmp_path / "optimizer.safetensors",
             "state": tmp_path / "state.json"}
    if damage == "truncate_model":  # a copy to storage killed half-way through the model file
        files["model"].write_bytes(files["model"].read_bytes()[:100])
    elif damage == "drop_optimizer":
        files["optim"].unlink()
    elif damage == "no_seal":
        files["state"].unlink()
    else:
        files["state"].write_text(files["state"].read_text()[:20])
    assert not is_complete(tmp_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path, _model_and_opt()[0])
