"""Figures people would rather look at than read: learning curves, confusion matrices, client partitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curve(history: Sequence[dict[str, Any]], x_key: str = "epoch", title: str = "Learning curve"):
    """Loss and accuracy per step for every prefix found (train/, val/; fed/val_, fed/client_eval_)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [h[x_key] for h in history]
    prefixes = sorted({k.split("/")[0] for h in history for k in h if "/" in k})
    for p in prefixes:
        # fed/ rows name their split after the slash: fed/val_loss (central), fed/client_eval_loss (clients).
        for sub in (("val_", "client_eval_") if p == "fed" else ("",)):
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
                ys = [h.get(f"{p}/{sub}{metric}") for h in history]
                if any(y is not None for y in ys):
                    ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", ms=3,
                            label=f"{p}/{sub.rstrip('_')}" if sub else p)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(cm: np.ndarray, classes: Sequence[Any], title: str = "Confusion matrix (test)"):
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * n + 2), max(3.5, 0.55 * n + 1.5)))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=45 if n > 10 else 0)
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def partition_figure(label_counts: Sequence[Sequence[int]], classes: Sequence[Any],
                     counts: Sequence[int] | None = None, title: str = "Training rows per client"):
    """One stacked bar per client, one colour per class; plain bars of ``counts`` when there are no classes.

    Stays readable at 100+ clients: the figure widens up to a cap, and only every k-th
    client is labelled; the legend sits outside the axes so it never hides a bar.
    """
    lc = np.asarray(label_counts, dtype=np.int64)
    n = len(lc) if lc.size else len(counts or [])
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.18 * n + 2.5)), 4.5))
    xs = np.arange(n)
    # A gap between bars keeps neighbours of one colour apart; past a few hundred it would eat the bars.
    width = 0.8 if n <= 300 else 1.0
    if lc.size:
        colours = plt.get_cmap("tab10" if lc.shape[1] <= 10 else "tab20" if lc.shape[1] <= 20 else "viridis")
        bottom = np.zeros(n)
        for j in range(lc.shape[1]):
            colour = colours(j) if lc.shape[1] <= 20 else colours(j / max(1, lc.shape[1] - 1))
            name = str(classes[j]) if j < len(classes) else str(j)
            ax.bar(xs, lc[:, j], width, bottom=bottom, color=colour, label=name, linewidth=0)
            bottom += lc[:, j]
        if lc.shape[1] <= 30:  # beyond that a legend is a wall of text; the colour ramp still shows skew
            ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8,
                      ncol=1 if lc.shape[1] <= 15 else 2)
    else:
        ax.bar(xs, np.asarray(counts or [], dtype=np.int64), width, color="tab:blue", linewidth=0)
    step = max(1, int(np.ceil(n / 25)))
    ax.set_xticks(xs[::step], [str(i) for i in xs[::step]], fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("client")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def client_rounds(clients: Sequence[dict[str, Any]], title: str = "Clients by round"):
    """One cell per client and round: its local train loss, or a mark where it failed or was rejected.

    Rows are ``{"round", "client", "status", "train_loss"}`` (the federation's per-client table); a client
    not sampled in a round stays blank.
    """
    rounds = sorted({int(c["round"]) for c in clients}) or [1]
    ids = sorted({int(c["client"]) for c in clients if int(c["client"]) >= 0}) or [0]
    col = {r: i for i, r in enumerate(rounds)}
    row = {c: i for i, c in enumerate(ids)}
    loss = np.full((len(ids), len(rounds)), np.nan)
    marks: dict[str, list[tuple[int, int]]] = {"failed": [], "rejected": []}
    for c in clients:
        if int(c["client"]) not in row:
            continue
        at = (row[int(c["client"])], col[int(c["round"])])
        if c["status"] == "ok" and c.get("train_loss") is not None:
            loss[at] = float(c["train_loss"])
        elif c["status"] in marks:
            marks[c["status"]].append(at)
    fig, ax = plt.subplots(figsize=(min(18, 3 + 0.35 * len(rounds)), min(16, 2 + 0.22 * len(ids))))
    im = ax.imshow(loss, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, label="local train loss")
    for status, style in (("failed", dict(marker="x", color="red")), ("rejected", dict(marker="s", color="orange"))):
        if marks[status]:
            ys, xs = zip(*marks[status], strict=True)
            ax.scatter(xs, ys, s=18, label=status, **style)
    if any(marks.values()):
        ax.legend(loc="upper left", bbox_to_anchor=(1.15, 1.0), fontsize=8)
    step = max(1, len(ids) // 25)
    ax.set_yticks(range(0, len(ids), step), [str(i) for i in ids[::step]])
    xstep = max(1, len(rounds) // 20)
    ax.set_xticks(range(0, len(rounds), xstep), [str(r) for r in rounds[::xstep]])
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def client_eval(history: Sequence[dict[str, Any]], title: str = "Federated evaluation on clients"):
    """Per round: the clients' weighted mean accuracy and the worst decile's (fed/client_eval_*), beside
    the central validation accuracy: a widening gap means the global model serves some clients badly."""
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [h for h in history if "fed/client_eval_accuracy" in h]
    for key, label, style in (("fed/client_eval_accuracy", "clients: weighted mean", "-o"),
                              ("fed/client_eval_p10_accuracy", "clients: 10th percentile", "--v"),
                              ("fed/val_accuracy", "central (validation split)", ":s")):
        ys = [h.get(key) for h in rows]
        if any(y is not None for y in ys):
            ax.plot([h["round"] for h in rows], [np.nan if y is None else y for y in ys], style, ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
