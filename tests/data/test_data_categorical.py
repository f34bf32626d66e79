"""Categorical columns: train-only vocabularies, index 0 for the unseen, embeddings in the MLP."""

import numpy as np
import pytest
import torch

from orchard.config import JobSpec, SpecError
from orchard.data import prepare
from orchard.data.manifest import read_split
from orchard.models import build_model
from tests.data.prep_helpers import write_csv

CITIES = ["oslo", "lima", "pune", "kobe"]


def _table(n: int = 400, seed: int = 0) -> list[list]:
    """The label depends on the city (a category) and on x (a number)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        city = CITIES[i % 4]
        x = rng.normal()
        label = int((CITIES.index(city) >= 2) ^ (x > 1.5))
        rows.append([f"{x:.5f}", city, "gold" if i % 3 == 0 else "", label])
    return rows


def test_categories_are_indexed_from_the_training_split_only(spark, tmp_path, make_spec):
    rows = _table()
    rows.append(["0.1", "rome", "gold", 1])  # a city seen once: it lands in one split only
    path = write_csv(tmp_path / "t.csv", ["x", "city", "plan", "label"], rows)
    prepared = prepare(make_spec(source=str(path), categorical=["city", "plan"]))
    m = prepared.manifest
    assert m["features"] == ["x", "city", "plan"] and m["feature_dim"] == 3
    cats = {c["name"]: c for c in m["categorical"]}
    assert cats["plan"]["vocabulary"] == ["", "gold"]  # a missing value is a category, not a bad row
    assert m["counts"]["quarantined"] == 0

    x, _ = read_split(prepared, "train")
    train_cities = set(cats["city"]["vocabulary"])
    assert set(CITIES) <= train_cities
    codes = x[:, 1]
    assert set(np.unique(codes)) <= set(range(1, cats["city"]["cardinality"]))  # train never needs 0
    assert cats["city"]["cardinality"] == len(train_cities) + 1
    if "rome" not in train_cities:  # the lone row went to val or test: it must read as unseen (0)
        held = np.concatenate([read_split(prepared, s)[0][:, 1] for s in ("val", "test")])
        assert 0 in held


def test_the_mlp_embeds_categories_and_learns_from_them(spark, tmp_path, make_spec):
    path = write_csv(tmp_path / "t.csv", ["x", "city", "plan", "label"], _table(600))
    prepared = prepare(make_spec(source=str(path), categorical=["city", "plan"], normalize="standard"))
    job = JobSpec.model_validate({"name": "t", "kind": "train", "model": {"family": "mlp", "hidden": [16], "dropout": 0.0},
                                  "train": {"loss": "cross_entropy"}})
    model = build_model(job, prepared.manifest)
    assert [e.num_embeddings for e in model.embeddings] == [c["cardinality"] for c in prepared.manifest["categorical"]]
    x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    xt, yt = (torch.from_numpy(a) for a in read_split(prepared, "test"))
    acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.85  # the city decides most labels, and its codes are not ordered by the label


def test_categorical_with_a_sequence_model_is_refused():
    manifest = {"feature_dim": 3, "num_classes": 2, "categorical": [{"cardinality": 5}]}
    with pytest.raises(ValueError, match="model.family=mlp"):
        build_model(JobSpec.model_validate({"name": "t", "kind": "train", "model": {"family": "rnn"}}), manifest)


def test_an_unknown_categorical_column_is_named(tmp_path, make_spec):
    path = write_csv(tmp_path / "t.csv", ["x", "city", "label"], [["1", "oslo", 0], ["2", "lima", 1]])
    with pytest.raises(SpecError, match=r"data.categorical: \['town'\] not found"):
        prepare(make_spec(source=str(path), categorical=["town"]))
