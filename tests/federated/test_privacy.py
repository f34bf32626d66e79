"""Differential privacy: the budget is accounted honestly and grows by round; DP runs really noise."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchard.config import SpecError, validate_spec
from orchard.federated.privacy import central_epsilon, client_mods


def _spec(tmp_path, **privacy):
    return validate_spec({
        "name": "fed-dp", "kind": "federated",
        "model": {"family": "mlp", "hidden": [64]},
        "train": {"batch_size": 32, "lr": 3e-3},
        "federated": {"clients": 4, "rounds": 3, "partition": "iid", "local_epochs": 2, "privacy": privacy},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def test_central_epsilon_matches_dp_accounting_and_grows_with_rounds():
    from dp_accounting import dp_event, rdp

    eps = [central_epsilon(1.0, 20, 20, r, 1e-5) for r in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    independent = rdp.RdpAccountant()
    independent.compose(dp_event.GaussianDpEvent(1.0), 20)
    assert eps[2] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-6)
    # Sampling 10 of 100 clients per round amplifies privacy; claiming no amplification costs more.
    assert central_epsilon(1.0, 10, 100, 20, 1e-5) < central_epsilon(1.0, 10, 100, 20, 1e-5, amplification=False)


def test_secagg_and_knobs_a_mode_ignores_are_refused(tmp_path):
    with pytest.raises(SpecError, match="secagg is not supported"):
        _spec(tmp_path, secagg=True)
    with pytest.raises(SpecError, match="epsilon has no effect with mode: central_fixed"):
        _spec(tmp_path, mode="central_fixed", epsilon=2.0)


def test_local_dp_builds_flowers_mod_with_the_spec_values(tmp_path):
    from flwr.clientapp.mod import LocalDpMod

    (mod,) = client_mods(_spec(tmp_path, mode="local", clipping_norm=2.0, epsilon=3.0, delta=1e-4))
    assert isinstance(mod, LocalDpMod)
    assert (mod.clipping_norm, mod.epsilon, mod.delta) == (2.0, 3.0, 1e-4)
    assert client_mods(_spec(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.parametrize("privacy", [{"mode": "central_fixed", "noise_multiplier": 0.1, "clipping_norm": 1.0},
                                     {"mode": "local", "clipping_norm": 1.0, "epsilon": 5.0}])
def test_a_dp_federation_logs_a_growing_epsilon_every_round(digits_prepared, tmp_path, monkeypatch, privacy):
    from orchard.federated import run_federated
    from orchard.tracking import JobRun

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, **privacy)
    plain = validate_spec({**spec.model_dump(mode="json"),
                           "federated": {**spec.federated.model_dump(mode="json"), "privacy": {"mode": "none"}}})
    with JobRun(spec) as job:
        res = run_federated(spec, digits_prepared, job)
    baseline = run_federated(plain, digits_prepared)
    eps = [m.value for m in sorted(MlflowClient(spec.tracking.uri).get_metric_history(job.run_id, "fed/epsilon"),
                                   key=lambda m: m.step)]
    print(privacy["mode"], "epsilon", eps, "accuracy", res.test.accuracy, "without DP", baseline.test.accuracy)
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    if privacy["mode"] == "local":
        assert eps == pytest.approx([5.0, 10.0, 15.0])
    # Noise changes the model: the DP run's final test loss differs from the same run without DP.
    assert res.test.loss != pytest.approx(baseline.test.loss, rel=1e-6)
    # 4 clients give DP no crowd to hide in (noise std = σ·C/4), so only a small σ still learns well.
    # Observed: central σ=0.1 0.833, local ε=5 per reply 0.215 (no DP 0.915); chance is 0.1.
    assert res.test.accuracy > (0.6 if privacy["mode"] == "central_fixed" else 0.12)
