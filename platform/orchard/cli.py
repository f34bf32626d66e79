"""The ``orchard`` command: thin verbs that load a spec and call one function each.

Exit codes: 0 success, 2 bad spec or bad input (the message names the field, file or row), 1 run failure.
Engines are imported lazily so ``orchard --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchard import __version__
from orchard.bench import BENCHES
from orchard.config import SpecError, load_spec

DEMO_JOBS = ("jobs/digits-cnn.yaml", "jobs/digits-federated.yaml")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchard", description="Distributed and federated deep learning from one job spec.")
    p.add_argument("--version", action="version", version=f"orchard {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="prepare data, train or federate, and track one job")
    run.add_argument("spec", help="job spec (YAML)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. --set train.epochs=3 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="continue this spec's newest unfinished run from its last checkpoint")

    prep = sub.add_parser("prep", help="run only the Spark data preparation of a spec")
    prep.add_argument("spec")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    check = sub.add_parser("check", help="validate a spec and print it resolved, without running anything")
    check.add_argument("spec")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    demo = sub.add_parser("demo", help="run the shipped digits jobs (central and federated) and summarise")
    demo.add_argument("specs", nargs="*", default=list(DEMO_JOBS))

    bench = sub.add_parser("bench", help="measure throughput against a baseline in the same run")
    bench.add_argument("name", choices=list(BENCHES))
    bench.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")

    submit = sub.add_parser("submit", help="run a spec on a Ray cluster through the Ray Jobs API")
    submit.add_argument("spec")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--address", default=None, help="Jobs API URL (default: $RAY_ADDRESS, else http://127.0.0.1:8265)")
    submit.add_argument("--image", default=None, help="run in this prebuilt platform image instead of shipping the project")
    submit.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")

    jobs = sub.add_parser("jobs", help="list, inspect, read the logs of, or stop cluster jobs")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("id", nargs="?", help="submission id (all actions but list)")
    jobs.add_argument("--address", default=None)
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    sync = sub.add_parser("sync-tracking", help="send metrics buffered during a tracking-server outage")
    sync.add_argument("path", help="a buffer folder (or one .jsonl file) named in the outage warning")
    sync.add_argument("--uri", default=None, help="tracking URI; default: the one recorded in the buffer")

    explain = sub.add_parser("explain", help="attributions (Captum) of a run's logged model, logged to that run")
    explain.add_argument("run_id", help="MLflow run id of an orchard run that logged its model")
    explain.add_argument("--method", choices=["integrated_gradients", "saliency"], default=None,
                         help="default: the run's explain: section, else integrated_gradients")
    explain.add_argument("--samples", type=int, default=None, help="test rows explained (default 200)")
    explain.add_argument("--steps", type=int, default=None, help="Integrated Gradients steps (default 32)")
    explain.add_argument("--baseline", choices=["zeros", "train_mean"], default=None)
    explain.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")

    export = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, checked and measured")
    export.add_argument("model_uri", help="runs:/<run_id>/model, models:/<name>/<version>, or a run id")
    export.add_argument("--format", dest="fmt", required=True, help="onnx or torchscript")
    export.add_argument("--quantize", default=None, help="int8: also write and measure an int8 copy")
    export.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")

    ui = sub.add_parser("ui", help="open MLflow's dashboard on the store the jobs wrote to")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--backend-store-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")

    serve = sub.add_parser("serve", help="serve a logged or registered model over REST (Ray Serve, MLflow's protocol)")
    serve.add_argument("model_uri", help="e.g. models:/NAME@champion, models:/NAME/3 or a run's models:/m-... URI")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (each reserves one CPU)")
    serve.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")

    promote = sub.add_parser("promote", help="point a registered model's alias (e.g. champion) at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Piped output (CI logs, `| tee`) gets a wide table instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    try:
        return {"run": _run, "prep": _prep, "check": _check, "demo": _demo, "ui": _ui, "bench": _bench,
                 "sync-tracking": _sync_tracking, "submit": _submit, "jobs": _jobs,
                 "serve": _serve, "promote": _promote, "explain": _explain, "export": _export}[args.verb](args, console)
    except SpecError as exc:
        # The message quotes the user's keys and values: "[/x]" there is text, not rich markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _run(args, console: Console) -> int:
    spec = load_spec(args.spec, args.overrides)
    summary = _execute(spec, console, resume=args.resume)
    if summary is None:
        return EXIT_FAILED
    _print_summary([summary], console)
    return EXIT_OK


def _execute(spec, console: Console, resume: bool = False):
    from orchard.runner import run_job

    console.print(f"[bold]orchard run[/] {spec.name} ({spec.kind}){' --resume' if resume else ''}")
    try:
        return run_job(spec, console, resume=resume)
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any engine failure is reported, with the log to read
        if _engine_failed(exc, console):
            return None
        console.print(f"[bold red]failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        if os.environ.get("ORCHARD_DEBUG"):
            traceback.print_exc()
        return None


def _prep(args, console: Console) -> int:
    from orchard.runner import prepare_only

    spec = load_spec(args.spec, args.overrides)
    try:
        prepared = prepare_only(spec, console)
    except Exception as exc:
        if _engine_failed(exc, console):
            return EXIT_FAILED
        raise
    c = prepared.manifest["counts"]
    state = "reused" if prepared.reused else "written"
    console.print(f"prepared data {state}: {prepared.path}")
    console.print(f"  rows: input {c['input']}, train {c['train']}, val {c['val']}, test {c['test']}, "
                  f"quarantined {c['quarantined']}, duplicates {c['duplicates']}")
    if prepared.manifest.get("quarantine_path"):
        console.print(f"  quarantined rows: {prepared.path / prepared.manifest['quarantine_path']}")
    return EXIT_OK


def _engine_failed(exc: Exception, console: Console) -> bool:
    """Print a data-engine failure as its one message and the log to read; False for anything else."""
    from orchard.data.errors import EngineError

    if not isinstance(exc, EngineError):
        return False
    from rich.text import Text

    # The message quotes Spark's text, which may hold [brackets] rich would read as markup.
    console.print(Text.assemble(("failed: ", "bold red"), str(exc)), highlight=False)
    if exc.log_path is not None:
        console.print(f"engine log: {exc.log_path}", highlight=False, markup=False)
    if os.environ.get("ORCHARD_DEBUG"):
        traceback.print_exc()
    return True


def _check(args, console: Console) -> int:
    from orchard.config import spec_yaml

    spec = load_spec(args.spec, args.overrides)
    console.print(spec_yaml(spec), highlight=False, markup=False)
    return EXIT_OK


def _demo(args, console: Console) -> int:
    specs = [load_spec(s) for s in args.specs]  # refuse any bad spec before running the first
    summaries, failed = [], False
    for spec in specs:
        summary = _execute(spec, console)
        failed |= summary is None
        if summary is not None:
            summaries.append(summary)
    _print_summary(summaries, console)
    return EXIT_FAILED if failed else EXIT_OK


def _print_summary(summaries, console: Console) -> None:
    table = Table(title="Orchard jobs")
    for col in ("job", "engine", "test metric", "test F1", "wall time", "MLflow run id"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        f1 = "–" if s.test_f1 is None else f"{s.test_f1:.4f}"
        table.add_row(s.name, s.engine, f"{s.headline[0]} {s.headline[1]:.4f}", f1, f"{s.wall_s:.1f} s", s.run_id)
    console.print(table)
    for s in summaries:
        if s.quarantined:
            console.print(f"{s.name}: {s.quarantined} row(s) quarantined (see the manifest's quarantine folder)")
    if summaries:
        console.print(f"tracking store: {summaries[0].tracking_uri}")
        for s in summaries:
            console.print(f"engine log of {s.name}: {s.log_path}")
        console.print("open the dashboard: [bold]orchard ui[/]  (or make ui); it prints each experiment's link")


def _bench(args, console: Console) -> int:
    import importlib
    from pathlib import Path as _Path

    from orchard.bench import BENCHES, spread_text, write_report
    from orchard.console import engine_output_to

    module, fn = BENCHES[args.name].split(":")
    log = _Path(".orchard/bench") / f"{args.name}.log"
    with engine_output_to(log, console) as term:
        results = getattr(importlib.import_module(module), fn)(progress=lambda msg: term.print(msg, highlight=False))
    report = write_report(args.name, results, args.json_path)
    table = Table(title=f"orchard bench {args.name}")
    notes = any(r.get("note") for r in report["results"])
    for col in ("case", "metric", "value", "baseline", "ratio", "spread", *(["note"] if notes else [])):
        table.add_column(col)
    for r in report["results"]:
        base = "" if r["baseline"] is None else f"{r['baseline']:,.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        table.add_row(r["case"], r["metric"], f"{r['value']:,.1f} {r['unit']}", base, ratio, spread_text(r),
                      *([r.get("note", "")] if notes else []))
    console.print(table)
    console.print(f"machine: {report['machine']}")
    if args.json_path:
        console.print(f"report: {args.json_path}")
    return EXIT_OK


def _submit(args, console: Console) -> int:
    from orchard.remote import jobs

    load_spec(args.spec, args.overrides)  # a bad spec is refused here, before anything reaches the cluster
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        console.print("[yellow]warning:[/] MLFLOW_TRACKING_URI is not set here: unless the spec names "
                      "tracking.uri, the run is tracked in a store inside the job's folder on the cluster")
    try:
        job_id, url = jobs.submit(args.spec, args.overrides, args.address, args.image)
        console.print(f"submitted [bold]{job_id}[/]\n  dashboard: {url}\n  follow: orchard jobs logs {job_id} --follow")
        if not args.follow:
            return EXIT_OK
        return _final(jobs.follow(job_id, args.address, _writer()), job_id, console)
    except jobs.ClusterError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return EXIT_FAILED


def _writer():
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write


def _final(state: str, job_id: str, console: Console) -> int:
    console.print(f"job {job_id}: [bold]{state}[/]")
    return EXIT_OK if state == "SUCCEEDED" else EXIT_FAILED


def _jobs(args, console: Console) -> int:
    from orchard.remote import jobs

    if args.action != "list" and not args.id:
        console.print(f"[bold red]error:[/] orchard jobs {args.action} needs a submission id")
        return EXIT_BAD_INPUT
    try:
        if args.action == "list":
            table = Table(title="Ray jobs")
            for col in ("id", "status", "entrypoint", "message"):
                table.add_column(col, overflow="fold")
            for row in jobs.list_jobs(args.address):
                table.add_row(row["id"], row["status"], row["entrypoint"], row["message"])
            console.print(table)
        elif args.action == "status":
            console.print(jobs.status(args.id, args.address))
        elif args.action == "logs" and args.follow:
            return _final(jobs.follow(args.id, args.address, _writer()), args.id, console)
        elif args.action == "logs":
            _writer()(jobs.logs(args.id, args.address))
        else:
            return _stopped(jobs.stop(args.id, args.address), args.id, console)
    except jobs.ClusterError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return EXIT_FAILED
    return EXIT_OK


def _stopped(state: str, job_id: str, console: Console) -> int:
    console.print(f"job {job_id}: [bold]{state}[/]")
    return EXIT_OK if state in ("STOPPED", "SUCCEEDED", "FAILED") else EXIT_FAILED


def _sync_tracking(args, console: Console) -> int:
    from orchard.tracking import sync_buffer
    from orchard.tracking.buffer import TrackingUnavailable

    try:
        sent = sync_buffer(args.path, args.uri)
    except FileNotFoundError as exc:
        console.print(f"[bold red]error:[/] no tracking buffer at {args.path} ({exc})", highlight=False)
        return EXIT_BAD_INPUT
    except TrackingUnavailable as exc:
        console.print(f"[bold red]failed:[/] {exc}", highlight=False)
        return EXIT_FAILED
    console.print(f"sent {sent} buffered metric(s) from {args.path}")
    return EXIT_OK


def _serve(args, console: Console) -> int:
    from orchard.deploy.serve import BadModel, serve_model
    from orchard.tracking import resolve_uri

    if args.replicas < 1:
        raise SpecError(f"--replicas must be at least 1, got {args.replicas}")

    def ready(url: str, waited_s: float) -> None:
        console.print(f"serving {args.model_uri} at {url}/invocations  ({args.replicas} replica(s), answered "
                      f"after {waited_s:.0f} s; Ctrl-C to stop)", highlight=False)

    try:
        serve_model(args.model_uri, args.tracking_uri or resolve_uri(), host=args.host, port=args.port,
                    replicas=args.replicas, on_ready=ready)
    except BadModel as exc:
        raise SpecError(str(exc)) from exc
    except KeyboardInterrupt:
        console.print("stopped")
    except (RuntimeError, TimeoutError) as exc:  # a replica that cannot load the model fails the deployment
        console.print(f"[bold red]failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        return EXIT_FAILED
    return EXIT_OK


def _promote(args, console: Console) -> int:
    from orchard.deploy.registry import RegistryError, promote
    from orchard.tracking import resolve_uri

    uri = args.tracking_uri or resolve_uri()
    try:
        promote(uri, args.name, args.version, args.alias)
    except RegistryError as exc:
        raise SpecError(str(exc)) from exc
    console.print(f"{args.name}@{args.alias} → version {args.version}  (serve it: orchard serve "
                  f"models:/{args.name}@{args.alias})", highlight=False)
    return EXIT_OK


def _explain(args, console: Console) -> int:
    from orchard.explain import explain_run
    from orchard.tracking.buffer import TrackingUnavailable

    try:
        with console.status(f"explaining run {args.run_id}…"):
            summary = explain_run(args.run_id, args.tracking_uri, method=args.method, samples=args.samples,
                                  steps=args.steps, baseline=args.baseline)
    except TrackingUnavailable as exc:
        console.print(f"[bold red]failed:[/] {escape(str(exc))}", highlight=False)
        return EXIT_FAILED
    check = summary.get("completeness")
    console.print(f"run {args.run_id}: {summary['method']} on {summary['samples']} test rows in "
                  f"{summary['seconds']:.1f} s" + (f", completeness error ≤ {check['max_abs_error']:.2g}"
                                                   if check else ""), highlight=False)
    console.print(f"  logged: {', '.join(summary['artifacts'])}", highlight=False)
    return EXIT_OK


def _export(args, console: Console) -> int:
    from orchard.deploy.export import ExportError, ParityError, export_model, report_table

    try:
        with console.status(f"exporting {args.model_uri} to {args.fmt}…"):
            report = export_model(args.model_uri, args.fmt, args.quantize, args.tracking_uri)
    except ExportError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_BAD_INPUT
    except ParityError as exc:
        console.print(f"[bold red]failed:[/] {escape(str(exc))}", highlight=False)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a converter or quantizer failure: its one line, exit 1
        console.print(f"[bold red]failed:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        if os.environ.get("ORCHARD_DEBUG"):
            traceback.print_exc()
        return EXIT_FAILED
    console.print(report_table(report))
    console.print(f"logged to run {report.run_id}: {', '.join(v.artifact for v in report.variants)}, {report.artifact}")
    return EXIT_OK


UI_WAIT_S = 240.0  # a loaded 2-core box took ~55 s before MLflow's server answered its first request


def _ui(args, console: Console) -> int:
    import tempfile
    import time

    from orchard.tracking import resolve_uri

    uri = args.backend_store_uri or resolve_uri()
    url = f"http://{args.host}:{args.port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="orchard-ui-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", str(_ui_workers())]
    console.print(f"MLflow dashboard on {uri}")
    # Without MLflow's job runner (see services.MLFLOW_SERVER_ENV); an explicit setting wins.
    from orchard.remote.services import MLFLOW_SERVER_ENV

    env = {**MLFLOW_SERVER_ENV, **os.environ}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.monotonic()
        with console.status("starting MLflow's server…"):
            answered = _wait_for_health(url, proc, UI_WAIT_S)
        if not answered:
            why = "exited" if proc.poll() is not None else f"did not answer within {UI_WAIT_S:.0f} s"
            console.print(f"[bold red]error:[/] MLflow's server {why}; its output ({log.name}):", highlight=False)
            console.print(Path(log.name).read_text()[-4000:], highlight=False, markup=False)
            return EXIT_FAILED
        _print_ui_links(console, url, time.monotonic() - t0, log.name)
        return proc.wait()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ui_workers() -> int:
    """MLflow starts 4 uvicorn workers by default: too many for a small box, where each one's start is slow."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, max(1, cpus // 2))


def _wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once the server answers ``/health``; False if it exits or stays silent for ``timeout_s``."""
    import time
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::", "") else parts.hostname
    health = f"http://{host}:{parts.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(health, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _print_ui_links(console: Console, url: str, waited_s: float, log: str) -> None:
    from orchard.tracking.dashboard import experiment_links, experiment_url

    console.print(f"  → {experiment_url(url)}  (Ctrl-C to stop)", highlight=False)
    console.print(f"  answered after {waited_s:.0f} s; server log: {log}", highlight=False)
    for name, link in experiment_links(url):
        console.print(f"    {name}: {link}", highlight=False)


def entry() -> None:
    """The ``orchard`` command: ``main()``, then an exit that does not keep the user waiting."""
    code = main()
    quick_exit_prep()
    sys.exit(code)


def quick_exit_prep() -> None:
    """Cut what the interpreter's exit costs after a run (~4 s here, none of it useful work).

    A Ray instance this process started is shut down now, not by Ray's atexit hook, which first sleeps
    0.5 s for log lines a driver started with ``log_to_driver=False`` never prints. The heap is then
    frozen (``gc.freeze``): the interpreter's final garbage collections walk every object torch, Ray,
    MLflow and pyspark created, ~2 s here, to find cycles that the exit frees anyway. Reference counting
    still frees objects and every atexit hook still runs; only for the process's last moments, so never
    from ``main()``, which tests call in-process.
    """
    ray = sys.modules.get("ray")
    if ray is not None:
        from orchard.raystart import settle_early_start

        with contextlib.suppress(Exception):  # a start that failed was reported by the run, if it mattered
            settle_early_start()  # a background start still running (the run failed first) ends up shut down
        if ray.is_initialized():
            ray.shutdown()
    gc.freeze()


if __name__ == "__main__":
    entry()
