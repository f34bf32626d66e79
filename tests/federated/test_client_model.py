"""The ClientApp keeps one model per actor (``KeptModel``) and loads each message's global
arrays into it: its replies must be exactly those of a model built for the message."""
from __future__ import annotations

import pickle

import pytest
import torch

from orchard.config import validate_spec


def _reply_arrays(spec, prepared, parts, global_sd, client, server_round, model_for):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common import MessageType

    from orchard.federated.client import local_train

    config = ConfigRecord({"lr": 5e-2, "local-epochs": 2, "server-round": server_round})
    sent = Message(RecordDict({"arrays": ArrayRecord(global_sd), "config": config}), dst_node_id=100 + client,
                   message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=100 + client, node_config={"partition-id": client}, state=RecordDict(),
                      run_config={})
    reply = local_train(spec, prepared.manifest, parts.folder, sent, context, model_for)
    return reply.content["arrays"].to_torch_state_dict(), reply.content["metrics"]["train_loss"]


@pytest.mark.usefixtures("server_identity")
def test_a_kept_model_replies_exactly_as_a_model_built_per_message(digits_prepared):
    from orchard.federated.client import KeptModel
    from orchard.federated.partitions import write_partitions
    from orchard.models import build_model

    # Dropout draws from the seeded generator and batch norm carries buffers: both must come out the same.
    spec = validate_spec({
        "name": "keep", "kind": "federated",
        "model": {"family": "mlp", "hidden": [48, 24], "dropout": 0.3, "norm": "batch"},
        "train": {"batch_size": 16, "lr": 5e-2, "optimizer": "adam"},
        "federated": {"clients": 4, "rounds": 2, "local_epochs": 2}})
    parts = write_partitions(digits_prepared, spec.federated)
    torch.manual_seed(0)
    first = build_model(spec, digits_prepared.manifest).state_dict()
    torch.manual_seed(1)
    second = build_model(spec, digits_prepared.manifest).state_dict()
    kept = KeptModel(spec, digits_prepared.manifest)
    # The kept model has trained on other clients and rounds before each message it answers.
    calls = [(first, 0, 1), (first, 2, 1), (second, 1, 2), (first, 0, 1)]
    for global_sd, client, server_round in calls:
        fresh_sd, fresh_loss = _reply_arrays(spec, digits_prepared, parts, global_sd, client, server_round, None)
        kept_sd, kept_loss = _reply_arrays(spec, digits_prepared, parts, global_sd, client, server_round, kept)
        assert kept_loss == fresh_loss
        assert fresh_sd.keys() == kept_sd.keys() and any("running_mean" in k for k in kept_sd)
        for key in fresh_sd:
            assert torch.equal(fresh_sd[key], kept_sd[key]), key
        assert not torch.equal(kept_sd[next(iter(kept_sd))], global_sd[next(iter(global_sd))])  # it trained
    assert kept.built == 1  # one model for all of them
    copy = pickle.loads(pickle.dumps(kept))  # as the ClientApp reaches each actor: without the model
    assert copy.model is None and copy.built == 0 and copy().state_dict().keys() == kept().state_dict().keys()
