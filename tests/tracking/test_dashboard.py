"""The dashboard tags and text Orchard gives MLflow (the rendering itself: test_dashboard_view.py)."""

import sys

from orchard.config import JobSpec, load_spec
from orchard.tracking import JobRun, dashboard
from tests.cli.test_cli import ROOT

MANIFEST = {"source": "sklearn:breast_cancer", "task": "classification",
            "counts": {"train": 398, "val": 86, "test": 85}}


def test_the_description_names_job_data_model_and_headline():
    spec = load_spec(ROOT / "jobs/breast-cancer-mlp.yaml", ["train.epochs=2"])
    text = dashboard.run_description(spec, MANIFEST, ("accuracy", 0.96471), 3201)
    assert "**breast-cancer-mlp**" in text and "Ray Train, 2 workers" in text
    assert "`sklearn:breast_cancer`" in text and "train 398, val 86, test 85" in text
    assert "mlp, 3,201 parameters" in text
    assert "up to 2 epochs (early stopping)" in text  # the spec's early stopping may end it sooner
    assert "test accuracy **0.9647**" in text


def test_a_federated_description_counts_clients_and_rounds_and_tolerates_no_result():
    spec = load_spec(ROOT / "jobs/digits-federated.yaml")
    text = dashboard.run_description(spec, {}, None, None)
    assert f"Flower, {spec.federated.clients} clients, {spec.federated.rounds} rounds" in text
    assert "result" not in text and "epochs" not in text


def test_the_source_is_the_spec_file_from_the_command_line(monkeypatch):
    spec = load_spec(ROOT / "jobs/digits-cnn.yaml")
    monkeypatch.setattr(sys, "argv", ["/x/orchard/cli.py", "run", str(ROOT / "jobs/digits-cnn.yaml")])
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    tags = dashboard.run_tags(spec)
    assert tags["mlflow.source.name"] == str(ROOT / "jobs/digits-cnn.yaml") and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]  # the Overview's "Created by"
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_1")
    monkeypatch.setattr(sys, "argv", ["pytest"])
    tags = dashboard.run_tags(spec)
    assert tags["mlflow.source.name"] == "orchard run digits-cnn" and tags["mlflow.source.type"] == "JOB"


def test_urls_ask_for_the_training_view():
    assert dashboard.experiment_url("http://h:5000/", "7") == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert dashboard.experiment_url("http://h:5000") == "http://h:5000/#/experiments?workflowType=machine_learning"


def test_job_runs_mark_new_and_existing_experiments_as_model_training(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("made-before")  # e.g. by an older Orchard: no kind tag
    for name in ("fresh", "made-before"):
        job = JobRun(JobSpec(name=name, kind="train", tracking={"uri": uri}))
        job.describe(MANIFEST, ("accuracy", 0.5), 10)
        job.finish()
        exp = client.get_experiment_by_name(name)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        run = client.get_run(job.run_id)
        assert "test accuracy **0.5000**" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["mlflow.source.type"] in ("LOCAL", "JOB")
    assert client.get_experiment_by_name("made-before").experiment_id == old
