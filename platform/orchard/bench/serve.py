"""``orchard bench serve``: ``orchard serve`` (Ray Serve) against ``mlflow models serve`` on the same model.

One model (a 64 → 16 → 10 MLP trained on scikit-learn's digits, logged to a local SQLite store the way a
run logs it) is served by both servers at once, each as its own process tree (``orchard serve`` with its
own local Ray and 1 replica; ``mlflow models serve`` with 1 worker). The same load generator talks to each
in turn: ``C`` client threads, each on one keep-alive HTTP connection, send 1-row ``{"inputs": ...}``
requests back to back for ``ORCHARD_BENCH_SERVE_SECONDS`` (default 10) after a 2 s warm-up, at C = 1 and
16. Repeats (``ORCHARD_BENCH_SERVE_REPEATS``, default 3) alternate the servers; the requests/s ratio of
each repeat is ``orchard serve`` over the MLflow server measured next to it. The load generator runs on
the same machine (its threads compete with both servers alike), so figures are for comparison, not a
capacity claim.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchard.bench import Result
from orchard.raystart import free_port

CONCURRENCY = (1, 16)
REPEATS = 3
SECONDS = 10.0
WARMUP_S = 2.0
START_S = 300.0


def run(progress: Callable[[str], None] = print) -> list[Result]:
    repeats = int(os.environ.get("ORCHARD_BENCH_SERVE_REPEATS", REPEATS))
    seconds = float(os.environ.get("ORCHARD_BENCH_SERVE_SECONDS", SECONDS))
    with tempfile.TemporaryDirectory(prefix="orchard-bench-serve-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        progress("training and logging a 64 → 16 → 10 MLP on digits")
        model_uri, row = _logged_model(uri)
        servers = _start(root, uri, model_uri, progress)
        try:
            body = json.dumps({"inputs": [row]}).encode()
            figures: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for r in range(repeats):
                for name, (_, port) in servers.items():
                    for c in CONCURRENCY:
                        rate, p50, p99 = _load(port, body, c, seconds)
                        figures.setdefault((name, c), []).append((rate, p50, p99))
                        progress(f"repeat {r + 1}/{repeats} {name}, {c} client(s): {rate:,.0f} req/s, "
                                 f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        finally:
            for proc, _ in servers.values():
                _stop(proc)
    return _results(figures, repeats)


def _logged_model(uri: str) -> tuple[str, list[float]]:
    import torch
    from sklearn.datasets import load_digits

    from orchard.config import JobSpec
    from orchard.tracking import JobRun

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    job = JobRun(JobSpec(name="bench-serve", kind="train", tracking={"uri": uri, "energy": False}))
    model_uri = job.log_model(model.eval(), x[:4])
    job.finish()
    return model_uri, [float(v) for v in x[0]]


def _env(uri: str) -> dict[str, str]:
    import orchard

    platform_dir = str(Path(orchard.__file__).resolve().parents[1])
    # `mlflow models serve` execs `uvicorn` by name: the interpreter's bin goes first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [platform_dir, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "MLFLOW_TRACKING_URI": uri, "PATH": path}


def _start(root: Path, uri: str, model_uri: str, progress) -> dict[str, tuple[subprocess.Popen, int]]:
    ports = {"orchard serve (Ray Serve, 1 replica)": free_port(), "mlflow models serve (1 worker)": free_port()}
    ours, theirs = ports.values()
    cmds = [[sys.executable, "-m", "orchard.cli", "serve", model_uri, "--port", str(ours), "--tracking-uri", uri],
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-p", str(theirs), "-h", "127.0.0.1", "-w", "1"]]
    servers = {}
    for (name, port), cmd in zip(ports.items(), cmds, strict=True):
        servers[name] = (subprocess.Popen(cmd, stdout=(root / f"{port}.log").open("w"), stderr=subprocess.STDOUT,
                                          env=_env(uri), start_new_session=True), port)
    try:
        for name, (proc, port) in servers.items():
            progress(f"waiting for {name} on port {port}")
            deadline = time.monotonic() + START_S
            log = root / f"{port}.log"
            while not _answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
    except BaseException:
        for proc, _ in servers.values():
            _stop(proc)
        raise
    return servers


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/ping")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _load(port: int, body: bytes, clients: int, seconds: float, warmup_s: float = WARMUP_S
          ) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of ``clients`` threads sending ``body`` back to back for ``seconds``
    after ``warmup_s`` (requests started in the warm-up are not counted)."""
    start = time.perf_counter() + warmup_s
    end = start + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}
        try:
            while (t0 := time.perf_counter()) < end:
                conn.request("POST", "/invocations", body, headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}")
                    return
                if t0 >= start:
                    latencies[i].append(time.perf_counter() - t0)
        except OSError as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"requests to port {port} failed: {errors[:3]}")
    done = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    return len(done) / seconds, float(np.percentile(done, 50)), float(np.percentile(done, 99))


def _results(figures: dict[tuple[str, int], list[tuple[float, float, float]]], repeats: int) -> list[Result]:
    names = list(dict.fromkeys(name for name, _ in figures))
    ours, theirs = names
    out = []
    for c in CONCURRENCY:
        for name in names:
            rows = np.array(figures[(name, c)])
            rates = rows[:, 0]
            row = Result(f"{name}, {c} client(s)", "requests/s", "req/s", float(rates.mean()),
                         spread=[float(rates.min()), float(rates.max())], repeats=repeats)
            if name == ours:  # a ratio over the MLflow server, each repeat against the one next to it
                base = np.array(figures[(theirs, c)])[:, 0]
                per = rates / base
                row.baseline, row.ratio = float(base.mean()), float(rates.mean() / base.mean())
                row.note, row.spread = f"baseline: {theirs}", [float(per.min()), float(per.max())]
            out.append(row)
            for k, label in ((1, "p50 latency"), (2, "p99 latency")):
                out.append(Result(f"{name}, {c} client(s)", label, "ms", float(rows[:, k].mean()),
                                  spread=[float(rows[:, k].min()), float(rows[:, k].max())], repeats=repeats))
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
