"""Ray Jobs API client: submit a spec to a cluster, follow it, list, read logs, stop.

The cluster runs the very command a user runs locally (``orchard run SPEC --set ...``); the project is
shipped as the job's ``working_dir`` (without ``.git``, environments, data or local stores), or the job
names a prebuilt image (``cluster/Dockerfile``) that already holds it. MLflow's address and credentials
travel from the submitter's environment into the job's, never through the spec.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchard.config import SpecError

# What never goes to the cluster: VCS, environments, caches, local stores, secrets.
EXCLUDES = [".git", ".venv", "venv", ".orchard", "mlflow.db", "mlruns", "mlartifacts", ".whl", "**/__pycache__",
            ".pytest_cache", ".ruff_cache", "*.egg-info", ".flwr", "cluster/flower/secrets", "cluster/flower/nodes",
            "cluster/orchard.env", "*.env"]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_EXPERIMENT_NAME", "ORCHARD_DEBUG")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class ClusterError(RuntimeError):
    """The cluster could not be reached, refused us, or does not know the job."""


def address_of(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None):
    """A Jobs API client; connection and authentication problems become one clear ``ClusterError``."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = address_of(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(url, exc)) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster's Jobs API at {url}: {exc}") from None


def _auth_message(url: str, exc: Exception) -> str:
    have = "a token that the cluster refused" if os.environ.get("RAY_AUTH_TOKEN") else "no token"
    return (f"the Ray cluster at {url} requires token authentication and this client sent {have}: "
            "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or RAY_AUTH_TOKEN_PATH) "
            f"and submit again. Ray said: {str(exc).splitlines()[0]}")


def _call(fn: Callable[[], Any], url: str) -> Any:
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(url, exc)) from None
    except RuntimeError as exc:  # the SDK's error for an unknown job id and HTTP failures
        raise ClusterError(str(exc).splitlines()[0]) from None


# A freshly started head answers HTTP before its job agent has registered; Ray then refuses the submission
# with this message ("please try again later"), seen in CI right after `ray start`.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def _submit_job(c, **kwargs) -> str:
    """``c.submit_job(**kwargs)``, retried for up to AGENT_WAIT_S while the head has no job agent yet."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(**kwargs)
        except RuntimeError as exc:
            if NO_AGENT not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def runtime_env(project_root: Path, image: str | None = None) -> dict[str, Any]:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if image:
        return {"image_uri": image, "env_vars": env_vars}
    return {"working_dir": str(project_root), "excludes": EXCLUDES, "env_vars": env_vars}


def entrypoint(spec_path: str, overrides: list[str], shipped: bool, python: str = "python") -> str:
    """``orchard run SPEC`` through ``orchard.job_entry``, which names the interpreter if it lacks Orchard's stack."""
    cmd = [python, "-m", "orchard.job_entry", "run", spec_path]
    for o in overrides:
        cmd += ["--set", o]
    # A shipped project is imported from its own source root; an image has orchard installed.
    prefix = "PYTHONPATH=platform${PYTHONPATH:+:$PYTHONPATH} " if shipped else ""
    return prefix + shlex.join(cmd)


def cluster_python(c, wait_s: float = 20.0) -> str:
    """The interpreter the head node starts Ray workers with: the job must run there, not `python` on PATH.

    A head started as ``.venv/bin/ray start --head`` without the venv on PATH runs its workers with the
    venv's Python while its shell's ``python`` is another one. The raylet's command line (in the
    dashboard's node summary) names it. A node's command line appears only once its dashboard agent has
    reported (seconds after start, longer on a busy head), so that is waited for up to ``wait_s``; if the
    summary cannot be read or never names it, ``python`` (the entry check then names the cause).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            nodes = c._do_request("GET", "/nodes?view=summary").json()["data"]["summary"]
        except Exception:  # noqa: BLE001 - an older or locked-down dashboard
            nodes = []
        nodes.sort(key=lambda n: not (n.get("raylet") or {}).get("isHeadNode", False))  # the driver runs on the head
        for node in nodes:
            for arg in node.get("cmdline") or []:
                if arg.startswith("--python_worker_command="):
                    return arg.split("=", 1)[1].split()[0]
        if time.monotonic() >= deadline:
            return "python"
        time.sleep(1)


def spec_in_project(spec_path: str, project_root: Path) -> str:
    """The spec's path relative to the shipped folder: the job runs from there on the cluster."""
    path = Path(spec_path).resolve()
    try:
        return str(path.relative_to(project_root.resolve()))
    except ValueError:
        raise SpecError(f"{spec_path}: the spec must live inside the project folder {project_root} "
                        "that is shipped to the cluster") from None


def submit(spec_path: str, overrides: list[str], address: str | None, image: str | None = None,
           project_root: Path | None = None) -> tuple[str, str]:
    """Submit ``orchard run SPEC`` as a Ray job. Returns (submission id, dashboard URL)."""
    root = (project_root or Path.cwd()).resolve()
    rel = spec_path if image else spec_in_project(spec_path, root)
    c = client(address)
    url = address_of(address)
    python = "python" if image else cluster_python(c)  # an image has its own interpreter, with orchard
    job_id = _call(lambda: _submit_job(c, entrypoint=entrypoint(rel, overrides, image is None, python),
                                       runtime_env=runtime_env(root, image), metadata={"orchard.spec": rel}), url)
    return job_id, f"{url.rstrip('/')}/#/jobs/{job_id}"


def status(job_id: str, address: str | None) -> str:
    c = client(address)
    return str(_call(lambda: c.get_job_status(job_id), address_of(address)).value)


def logs(job_id: str, address: str | None) -> str:
    c = client(address)
    return _call(lambda: c.get_job_logs(job_id), address_of(address))


def stop(job_id: str, address: str | None, wait_s: float = 60) -> str:
    """Ask the job to stop and wait until it is terminal; returns the final status."""
    c = client(address)
    _call(lambda: c.stop_job(job_id), address_of(address))
    return wait(job_id, address, timeout_s=wait_s)


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    c = client(address)
    rows = []
    for j in _call(c.list_jobs, address_of(address)):
        rows.append({"id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
                     "start": j.start_time, "end": j.end_time, "message": j.message or ""})
    return sorted(rows, key=lambda r: r["start"] or 0)


def wait(job_id: str, address: str | None, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (state := status(job_id, address)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            return state
        time.sleep(poll_s)
    return state


def follow(job_id: str, address: str | None, write: Callable[[str], None]) -> str:
    """Stream the job's log to ``write`` until it ends; returns the final status."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    _call(lambda: asyncio.run(tail()), address_of(address))
    return wait(job_id, address)
