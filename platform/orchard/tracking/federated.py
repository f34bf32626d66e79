"""What a federated job logs about its clients: per-client data and per-client, per-round outcomes.

The partitions go on the job's run as a table (``federated/partitions.json``, MLflow's table format,
shown in the UI's artifact view and queryable with ``mlflow.load_table``) and a stacked-bar figure
(``plots/partitions.png``); the clients' rounds as one table (``federated/clients.json``). All of it
arrives as plain data in the engine's ``RunResult``: tracking imports no engine.
"""

from __future__ import annotations

import json
from typing import Any

from orchard.results import PartitionTable

TABLE_FILE = "federated/partitions.json"
FIGURE_FILE = "plots/partitions.png"
CLIENTS_FILE = "federated/clients.json"
CLIENT_COLUMNS = ["round", "client", "node", "status", "train_loss", "num_examples", "reason"]


def log_partitions(job, table: PartitionTable) -> None:
    """Rows and label histogram per client on ``job``'s run (a resumed run keeps its first table)."""
    from orchard.tracking import plots

    job.log_table(table.columns, table.rows, TABLE_FILE)
    fig = plots.partition_figure(table.label_counts, table.classes, table.counts,
                                 title=f"Training rows per client ({table.name})")
    try:
        job.log_figure(fig, FIGURE_FILE)
    finally:
        plots.close(fig)


def log_clients(job, clients: list[dict[str, Any]]) -> None:
    """Per-client figures as ONE table rather than client/<id>/* metrics: 100 clients x 5 keys would bury
    the fed/* charts in the UI's metric list, and a table keeps the status and reason next to each loss."""
    data = [[c.get(k) for k in CLIENT_COLUMNS] for c in clients]
    job.log_text(json.dumps({"columns": CLIENT_COLUMNS, "data": data}), CLIENTS_FILE)
