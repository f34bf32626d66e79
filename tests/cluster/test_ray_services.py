"""The compose `ray-head` and `ray-worker` services, run for real as native processes with their environment.

From `docker-compose config` come the argv and the environment (token auth on, the token from the secret);
only what Docker would isolate is changed: free ports instead of 6379/8265, loopback instead of 0.0.0.0 and
the `ray-head` service name, a private temp dir, and a free dashboard-agent port (two Ray nodes share this
machine, where each container would have its own). Shows the head's healthcheck command works under token
auth (and needs the token), the worker joins with the shared token, and the Jobs API (what `orchard submit` calls) refuses
callers without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_compose import SECRETS, _compose
from tests.net import free_port, kill_strays, stop_group, wait_for

BIN = Path(sys.executable).parent


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def _alive_nodes(dashboard: str) -> int:
    status, body = _get(f"{dashboard}/nodes?view=summary", SECRETS["RAY_AUTH_TOKEN"])
    if status != 200:
        return 0
    return sum(n["raylet"]["state"] == "ALIVE" for n in json.loads(body)["data"]["summary"])


def _native(argv: list[str], replace: dict[str, str], extra: list[str]) -> list[str]:
    out = [replace.get(a, a) for a in argv] + extra
    out[0] = str(BIN / out[0])
    return out


@pytest.fixture
def ray_tmp():
    # Short: Ray's Unix socket paths live under it and must stay under 107 characters.
    tmp = tempfile.mkdtemp(prefix="orc-ray-", dir="/tmp")
    procs: list[subprocess.Popen] = []
    yield tmp, procs
    stop_group(*procs)
    kill_strays(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_services_form_a_token_protected_cluster(ray_tmp):
    tmp, procs = ray_tmp
    services = yaml.safe_load(_compose("config", env=SECRETS).stdout)["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    gcs, dash = free_port(), free_port()
    env = {**os.environ, **head["environment"], "RAY_TMPDIR": tmp, "PATH": f"{BIN}:{os.environ['PATH']}"}
    assert env["RAY_AUTH_MODE"] == "token"

    replace = {"--port=6379": f"--port={gcs}", "--dashboard-port=8265": f"--dashboard-port={dash}",
               "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1",
               "--address=ray-head:6379": f"--address=127.0.0.1:{gcs}"}
    agent = [f"--dashboard-agent-listen-port={free_port()}"]
    procs.append(subprocess.Popen(_native(head["command"], replace, agent), env=env, start_new_session=True,
                                  stdout=open(f"{tmp}/head.log", "wb"), stderr=subprocess.STDOUT))
    healthcheck = [a.replace("127.0.0.1:8265", f"127.0.0.1:{dash}") for a in head["healthcheck"]["test"][1:]]
    healthcheck[0] = str(BIN / healthcheck[0])
    wait_for(lambda: subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0,
              "healthy head (the compose healthcheck command)")
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    assert subprocess.run(healthcheck, env=wrong, capture_output=True, timeout=30).returncode != 0

    dashboard = f"http://127.0.0.1:{dash}"
    assert _get(f"{dashboard}/api/jobs/", None)[0] == 401
    assert _get(f"{dashboard}/api/jobs/", "not-the-token")[0] == 403

    worker_env = {**env, **worker["environment"]}
    agent = [f"--dashboard-agent-listen-port={free_port()}"]
    procs.append(subprocess.Popen(_native(worker["command"], replace, agent), env=worker_env,
                                  start_new_session=True, stdout=open(f"{tmp}/worker.log", "wb"),
                                  stderr=subprocess.STDOUT))
    wait_for(lambda: _alive_nodes(dashboard) == 2, "worker joining the head")
