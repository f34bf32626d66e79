"""LEAF's Shakespeare federation end to end on the real archive: Spark prep of the (play, role) clients,
natural partitions, and a real Flower round of a character LSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchard.config import validate_spec
from orchard.data import prepare, text
from orchard.data.manifest import read_groups, read_split
from orchard.models import build_from_dims
from tests.data.test_text_source import archive

SEQ_LEN, STRIDE, MIN_SAMPLES = 40, 16, 350  # macbeth: MACBETH, LADY MACBETH, MALCOLM, MACDUFF


def _spec(tmp_path, **federated):
    return validate_spec({
        "name": "shakespeare-test", "kind": "federated",
        "data": {"source": f"shakespeare:{archive()}", "task": "next_token", "normalize": "none",
                 "seq_len": SEQ_LEN, "text": {"plays": ["macbeth"], "stride": STRIDE, "min_samples": MIN_SAMPLES},
                 "split": {"train": 0.8, "val": 0.1, "test": 0.1}, "output": str(tmp_path / "prepared"),
                 "spark": {"master": "local[2]", "shuffle_partitions": 2}},
        "model": {"family": "rnn", "cell": "lstm", "embed_dim": 8, "rnn_hidden": 32, "pooling": "last",
                  "hidden": [], "dropout": 0.0},
        "train": {"batch_size": 32, "lr": 0.01},
        "federated": {"clients": 4, "rounds": 2, "partition": "natural", "partition_by": "user",
                      "local_epochs": 1, "client_cpus": 1, **federated},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


@pytest.mark.slow
def test_shakespeare_prepares_role_clients_and_a_federated_lstm_learns_next_characters(tmp_path):
    from orchard.federated import run_federated

    spec = _spec(tmp_path)
    prepared = prepare(spec)
    m = prepared.manifest
    # What the driver computes from the archive is what Spark wrote: same clients, same per-client cut.
    expected = text.samples(text.read_archive(archive()), spec.data)
    vocab = m["vocabulary"]
    assert vocab["fitted_on"] == "train" and vocab["chars"] == "".join(expected.vocabulary)
    assert m["task"] == "next_token" and m["num_classes"] == vocab["size"] == m["classes"][-1] + 1
    assert m["text"]["clients"] == 4 and m["partition_column"]["distinct"]["train"] == 4
    x, y = read_split(prepared, "train")
    assert x.shape[1] == SEQ_LEN and x.max() < vocab["size"] and (x == np.round(x)).all()  # ids, not scaled
    assert (x != text.UNKNOWN).all()  # every training character is in the vocabulary
    groups = read_groups(prepared, "train")
    users, counts = np.unique(groups, return_counts=True)
    want_users, want_counts = np.unique(expected.users[expected.splits == "train"], return_counts=True)
    assert users.tolist() == want_users.tolist() and counts.tolist() == want_counts.tolist()
    assert m["counts"]["test"] == int((expected.splits == "test").sum())

    res = run_federated(spec, prepared, None, log_path=tmp_path / "engine.log")
    # One client per (play, role), each holding exactly its own training windows.
    table = res.partitions
    assert [row[table.columns.index("id")] for row in table.rows] == users.tolist()
    assert res.partitions.counts == counts.tolist()
    assert [h["round"] for h in res.history] == [1, 2]
    assert res.history[-1]["fed/client_train_loss"] < res.history[0]["fed/client_train_loss"]
    # Chance is 1/vocabulary (~0.02): two short rounds must have learnt at least the character frequencies.
    print("shakespeare test accuracy", res.test)
    assert res.test["test/accuracy"] > 0.1


def test_rnn_and_transformer_embed_token_ids_and_train_on_them():
    vocab, steps = 30, 12
    x = torch.randint(0, vocab, (5, steps)).float()  # prepared features carry ids as floats
    y = torch.randint(0, vocab, (5,))
    for family in ("rnn", "transformer"):
        spec = validate_spec({"name": "m", "kind": "train", "model": {
            "family": family, "pooling": "last", "embed_dim": 6, "rnn_hidden": 16, "d_model": 16, "heads": 2,
            "layers": 1, "hidden": []}}).model
        model = build_from_dims(spec, steps, vocab, vocab_size=vocab)
        assert isinstance(model.tokens.embed, torch.nn.Embedding) and model.tokens.embed.num_embeddings == vocab
        out = model(x)
        assert out.shape == (5, vocab)
        torch.nn.functional.cross_entropy(out, y).backward()
        assert model.tokens.embed.weight.grad is not None and model.tokens.embed.weight.grad.abs().sum() > 0
        # A token's id, not its magnitude, matters: the same ids as long give the same outputs.
        model.eval()
        assert torch.allclose(model(x), model(x.long()))
    with pytest.raises(ValueError, match="rnn or transformer"):
        build_from_dims(validate_spec({"name": "m", "kind": "train"}).model, steps, vocab, vocab_size=vocab)
