"""A background Ray start (``start_ray_early``): the next ``start_ray`` waits for it and owns the instance;
a local instance runs without the autoscaler and log monitors, and, when asked (``lean``), without the API
server and with stand-ins for its agents."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Prepended to both scripts: the instance's Python processes, by script or title ("ray::DashboardAgent").
_NAMES = textwrap.dedent("""
    def ray_process_names():
        import os, psutil
        names = set()
        for child in psutil.Process().children(recursive=True):
            try:
                names |= {os.path.basename(a) for a in child.cmdline() if a.endswith(".py") or a.startswith("ray::")}
            except psutil.Error:
                pass
        return names
""")

_SCRIPT = _NAMES + textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import ray
    from orchard import raystart

    import socket
    held = socket.socket()  # Ray's default port for the agent's HTTP server, taken as another instance would
    try:
        held.bind(("", 52365))
        held.listen()
    except OSError:
        pass  # taken already
    out = {}
    out["early"] = raystart.start_ray_early(3)
    imported = set(sys.modules)
    out["again"] = raystart.start_ray_early(3)  # one background start at a time
    out["handler"] = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    time.sleep(1.0)  # the caller's own work
    out["owned"] = raystart.start_ray(3)  # waits for the background start, then owns it
    # What the start's thread imported itself: packages that the caller may be importing meanwhile are not.
    out["thread_imports"] = sorted({m.split(".")[0] for m in set(sys.modules) - imported})
    out["settled_twice"] = list(raystart.settle_early_start())
    time.sleep(2.0)  # Ray's processes outlive the start: the thread that spawned them is still alive

    @ray.remote
    def pid():
        return os.getpid()

    out["task"] = ray.get(pid.remote(), timeout=60) != os.getpid()
    out["cpus"] = ray.cluster_resources()["CPU"]
    from ray._private import parameter
    out["scripts"] = sorted(ray_process_names())
    out["params_restored"] = parameter.RayParams.__qualname__ == "RayParams"
    node = ray._private.worker.global_worker.node
    out["agent_port"] = node.dashboard_agent_listen_port
    agent_log = os.path.join(node.get_session_dir_path(), "logs", "dashboard_agent.log")
    for _ in range(60):
        text = open(agent_log).read() if os.path.exists(agent_log) else ""
        if "http address" in text or "Failed to bind" in text:
            break
        time.sleep(0.5)
    out["agent_http"] = [line.split("-- ", 1)[-1] for line in text.splitlines()
                         if "http address" in line or "Failed to bind" in line]
    ray.shutdown()
    time.sleep(1.5)
    out["thread_left"] = any(t.name == "orchard-ray-start" for t in threading.enumerate())

    # A start that fails reaches whoever settles it, as the error the start raised.
    def broken(min_cpus, **kwargs):
        raise RuntimeError("no room for Ray")

    raystart._start_ray = broken
    out["early_again"] = raystart.start_ray_early(3)
    try:
        raystart.start_ray(3)
    except RuntimeError as exc:
        out["error"] = str(exc)
    os.environ["RAY_ADDRESS"] = "127.0.0.1:1"
    out["cluster"] = raystart.start_ray_early(3)  # joining a cluster is not done in the background
    print(json.dumps(out))
""")


def _run(script: str) -> dict:
    """The script's JSON line, run in a fresh interpreter (Ray is started and shut down there)."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_background_start_is_waited_for_owned_kept_alive_and_its_error_raised():
    got = _run(_SCRIPT)
    assert got["early"] is True and got["again"] is False
    shared = {"aiohttp", "grpc", "opentelemetry", "prometheus_client", "pydantic", "pydantic_core", "yarl"}
    assert not shared & set(got["thread_imports"]), got["thread_imports"]
    assert got["handler"]  # SIGTERM still exits through sys.exit, as Ray's main-thread start arranges
    assert got["owned"] is True  # this caller shuts the instance down; the background start did not claim it
    assert got["settled_twice"] == [False, 0.0]
    assert got["task"] is True and got["cpus"] >= 3
    # A local instance runs its agents but neither the autoscaler monitor nor the log monitor.
    assert "ray::DashboardAgent" in got["scripts"] and "dashboard.py" in got["scripts"], got["scripts"]
    assert "monitor.py" not in got["scripts"] and "log_monitor.py" not in got["scripts"], got["scripts"]
    assert got["params_restored"]  # Ray's own RayParams is back once the start is done
    # Its agent serves HTTP on a free port, first time: on Ray's fixed one, taken here, it retried for 3.4 s.
    assert got["agent_port"] not in (52365, None, -1, 0), got
    assert got["agent_http"] == [f"Dashboard agent http address: {got['agent_http'][0].rsplit(' ', 1)[-1]}"], got
    assert got["agent_http"][0].endswith(f":{got['agent_port']}"), got
    assert got["thread_left"] is False  # the keeper thread ends with the instance
    assert got["early_again"] is True and got["error"] == "no room for Ray"
    assert got["cluster"] is False


_LEAN = _NAMES + textwrap.dedent("""
    import json, os, signal, time
    import psutil, ray
    from ray._private import node, services
    from orchard import raystart

    out = {"owned": raystart.start_ray(2, lean=True)}

    @ray.remote
    def pid():
        return os.getpid()

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            return self.n

    out["task"] = ray.get(pid.remote(), timeout=60) != os.getpid()
    counter = Counter.remote()
    out["actor"] = ray.get([counter.add.remote(k) for k in (1, 2, 3)], timeout=60)
    out["cpus"] = ray.cluster_resources()["CPU"]
    out["inline"] = ray._private.worker._global_node._ray_params._system_config.get("max_direct_call_object_size")
    time.sleep(3.0)  # Ray's agents would have named themselves ("ray::DashboardAgent") by now
    out["scripts"] = sorted(ray_process_names())

    def stand_ins():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if (p.info["cmdline"] or [])[:3] == raystart._AGENT_STAND_IN:
                found.append(p)
        return found

    raylet = ray._private.worker.global_worker.node.all_processes["raylet"][0].process.pid
    out["stand_ins"] = sorted(p.ppid() == raylet for p in stand_ins())
    out["stand_in_mib"] = max(p.memory_info().rss for p in stand_ins()) / 2**20
    out["restored"] = (node.Node.start_api_server.__name__ == "start_api_server"
                       and services.start_ray_process.__name__ == "start_ray_process")
    ray.shutdown()
    time.sleep(1.5)
    out["left_after_shutdown"] = len(stand_ins())

    # Killed, not shut down: the stand-ins end with the raylet by themselves.
    raystart.start_ray(2, lean=True)
    raylet = ray._private.worker.global_worker.node.all_processes["raylet"][0].process.pid
    out["stand_ins_again"] = len(stand_ins())
    os.kill(raylet, signal.SIGKILL)
    time.sleep(3.0)
    out["left_after_kill"] = len(stand_ins())
    ray.shutdown()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_lean_instance_runs_tasks_and_actors_without_api_server_or_agents():
    """What a Flower simulation starts: no ``dashboard.py`` (~117 MiB), and a ~2 MiB shell for each of Ray's
    agents (121 + 84 MiB); the stand-ins never outlive their raylet."""
    got = _run(_LEAN)
    assert got["owned"] is True and got["task"] is True and got["cpus"] >= 2
    assert got["actor"] == [1, 3, 6]
    assert got["inline"] == 2**20  # a model of up to 1 MiB travels in the call, not the object store
    assert "dashboard.py" not in got["scripts"], got["scripts"]
    assert not {"ray::DashboardAgent", "ray::RuntimeEnvAgent", "agent.py", "main.py"} & set(got["scripts"]), got
    assert got["stand_ins"] == [True, True], got  # both, children of this instance's raylet
    assert got["stand_in_mib"] < 10, got
    assert got["restored"]  # Ray's own functions are back once the start is done
    assert got["left_after_shutdown"] == 0 and got["stand_ins_again"] == 2 and got["left_after_kill"] == 0, got
