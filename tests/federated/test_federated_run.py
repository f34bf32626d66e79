"""A real Flower simulation on Ray over digits: it learns, logs every round, and fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchard.config import validate_spec
from orchard.data.manifest import read_split
from orchard.engine import evaluate

# Observed 0.944-0.952 test accuracy for these settings on digits (two split seeds; runs repeat exactly);
# the floor leaves room for thread-count and platform differences in float arithmetic.
ACCURACY_FLOOR = 0.85
ROUNDS = 4


def _spec(tmp_path, **federated):
    return validate_spec({
        "name": "fed-test", "kind": "federated",
        "model": {"family": "mlp", "hidden": [64]},
        "train": {"batch_size": 32, "lr": 3e-3},
        "federated": {"clients": 4, "rounds": ROUNDS, "partition": "dirichlet", "alpha": 1.0,
                      "local_epochs": 3, **federated},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


@pytest.mark.slow
def test_federation_learns_digits_logs_validation_every_round_and_tests_once(digits_prepared, tmp_path, monkeypatch,
                                                                             capfd):
    from mlflow.tracking import MlflowClient

    from orchard.config import ExplainSpec
    from orchard.explain import explain_job
    from orchard.federated import run_federated
    from orchard.progress import read_progress
    from orchard.tracking import JobRun
    from orchard.tracking.outputs import log_result

    monkeypatch.chdir(tmp_path)  # MLflow's artifact root is relative to the working folder
    spec = _spec(tmp_path, client_eval=0.5)  # 2 of the 4 clients also score each round's model locally
    log_path = tmp_path / "run" / "engine.log"
    progress = tmp_path / "run" / "progress.json"
    with JobRun(spec) as job:
        res = run_federated(spec, digits_prepared, job.logger, checkpoint_dir=tmp_path / "rounds",
                            progress_file=progress, log_path=log_path)
        log_result(job, res, spec.name, digits_prepared.manifest["classes"])
        # The final global model explains like a centrally trained one (issue 14): class maps on the run.
        explained = explain_job(job, spec.model_copy(update={"explain": ExplainSpec(samples=40, steps=16)}),
                                digits_prepared, res.model)

    accuracy = res.test["test/accuracy"]
    print(f"federated test accuracy {accuracy:.4f}", [round(h["fed/val_accuracy"], 3) for h in res.history])
    assert res.test["test/accuracy"] >= ACCURACY_FLOOR
    assert [h["round"] for h in res.history] == list(range(1, ROUNDS + 1))
    assert all(h["fed/clients"] == 4 for h in res.history)
    assert res.history[-1]["fed/client_train_loss"] < res.history[0]["fed/client_train_loss"]
    assert sum(res.partitions.counts) == digits_prepared.manifest["counts"]["train"]

    # The returned model is the final global model: evaluating it again gives the same figures.
    x, y = read_split(digits_prepared, "test")
    again = evaluate(res.model, [(torch.from_numpy(x), torch.from_numpy(y))], torch.device("cpu"), 10)
    assert again.accuracy == pytest.approx(res.test["test/accuracy"])
    assert res.confusion.sum() == len(y)

    client = MlflowClient(spec.tracking.uri)
    logged = client.get_run(job.run_id).data.metrics
    assert explained is not None and sum(explained["predicted_counts"].values()) == 40
    assert {a.path for a in client.list_artifacts(job.run_id, "explain")} == {"explain/attributions.png",
                                                                             "explain/summary.json"}
    # Rounds are scored on the validation split only; the test split once, on the final global model.
    assert not any(k.startswith("fed/") and k.removeprefix("fed/") in ("accuracy", "loss", "f1") for k in logged)
    val_rows = digits_prepared.manifest["counts"]["val"]
    for key in ("fed/val_accuracy", "fed/val_loss", "fed/val_f1", "fed/client_eval_accuracy",
                "fed/client_eval_p10_accuracy"):
        assert [m.step for m in client.get_metric_history(job.run_id, key)] == list(range(1, ROUNDS + 1)), key
    for key in ("test/accuracy", "test/f1", "test/precision", "test/recall"):
        assert [m.step for m in client.get_metric_history(job.run_id, key)] == [ROUNDS], key
    assert logged["test/accuracy"] == pytest.approx(res.test["test/accuracy"])
    final_val = evaluate(res.model, [tuple(map(torch.from_numpy, read_split(digits_prepared, "val")))],
                         torch.device("cpu"), 10)
    assert final_val.samples == val_rows and final_val.accuracy == pytest.approx(logged["fed/val_accuracy"])
    for h in res.history:  # 2 clients evaluated on their own share of the validation split
        assert h["fed/client_eval_clients"] == 2
        assert 0 < h["fed/client_eval_p10_accuracy"] <= h["fed/client_eval_accuracy"] <= 1
    (tmp_path / "dl").mkdir()
    table = json.loads(Path(client.download_artifacts(job.run_id, "federated/partitions.json", str(tmp_path / "dl")))
                       .read_text())
    assert [row[table["columns"].index("rows")] for row in table["data"]] == res.partitions.counts
    png = client.download_artifacts(job.run_id, "plots/client_eval.png", str(tmp_path / "dl"))
    assert Path(png).stat().st_size > 1000

    for key in ("fed/failed", "fed/rejected", "fed/skipped", "fed/bytes_sent", "fed/bytes_received"):
        assert [m.step for m in client.get_metric_history(job.run_id, key)] == list(range(1, ROUNDS + 1)), key
    # 4 clients x the float32 model each way; Flower's serialised arrays add a small header per array.
    model_bytes = 4 * sum(p.numel() * 4 for p in res.model.parameters())
    assert all(h["fed/bytes_sent"] == h["fed/bytes_received"] for h in res.history)
    assert model_bytes <= res.history[0]["fed/bytes_sent"] < 1.05 * model_bytes
    assert all(h["fed/failed"] == h["fed/rejected"] == h["fed/skipped"] == 0 for h in res.history)
    clients = json.loads(Path(client.download_artifacts(job.run_id, "federated/clients.json", str(tmp_path / "dl")))
                         .read_text())
    rows = [dict(zip(clients["columns"], r, strict=True)) for r in clients["data"]]
    assert sorted((r["round"], r["client"]) for r in rows) == [(r, c) for r in range(1, ROUNDS + 1) for c in range(4)]
    assert {r["status"] for r in rows} == {"ok"}

    assert read_progress(progress)["round"] == ROUNDS
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir())[-1] == f"round-{ROUNDS:05d}"
    assert "[ROUND 1/" in log_path.read_text()
    out, err = capfd.readouterr()
    assert "ROUND" not in out + err  # Flower's and Ray's chatter went to the log file


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [{"name": "fedprox", "proximal_mu": 0.1}, {"name": "fedyogi", "server_lr": 0.01},
                                      {"name": "bulyan", "num_malicious": 0}])
def test_other_strategies_run_a_real_federation(digits_prepared, tmp_path, strategy):
    from orchard.federated import run_federated

    spec = _spec(tmp_path, rounds=2, partition="iid", strategy=strategy)
    if strategy["name"] == "fedprox":
        # Early stopping rides on this run rather than paying for a federation of its own: mode max on a
        # falling loss makes round 1 the best and round 2 worse, so 5 rounds stop after round 2.
        spec = _spec(tmp_path, rounds=5, partition="iid", strategy=strategy,
                     early_stopping={"metric": "fed/val_loss", "mode": "max", "patience": 1})
    res = run_federated(spec, digits_prepared, None, log_path=tmp_path / "engine.log")
    assert [h["fed/clients"] for h in res.history] == [4, 4] and not any(h["fed/skipped"] for h in res.history)
    # Two rounds move the global model well above chance (0.1) for each of these strategies.
    assert res.history[-1]["fed/val_accuracy"] > 0.5, res.history
    if strategy["name"] == "fedprox":
        _assert_stopped_early_with_round_1s_model(res, digits_prepared, tmp_path / "engine.log")


def _assert_stopped_early_with_round_1s_model(res, prepared, log_path: Path) -> None:
    assert res.history[1]["fed/val_loss"] < res.history[0]["fed/val_loss"]
    assert (res.extra["best_round"], res.extra["stopped_round"]) == (1, 2)
    x, y = read_split(prepared, "val")
    val = evaluate(res.model, [(torch.from_numpy(x), torch.from_numpy(y))], torch.device("cpu"), 10)
    assert val.accuracy == pytest.approx(res.history[0]["fed/val_accuracy"])  # round 1's model, not round 2's
    x, y = read_split(prepared, "test")
    test = evaluate(res.model, [(torch.from_numpy(x), torch.from_numpy(y))], torch.device("cpu"), 10)
    assert test.accuracy == pytest.approx(res.test["test/accuracy"])  # and it is the one tested
    assert "early stopping after round 2" in log_path.read_text()


@pytest.mark.slow
def test_clients_that_cannot_train_stop_the_federation_with_a_clear_error(fresh_digits, tmp_path):
    from orchard.federated import run_federated
    from orchard.federated.partitions import write_partitions
    from orchard.federated.server import FederationError

    spec = _spec(tmp_path, clients=2, rounds=2)
    parts = write_partitions(fresh_digits, spec.federated)
    for i in range(2):
        parts.client_file(i).write_bytes(b"not parquet")  # every client fails to read its data

    with pytest.raises(FederationError, match="round 1: none of 2 client"):
        run_federated(spec, fresh_digits, None, log_path=tmp_path / "engine.log")


@pytest.mark.slow
def test_a_client_larger_than_any_ray_node_is_refused_before_flower_starts(digits_prepared, tmp_path):
    from orchard.federated import run_federated

    spec = _spec(tmp_path, client_cpus=512)
    with pytest.raises(ValueError, match="federated.client_cpus=512"):
        run_federated(spec, digits_prepared, None, log_path=tmp_path / "engine.log")


def test_client_cpus_default_follows_the_cpus_the_round_size_and_memory():
    from orchard.federated.simulation import ACTOR_BYTES, choose_client_cpus

    assert choose_client_cpus(2, 4, None)[:2] == (1.0, 2)  # more clients than CPUs: one CPU each
    cpus, actors, why = choose_client_cpus(16, 4, 64 * 2**30)  # few clients, many CPUs: threads each
    assert (cpus, actors) == (4.0, 4) and "4 clients sampled per round" in why
    assert choose_client_cpus(16, 100, 3 * ACTOR_BYTES)[:2] == (16.0, 1)  # memory for one actor only
    spec = _spec(Path("."))
    assert spec.federated.client_cpus is None  # unset: chosen at run time and written to the engine log

