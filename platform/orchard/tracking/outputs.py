"""What a finished engine run leaves on the job's run: figures and tables from its ``RunResult``.

Metrics were logged step by step through the run's ``RunLogger`` while the engine ran; this is the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from orchard.results import RunResult

CLIENT_EVAL_FIGURE = "plots/client_eval.png"  # federated.client_eval: mean and worst-decile client accuracy


def log_result(job, result: RunResult, title: str, classes: Sequence[Any] | None = None) -> None:
    """Learning curve, confusion matrix (figure + JSON), and for a federation its clients and partitions."""
    import numpy as np

    from orchard.tracking import plots
    from orchard.tracking.federated import log_clients, log_partitions

    figures = [("plots/learning_curve.png", lambda: plots.learning_curve(result.history, result.x, title))]
    if result.confusion is not None:
        labels = list(classes) if classes else list(range(len(result.confusion)))
        figures.append(("plots/confusion_matrix.png", lambda: plots.confusion_matrix(result.confusion, labels)))
        job.log_text(json.dumps(np.asarray(result.confusion).tolist()), "metrics/confusion_matrix.json")
    if any("fed/client_eval_accuracy" in h for h in result.history):
        figures.append((CLIENT_EVAL_FIGURE, lambda: plots.client_eval(result.history)))
    if result.clients:
        figures.append(("plots/clients_by_round.png", lambda: plots.client_rounds(result.clients)))
        log_clients(job, result.clients)
    if result.partitions is not None:
        log_partitions(job, result.partitions)
    for name, make in figures:
        fig = make()
        try:
            job.log_figure(fig, name)
        finally:
            plots.close(fig)
