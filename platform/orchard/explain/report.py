"""What an explanation leaves on a run: figures, the feature table, the summary, the completeness metric.

``sink`` is anything with ``log_figure(fig, path)``, ``log_text(text, path)`` and ``log_metrics(dict)``:
the job's ``JobRun`` while it runs, or ``tracking.logged.LoggedRun`` for ``orchard explain RUN_ID``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the driver of a cluster job has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from orchard.config import ExplainSpec  # noqa: E402
from orchard.explain.attribute import Attribution  # noqa: E402

FOLDER = "explain"
GRID = f"{FOLDER}/attributions.png"
TABLE = f"{FOLDER}/feature_importance.csv"
BARS = f"{FOLDER}/feature_importance.png"
SUMMARY = f"{FOLDER}/summary.json"
COMPLETENESS_METRIC = "explain/ig_completeness_max_error"
TOP_BARS = 20  # features shown in the bar chart; the CSV has them all


def class_maps(att: Attribution, image_shape: Sequence[int], classes: Sequence[Any], classification: bool
               ) -> list[tuple[str, int, np.ndarray]]:
    """(label, rows, mean signed attribution map (H, W), channels summed) per predicted class that has rows;
    one "all rows" map for regression."""
    c, h, w = (int(v) for v in image_shape)
    maps = att.values.reshape(-1, c, h, w).sum(1)
    if not classification:
        return [("all rows", len(maps), maps.mean(0))]
    out = []
    for k in np.unique(att.predicted):
        rows = att.predicted == k
        label = str(classes[int(k)]) if int(k) < len(classes) else str(int(k))
        out.append((label, int(rows.sum()), maps[rows].mean(0)))
    return out


def attribution_grid(maps: list[tuple[str, int, np.ndarray]], title: str):
    """One panel per class, one colour scale for all (red pushes toward the class, blue away)."""
    cols = min(5, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.8, 2.3 * rows + 0.6), squeeze=False)
    vmax = max(float(np.abs(m).max()) for _, _, m in maps) or 1.0
    im = None
    for ax, (label, n, m) in zip(axes.flat, maps, strict=False):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{label} (n={n})", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03)
    fig.suptitle(title, fontsize=10)
    return fig


def feature_rows(att: Attribution, names: Sequence[str]) -> list[dict[str, Any]]:
    """Features ranked by mean |attribution| over the sample, with their mean signed attribution."""
    mean_abs = np.abs(att.values).mean(0)
    mean = att.values.mean(0)
    total = float(mean_abs.sum()) or 1.0
    names = list(names) if len(names) == att.values.shape[1] else [f"f{i}" for i in range(att.values.shape[1])]
    order = np.argsort(-mean_abs, kind="stable")
    return [{"rank": r + 1, "feature": names[i], "mean_abs_attribution": float(mean_abs[i]),
             "mean_attribution": float(mean[i]), "share": float(mean_abs[i]) / total}
            for r, i in enumerate(order)]


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def importance_figure(rows: list[dict[str, Any]], title: str):
    top = rows[:TOP_BARS][::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(top) + 1.4))
    ax.barh([r["feature"] for r in top], [r["mean_abs_attribution"] for r in top], color="tab:blue")
    ax.set_xlabel("mean |attribution|")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def completeness(att: Attribution) -> dict[str, float] | None:
    """How far each row's attributions miss F(x) - F(baseline) (IG only): absolute and relative to the gap."""
    if att.delta is None or att.gap is None:
        return None
    err = np.abs(att.delta.astype(np.float64))
    scale = max(float(np.abs(att.gap).max()), 1e-12)
    return {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
            "max_relative_error": float(err.max()) / scale, "max_abs_output_gap": float(np.abs(att.gap).max())}


def log_explanation(sink, att: Attribution, manifest: dict[str, Any], spec: ExplainSpec,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the figures, table, summary and metric of ``att`` on ``sink``; returns the summary."""
    classification = manifest.get("task") != "regression"
    method = "Integrated Gradients" if spec.method == "integrated_gradients" else "Saliency"
    title = f"{method} on {len(att.x)} test rows ({manifest.get('dataset', 'data')})"
    artifacts: list[str] = []
    summary: dict[str, Any] = {"method": spec.method, "samples_requested": spec.samples, "samples": len(att.x),
                               "seed": spec.seed, "split": "test", "task": manifest.get("task", "classification"),
                               "target": "predicted class" if classification else "model output"}
    if spec.method == "integrated_gradients":
        summary |= {"steps": spec.steps, "baseline": spec.baseline}
    if classification:
        classes = manifest.get("classes") or []
        counts = {str(classes[int(k)]) if int(k) < len(classes) else str(int(k)): int(n)
                  for k, n in zip(*np.unique(att.predicted, return_counts=True), strict=True)}
        summary["predicted_counts"] = counts
    shape = manifest.get("image_shape")
    if shape:
        maps = class_maps(att, shape, manifest.get("classes") or [], classification)
        _figure(sink, attribution_grid(maps, f"{title}: mean attribution per predicted class"), GRID)
        artifacts.append(GRID)
    else:
        rows = feature_rows(att, manifest.get("features") or [])
        sink.log_text(table_csv(rows), TABLE)
        _figure(sink, importance_figure(rows, title), BARS)
        artifacts += [TABLE, BARS]
        summary["top_features"] = [r["feature"] for r in rows[:10]]
    check = completeness(att)
    if check is not None:
        summary["completeness"] = check
        sink.log_metrics({COMPLETENESS_METRIC: check["max_abs_error"]})
    summary |= {"artifacts": [*artifacts, SUMMARY], **(extra or {})}
    sink.log_text(json.dumps(summary, indent=1), SUMMARY)
    return summary


def _figure(sink, fig, path: str) -> None:
    try:
        sink.log_figure(fig, path)
    finally:
        plt.close(fig)
