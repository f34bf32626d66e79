"""kind: tune: the search space is checked before any compute, and a small real search (Ray Tune over Ray
Train trials, ASHA) leaves one parent run and one MLflow child run per trial."""

from __future__ import annotations

import sys

import pytest
from mlflow.tracking import MlflowClient

from orchard.config import SpecError, parse_distribution, validate_spec
from orchard.tune.pareto import pareto_front


def _tune_spec(space: dict, **tune) -> dict:
    return {"name": "t", "kind": "tune", "tune": {"space": space, **tune}}


@pytest.mark.parametrize(("space", "named", "why"), [
    ({"train.lrr": "loguniform(1e-4, 1e-1)"}, "tune.space.train.lrr", "did you mean 'train.lr'"),
    ({"model.nope": "choice([1, 2])"}, "tune.space.model.nope", "unknown key"),
    ({"train.lr": "uniform(-0.1, 0.1)"}, "tune.space.train.lr", "can draw -0.1"),
    ({"model.dropout": "uniform(0.0, 1.5)"}, "tune.space.model.dropout", "less than 1"),
    ({"model.norm": "choice(['batch', 'group'])"}, "tune.space.model.norm", "can draw 'group'"),
    ({"train.lr": "loguniform(0, 0.1)"}, "tune.space.train.lr", "0 < low"),
    ({"train.lr": "lognormal(1, 2)"}, "tune.space.train.lr", "is not a distribution"),
    ({"train.lr": "uniform(__import__('os').getcwd(), 1)"}, "tune.space.train.lr", "not plain literals"),
    ({"train.epochs": "randint(1.5, 3)"}, "tune.space.train.epochs", "two integers"),
    ({"train": "choice([1])"}, "tune.space.train", "is a section"),
    ({"data.normalize": "choice(['none'])"}, "tune.space.data.normalize", "cannot be searched"),
])
def test_a_bad_space_is_refused_naming_the_key_before_ray_starts(space, named, why):
    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    # An earlier in-process test of this worker may have left its Ray up: what counts is that this did not start one.
    before = ray_up()
    with pytest.raises(SpecError) as err:
        validate_spec(_tune_spec(space))
    assert named in str(err.value) and why in str(err.value)
    assert ray_up() == before


def test_cli_exits_2_naming_the_key(tmp_path, capsys):
    from orchard.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nkind: tune\ntune:\n  space:\n    model.dropout: uniform(0.2, 1.0)\n")
    assert main(["run", str(spec)]) == 2
    out = capsys.readouterr()
    assert "tune.space.model.dropout" in out.out + out.err


def test_a_good_space_parses_and_other_sections_stay_checked():
    spec = validate_spec(_tune_spec({"train.lr": "loguniform(1e-4, 1e-1)", "model.hidden": "choice([[64], [128, 64]])",
                                     "federated.strategy.proximal_mu": "uniform(0.0, 1.0)",
                                     "train.early_stopping.patience": "randint(1, 3)"}, searcher="optuna"))
    assert spec.tune.direction() == "max" and spec.tune.trial_kind == "train"
    assert parse_distribution("choice([[64], [128, 64]])") == ("choice", ([[64], [128, 64]],))
    with pytest.raises(SpecError, match="tune section"):
        validate_spec({"name": "t", "kind": "tune"})
    with pytest.raises(SpecError, match="searcher grid needs"):
        validate_spec(_tune_spec({"train.lr": "uniform(0.1, 0.2)"}, searcher="grid"))
    with pytest.raises(SpecError, match="max_concurrent_trials must be 1"):
        validate_spec(_tune_spec({"federated.client_lr": "uniform(0.01, 0.1)"}, trial_kind="federated",
                                 max_concurrent_trials=2))
    with pytest.raises(SpecError, match="tune.metric"):
        validate_spec(_tune_spec({"train.lr": "uniform(0.1, 0.2)"}, metric="test/accuracy"))


def test_pareto_front_keeps_only_undominated_trials():
    # (accuracy up, params down, latency down)
    points = [(0.9, 100, 1.0), (0.95, 1000, 2.0), (0.85, 200, 1.5), (0.9, 100, 0.5)]
    assert pareto_front(points, ("max", "min", "min")) == [False, True, False, True]


@pytest.mark.slow
def test_a_small_search_tracks_one_parent_and_a_child_run_per_trial(tmp_path, monkeypatch, digits_prepared):
    import orchard.runner as runner

    prepared_calls = []

    def prepare_once(spec, log_path):  # the digits fixture stands in for Spark's output: this test is about Tune
        prepared_calls.append(spec.kind)
        return digits_prepared

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "_prepare", prepare_once)
    spec = validate_spec({
        "name": "tune-test", "kind": "tune",
        "model": {"family": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 64},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "register": "tune-best"},
        "tune": {"space": {"train.lr": "loguniform(1e-3, 3e-2)", "model.hidden": "choice([[16], [64, 32]])"},
                 "num_samples": 3, "scheduler": "asha", "max_concurrent_trials": 2, "seed": 1},
    })
    summary = runner.run_job(spec)
    assert prepared_calls == ["train"]  # once, for all trials

    client = MlflowClient(spec.tracking.uri)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["orchard.kind"] == "tune"
    assert parent.data.params["tune.space.train.lr"] == "loguniform(1e-3, 3e-2)"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary.run_id}'")
    assert len(children) == 3
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert all(c.data.tags["orchard.kind"] == "train" for c in children)
    assert all(c.data.metrics.get("val/accuracy") is not None for c in children)  # reported each epoch
    best = client.get_run(parent.data.tags["orchard.best_run_id"])
    assert best.info.status == "FINISHED"
    assert float(parent.data.params["best.train.lr"]) == pytest.approx(float(best.data.params["train.lr"]))
    assert parent.data.params["best.model.hidden"] == best.data.params["model.hidden"]
    assert parent.data.metrics["best/test/accuracy"] == pytest.approx(best.data.metrics["test/accuracy"])
    assert parent.data.metrics["tune/trials"] == 3
    artifacts = {f.path for f in client.list_artifacts(summary.run_id, "plots")}
    assert "plots/tune_trials.png" in artifacts
    assert "plots/pareto_front.png" in artifacts  # model.hidden searched: an architecture search
    assert summary.headline[1] > 0.5
    # The whole search's energy on the parent; the best model registered once, tagged with its test metrics.
    assert parent.data.metrics["energy/kwh"] > 0 and "orchard.energy_source" in parent.data.tags
    assert summary.model_uri == "models:/tune-best/1"
    version = client.get_model_version("tune-best", "1")
    assert float(version.tags["test/accuracy"]) == pytest.approx(best.data.metrics["test/accuracy"])
