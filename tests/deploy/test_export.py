"""``orchard export`` on real models: trained in-process on real digits and logged the way the runner logs them.

Each model is trained for a few full passes of plain PyTorch (no Ray: ~1 s) and logged through ``JobRun``
(dataset inputs, spec, ``log_model``), so the export reads exactly what an ``orchard run`` leaves behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchard.cli import main
from orchard.config import JobSpec
from orchard.data.manifest import read_head, read_split
from orchard.deploy.export import ExportError, export_model, predictions
from orchard.models.registry import build_model
from orchard.tracking import JobRun

MLP = {"family": "mlp", "hidden": [64]}
CNN = {"family": "cnn", "channels": [8, 16], "kernel_size": 3, "pool": "max", "hidden": [32], "norm": "batch"}


def log_trained_run(model_spec: dict, prepared, uri: str, epochs: int = 2, batch: int = 32, seed: int = 0) -> str:
    """A finished run holding a model trained on ``prepared`` (Adam, a few epochs), logged like ``orchard run``."""
    spec = JobSpec.model_validate({"name": "export-test", "kind": "train", "model": model_spec,
                                   "tracking": {"uri": uri}})
    torch.manual_seed(seed)
    model = build_model(spec, prepared.manifest)
    x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
            opt.step()
    with JobRun(spec) as job:
        job.log_dataset(prepared)
        LOGGED[job.run_id] = job.log_model(model.eval(), read_head(prepared, "test", 4))
    return job.run_id


LOGGED: dict[str, str] = {}  # run id -> the model URI log_model returned (what `orchard run` prints)


@pytest.fixture(scope="module")
def one_thread():
    # On the shared 2-core box torch's second intra-op thread mostly waits for a core: one thread trained
    # the tiny CNN several times faster under load. The export measures latency on one thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_prepared, one_thread):
    folder = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # Trained past thin margins: after 2 epochs int8 flipped 3 of 270 test rows (torch.ao's MLP, ONNX's CNN),
    # which is more than the 1-point budget; the 1-point bound is meant for a model that learned the task.
    runs = {"mlp": log_trained_run(MLP, digits_prepared, uri, epochs=4),
            "cnn": log_trained_run(CNN, digits_prepared, uri, epochs=5)}
    return uri, runs


@pytest.fixture(scope="module")
def onnx_reports(store):
    uri, runs = store
    return {name: export_model(f"runs:/{run_id}/model", "onnx", "int8", uri) for name, run_id in runs.items()}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_export_predicts_what_pytorch_predicts_and_int8_keeps_digits_accuracy(onnx_reports, name):
    fp32, int8 = onnx_reports[name].variants
    assert fp32.agreement >= 0.999 and fp32.max_abs_diff < 1e-4
    assert fp32.test_accuracy > 0.9  # the model learned: accuracy on 270 test rows means something
    assert abs(int8.test_accuracy - fp32.test_accuracy) <= 0.01
    assert int8.size_bytes < fp32.size_bytes
    # A CNN needs static quantization: dynamic would leave its convolutions in float.
    assert onnx_reports[name].quantization == ("static" if name == "cnn" else "dynamic")


def test_export_logs_files_report_and_metrics_to_the_models_own_run(store, onnx_reports, tmp_path):
    uri, runs = store
    client = MlflowClient(uri)
    run_id = runs["cnn"]
    files = {f.path: f.file_size for f in client.list_artifacts(run_id, "export")}
    assert set(files) == {"export/model.onnx", "export/model.int8.onnx", "export/report.onnx.json"}
    metrics = client.get_run(run_id).data.metrics
    for key in ("onnx_max_abs_diff", "onnx_argmax_agreement", "fp32_test_accuracy", "int8_test_accuracy",
                "fp32_size_bytes", "int8_size_bytes", "fp32_latency_ms_per_row", "int8_latency_ms_per_row"):
        assert f"export/{key}" in metrics, key
    assert metrics["export/int8_size_bytes"] == files["export/model.int8.onnx"]
    report = json.loads(Path(client.download_artifacts(run_id, "export/report.onnx.json", str(tmp_path))).read_text())
    assert report["run_id"] == run_id and report["test_rows"] == 270 and report["quantization"] == "static"


def test_logged_onnx_file_runs_with_a_dynamic_batch(store, digits_prepared, tmp_path):
    import onnxruntime as ort

    uri, runs = store
    path = MlflowClient(uri).download_artifacts(runs["mlp"], "export/model.onnx", str(tmp_path))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, y = read_split(digits_prepared, "test")
    for rows in (1, 7, len(x)):
        assert session.run(None, {"features": x[:rows]})[0].shape == (rows, 10)
    assert np.mean(predictions(session.run(None, {"features": x})[0]) == y) > 0.9


def test_torchscript_export_by_run_id_through_the_cli(store, capsys):
    uri, runs = store
    assert main(["export", runs["mlp"], "--format", "torchscript", "--quantize", "int8",
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "export/model.torchscript.pt" in out and "export/model.torchscript.int8.pt" in out
    metrics = MlflowClient(uri).get_run(runs["mlp"]).data.metrics
    assert metrics["export/torchscript_argmax_agreement"] >= 0.999
    assert abs(metrics["export/torchscript_int8_test_accuracy"] - metrics["export/torchscript_fp32_test_accuracy"]) <= 0.01


@pytest.mark.parametrize("args, needle", [
    (["runs:/0123456789abcdef0123456789abcdef/model"], "no run 0123456789abcdef0123456789abcdef"),
    (["not a uri:x"], "is not runs:/<run_id>/model"),
    (["RUN", "--format", "tflite"], "--format 'tflite' is not supported"),
    (["RUN", "--quantize", "int4"], "--quantize 'int4' is not supported"),
])
def test_bad_input_exits_2_with_a_message_naming_it(store, capsys, args, needle):
    uri, runs = store
    args = [runs["mlp"] if a == "RUN" else a for a in args]
    fmt = [] if "--format" in args else ["--format", "onnx"]
    assert main(["export", *args, *fmt, "--tracking-uri", uri]) == 2
    out = capsys.readouterr().out
    assert needle in " ".join(out.split()) and "Traceback" not in out


def test_a_run_without_a_logged_model_is_refused_by_name(store):
    uri, _ = store
    job = JobRun(JobSpec(name="no-model", kind="train", tracking={"uri": uri}))
    job.finish()
    with pytest.raises(ExportError, match=f"run {job.run_id} has no loadable PyTorch model"):
        export_model(job.run_id, "onnx", tracking_uri=uri)


def test_a_missing_store_is_refused_instead_of_created(tmp_path):
    with pytest.raises(ExportError, match="no tracking store at"):
        export_model("abc", "onnx", tracking_uri=f"sqlite:///{tmp_path / 'nope.db'}")
    assert not (tmp_path / "nope.db").exists()


def test_an_export_below_the_agreement_floor_exits_1_and_logs_nothing(store, capsys, monkeypatch):
    import orchard.deploy.export as export

    uri, runs = store
    monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)  # no file can agree on more than every row
    assert main(["export", runs["cnn"], "--format", "torchscript", "--tracking-uri", uri]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"the torchscript export of run {runs['cnn']} predicts the PyTorch model's class on only" in out
    assert "nothing was logged" in out and "Traceback" not in out
    logged = [f.path for f in MlflowClient(uri).list_artifacts(runs["cnn"], "export")]
    assert not any("torchscript" in p for p in logged)


def test_the_model_uri_a_run_prints_resolves_to_its_run(store):
    from orchard.tracking.exported import load_run_model

    uri, runs = store
    model_uri = LOGGED[runs["mlp"]]
    assert model_uri.startswith("models:/")
    loaded = load_run_model(model_uri, uri)
    assert loaded.run_id == runs["mlp"] and loaded.prepared_path is not None and loaded.spec_yaml
