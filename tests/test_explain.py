"""Explanations: Integrated Gradients is complete on a real trained model, and what it logs to a real run.

Models are trained in-process for a few full-batch steps (no Ray); runs live in a temp SQLite store.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from orchard.config import ExplainSpec, validate_spec
from orchard.data.manifest import load_manifest, read_features, read_split
from orchard.explain import explain, explain_job
from orchard.explain.attribute import sample_rows


def _fit(model: nn.Module, prepared, steps: int = 40, lr: float = 1e-2) -> nn.Module:
    """Full-batch Adam on the train split: enough to make the attributions those of a model that learned."""
    x, y = map(torch.from_numpy, read_split(prepared, "train"))
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    single = next(m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)).out_features == 1
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = (nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float()) if single
                else nn.functional.cross_entropy(out, y))
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_mlp(digits_prepared):
    torch.manual_seed(0)
    return _fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), digits_prepared)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables costs seconds); artifacts beside it."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root


def test_integrated_gradients_sum_to_the_output_difference_on_a_trained_model(digits_prepared, digits_mlp):
    spec = ExplainSpec(samples=60, steps=200, seed=3)
    att = explain(digits_mlp, digits_prepared, spec)
    x = read_features(digits_prepared, "test")[att.rows]
    with torch.no_grad():  # F(x) - F(0) for the predicted class, computed here rather than taken from Captum
        out, base = digits_mlp(torch.from_numpy(x)), digits_mlp(torch.zeros_like(torch.from_numpy(x)))
    pred = out.argmax(1)
    gap = (out.gather(1, pred[:, None]) - base.gather(1, pred[:, None]))[:, 0].numpy()
    assert (att.target == pred.numpy()).all()
    assert np.abs(gap).max() > 1.0  # a trained model: the attributions have something to share out
    err = np.abs(att.values.sum(1) - gap)
    assert err.max() <= 0.01 * np.abs(gap).max(), (err.max(), np.abs(gap).max())
    assert np.allclose(np.abs(att.delta), err, atol=1e-3)  # the logged completeness figure is this error
    # Too few steps miss it by more: the check above can fail.
    coarse = explain(digits_mlp, digits_prepared, ExplainSpec(samples=60, steps=2, seed=3))
    assert np.abs(coarse.delta).max() > err.max()


def test_saliency_is_the_gradient_of_the_predicted_class(digits_prepared, digits_mlp):
    att = explain(digits_mlp, digits_prepared, ExplainSpec(method="saliency", samples=5))
    x = torch.from_numpy(read_features(digits_prepared, "test")[att.rows]).requires_grad_()
    out = digits_mlp(x)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    assert np.allclose(att.values, x.grad.numpy(), atol=1e-6)
    assert att.delta is None


def test_the_sample_is_fixed_by_its_seed():
    assert (sample_rows(500, 50, 1) == sample_rows(500, 50, 1)).all()
    assert not (sample_rows(500, 50, 1) == sample_rows(500, 50, 2)).all()
    assert len(set(sample_rows(500, 50, 1).tolist())) == 50
    assert sample_rows(30, 200, 0).tolist() == list(range(30))


def _artifact(client, run_id: str, path: str, dst: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()


def test_orchard_explain_logs_class_maps_of_a_logged_model_to_its_run(digits_prepared, digits_mlp, store, tmp_path,
                                                                       monkeypatch, capsys):
    """The path of `orchard explain RUN_ID`: the model the run logged (pt2), the test split from its inputs;
    digits rows are 8x8 images (manifest image_shape), so the output is one attribution map per class."""
    from mlflow.tracking import MlflowClient

    from orchard.cli import main
    from orchard.data.manifest import read_head
    from orchard.tracking import JobRun

    uri, root = store
    monkeypatch.chdir(root)
    spec = validate_spec({"name": "explain-digits", "kind": "train", "tracking": {"uri": uri}})
    with JobRun(spec) as job:
        job.log_dataset(digits_prepared)
        job.log_model(digits_mlp, read_head(digits_prepared, "test", 4))
    assert main(["explain", job.run_id, "--samples", "40", "--steps", "16", "--tracking-uri", uri]) == 0
    assert f"run {job.run_id}: integrated_gradients on 40 test rows" in capsys.readouterr().out

    client = MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(job.run_id, "explain")}
    assert files == {"explain/attributions.png", "explain/summary.json"}
    assert _artifact(client, job.run_id, "explain/attributions.png", tmp_path)[:4] == b"\x89PNG"
    summary = json.loads(_artifact(client, job.run_id, "explain/summary.json", tmp_path))
    assert summary["samples"] == 40 and summary["steps"] == 16 and summary["target"] == "predicted class"
    assert sum(summary["predicted_counts"].values()) == 40
    metric = client.get_run(job.run_id).data.metrics["explain/ig_completeness_max_error"]
    assert metric == pytest.approx(summary["completeness"]["max_abs_error"])
    assert 0 <= metric < 0.1 * summary["completeness"]["max_abs_output_gap"]


def _breast_cancer(root: Path):
    """sklearn's breast cancer table as a prepared folder (standardized on train), the way conftest writes digits."""
    from sklearn.datasets import load_breast_cancer

    from orchard.data.synthetic import write_prepared

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    rows = np.random.default_rng(0).permutation(len(y))
    train, val, test = rows[:400], rows[400:450], rows[450:]
    mean, std = x[train].mean(0), x[train].std(0)
    return write_prepared(root / "bc", (x - mean) / std, y, {"train": train, "val": val, "test": test},
                          dataset="breast_cancer", features=list(data.feature_names),
                          classes=list(data.target_names), num_classes=2, normalize="standard")


def test_a_tabular_job_logs_a_ranked_feature_table_and_bar_chart(store, tmp_path, monkeypatch):
    """The runner's path (spec explain: section), with a single-logit binary model and a train-mean baseline."""
    from mlflow.tracking import MlflowClient

    from orchard.tracking import JobRun

    uri, root = store
    monkeypatch.chdir(root)
    prepared = load_manifest(_breast_cancer(tmp_path).path)
    spec = validate_spec({"name": "explain-bc", "kind": "train", "tracking": {"uri": uri},
                          "explain": {"samples": 50, "baseline": "train_mean"}})
    torch.manual_seed(0)
    model = _fit(nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1)), prepared)
    with JobRun(spec) as job:
        summary = explain_job(job, spec, prepared, model)
    assert summary is not None and summary["baseline"] == "train_mean"

    client = MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(job.run_id, "explain")}
    assert files == {"explain/feature_importance.csv", "explain/feature_importance.png", "explain/summary.json"}
    table = list(csv.DictReader(io.StringIO(_artifact(client, job.run_id, "explain/feature_importance.csv",
                                                      tmp_path).decode())))
    assert len(table) == 30 and [r["rank"] for r in table] == [str(i) for i in range(1, 31)]
    assert {r["feature"] for r in table} == set(prepared.manifest["features"])
    importance = [float(r["mean_abs_attribution"]) for r in table]
    assert importance == sorted(importance, reverse=True) and importance[0] > 0
    assert summary["top_features"] == [r["feature"] for r in table[:10]]
    assert sum(summary["predicted_counts"].values()) == 50
    assert set(summary["predicted_counts"]) <= {"malignant", "benign"}
    assert "explain/ig_completeness_max_error" in client.get_run(job.run_id).data.metrics


def test_orchard_explain_of_an_unknown_run_exits_2_naming_it(store, capsys):
    from orchard.cli import main

    uri, _ = store
    assert main(["explain", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri]) == 2
    assert "run 0123456789abcdef0123456789abcdef: no such run" in capsys.readouterr().out


def test_a_typo_in_the_explain_section_exits_2_naming_the_key(tmp_path, capsys):
    from orchard.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "kind": "train", "explain": {"metod": "saliency"}}))
    assert main(["check", str(path)]) == 2
    assert "explain.metod: unknown key (did you mean 'explain.method'?)" in capsys.readouterr().out


def test_an_explanation_that_fails_leaves_a_tag_not_a_failed_job(digits_prepared, store, monkeypatch):
    """The model is trained and logged before the explanation: its failure must not fail the job."""
    from mlflow.tracking import MlflowClient

    from orchard.tracking import JobRun

    uri, root = store
    monkeypatch.chdir(root)
    spec = validate_spec({"name": "explain-broken", "kind": "train", "tracking": {"uri": uri}, "explain": {}})
    wrong_width = nn.Linear(30, 2)  # digits rows have 64 features
    with JobRun(spec) as job:
        assert explain_job(job, spec, digits_prepared, wrong_width) is None
    run = MlflowClient(uri).get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert "RuntimeError" in run.data.tags["orchard.explain_error"]
    assert not MlflowClient(uri).list_artifacts(job.run_id, "explain")
