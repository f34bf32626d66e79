"""A real Ray Train run (2 workers, local Ray) on real digits, tracked in a temp MLflow store."""

import pytest
from mlflow.tracking import MlflowClient

from orchard.config import JobSpec
from orchard.progress import read_progress
from orchard.tracking import JobRun
from orchard.train import run_training

pytestmark = pytest.mark.slow


@pytest.fixture
def mlp_spec(tmp_path) -> JobSpec:
    return JobSpec.model_validate({
        "name": "test-train", "kind": "train",
        "model": {"family": "mlp", "hidden": [64], "dropout": 0.1},
        "train": {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.003},
        "scaling": {"num_workers": 2, "use_gpu": False, "storage_path": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def test_two_workers_learn_digits_and_log_every_epoch_and_the_same_spec_again_trains_afresh(
        mlp_spec, digits_prepared, tmp_path):
    job = JobRun(mlp_spec)
    result = run_training(mlp_spec, digits_prepared, job.logger, progress_file=tmp_path / "progress.json")
    job.finish()

    # Floor from real runs: this 4-epoch MLP reached 0.95-0.97 test accuracy here.
    assert result.test["test/accuracy"] >= 0.92
    assert result.confusion.sum() == digits_prepared.manifest["counts"]["test"]  # every test row, once
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and result.x == "epoch"
    assert read_progress(tmp_path / "progress.json")["epoch"] == 4
    assert result.history[-1]["train/samples"] <= digits_prepared.manifest["counts"]["train"]

    client = MlflowClient(mlp_spec.tracking.uri)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(job.run_id, name)] == [1, 2, 3, 4], name
    assert run.data.metrics["test/accuracy"] == pytest.approx(result.test["test/accuracy"])
    assert run.data.tags["orchard.kind"] == "train"

    # The same spec (same name, same storage) run again after it finished is a new run from epoch 1. Before,
    # a call without run_name reused "<name>-<spec hash>" and silently resumed the finished run's final
    # checkpoint: no epoch trained, the old test figures reported again.
    again = JobRun(mlp_spec)
    second = run_training(mlp_spec, digits_prepared, again.logger)
    again.finish()
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4]
    assert "train/resumed_from" not in second.history[0]
    folder = str(result.extra["checkpoint_path"]).rsplit("/checkpoint_", 1)[0]
    assert not str(second.extra["checkpoint_path"]).startswith(folder + "/")
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == [1, 2, 3, 4]
