"""The server folds train replies into their weighted mean as they arrive (``GuardedStrategy._fold``).

Replies are real ``local_train`` replies on real digits partitions (no Ray); the reference is Flower's own
aggregation of the whole list (``FedAvg.aggregate_train``).
"""

from __future__ import annotations

import pytest
import torch

from tests.federated.test_faults_attacks import _client_replies, _guard, _spec


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_the_folded_mean_matches_flowers_aggregation_of_the_whole_list(digits_prepared, name):
    spec = _spec(partition="dirichlet", alpha=0.5, strategy={"name": name})
    counts, global_sd, replies = _client_replies(spec, digits_prepared, range(4))
    assert len(set(counts)) == 4, counts  # unequal weights, so a plain mean would differ
    guard = _guard(spec, global_sd, counts)
    assert guard.folds()
    expected, expected_metrics = guard.inner.aggregate_train(1, replies)  # Flower's, before the fold drops arrays
    expected_sd = expected.to_torch_state_dict()

    arrays, metrics = guard.aggregate_train(1, iter(replies))
    got = arrays.to_torch_state_dict()
    assert list(got) == list(expected_sd)
    for k in got:
        assert got[k].dtype == expected_sd[k].dtype, k
        assert torch.allclose(got[k].double(), expected_sd[k].double(), rtol=1e-5, atol=1e-6), k
    assert metrics["train_loss"] == pytest.approx(expected_metrics["train_loss"], rel=1e-9)
    assert [c["status"] for c in guard.rounds[1].clients] == ["ok"] * 4
    assert guard.rounds[1].bytes_received > 0


@pytest.mark.usefixtures("server_identity")
def test_each_reply_is_dropped_before_the_next_is_read(digits_prepared):
    """The server holds one client model at a time, not a round's worth."""
    spec = _spec()
    counts, global_sd, replies = _client_replies(spec, digits_prepared, range(4))
    held = []

    def arriving():
        for msg in replies:
            held.append(sum(1 for r in replies if "arrays" in r.content.array_records))
            yield msg

    guard = _guard(spec, global_sd, counts)
    arrays, _ = guard.aggregate_train(1, arriving())
    assert arrays is not None
    assert held == [4, 3, 2, 1]  # as reply i arrives, the i before it have been folded and released
    assert not any("arrays" in r.content.array_records for r in replies)


@pytest.mark.usefixtures("server_identity")
def test_a_robust_rule_still_sees_every_reply(digits_prepared):
    spec = _spec(strategy={"name": "fedmedian"})
    counts, global_sd, replies = _client_replies(spec, digits_prepared, range(3))
    guard = _guard(spec, global_sd, counts)
    assert not guard.folds()
    expected = {k: torch.stack([r.content["arrays"].to_torch_state_dict()[k].double() for r in replies]).median(0)
                for k in global_sd}
    got = guard.aggregate_train(1, iter(replies))[0].to_torch_state_dict()
    for k in got:
        assert torch.allclose(got[k].double(), expected[k].values, atol=1e-6), k


@pytest.mark.usefixtures("server_identity")
def test_a_bad_reply_is_left_out_of_the_fold_and_logged(digits_prepared):
    spec = _spec()
    counts, global_sd, replies = _client_replies(spec, digits_prepared, range(3))
    key = next(iter(replies[1].content["arrays"]))
    bad = replies[1].content["arrays"][key].numpy().copy()
    bad.flat[0] = float("nan")
    from flwr.app import Array

    replies[1].content["arrays"][key] = Array(bad)
    guard = _guard(spec, global_sd, counts)
    expected, _ = guard.inner.aggregate_train(1, [replies[0], replies[2]])
    expected_sd = expected.to_torch_state_dict()
    got = guard.aggregate_train(1, iter(replies))[0].to_torch_state_dict()
    for k in got:
        assert torch.allclose(got[k].double(), expected_sd[k].double(), rtol=1e-5, atol=1e-6), k
    assert [c["status"] for c in guard.rounds[1].clients] == ["ok", "rejected", "ok"]
