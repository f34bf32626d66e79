"""Per-client partition table and figure, logged to a real (temporary SQLite) MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from orchard.config import FederatedSpec, validate_spec
from orchard.federated.partitions import partition_summary, write_partitions
from orchard.tracking import plots
from orchard.tracking.federated import FIGURE_FILE, TABLE_FILE, log_partitions


def test_partition_figure_stacks_one_bar_per_class_and_stays_readable_at_100_clients(fresh_digits):
    parts = write_partitions(fresh_digits, FederatedSpec(clients=100, partition="pathological", classes_per_client=2))
    fig = plots.partition_figure(parts.label_counts, list(range(10)))
    try:
        ax = fig.axes[0]
        assert len(ax.patches) == 100 * 10  # one segment per client and class
        tops = {}
        for bar in ax.patches:  # stacked: each client's segments add up to its row count
            x = round(bar.get_x() + bar.get_width() / 2)
            tops[x] = max(tops.get(x, 0), bar.get_y() + bar.get_height())
        assert [int(tops[i]) for i in range(100)] == parts.counts
        assert len(ax.get_xticks()) <= 26  # every 4th client labelled, not 100 overlapping labels
        assert fig.get_size_inches()[0] <= 24
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [str(c) for c in range(10)]
    finally:
        plots.close(fig)


def test_partition_figure_without_classes_plots_row_counts():
    fig = plots.partition_figure([], [], counts=[5, 7, 9])
    try:
        assert [b.get_height() for b in fig.axes[0].patches] == [5, 7, 9]
    finally:
        plots.close(fig)


@pytest.mark.slow
def test_log_partitions_puts_a_table_and_a_figure_on_the_run(fresh_digits, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchard.tracking import JobRun

    monkeypatch.chdir(tmp_path)  # MLflow's artifact root is relative to the working folder
    spec = validate_spec({"name": "parts", "kind": "federated", "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}})
    parts = write_partitions(fresh_digits, FederatedSpec(clients=6, partition="dirichlet", alpha=0.3))
    classes = fresh_digits.manifest["classes"]
    with JobRun(spec) as job:
        log_partitions(job, partition_summary(parts, classes))
        log_partitions(job, partition_summary(parts, classes))  # a resumed run logs it again: not doubled

    client = MlflowClient(spec.tracking.uri)
    dl = tmp_path / "dl"
    dl.mkdir()
    table = json.loads(Path(client.download_artifacts(job.run_id, TABLE_FILE, str(dl))).read_text())
    assert table["columns"] == ["client", "rows", *[f"class {c}" for c in classes]]
    assert [row[0] for row in table["data"]] == list(range(6))
    assert [row[1] for row in table["data"]] == parts.counts
    assert [row[2:] for row in table["data"]] == parts.label_counts
    assert all(sum(row[2:]) == row[1] for row in table["data"])

    png = mpimg.imread(client.download_artifacts(job.run_id, FIGURE_FILE, str(dl)))
    assert png.shape[0] > 100 and png.shape[1] > 100
