"""A standard Flower App for ``flwr run``: the same ServerApp/ClientApp bodies, configured by Flower.

``pyproject.toml`` names ``serverapp`` and ``clientapp`` below as the app's components. Unlike
``run_simulation`` (``simulation.py``), ``flwr run`` starts them in other processes, so everything
reaches them through Flower's config instead of a closure:

run config (``[tool.flwr.app.config]``, override with ``flwr run -c 'key=value'``)
    ``spec``: path of the job spec (absolute, or relative to the SuperLink's/SuperNode's working folder);
    ``overrides``: spec overrides, space separated (``"federated.rounds=2 federated.clients=4"``);
    ``data-dir``: the prepared folder (``orchard prep SPEC`` prints it); empty = derived from the spec;
    ``write-partitions``: the ServerApp writes the client partitions first (simulation);
    ``connect-timeout-s``, ``round-timeout-s``;
    ``checkpoint-dir``: round checkpoints go there, and a run submitted again with the same folder (after a
    SuperLink restart ended the first) continues after its last round; empty = none;
    ``tracking``: log the rounds to an MLflow run (the spec's ``tracking.uri``); with ``checkpoint-dir`` the
    run's id is kept in that folder, so a resumed federation logs into the same run.
node config (``flower-supernode --node-config``)
    ``partition-id`` (set by Flower in simulation); ``data-dir``: a folder holding this node's
    ``manifest.json`` and ``client-<partition-id>.parquet`` (``export_node_data`` writes one per node; with
    ``federated.client_eval`` also ``val/client-<partition-id>.parquet``, its share of the validation split).
    Without ``data-dir`` a client reads its partition from the run's prepared folder (simulation).
"""

from __future__ import annotations

import functools
import shlex
import shutil
import sys
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from orchard.config import JobSpec, load_spec
from orchard.data.manifest import MANIFEST, PreparedData, load_manifest, read_split
from orchard.federated.partitions import (
    PARTITIONS_DIR,
    VAL_DIR,
    client_file,
    partition_name,
    write_partitions,
    write_val_partitions,
)


class AppConfigError(ValueError):
    """The run or node config does not lead to a spec, prepared data or a partition."""


@functools.lru_cache(maxsize=4)
def _cached_spec(path: str, mtime_ns: int, overrides: tuple[str, ...]) -> JobSpec:
    return load_spec(path, list(overrides))


def spec_from(run_config: dict) -> JobSpec:
    path = Path(str(run_config.get("spec", ""))).expanduser()
    if not path.is_file():
        raise AppConfigError(f"run config 'spec': no job spec at {path.resolve()} (give an absolute path, "
                             "e.g. flwr run -c 'spec=\"/abs/jobs/x.yaml\"')")
    spec = _cached_spec(str(path), path.stat().st_mtime_ns, tuple(shlex.split(str(run_config.get("overrides", "")))))
    if spec.kind != "federated":
        raise AppConfigError(f"run config 'spec': {path} is a '{spec.kind}' job; the Flower App runs kind: federated")
    return spec


def prepared_from(spec: JobSpec, run_config: dict) -> PreparedData:
    """The prepared folder named by ``data-dir``, else the one ``orchard prep`` writes for this spec."""
    data_dir = str(run_config.get("data-dir", ""))
    if data_dir:
        path = Path(data_dir).expanduser()
    else:
        from orchard.data.prepare import prepared_path  # resolves the folder without Spark

        path = prepared_path(spec)
    if not (path / MANIFEST).is_file():
        raise AppConfigError(f"no prepared data at {path.resolve()} ({MANIFEST} missing): run `orchard prep SPEC` "
                             "first and pass the folder it prints as run config 'data-dir'")
    return load_manifest(path)


def _log_round(row: dict) -> None:
    figures = " ".join(f"{k.removeprefix('fed/')}={v:.4f}" for k, v in row.items() if k != "round")
    log(INFO, "orchard round %d: %s", row["round"], figures)


RUN_ID_FILE = "mlflow-run-id"


def _job_run(spec: JobSpec, ck_dir: Path | None):
    """The federation's MLflow run: the one whose id ``ck_dir`` keeps (a resubmitted run), else a new one."""
    from orchard.tracking import JobRun

    kept = ck_dir / RUN_ID_FILE if ck_dir is not None else None
    if kept is not None and kept.is_file():
        job = JobRun(spec, resume_run_id=kept.read_text().strip())
        log(INFO, "orchard logs into MLflow run %s (resumed)", job.run_id)
        return job
    job = JobRun(spec)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(job.run_id)
    log(INFO, "orchard logs into MLflow run %s", job.run_id)
    return job


def _round_logger(job):
    if job is None:
        return _log_round

    def on_round(row: dict) -> None:
        _log_round(row)
        job.logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=row["round"])

    return on_round


serverapp = ServerApp()


@serverapp.main()
def server_main(grid: Grid, context: Context) -> None:
    from orchard.federated.checkpoint import load_latest
    from orchard.federated.server import Federation, central_evaluator, run_server

    cfg = context.run_config
    spec = spec_from(cfg)
    prepared = prepared_from(spec, cfg)
    counts: list[int] = []
    if cfg.get("write-partitions", True):
        parts = write_partitions(prepared, spec.federated)
        counts = list(parts.counts)
        if spec.federated.client_eval:
            write_val_partitions(prepared, spec.federated, parts)
        log(INFO, "orchard partitions: %s (rows per client %s)", parts.folder, parts.counts)
    x, y = read_split(prepared, "val")
    ck_dir = Path(str(cfg.get("checkpoint-dir", ""))).expanduser() if cfg.get("checkpoint-dir") else None
    federation = Federation(partition_counts=counts, checkpoint_dir=ck_dir,
                            resume=load_latest(ck_dir) if ck_dir is not None else None)
    if federation.resume is not None:
        log(INFO, "orchard resumes after round %d (checkpoint in %s)", federation.resume.round, ck_dir)
    job = _job_run(spec, ck_dir) if cfg.get("tracking", False) else None
    if job is not None and federation.resume is not None:
        job.logger.log_metrics({"fed/resumed_from": float(federation.resume.round)}, step=federation.resume.round)
    try:
        run_server(grid, spec, prepared.manifest, (torch.from_numpy(x), torch.from_numpy(y)), federation,
                   _round_logger(job), round_timeout_s=float(cfg.get("round-timeout-s", 600.0)),
                   connect_timeout_s=float(cfg.get("connect-timeout-s", 120.0)))
        # Rounds were scored on the validation split; the test split once, on the final (or best) global model.
        x, y = read_split(prepared, "test")
        test = central_evaluator(spec, prepared.manifest, (torch.from_numpy(x), torch.from_numpy(y)))(
            federation.arrays)
        if job is not None:
            job.logger.log_metrics(test.as_metrics("test"), step=len(federation.history))
    except BaseException:
        if job is not None:
            job.finish("FAILED")
        raise
    if job is not None:
        job.finish("FINISHED")
    log(INFO, "orchard federation finished: %d round(s), final accuracy %.4f (test split)", len(federation.history),
        float(test.accuracy if test.accuracy is not None else float("nan")))


clientapp = ClientApp()


def partition_folder(spec: JobSpec, context: Context) -> tuple[Path, dict]:
    """(folder holding ``client-<partition-id>.parquet``, manifest) for this node."""
    node, pid = context.node_config, int(context.node_config.get("partition-id", -1))
    if not 0 <= pid < spec.federated.clients:
        raise AppConfigError(f"node config 'partition-id'={pid}: the spec has federated.clients="
                             f"{spec.federated.clients}, so it must be 0..{spec.federated.clients - 1}")
    if node.get("data-dir"):
        folder = Path(str(node["data-dir"])).expanduser()
        if not (folder / MANIFEST).is_file() or not client_file(folder, pid).is_file():
            raise AppConfigError(f"node config 'data-dir'={folder}: needs {MANIFEST} and {client_file(folder, pid).name}"
                                 " (python -m orchard.federated.app export-nodes writes them)")
        return folder, load_manifest(folder).manifest
    prepared = prepared_from(spec, context.run_config)
    return prepared.path / PARTITIONS_DIR / partition_name(spec.federated), prepared.manifest


@clientapp.train()
def client_train(msg: Message, context: Context) -> Message:
    from orchard.federated.client import local_train

    spec = spec_from(context.run_config)
    folder, manifest = partition_folder(spec, context)
    return local_train(spec, manifest, folder, msg, context)


@clientapp.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    from orchard.federated.client import local_evaluate

    spec = spec_from(context.run_config)
    folder, manifest = partition_folder(spec, context)
    return local_evaluate(spec, manifest, folder, msg, context)


def export_node_data(prepared: PreparedData, spec: JobSpec, out: str | Path) -> list[Path]:
    """One folder per SuperNode, ``out/node-<i>/{manifest.json, client-<i>.parquet}``: what site i gets."""
    parts = write_partitions(prepared, spec.federated)
    val = write_val_partitions(prepared, spec.federated, parts) if spec.federated.client_eval else None
    folders = []
    for i in range(spec.federated.clients):
        folder = Path(out) / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(prepared.path / MANIFEST, folder / MANIFEST)
        shutil.copy2(client_file(parts.folder, i), client_file(folder, i))
        if val is not None:
            (folder / VAL_DIR).mkdir(exist_ok=True)
            shutil.copy2(client_file(val, i), client_file(folder / VAL_DIR, i))
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    """``python -m orchard.federated.app export-nodes SPEC OUT [--data-dir D] [--set k=v ...]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m orchard.federated.app")
    sub = p.add_subparsers(dest="verb", required=True)
    ex = sub.add_parser("export-nodes", help="write each SuperNode's data folder (manifest + its partition)")
    ex.add_argument("spec")
    ex.add_argument("out")
    ex.add_argument("--data-dir", default="", help="prepared folder; default: the one `orchard prep SPEC` made")
    ex.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from orchard.config import SpecError
    from orchard.federated.partitions import PartitionError

    try:
        spec = load_spec(args.spec, args.overrides)
        folders = export_node_data(prepared_from(spec, {"data-dir": args.data_dir}), spec, args.out)
    except (SpecError, AppConfigError, PartitionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2  # the CLI's exit code for bad input
    print("\n".join(map(str, folders)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
