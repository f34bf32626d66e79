"""The federated results table in the README, reproduced: ``python -m orchard.study``.

Every cell is a real, tracked run of ``jobs/digits-federated-20.yaml`` (20 clients on digits) with a few
``--set`` overrides; the centralized row trains the same MLP with Ray Train. The table is printed as
Markdown and written to ``.orchard/study/federated.md`` with the MLflow run id of every cell.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from orchard.config import load_spec

SPEC = "jobs/digits-federated-20.yaml"
PARTITIONS = {"IID": ["federated.partition=iid"],
              "Dirichlet α=0.5": ["federated.partition=dirichlet", "federated.alpha=0.5"],
              "Dirichlet α=0.1": ["federated.partition=dirichlet", "federated.alpha=0.1"]}
STRATEGIES = {"FedAvg": ["federated.strategy.name=fedavg"],
              "FedProx (μ=0.01)": ["federated.strategy.name=fedprox", "federated.strategy.proximal_mu=0.01"],
              "FedAdam (η=0.01)": ["federated.strategy.name=fedadam", "federated.strategy.server_lr=0.01"]}
# The strategies run against ATTACK: the attack table's rows.
ATTACK_STUDY = {"FedAvg": ["federated.strategy.name=fedavg"],
                "FedMedian": ["federated.strategy.name=fedmedian"],
                "Krum": ["federated.strategy.name=krum"],
                "FedTrimmedAvg (β=0.2)": ["federated.strategy.name=fedtrimmedavg", "federated.strategy.trim_beta=0.2"]}
ATTACK = ["federated.partition=iid", "federated.attack.kind=sign_flip", "federated.attack.fraction=0.2"]
DP = {sigma: ["federated.partition=iid", "federated.privacy.mode=central_fixed",
             f"federated.privacy.noise_multiplier={sigma}", "federated.privacy.clipping_norm=1.0"]
      for sigma in (0.3, 1.0)}
CRASH = ["federated.partition=iid", "federated.rounds=10", "federated.faults.crash=0.3"]


def _run(overrides: list[str], console: Console) -> tuple[float, str, dict]:
    from orchard.runner import run_job

    spec = load_spec(SPEC, overrides)
    summary = run_job(spec, console)
    return summary.headline[1], summary.run_id, _last_round(summary)


def _last_round(summary) -> dict:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    return {k: v for k, v in run.data.metrics.items() if k.startswith("fed/")}


def _centralized(console: Console) -> tuple[float, str]:
    from orchard.runner import run_job

    fed = load_spec(SPEC)
    raw = {"name": "digits-centralized-mlp", "kind": "train", "data": fed.data.model_dump(mode="json"),
           "model": fed.model.model_dump(mode="json"),
           "train": {**fed.train.model_dump(mode="json"), "epochs": 30,
                     "early_stopping": {"metric": "val/accuracy", "patience": 5}},
           "scaling": {"num_workers": 1}}
    from orchard.config import validate_spec

    summary = run_job(validate_spec(raw, "centralized MLP"), console)
    return summary.headline[1], summary.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=".orchard/study/federated.md")
    args = p.parse_args(argv)
    console = Console(width=140)
    t0 = time.perf_counter()
    lines = ["| setting | " + " | ".join(PARTITIONS) + " |", "|---|" + "---|" * len(PARTITIONS)]
    acc, run_id = _centralized(console)
    lines.append("| centralized (same MLP, Ray Train) | " + " | ".join([f"{acc:.4f}"] * len(PARTITIONS)) + " |")
    runs = [f"centralized: {run_id}"]
    for name, strat in STRATEGIES.items():
        cells = []
        for part_name, part in PARTITIONS.items():
            acc, run_id, _ = _run(part + strat, console)
            cells.append(f"{acc:.4f}")
            runs.append(f"{name} / {part_name}: {run_id}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| 20% sign-flip attackers (IID) | test accuracy | replies rejected |", "|---|---|---|"]
    for name, strat in ATTACK_STUDY.items():
        acc, run_id, last = _run(ATTACK + strat, console)
        lines.append(f"| {name} | {acc:.4f} | {last.get('fed/rejected', 0):.0f} |")
        runs.append(f"attack {name}: {run_id}")
    dp_rows = []
    for sigma, overrides in DP.items():
        acc_dp, run_id, last = _run(overrides, console)
        runs.append(f"central DP σ={sigma}: {run_id}")
        dp_rows.append(f"| central DP (fixed clipping), σ={sigma}, clip 1.0 | {acc_dp:.4f} | ε after round 20: "
                       f"{last.get('fed/epsilon', float('nan')):.1f} at δ=1e-5 |")
    acc_crash, run_id, crash_last = _run(CRASH, console)
    runs.append(f"30% crashes: {run_id}")
    lines += ["", "| other runs (IID, FedAvg) | test accuracy | notes |", "|---|---|---|",
              "| no DP, no faults | (the FedAvg / IID cell above) | |", *dp_rows,
              f"| 30% of clients crash each round, 10 rounds | {acc_crash:.4f} | "
              f"clients failed in the last round: {crash_last.get('fed/failed', float('nan')):.0f} |"]
    lines += ["", f"(all runs: {time.perf_counter() - t0:.0f} s on this machine)", "", "MLflow runs:",
              *[f"- {r}" for r in runs]]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    console.print(text, markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
