"""What a federated job logs about its clients' data: per-client rows and label histograms.

Both go on the job's run: a table (``federated/partitions.json``, MLflow's table format, shown in the
UI's artifact view and queryable with ``mlflow.load_table``) and a stacked-bar figure
(``plots/partitions.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TABLE_FILE = "federated/partitions.json"
FIGURE_FILE = "plots/partitions.png"


def log_partitions(job, partitions, classes: Sequence[Any] | None = None) -> None:
    """Log ``partitions`` (an ``orchard.federated.partitions.PartitionSet``) on ``job``'s run.

    ``classes`` names the label columns (the manifest's ``classes``); a regression target has none.
    """
    from orchard.federated.partitions import partition_table
    from orchard.tracking import plots

    classes = list(classes or [])
    # log_table appends to an existing file of the same name: a resumed run would double the rows.
    if not any(f.path == TABLE_FILE for f in job._client.list_artifacts(job.run_id, "federated")):
        job._client.log_table(job.run_id, data=partition_table(partitions, classes), artifact_file=TABLE_FILE)
    fig = plots.partition_figure(partitions.label_counts, classes, partitions.counts,
                                 title=f"Training rows per client ({partitions.folder.name})")
    try:
        job.log_figure(fig, FIGURE_FILE)
    finally:
        plots.close(fig)
