"""Differential privacy: the spent epsilon, Flower's central DP wrappers and local DP mod on real messages.

Replies are real Flower ``Message`` objects aggregated by the real wrapped strategies (no Ray); one test
runs a real simulation with central DP. SecAgg+ is refused in the spec; a test keeps the reason checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchard.config import SpecError, validate_spec

pytestmark = pytest.mark.usefixtures("server_identity")

DIM = 64 * 10 + 10  # one Linear(64, 10): enough elements to measure the noise's stddev


def _spec(privacy: dict, clients: int = 10, **federated):
    return validate_spec({"name": "p", "kind": "federated",
                          "federated": {"clients": clients, "rounds": 3, "privacy": privacy, **federated}})


def _global():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(10, 64)).astype(np.float32), "b": np.zeros(10, np.float32)}


def _replies(global_nd, steps, examples=None):
    """One reply per step: the global arrays moved by ``step`` (a scalar added to every element)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    out = []
    for cid, step in enumerate(steps):
        sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=100 + cid,
                       message_type=MessageType.TRAIN)
        arrays = _ar({k: v + np.float32(step) for k, v in global_nd.items()})
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": (examples or [10] * len(steps))[cid]})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=sent))
    return out


def _wrapped(privacy: dict, global_nd, clients=4):
    from flwr.serverapp.strategy import FedAvg

    from orchard.federated.privacy import PrivacyLedger, wrap_strategy

    spec = _spec(privacy, clients=clients)
    ledger = PrivacyLedger(spec, clients)
    strategy = wrap_strategy(FedAvg(fraction_evaluate=0.0), spec, clients, ledger)
    strategy.current_arrays = _ar(global_nd)  # what configure_train stores (needs a live Grid)
    return strategy, ledger


def _ar(nd: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.asarray(v)) for k, v in nd.items()})


def _update(arrays, global_nd) -> np.ndarray:
    return np.concatenate([(arrays[k].numpy() - global_nd[k]).ravel() for k in global_nd])


# --- the spent epsilon ----------------------------------------------------------------------------------

def test_epsilon_grows_with_rounds_and_matches_dp_accounting():
    from dp_accounting import dp_event, rdp

    from orchard.federated.privacy import PrivacyLedger

    ledger = PrivacyLedger(_spec({"mode": "central_fixed", "noise_multiplier": 1.1, "delta": 1e-5,
                                  "amplification": True}), 4)
    assert ledger.epsilon_after(0) == 0.0
    for rnd in range(1, 6):
        ledger.record(rnd, 1.1)
    eps = [ledger.epsilon_after(r) for r in range(1, 6)]
    assert all(b > a > 0 for a, b in zip(eps, eps[1:], strict=False)), eps

    # Independently: 3 Poisson-sampled Gaussian releases, q = 4/10, straight from dp-accounting.
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(0.4, dp_event.GaussianDpEvent(1.1)), 3)
    assert eps[2] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_sampling_amplification_is_off_by_default_and_refused_for_fixed_size_sampling():
    from orchard.federated.privacy import PrivacyLedger

    def eps(**privacy):
        ledger = PrivacyLedger(_spec({"mode": "central_fixed", **privacy}), 2)
        ledger.record(1, 1.0)
        return ledger.epsilon_after(1)

    # Default: the no-sampling bound, as if every round touched every client.
    assert eps() == eps(amplification=False) > eps(amplification=True)
    # Flower draws a fixed-size set per round, not the Poisson sampling the amplified bound assumes.
    with pytest.raises(SpecError, match="privacy.amplification: true assumes Poisson"):
        _spec({"mode": "central_fixed", "amplification": True}, fraction_train=0.5)
    assert _spec({"mode": "central_fixed"}, fraction_train=0.5).federated.privacy.amplification is False


def test_local_dp_epsilon_composes_over_the_rounds_a_client_took_part_in():
    from orchard.federated.privacy import PrivacyLedger

    ledger = PrivacyLedger(_spec({"mode": "local", "epsilon": 0.5}), 10)
    eps = [ledger.epsilon_after(r) for r in (1, 2, 4)]
    assert eps[0] < eps[1] < eps[2]
    # RDP of the mod's Gaussian over 4 replies is tighter than basic composition (4 x 0.5) yet above one reply.
    assert 0.5 < eps[2] < 4 * 0.5
    assert PrivacyLedger(_spec({}), 10).epsilon_after(3) is None


# --- the spec refuses what would be meaningless -----------------------------------------------------------

@pytest.mark.parametrize(("privacy", "words"), [
    ({"secagg": True}, ["secagg", "LegacyContext", "central_fixed"]),
    ({"mode": "central_fixed", "noise_multiplier": 0}, ["noise_multiplier"]),
    ({"mode": "central_fixed", "epsilon": 2.0}, ["epsilon has no effect with mode: central_fixed"]),
    ({"mode": "local", "noise_multiplier": 2.0}, ["noise_multiplier has no effect with mode: local"]),
    ({"mode": "central_fixed", "target_quantile": 0.3}, ["target_quantile has no effect"]),
    ({"mode": "central_adaptive", "target_quantile": 1.0}, ["target_quantile"]),
    ({"mode": "central_adaptive", "noise_multiplier": 1.0, "clipped_count_stddev": 0.4}, ["clipped_count_stddev > 0.5"]),
])
def test_meaningless_privacy_settings_are_refused_with_the_reason(privacy, words):
    with pytest.raises(SpecError) as err:
        _spec(privacy)
    for word in words:
        assert word in str(err.value)


def test_central_dp_refuses_a_strategy_that_is_not_a_plain_mean():
    """Refused by the spec, before any compute."""
    for name in ("fedmedian", "fedadam", "krum"):
        with pytest.raises(SpecError, match=f"needs strategy.name fedavg or fedprox, got {name}"):
            _spec({"mode": "central_fixed"}, strategy={"name": name})
    _spec({"mode": "central_adaptive"}, strategy={"name": "fedprox"})


def test_secaggplus_still_needs_the_legacy_api():
    """The reason secagg is refused: if Flower lifts it, this fails and secagg should be revisited."""
    from flwr.app import Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.common import MessageType
    from flwr.server.workflow import SecAggPlusWorkflow

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TypeError, match="LegacyContext"):
        SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)(None, context)
    # A Message-API train message (arrays + config, as Strategy.start sends) is not a SecAgg+ stage.
    msg = Message(RecordDict({"arrays": _ar({"w": np.zeros(3, np.float32)})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    with pytest.raises(KeyError):
        secaggplus_mod(msg, context, lambda m, c: m)


# --- central DP on real replies ------------------------------------------------------------------------------

def test_fixed_clipping_bounds_the_aggregated_update_by_the_clipping_norm():
    global_nd = _global()
    # A noise multiplier of 1e-6 (the spec refuses 0: epsilon would be infinite) leaves the clipping visible.
    strategy, ledger = _wrapped({"mode": "central_fixed", "noise_multiplier": 1e-6, "clipping_norm": 0.5}, global_nd)
    arrays, _ = strategy.aggregate_train(1, _replies(global_nd, [1.0, 2.0, -0.5, 3.0]))
    norm = np.linalg.norm(_update(arrays, global_nd))
    unclipped = np.linalg.norm(np.full(DIM, (1.0 + 2.0 - 0.5 + 3.0) / 4))
    assert norm <= 0.5 * 1.001 and unclipped > 10 * 0.5
    assert len(ledger.releases) == 1 and ledger.epsilon_after(1) > 0


def test_fixed_clipping_adds_noise_of_sigma_c_over_m_and_weighs_clients_equally():
    global_nd = _global()
    strategy, ledger = _wrapped({"mode": "central_fixed", "noise_multiplier": 2.0, "clipping_norm": 100.0}, global_nd)
    # Updates far below the clip, different example counts: the noiseless mean would be 0.25 (uniform).
    arrays, _ = strategy.aggregate_train(1, _replies(global_nd, [0.1, 0.2, 0.3, 0.4], examples=[1, 1, 1, 97]))
    noise = _update(arrays, global_nd) - 0.25
    assert np.std(noise) == pytest.approx(2.0 * 100.0 / 4, rel=0.15)  # sigma * C / m
    assert abs(np.mean(noise)) < 3 * 50 / math.sqrt(DIM)  # centred on the uniform mean, not the weighted 0.394
    assert ledger.releases == [(1, 2.0)]


def test_adaptive_clipping_moves_the_norm_towards_the_target_quantile():
    global_nd = _global()
    privacy = {"mode": "central_adaptive", "noise_multiplier": 0.5, "clipping_norm": 1.0, "target_quantile": 0.5}
    big, _ = _wrapped(privacy, global_nd, clients=40)
    # 40 replies: the clipped count is noised with stddev max(40/20, 2 * 0.5) = 2, a twentieth of the
    # fraction; with 4 replies one stddev was a quarter of it and "none clipped" could read as over half.
    big.aggregate_train(1, _replies(global_nd, [1.0] * 40))  # every update (norm 25.5) is clipped
    small, ledger = _wrapped(privacy, global_nd, clients=40)
    small.aggregate_train(1, _replies(global_nd, [1e-4] * 40))  # none is
    # Flower 1.42's own update shrinks the norm when all are clipped (it collapses); ours grows it.
    assert big.clipping_norm > 1.0 > small.clipping_norm
    # Two releases per round: the update and the clipped count.
    assert [r for r, _ in ledger.releases] == [1, 1] and ledger.epsilon_after(1) > 0


# --- local DP -----------------------------------------------------------------------------------------------

def test_local_dp_mod_clips_and_noises_what_the_client_sends():
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType

    from orchard.federated.privacy import client_mods

    assert client_mods(_spec({"mode": "central_fixed"})) == []
    [mod] = client_mods(_spec({"mode": "local", "clipping_norm": 0.5, "epsilon": 1.0, "delta": 1e-5}))
    global_nd = _global()
    sent = Message(RecordDict({"arrays": _ar(global_nd), "config": ConfigRecord({"lr": 0.1})}),
                   dst_node_id=1, message_type=MessageType.TRAIN)
    trained = {k: v + np.float32(1.0) for k, v in global_nd.items()}

    def client(msg, ctxt):
        return Message(RecordDict({"arrays": _ar(trained)}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = mod(sent, context, client)
    sent_update = _update(reply.content["arrays"], global_nd)
    expected_std = 2 * 0.5 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0  # sensitivity 2C
    assert np.std(sent_update - np.mean(sent_update)) == pytest.approx(expected_std, rel=0.15)
    # The client's true update (all ones, norm 25.5) is gone: what remains is a clipped step plus noise.
    assert abs(np.mean(sent_update)) < 0.5


# --- a real federation ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_central_dp_federation_reports_a_growing_epsilon_that_survives_a_resume(digits_prepared, tmp_path):
    """2 rounds checkpointed, then the same federation resumed to 3 rounds: epsilon counts all 3 releases."""
    from orchard.federated import run_federated
    from orchard.federated.privacy import PrivacyLedger

    def spec(rounds):
        return validate_spec({
            "name": "dp", "kind": "federated", "model": {"family": "mlp", "hidden": [64]},
            "train": {"batch_size": 32, "lr": 3e-3},
            "federated": {"clients": 4, "rounds": rounds, "partition": "iid", "local_epochs": 2,
                          "privacy": {"mode": "central_fixed", "noise_multiplier": 0.3, "clipping_norm": 1.0}},
        })

    rounds = tmp_path / "rounds"
    first = run_federated(spec(2), digits_prepared, checkpoint_dir=rounds, log_path=tmp_path / "engine.log")
    assert [h["round"] for h in first.history] == [1, 2]
    res = run_federated(spec(3), digits_prepared, checkpoint_dir=rounds, log_path=tmp_path / "engine.log")
    eps = [h["fed/epsilon"] for h in res.history]
    print("dp federation", round(res.test["test/accuracy"], 4), [round(e, 3) for e in eps])
    assert [h["round"] for h in res.history] == [1, 2, 3]
    assert 0 < eps[0] < eps[1] < eps[2]
    ledger = PrivacyLedger(spec(3), 4)
    for rnd in (1, 2, 3):
        ledger.record(rnd, 0.3)
        # Every round's figure is the budget of all releases so far, the resumed round's included.
        assert eps[rnd - 1] == pytest.approx(ledger.epsilon_after(rnd))
    # Observed 0.70 test accuracy (epsilon 20.4, 32.3, 42.8) for these settings; chance is 0.1.
    assert res.test["test/accuracy"] > 0.5, [round(h["fed/val_accuracy"], 3) for h in res.history]
