"""The one place that starts (or joins) Ray for an engine: Ray Train and the Flower simulation alike.

Top level rather than under ``train/`` or ``federated/`` so that neither imports the other; ``engine/``
stays free of Ray. Ray itself is imported only when a function here is called.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# How long workers pre-started for a run stay idle before Ray may reap them: the data is prepared meanwhile.
PRESTART_KEEP_ALIVE_S = 600
# On a lean instance, task arguments and results up to this size travel inline in the call's own gRPC
# message instead of through the raylet's shared-memory object store (Ray's default: 100 KiB). A Flower
# simulation sends the global model to an actor and gets one back on every client update: echoing a 400 kB
# array through an actor took 4.1-4.5 ms per round trip with the store and 1.6-1.7 ms inline here, and a
# bare ClientApp call with a 400 kB model 4.7-5.2 ms against 2.6-2.8 ms. Not larger: an inline result is
# held in the receiving process's heap, not in shared memory, and copying dominates the store's fixed cost
# for big models; at 8 MiB a 100-client run of a 1.7 MB CNN peaked at 1,799-1,829 MiB against 1,737-1,744.
LEAN_INLINE_BYTES = 2**20


class _EarlyStart(threading.Thread):
    """``ray.init`` of a local instance, run while the caller does other work (see ``start_ray_early``).

    The thread lives on while the instance it started is up: Ray starts its processes with
    ``PR_SET_PDEATHSIG``, which Linux fires when the *thread* that spawned them exits, so a thread that
    returned after ``ray.init`` would take GCS, raylet and agents down with it (seen: "Failed to
    connect to GCS within 60 seconds", then the driver killed).
    """

    def __init__(self, min_cpus: float) -> None:
        super().__init__(name="orchard-ray-start", daemon=True)
        self.min_cpus = min_cpus
        self.prestart: tuple[tuple[str, int], ...] = ()
        self.prestart_asked = threading.Event()
        self.started = False
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.ready = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        # Ray notes that it set no SIGTERM handler from this thread; start_ray_early installed one.
        ray_worker = logging.getLogger("ray._private.worker")
        ray_worker.addFilter(_no_sigterm_note)
        try:
            self.started = _start_ray(self.min_cpus)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever settles it, raised there
            self.error = exc
        finally:
            ray_worker.removeFilter(_no_sigterm_note)
            self.seconds = time.perf_counter() - t0
            self.ready.set()
        if self.started:
            import ray

            while ray.is_initialized():  # until ray.shutdown(), from any thread
                if self.prestart_asked.wait(0.5):  # prestart_when_up
                    self.prestart_asked.clear()
                    prestart_workers(self.prestart)


def _no_sigterm_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


_early: _EarlyStart | None = None
_early_lock = threading.Lock()


def start_ray_early(min_cpus: float = 0) -> bool:
    """Start a quiet local Ray in a background thread; the next ``start_ray`` waits for it and owns it.

    A local start takes seconds (GCS, raylet and agent processes, pre-started workers) in which the
    caller can do its own work: open the tracking store, prepare the data. Does nothing, and returns
    False, when Ray is up already or $RAY_ADDRESS names a cluster to join (joining is quick, and must
    happen before anything is written: see ``runner._join_cluster``).

    Ray installs its SIGTERM handler (exit through ``sys.exit``, so ``finally`` blocks and atexit hooks
    run) only from the main thread: the same handler is installed here, from the caller's thread.
    """
    global _early
    # Imported here, not in the thread: two threads importing one package can deadlock or see it half
    # initialized (seen in CI with pyspark), and the caller goes on importing (pyspark; torch and Ray Train
    # for launcher.prewarm) while the thread starts Ray. With Ray, what ray.init imports on first use: its
    # dashboard's dependencies (aiohttp, grpc, OpenTelemetry, Prometheus), usage stats, pydantic's shim.
    import ray
    import ray._common.pydantic_compat  # noqa: F401
    import ray._common.usage.usage_lib  # noqa: F401
    import ray.dashboard.optional_deps  # noqa: F401

    with _early_lock:
        if _early is not None or ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
            return False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        _early = _EarlyStart(min_cpus)
        _early.start()
    return True


def prestart_when_up(wanted: Sequence[tuple[str, int]]) -> None:
    """``prestart_workers(wanted)`` in the background: from the pending background start's thread once Ray
    is up, else from a thread of its own (what either imports is imported here first)."""
    _raylet_stub_modules()
    import psutil  # noqa: F401 - for _starting_workers, in the thread

    with _early_lock:
        early = _early
    if early is None:
        threading.Thread(target=prestart_workers, args=(tuple(wanted),), name="orchard-ray-prestart",
                         daemon=True).start()
        return
    early.prestart = tuple(wanted)
    early.prestart_asked.set()


def _raylet_stub_modules() -> tuple[Any, Any, Any]:
    import grpc
    from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

    return grpc, node_manager_pb2, node_manager_pb2_grpc


def prestart_workers(wanted: Sequence[tuple[str, int]], keep_alive_s: int = PRESTART_KEEP_ALIVE_S) -> int:
    """Have this machine's raylet start Python workers for this job now: for each ``(serialized runtime env,
    count)`` in ``wanted``, in order, ``count`` workers in the runtime env that serializes to that string,
    kept idle (not reaped) for ``keep_alive_s``. Returns how many were asked for.

    An actor takes an idle worker only if its runtime env serializes to the very same string (the raylet
    compares hashes of it); otherwise the raylet starts a fresh interpreter while the caller waits (~1 s of
    CPU here, before the actor's own imports). Ray sends this request (its raylet's ``PrestartWorkers``)
    from its C++ core worker only, so it is sent here over the raylet's gRPC port, one worker at a time
    when a start slot is free: the raylet starts as many processes at once as the machine has cores and
    queues the rest, and a queued start is dropped once any worker of that env is idle (asked for 5 at
    once, 3-4 came). Only for a local instance that this process drives with no job runtime env (a
    cluster's job has its own, and other nodes); otherwise, or if a request fails, it stops and returns
    what it asked for: it saves time, it is never needed.
    """
    import ray

    asked = 0
    if not ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return asked
    try:
        from ray._private.utils import get_runtime_env_info
        from ray.runtime_env import RuntimeEnv

        worker = ray._private.worker.global_worker
        if worker.mode != ray.SCRIPT_MODE or ray.get_runtime_context().runtime_env:
            return asked
        grpc, pb2, pb2_grpc = _raylet_stub_modules()
        node = worker.node
        slots = max(1, min(os.cpu_count() or 1, int(ray.cluster_resources().get("CPU", 1))))
        job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
        with grpc.insecure_channel(f"{node.node_ip_address}:{node.node_manager_port}") as channel:
            stub = pb2_grpc.NodeManagerServiceStub(channel)
            for env, count in wanted:
                info = get_runtime_env_info(RuntimeEnv())
                info.serialized_runtime_env = env
                request = pb2.PrestartWorkersRequest(
                    language=0,  # ray.rpc.Language.PYTHON
                    job_id=job_id, runtime_env_info=info, keep_alive_duration_secs=keep_alive_s, num_workers=1)
                for _ in range(count):
                    _wait(lambda: _starting_workers() < slots, 15)
                    before = _starting_workers()
                    stub.PrestartWorkers(request, timeout=10)
                    asked += 1
                    _wait(lambda n=before: _starting_workers() > n, 2)  # its process is forked
    except Exception:  # noqa: BLE001 - an optimisation: actors then start their own workers, as before
        logging.getLogger("orchard.ray").debug("could not pre-start Ray workers", exc_info=True)
    return asked


def _starting_workers() -> int:
    """Ray workers of this process's local instance still starting (a worker renames itself once up)."""
    import psutil

    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            n += any(a.endswith("default_worker.py") for a in child.cmdline())
        except psutil.Error:
            pass
    return n


def _wait(done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def settle_early_start() -> tuple[bool, float]:
    """Wait for a background start, if one is pending, and take ownership of what it started.

    Returns (whether it started Ray, its seconds); raises what the start raised. The instance then
    belongs to this caller: a second call returns (False, 0.0).
    """
    global _early
    with _early_lock:
        early, _early = _early, None
    if early is None:
        return False, 0.0
    early.ready.wait()
    if early.error is not None:
        raise early.error
    return early.started, early.seconds


def training_cpus(num_workers: int, cpus_per_worker: float) -> float:
    """The CPUs a local instance needs for a Ray Train run: the workers' and one for Ray Data's reads."""
    return num_workers * cpus_per_worker + 1


def start_ray(min_cpus: float = 0, *, task_cpus: float = 0, task_setting: str = "task_cpus",
              lean: bool = False) -> bool:
    """Join $RAY_ADDRESS if set, else start a quiet local instance; do nothing if Ray is already up.

    Returns True only if this call started Ray (or took over the background start of
    ``start_ray_early``), so the caller shuts down its own instance and no other. A local instance gets
    at least ``min_cpus`` logical CPUs: train workers reserve theirs for the whole run and Ray Data's
    read tasks need one more, else the job waits forever on a small machine.
    ``task_cpus`` (named ``task_setting`` in the error) is one task's reservation, e.g. a Flower
    client's: if no node has that many CPUs nothing could ever be scheduled, so refuse now.
    ``lean=True`` starts a local instance without Ray's API server and with its two agents stood in for
    (see ``_without_api_server`` and ``_without_agents``), for work that never reads Ray's state API and
    asks for no runtime env: a Flower simulation, not Ray Train V2.
    """
    import ray

    started = settle_early_start()[0] or _start_ray(min_cpus, lean=lean)
    if task_cpus:
        biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if biggest < task_cpus:
            if started:
                ray.shutdown()
            raise ValueError(f"{task_setting}={task_cpus:g}, but no Ray node has more than {biggest:g} CPUs: "
                             "nothing that needs them could run")
    return started


def _start_ray(min_cpus: float, lean: bool = False) -> bool:
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}
        if not os.environ.get("RAY_ADDRESS"):
            # "local", not None: with no address Ray joins the latest `ray start` cluster on this machine
            # (/tmp/ray/ray_current_cluster), e.g. someone else's; a local run starts its own instance.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(min_cpus))
            # Ray's own metrics (Prometheus/OpenTelemetry) feed the Ray dashboard, which a local instance
            # does not start. Left on, the driver's exit flushes them and waited ~10 s in about one run in
            # four here (py-spy: OpenTelemetryMetricRecorder::Shutdown -> ForceFlush in shutdown_driver).
            kwargs["_system_config"] = {"enable_metrics_collection": False}
            if lean:
                kwargs["_system_config"]["max_direct_call_object_size"] = LEAN_INLINE_BYTES
        cwd = os.getcwd()
        local = not os.environ.get("RAY_ADDRESS")
        with _inherited_pythonpath(local), _without_monitors(local), _without_api_server(local and lean), \
                _without_agents(local and lean):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level=logging.WARNING, **kwargs)
        # Inside a Ray job whose project was shipped as working_dir, joining the cluster re-extracts that
        # folder: the old directory (our cwd) is gone and relative paths fail until we enter the new one.
        os.chdir(cwd)
        started = True
    return started


@contextlib.contextmanager
def _without_monitors(local: bool) -> Iterator[None]:
    """A local instance starts without the autoscaler monitor and the log monitor, and its dashboard agent
    listens for HTTP on a free port.

    Both monitors are Python processes (~80 MiB each, measured) that a one-machine instance has no use for:
    the monitor autoscales a cluster that cannot grow, the log monitor streams worker output to drivers that
    set ``log_to_driver=False`` (worker logs are still written to Ray's session folder). Each also
    imports Ray while the run starts, on cores that Spark and the training workers need then.
    The agent's port is Ray's fixed 52365 otherwise: while another instance held it (another run's, or the
    last run's agent still exiting) the agent retried for 3.4 s and ``ray.init`` waited for it (2.5 → 5.6 s
    with a second instance up; the agent's log: "Failed to bind to port 52365 (attempt 1/6)"). Nothing
    uses that port on a local instance (it serves job submission).
    ``ray.init`` passes none of these settings to the head node's ``RayParams``, so its class is swapped for
    one with these defaults for the duration of the call, as Ray's own ``cluster_utils.Cluster`` does for
    the log monitor.
    """
    if not local:
        yield
        return
    from ray._private import parameter

    original = parameter.RayParams

    class _Lean(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("no_monitor", True)
            kwargs.setdefault("include_log_monitor", False)
            kwargs.setdefault("dashboard_agent_listen_port", free_port())
            super().__init__(*args, **kwargs)

    parameter.RayParams = _Lean
    try:
        yield
    finally:
        parameter.RayParams = original


def free_port() -> int:
    """A TCP port free on every interface of this machine now."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _without_api_server(skip: bool) -> Iterator[None]:
    """With ``skip``, the head node starts no API server (``dashboard.py``), which Ray starts even with
    ``include_dashboard=False``: it serves the state API, job submission and metrics to clients that ask.

    A Python process of ~117 MiB RSS (measured in a 100-client simulation: 78 MiB proportional), a
    quarter of an actor's worth on a machine where the simulation's peak memory is its main cost. Ray
    already runs without one when it fails to start (``raise_on_failure`` is off unless the dashboard was
    asked for); the swapped method takes that path: no process, no web UI address.
    """
    if not skip:
        yield
        return
    from ray._private import node

    original = node.Node.start_api_server

    def _none(self: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
        self._webui_url = None

    node.Node.start_api_server = _none
    try:
        yield
    finally:
        node.Node.start_api_server = original


# What stands in for each of Ray's two agents on a lean instance: a shell that waits while the raylet is its
# parent (~2 MiB; Ray's agents are Python processes of 121 and 84 MiB here). It ends on SIGTERM, which the
# raylet sends its agents when it exits, and by itself within a second of being orphaned (a killed raylet
# that nobody has reaped yet still answers ``kill -0``, so the parent is read from /proc); the raylet
# appends its own arguments, which ``sh -c`` ignores.
_AGENT_STAND_IN = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; "
                   "while read -r _ _ _ p _ </proc/$$/stat && [ $p = $PPID ]; do sleep 1 & wait $!; done"]
_AGENT_PORTS = ("METRICS_AGENT_PORT_NAME", "METRICS_EXPORT_PORT_NAME", "DASHBOARD_AGENT_LISTEN_PORT_NAME",
                "RUNTIME_ENV_AGENT_PORT_NAME")


@contextlib.contextmanager
def _without_agents(skip: bool) -> Iterator[None]:
    """With ``skip``, the raylet starts a stand-in (``_AGENT_STAND_IN``) for each of its agents.

    The dashboard agent reports node metrics to the dashboard and serves job submission and log reads; the
    runtime-env agent installs runtime envs (pip, working_dir, env_vars) for tasks and actors that ask for
    one. A Flower simulation on its own local instance needs neither: no dashboard runs, metrics are off
    (``enable_metrics_collection``) and its actors are plain workers, which import Orchard through the
    inherited PYTHONPATH (``_inherited_pythonpath``) and ask for no runtime env. Together the two agents
    were 205 MiB RSS of the process tree, about a tenth of a 100-client simulation's peak.
    Ray's raylet cannot run without agent processes (it refuses an empty command and exits when an agent
    does) and waits at start for each agent to write its ports into the session folder; the ports are
    written here first, as -1: "not in use", what the dashboard agent writes itself in Ray's minimal mode.
    On such an instance a task or actor that asks for a runtime env fails: the raylet exits after 30 s
    ("the runtime env agent was never started", in its raylet.out) and the driver sees its raylet die.
    """
    if not skip:
        yield
        return
    import ray._raylet
    from ray._private import ray_constants, services

    original = services.start_ray_process
    stand_in = subprocess.list2cmdline(_AGENT_STAND_IN)
    flags = ("--dashboard_agent_command=", "--runtime_env_agent_command=")

    def _lean(command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        if process_type == ray_constants.PROCESS_TYPE_RAYLET:
            opts = dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)
            for name in _AGENT_PORTS:
                ray._raylet.persist_port(opts["session_dir"], opts["node_id"], getattr(ray._raylet, name), -1)
            command = [f"{a.split('=', 1)[0]}={stand_in}" if a.startswith(flags) else a for a in command]
        return original(command, process_type, *args, **kwargs)

    services.start_ray_process = _lean
    try:
        yield
    finally:
        services.start_ray_process = original


@contextlib.contextmanager
def _inherited_pythonpath(local: bool) -> Iterator[None]:
    """Actors import orchard from wherever this process does: a local instance's raylet, started inside
    ``ray.init``, inherits this PYTHONPATH and hands it to every worker it starts.

    Not as a job runtime env, as Flower's RayBackend does: workers are then started per runtime env, so
    the raylet's pre-started idle workers (plain env) never serve the job and every task and actor of a
    run waits for a fresh interpreter. Not on a cluster, whose job runtime env (its working_dir) is the
    same on every node; our paths are not. This process's own environment is restored afterwards; during
    a background start (``start_ray_early``) a process the caller spawns meanwhile (Spark's JVM) inherits
    the longer path too, which names the same modules this interpreter imports.
    """
    if not local:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [before])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
