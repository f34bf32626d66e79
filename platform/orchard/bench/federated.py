"""``orchard bench federated``: Flower simulations on Ray against the same FedAvg math in one plain loop.

Cases (``ORCHARD_BENCH_FED_CASES``, comma separated; default all):

- ``tiny``: 100 clients × 200 rows × 64 features, MLP 64, all clients every round (the original case);
- ``cnn100``: 100 clients × 600 rows × 784 features (1×28×28), CNN [32, 64], 1 local epoch, all clients;
- ``clients1000``: 1,000 clients on a 70,000 × 784 table, Dirichlet α=0.3, ``fraction_train`` 0.1, 20
  rounds, MLP 128 — the federation of issue 12.

Both sides train the same model with the same optimizer (``orchard.engine.loop.build_optimizer``), batch,
local epochs and client partitions (the files ``write_partitions`` writes once, before any measured run),
average the results weighted by rows, score each round's global model on the validation split and the final
one on the test split with the same evaluator and batches (``orchard.federated.server.central_evaluator``: the
simulation's ServerApp scores every round). The baseline is the loop anyone writes first: one process using
every core, the clients one after another, no messages, no actors. Where a round samples clients
(``fraction_train`` < 1) each side draws its own sample of the same size, so the two do the same number of
updates on different clients; the case name says so. Throughput is client updates per minute over the rounds
after the first (start-up and the first round's warm-up are reported apart); the overhead per update is the
difference of the two sides' seconds per update; memory is the peak resident set of the process tree (Ray's
workers included), sampled every 100 ms. Every run, plain or simulated, is a fresh Python process
(``_fresh``), so neither side carries the other's heap or imports. Repeats (``ORCHARD_BENCH_FED_REPEATS``,
default 2) alternate plain, simulated, plain, ...; each simulated repeat is compared with the mean of the
plain runs either side of it, for speed and for memory.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchard.bench import PeakRSS, Result
from orchard.bench.synthetic import write_classification
from orchard.config import JobSpec
from orchard.models import build_model

REPEATS = 2
BATCH, LR = 32, 1e-3


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    clients: int
    rows_per_client: int  # the train split holds clients × rows_per_client rows (before partition skew)
    dim: int
    model: dict
    rounds: int
    image_shape: list[int] | None = None
    classes: int = 10
    fraction: float = 1.0
    federated: dict = field(default_factory=dict)


CASES = {c.name: c for c in (
    Case("tiny", "100 clients, MLP 64, 64 features", 100, 200, 64, {"family": "mlp", "hidden": [64]}, 4),
    Case("cnn100", "100 clients × 600 rows, CNN [32, 64], 1×28×28", 100, 600, 784,
         {"family": "cnn", "channels": [32, 64], "hidden": [128]}, 3, image_shape=[1, 28, 28]),
    Case("clients1000", "1,000 clients, Dirichlet α=0.3, 10% per round (each side samples its own), MLP 128",
         1000, 63, 784, {"family": "mlp", "hidden": [128]}, 20, fraction=0.1,
         federated={"partition": "dirichlet", "alpha": 0.3}),
)}


def _spec(case: Case) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"bench-federated-{case.name}", "kind": "federated",
        "model": {**case.model, "dropout": 0.0},
        "train": {"batch_size": BATCH, "optimizer": "adam", "lr": LR, "precision": "fp32", "seed": 0},
        "federated": {"clients": case.clients, "rounds": case.rounds, "partition": "iid", "local_epochs": 1,
                      "fraction_train": case.fraction, **case.federated},
        "tracking": {"log_model": False},
    })


def _rate(case: Case, ends: list[float]) -> float:
    """Client updates per minute between the end of round 1 and the end of the last round."""
    per_round = max(1, round(case.clients * case.fraction))
    return per_round * (len(ends) - 1) / (ends[-1] - ends[0]) * 60


def _fresh(fn, *args):
    """``fn(*args)`` in a new Python process, with the peak memory of that process's tree (MiB).

    Each side is measured from its own interpreter start: in one shared bench process the second side
    inherits the first one's heap (the plain loop's partitions, freed but not returned to the system,
    were ~200-330 MiB of the simulation's peak) and its imports."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        pid = pool.apply(os.getpid)
        with PeakRSS(pid) as mem:
            out = pool.apply(fn, args)
    return (*out, mem.peak / 2**20)


def _simulated(case: Case, spec: JobSpec, prepared) -> tuple[float, float, float]:
    """(updates/min after round 1, start-up + round 1 seconds, final accuracy)."""
    from orchard.federated import run_federated

    ends: dict[int, float] = {}
    t0 = time.perf_counter()
    # No MLflow run: nothing is tracked or checkpointed, so every bench starts from round 1.
    res = run_federated(spec, prepared, None, on_round=lambda row: ends.setdefault(row["round"], time.perf_counter()))
    ordered = [ends[r] for r in sorted(ends)]
    return _rate(case, ordered), ordered[0] - t0, res.test["test/accuracy"]


def _plain(case: Case, spec: JobSpec, prepared) -> tuple[float, float]:
    """(updates/min after round 1, final accuracy) of FedAvg as one plain Python loop using every core."""
    from flwr.app import ArrayRecord

    from orchard.data.manifest import read_xy
    from orchard.engine.loop import build_optimizer
    from orchard.federated.partitions import client_file, write_partitions
    from orchard.federated.server import central_evaluator
    from orchard.federated.simulation import split_tensors

    torch.set_num_threads(os.cpu_count() or 1)  # one process using the machine
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    parts = write_partitions(prepared, spec.federated)
    data = [tuple(map(torch.from_numpy, read_xy([client_file(parts.folder, c)], case.dim)))
            for c in range(case.clients)]
    model = build_model(spec, prepared.manifest)
    score_val = central_evaluator(spec, prepared.manifest, split_tensors(prepared, "val"))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    per_round = max(1, round(case.clients * case.fraction))
    ends = []
    for _ in range(case.rounds):
        chosen = rng.choice(case.clients, per_round, replace=False) if per_round < case.clients \
            else np.arange(case.clients)
        rows = sum(len(data[c][1]) for c in chosen)
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
        for c in chosen:
            x, y = data[c]
            model.load_state_dict(global_state)
            opt = build_optimizer(model, spec.train)
            model.train()
            for idx in torch.randperm(len(y)).split(BATCH):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                total[k] += v.float() * (len(y) / rows)
        global_state = {k: v.to(global_state[k].dtype) for k, v in total.items()}
        score_val(ArrayRecord(global_state))
        ends.append(time.perf_counter())
    # The test split scored as the simulation scores it (same evaluator, same batches): one forward pass
    # over the whole split at once held 669 MB of CNN activations, the plain side's peak.
    test = central_evaluator(spec, prepared.manifest, split_tensors(prepared, "test"))(ArrayRecord(global_state))
    return _rate(case, ends), float(test.accuracy)


def _selected(cases: tuple[str, ...] | None) -> list[Case]:
    names = cases or tuple(filter(None, os.environ.get("ORCHARD_BENCH_FED_CASES", "").split(","))) or tuple(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown federated bench case(s) {unknown}: choose from {sorted(CASES)}")
    return [CASES[n] for n in names]


def run(progress=print, cases: tuple[str, ...] | None = None, repeats: int | None = None) -> list[Result]:
    repeats = repeats or int(os.environ.get("ORCHARD_BENCH_FED_REPEATS", REPEATS))
    results: list[Result] = []
    for case in _selected(cases):
        results += _case(case, progress, repeats)
    return results


def _case(case: Case, progress, repeats: int) -> list[Result]:
    spec = _spec(case)
    plain_rates, plain_mems, sim_rates, sim_mems, startups, accs = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="orchard-bench-fed-") as tmp:
        rows = case.clients * case.rows_per_client
        prepared = write_classification(Path(tmp) / "data", int(rows / 0.9), case.dim, case.classes,
                                        image_shape=case.image_shape)
        # Partitions are written here, once: every measured run, plain or simulated, reuses them.
        from orchard.federated.partitions import write_partitions

        write_partitions(prepared, spec.federated)

        def plain() -> None:
            progress(f"[{case.name}] plain FedAvg loop: {case.clients} clients × {case.rounds} rounds")
            rate, acc, mem = _fresh(_plain, case, spec, prepared)
            plain_rates.append(rate)
            plain_mems.append(mem)
            accs.append(("plain", acc))
            progress(f"  {rate:,.0f} updates/min, peak {mem:,.0f} MiB, accuracy {acc:.3f}")

        plain()
        for _ in range(repeats):
            progress(f"[{case.name}] Flower simulation on Ray: {case.clients} clients × {case.rounds} rounds")
            rate, startup, acc, mem = _fresh(_simulated, case, spec, prepared)
            sim_rates.append(rate)
            sim_mems.append(mem)
            startups.append(startup)
            accs.append(("flower", acc))
            progress(f"  {rate:,.0f} updates/min, start-up + round 1 {startup:.1f} s, peak {mem:,.0f} MiB, "
                     f"accuracy {acc:.3f}")
            plain()
    base = [(a + b) / 2 for a, b in zip(plain_rates, plain_rates[1:], strict=False)]
    base_mem = [(a + b) / 2 for a, b in zip(plain_mems, plain_mems[1:], strict=False)]
    per = [s / b for s, b in zip(sim_rates, base, strict=True)]
    overhead = [(60_000 / s - 60_000 / b) for s, b in zip(sim_rates, base, strict=True)]
    mem_per = [s / b for s, b in zip(sim_mems, base_mem, strict=True)]
    acc_note = "accuracy flower " + ", ".join(f"{a:.3f}" for k, a in accs if k == "flower") + \
        " vs plain " + ", ".join(f"{a:.3f}" for k, a in accs if k == "plain")
    return [
        Result(case.title, "client updates/min (rounds 2..N)", "updates/min", float(np.mean(sim_rates)),
               float(np.mean(base)), float(np.mean(sim_rates) / np.mean(base)), note=acc_note,
               spread=[min(per), max(per)], repeats=len(per)),
        Result(f"{case.name}: overhead per client update", "simulated − plain seconds per update", "ms",
               float(np.mean(overhead)), spread=[min(overhead), max(overhead)], repeats=len(overhead)),
        Result(f"{case.name}: simulation start-up + round 1", "seconds", "s", float(np.mean(startups)),
               spread=[min(startups), max(startups)], repeats=len(startups)),
        Result(f"{case.name}: peak memory (process tree)", "peak RSS", "MiB", float(np.mean(sim_mems)),
               float(np.mean(base_mem)), float(np.mean(sim_mems) / np.mean(base_mem)),
               spread=[min(mem_per), max(mem_per)], repeats=len(mem_per)),
    ]
