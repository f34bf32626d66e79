"""Strategy factory and reply guard: all 12 strategies aggregate real replies; bad replies are rejected.

The replies are real Flower ``Message`` objects built as a ClientApp builds them; no Ray is needed to
check what the server does with them. A few strategies also run a real simulation on Ray.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from orchard.config import STRATEGIES, SpecError, validate_spec

pytestmark = pytest.mark.usefixtures("server_identity")

TINY = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _spec(name: str, clients: int = 6, **federated):
    return validate_spec({"name": "s", "kind": "federated", "train": {"lr": 0.1},
                          "federated": {"clients": clients, "rounds": 2, "strategy": {"name": name, "num_selected": 2},
                                        **federated}})


def _replies(global_sd, n, shift=0.1, edit=None):
    """n replies from clients 0..n-1, each the global model moved by a small client-specific step."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    out = []
    for cid in range(n):
        sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=100 + cid,
                       message_type=MessageType.TRAIN)
        sd = {k: v + shift * (cid + 1) / n for k, v in global_sd.items()}
        content = {"arrays": ArrayRecord(sd), "metrics": MetricRecord({"train_loss": 1.0 + cid, "num-examples": 10}),
                   "orchard": ConfigRecord({"client-id": cid})}
        if edit is not None:
            edit(cid, content)
        out.append(Message(RecordDict(content), reply_to=sent))
    return out


def _guard(spec, global_sd, counts=None):
    from flwr.app import ArrayRecord

    from orchard.federated.strategies import GuardedStrategy, ReplyCheck, build_strategy

    inner = build_strategy(spec)
    # What each strategy's configure_train stores before aggregation (it needs a live Grid to call).
    for attr in ("current_arrays",):
        if hasattr(inner, attr):
            arrays = ArrayRecord(global_sd)
            setattr(inner, attr, {k: a.numpy() for k, a in arrays.items()}
                    if type(inner).__name__ in ("FedAdagrad", "FedAdam", "FedYogi") else arrays)
    check = ReplyCheck(ArrayRecord(global_sd), counts or [10] * spec.federated.clients)
    return GuardedStrategy(inner, check, spec.federated.min_train_clients)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_and_aggregates_real_replies(name):
    global_sd = {k: v.detach().clone() for k, v in TINY.state_dict().items()}
    spec = _spec(name, clients=7)
    guard = _guard(spec, global_sd)
    replies = _replies(global_sd, 7)
    arrays, metrics = guard.aggregate_train(1, replies)
    assert arrays is not None, f"{name} skipped a round of 7 valid replies"
    # The replies' models are dropped once aggregated (Flower's loop keeps the list a round longer); what the
    # strategy returned (Krum's is one client's own record) is intact.
    assert [len(r.content.array_records) for r in replies] == [0] * 7
    assert all(r.content["metrics"]["num-examples"] == 10 for r in replies)
    new = arrays.to_torch_state_dict()
    assert set(new) == set(global_sd)
    moved = sum(float((new[k] - global_sd[k]).abs().sum()) for k in new)
    assert moved > 0 and all(torch.isfinite(v).all() for v in new.values())
    assert guard.rounds[1].metrics()["fed/clients"] == 7


def test_bad_replies_are_rejected_counted_and_the_rest_aggregated():
    import flwr.app as fa

    global_sd = {k: v.detach().clone() for k, v in TINY.state_dict().items()}
    key = next(iter(global_sd))

    def spoil(cid, content):
        sd = content["arrays"].to_torch_state_dict()
        if cid == 0:
            sd[key] = sd[key] * float("nan")
        elif cid == 1:
            sd[key] = torch.zeros(9, 9)
        elif cid == 2:
            content["metrics"] = fa.MetricRecord({"train_loss": 1.0, "num-examples": 10_000})
        elif cid == 3:
            content["metrics"] = fa.MetricRecord({"loss": 1.0, "num-examples": 10})
        elif cid == 4:
            content["extra"] = fa.ArrayRecord({"z": torch.ones(1)})
        content["arrays"] = fa.ArrayRecord(sd)

    guard = _guard(_spec("fedavg", clients=8), global_sd)
    arrays, _ = guard.aggregate_train(1, _replies(global_sd, 8, edit=spoil))
    log = guard.rounds[1]
    reasons = {c["client"]: c["reason"] for c in log.clients if c["status"] == "rejected"}
    assert sorted(reasons) == [0, 1, 3, 4]
    assert "NaN" in reasons[0] and "shape" in reasons[1]
    assert "metric keys" in reasons[3] and "ArrayRecord" in reasons[4]
    assert log.metrics()["fed/rejected"] == 4 and log.metrics()["fed/clients"] == 4
    # Client 2 claimed 10,000 rows of a 10-row partition: kept, its weight capped to 10.
    (capped,) = [c for c in log.clients if c["client"] == 2]
    assert capped["num_examples"] == 10 and "capped" in capped["reason"] and log.metrics()["fed/capped"] == 1
    # The mean of clients 2, 5, 6, 7 (equal weights): shifts 0.1 * (3, 6, 7, 8) / 8.
    expected = global_sd[key] + 0.1 * 6 / 8
    assert torch.allclose(arrays.to_torch_state_dict()[key], expected, atol=1e-6)


def test_a_round_with_too_few_valid_replies_is_skipped_not_fatal():
    global_sd = {k: v.detach().clone() for k, v in TINY.state_dict().items()}

    def nan_all_but_one(cid, content):
        if cid:
            sd = content["arrays"].to_torch_state_dict()
            import flwr.app as fa
            content["arrays"] = fa.ArrayRecord({k: v * float("inf") for k, v in sd.items()})

    guard = _guard(_spec("fedavg", clients=4, min_train_clients=2), global_sd)
    arrays, metrics = guard.aggregate_train(1, _replies(global_sd, 4, edit=nan_all_but_one))
    assert arrays is None and metrics is None
    assert guard.rounds[1].metrics()["fed/skipped"] == 1.0


@pytest.mark.parametrize(("name", "clients", "federated", "match"), [
    ("bulyan", 6, {"attack": {"kind": "sign_flip", "fraction": 0.2}}, "4\\*num_malicious\\+3 = 7"),
    ("krum", 4, {"strategy": {"name": "krum", "num_malicious": 1}}, "more than 2\\*num_malicious\\+2 = 4"),
    ("multikrum", 6, {"strategy": {"name": "multikrum", "num_malicious": 1, "num_selected": 6}}, "num_selected=6"),
    ("fedavg", 10, {"fraction_train": 0.2, "min_train_clients": 3}, None),
])
def test_impossible_strategy_settings_are_refused_before_start(name, clients, federated, match):
    from orchard.federated.strategies import check_strategy, num_sampled

    spec = _spec(name, clients=clients, **federated)
    if match is None:  # sampling never asks fewer clients than min_train_clients, as Flower does
        assert num_sampled(spec) == 3
        check_strategy(spec)
        return
    with pytest.raises(SpecError, match=match):
        check_strategy(spec)


def test_num_malicious_auto_follows_the_attack_fraction_of_sampled_clients():
    from orchard.federated.strategies import build_strategy, num_malicious

    spec = _spec("krum", clients=20, fraction_train=0.5, attack={"kind": "sign_flip", "fraction": 0.2})
    assert num_malicious(spec) == 2  # round(0.2 * 10 sampled)
    assert build_strategy(spec).num_malicious_nodes == 2
    assert build_strategy(_spec("qfedavg")).client_learning_rate == pytest.approx(0.1)  # train.lr
    assert build_strategy(_spec("fedadam", client_lr=0.05)).eta_l == pytest.approx(0.05)


def test_strategy_state_round_trips_through_a_checkpoint(tmp_path):
    from orchard.federated.checkpoint import (
        RoundCheckpoint,
        load_latest,
        restore_strategy,
        save_round,
        strategy_state,
    )

    global_sd = {k: v.detach().clone() for k, v in TINY.state_dict().items()}
    for name, attrs in (("fedadam", ("m_t", "v_t")), ("fedavgm", ("momentum_vector",))):
        guard = _guard(_spec(name), global_sd)
        guard.aggregate_train(1, _replies(global_sd, 6))
        tensors, scalars = strategy_state(guard)
        assert tensors, name
        save_round(tmp_path / name, RoundCheckpoint(1, global_sd, [{"round": 1}], [], tensors, scalars))
        ck = load_latest(tmp_path / name)
        fresh = _guard(_spec(name), global_sd)
        restore_strategy(fresh, ck.strategy_tensors, ck.strategy_scalars)
        for attr in attrs:
            a, b = getattr(guard.inner, attr), getattr(fresh.inner, attr)
            pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else list(zip(a, b, strict=True))
            assert len(pairs) == len(b) and all(np.array_equal(x, y) for x, y in pairs)
        assert ck.round == 1 and ck.history == [{"round": 1}]


def test_validation_still_filters_replies_when_flowers_dp_wrapper_is_inside():
    # Flower's DP wrappers skip a round on any error reply and clip every update against the global
    # arrays (a wrong shape would crash them): the guard sits outside them and filters first.
    import flwr.app as fa
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    from orchard.federated.strategies import GuardedStrategy, ReplyCheck, build_strategy

    global_sd = {k: v.detach().clone() for k, v in TINY.state_dict().items()}
    key = next(iter(global_sd))
    spec = _spec("fedavg", clients=4)
    dp = DifferentialPrivacyServerSideFixedClipping(build_strategy(spec), noise_multiplier=0.01,
                                                    clipping_norm=100.0, num_sampled_clients=4)
    dp.current_arrays = fa.ArrayRecord(global_sd)  # what its configure_train stores
    guard = GuardedStrategy(dp, ReplyCheck(fa.ArrayRecord(global_sd), [10] * 4), 1)

    def wrong_shape(cid, content):
        if cid == 0:
            content["arrays"] = fa.ArrayRecord({**content["arrays"].to_torch_state_dict(), key: torch.zeros(2, 2)})

    arrays, _ = guard.aggregate_train(1, _replies(global_sd, 4, edit=wrong_shape))
    assert arrays is not None and arrays[key].shape == tuple(global_sd[key].shape)
    assert guard.rounds[1].rejected == 1 and guard.rounds[1].metrics()["fed/clients"] == 3
