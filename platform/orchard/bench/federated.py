"""``orchard bench federated``: a Flower simulation of 100 clients against the same FedAvg math in one loop.

Both sides train the same small MLP with the same optimizer, batch, local epochs and client data, and
average the results weighted by rows. The baseline is the loop anyone writes first: one process, the
clients one after another, no messages, no actors. Throughput is client updates per minute over the
rounds after the first (start-up and the first round's warm-up are reported apart); memory is the peak
resident set of the process tree (Ray's workers included), sampled every 100 ms.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from orchard.bench import PeakRSS, Result
from orchard.bench.synthetic import write_classification
from orchard.config import JobSpec
from orchard.models import build_model

CLIENTS, ROUNDS, ROWS_PER_CLIENT, DIM, CLASSES = 100, 4, 200, 64, 10
BATCH, LR = 32, 1e-3


def _spec() -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench-federated", "kind": "federated",
        "model": {"family": "mlp", "hidden": [64], "dropout": 0.0},
        "train": {"batch_size": BATCH, "optimizer": "adam", "lr": LR, "precision": "fp32", "seed": 0},
        "federated": {"clients": CLIENTS, "rounds": ROUNDS, "partition": "iid", "local_epochs": 1,
                      "client_cpus": 1.0},
        "tracking": {"log_model": False},
    })


def _simulated(spec: JobSpec, prepared) -> tuple[float, float, float, float]:
    """(updates/min after round 1, start-up + round 1 seconds, peak MiB, final accuracy)."""
    from orchard.federated import run_federated

    ends: dict[int, float] = {}
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        # No MLflow run: nothing is tracked or checkpointed, so every bench starts from round 1.
        res = run_federated(spec, prepared, None, on_round=lambda row: ends.setdefault(row["round"], time.perf_counter()))
    rate = CLIENTS * (ROUNDS - 1) / (ends[ROUNDS] - ends[1]) * 60
    return rate, ends[1] - t0, mem.peak / 2**20, res.test["test/accuracy"]


def _plain(spec: JobSpec, prepared) -> tuple[float, float, float]:
    """(updates/min after round 1, peak MiB, final accuracy) of FedAvg as one plain Python loop."""
    from orchard.data.manifest import read_split, read_xy
    from orchard.federated.partitions import client_file, write_partitions

    parts = write_partitions(prepared, spec.federated)
    data = [tuple(map(torch.from_numpy, read_xy([client_file(parts.folder, c)], DIM))) for c in range(CLIENTS)]
    model = build_model(spec, prepared.manifest)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    ends = []
    with PeakRSS() as mem:
        for _ in range(ROUNDS):
            total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
            for x, y in data:
                model.load_state_dict(global_state)
                opt = torch.optim.Adam(model.parameters(), lr=LR)
                model.train()
                for idx in torch.randperm(len(y)).split(BATCH):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x[idx]), y[idx]).backward()
                    opt.step()
                for k, v in model.state_dict().items():
                    total[k] += v.float() * (len(y) / sum(parts.counts))
            global_state = {k: v.to(global_state[k].dtype) for k, v in total.items()}
            ends.append(time.perf_counter())
    rate = CLIENTS * (ROUNDS - 1) / (ends[-1] - ends[0]) * 60
    x_test, y_test = read_split(prepared, "test")
    model.load_state_dict(global_state)
    with torch.no_grad():
        acc = float((model.eval()(torch.from_numpy(x_test)).argmax(1) == torch.from_numpy(y_test)).float().mean())
    return rate, mem.peak / 2**20, acc


def run(progress=print) -> list[Result]:
    torch.set_num_threads(1)  # each simulated client gets one CPU; the baseline gets the same
    spec = _spec()
    with tempfile.TemporaryDirectory(prefix="orchard-bench-fed-") as tmp:
        rows = CLIENTS * ROWS_PER_CLIENT
        prepared = write_classification(Path(tmp) / "data", int(rows / 0.9), DIM, CLASSES)
        progress(f"plain FedAvg loop: {CLIENTS} clients × {ROUNDS} rounds")
        base_rate, base_mem, base_acc = _plain(spec, prepared)
        progress(f"  {base_rate:,.0f} updates/min, peak {base_mem:,.0f} MiB, accuracy {base_acc:.3f}")
        progress(f"Flower simulation on Ray: {CLIENTS} clients × {ROUNDS} rounds")
        rate, startup, mem, acc = _simulated(spec, prepared)
        progress(f"  {rate:,.0f} updates/min, peak {mem:,.0f} MiB, accuracy {acc:.3f}")
    return [
        Result(f"{CLIENTS} clients, MLP 64→64→10", "client updates/min (rounds 2..N)", "updates/min",
               rate, base_rate, rate / base_rate, note=f"accuracy {acc:.3f} vs plain {base_acc:.3f}"),
        Result("simulation start-up + round 1", "seconds", "s", startup),
        Result(f"{CLIENTS} clients, peak memory (process tree)", "peak RSS", "MiB", mem, base_mem, mem / base_mem),
    ]
