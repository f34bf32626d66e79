"""The per-client plot shows each client's loss per round, and marks failures and rejections."""

import numpy as np

from orchard.tracking import plots


def test_client_rounds_places_losses_and_marks_failed_and_rejected_clients():
    rows = [{"round": 1, "client": 0, "status": "ok", "train_loss": 0.5},
            {"round": 1, "client": 1, "status": "failed", "train_loss": None},
            {"round": 2, "client": 0, "status": "rejected", "train_loss": None},
            {"round": 2, "client": 1, "status": "ok", "train_loss": 0.25}]
    fig = plots.client_rounds(rows)
    ax = fig.axes[0]
    grid = np.asarray(ax.images[0].get_array().filled(np.nan))
    assert grid[0, 0] == 0.5 and grid[1, 1] == 0.25
    assert np.isnan(grid[1, 0]) and np.isnan(grid[0, 1])
    labels = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert labels == ["failed", "rejected"]
    plots.close(fig)
