"""The compose Flower services, run for real: `flower-certs`, `superlink`, `flower-register`, `supernode-<i>`.

Each argv or script comes from `docker-compose config` (so what runs here is what the containers run); only
what Docker would provide is mapped onto this machine: the `/certs` volume becomes a temp folder, the
`superlink` host and 0.0.0.0 become loopback, ports become free ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_compose import SECRETS, _compose
from tests.net import free_port, listening, stop_group, wait_for

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _make_certs(command: list[str], root: Path) -> None:
    """The `flower-certs` one-shot (cluster/flower/make-certs.sh), with /certs mapped to ``root``."""
    argv = [re.sub(r"(?<![\w/])/certs", str(root), a) for a in command]  # the volume root, not certs/certs
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # the SuperLink spawns flower-superexec
    return subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    stop_group(proc, grace_s=20)


def _mapped(argv: list[str], root: Path, port: int) -> list[str]:
    out = [a.replace("/certs/", f"{root}/") for a in argv]
    out = [re.sub(r"^superlink:\d+$", f"127.0.0.1:{port}", a) for a in out]
    out = ["127.0.0.1" if a == "0.0.0.0" else a for a in out]
    out[out.index("--port") + 1] = str(port)
    out[0] = str(BIN / out[0])
    return out


@pytest.mark.slow
def test_flower_services_admit_exactly_the_registered_supernodes(tmp_path):
    from orchard.federated.certs import make_node_keys

    services = yaml.safe_load(_compose("config", env=SECRETS).stdout)["services"]
    root = tmp_path / "certs-volume"
    _make_certs(services["flower-certs"]["command"], root)
    ca = (root / "certs" / "ca.crt").read_bytes()
    _make_certs(services["flower-certs"]["command"], root)  # a restart re-runs the one-shot
    assert (root / "certs" / "ca.crt").read_bytes() == ca  # ... and must not rotate the CA
    make_node_keys(root / "keys", "client_2")  # a key pair that is never registered

    port = free_port()
    superlink_log = tmp_path / "superlink.log"
    argv = _mapped(services["superlink"]["command"], root, port)
    argv[argv.index("--database") + 1] = str(tmp_path / "superlink.db")
    superlink = _start(argv, superlink_log)
    nodes: list[subprocess.Popen] = []
    try:
        wait_for(lambda: listening(port), "SuperLink", superlink_log)
        script = services["flower-register"]["command"][2].replace("$$", "$").replace("/certs/", f"{root}/")
        script = re.sub(r"superlink:\d+", f"127.0.0.1:{port}", script)
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr")}
        outputs = []
        for attempt in ("first start", "restart"):  # a restarted stack re-runs the one-shot: it must pass
            out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, (attempt, out.stdout, out.stderr)
            outputs.append(out.stdout)
        assert outputs[0].count("registered successfully") == 2, outputs[0]
        assert outputs[1].count("already in use") == 2, outputs[1]

        def supernode(i: int) -> subprocess.Popen:
            argv = [a.replace("client_0", f"client_{i}") for a in services["supernode-0"]["command"]]
            argv = _mapped(argv, root, port)
            argv[argv.index("--port") + 1] = str(free_port())  # its own local Runtime API
            return _start(argv, tmp_path / f"supernode-{i}.log")

        nodes = [supernode(0), supernode(2)]
        wait_for(lambda: "Activated node_id" in superlink_log.read_text(), "activated SuperNode", superlink_log)
        time.sleep(5)  # give the unregistered node the same chance to get in
        assert superlink_log.read_text().count("Activated node_id") == 1
    finally:
        for proc in [*nodes, superlink]:
            _stop(proc)
