"""docker-compose.yml, checked with the real `docker-compose config` (no Docker daemon needed).

The stack's commands must be the argv that ``orchard.remote.services`` builds, because the integration tests
prove those argv as native processes; here each compose command is compared with the function's output.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orchard.remote import services

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

# The secrets compose refuses to start without (``${VAR:?message}``), with values that pass MLflow's and
# MinIO's length rules. Distinct values let a test tell which one landed where.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-0001",
    "MINIO_ROOT_PASSWORD": "minio-secret-0002",
    "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-0003",
    "MLFLOW_FLASK_SECRET_KEY": "flask-key-0004",
    "RAY_AUTH_TOKEN": "ray-token-0005",
}

# Each long-running service's command, as services.py builds it from the values the stack uses.
EXPECTED_COMMANDS = {
    "mlflow": lambda: services.mlflow_server(
        "postgresql+psycopg2://mlflow@postgres:5432/mlflow", "s3://mlflow/", host="0.0.0.0", port=5000, basic_auth=True),
    "ray-head": lambda: services.ray_head(port=6379, dashboard_host="0.0.0.0", dashboard_port=8265),
    "ray-worker": lambda: services.ray_worker("ray-head:6379"),
    "superlink": lambda: services.superlink("/certs/certs", "0.0.0.0:9093", database="/var/lib/flower/superlink.db"),
    "supernode-0": lambda: services.supernode("superlink:9093", "/certs/certs", "/certs/keys", 0, 2,
                                              data_dir="/var/lib/orchard/nodes/node-0"),
    "supernode-1": lambda: services.supernode("superlink:9093", "/certs/certs", "/certs/keys", 1, 2,
                                              data_dir="/var/lib/orchard/nodes/node-1"),
}
SERVICE_PROGRAMS = {"mlflow", "ray", "flower-superlink", "flower-supernode"}
ONE_SHOT = {"minio-init", "flower-certs", "flower-data", "flower-register"}  # run to completion; no healthcheck to wait on
RAY_SERVICES = ("ray-head", "ray-worker")


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `make test-sysdeps` installs it (Debian's docker-compose)")
    # A clean environment, so secrets exported in the developer's shell cannot make a test pass.
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(ROOT)}
    return subprocess.run([exe, "-f", str(COMPOSE), *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The stack as compose resolves it (variables substituted, anchors merged)."""
    out = _compose("config", env=SECRETS)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_validates_when_the_secrets_are_set():
    out = _compose("config", "-q", env=SECRETS)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_an_unset_secret_is_an_error_naming_the_variable(missing):
    out = _compose("config", "-q", env={k: v for k, v in SECRETS.items() if k != missing})
    assert out.returncode != 0
    assert missing in out.stderr


def test_service_commands_are_the_services_module_argv(resolved):
    for name, build in EXPECTED_COMMANDS.items():
        assert resolved["services"][name]["command"] == build(), name


def test_every_service_process_is_covered_by_the_command_check(resolved):
    # A new Ray/Flower/MLflow service added to compose must also be added to EXPECTED_COMMANDS.
    running = {name for name, svc in resolved["services"].items()
               if isinstance(svc.get("command"), list) and svc["command"][0] in SERVICE_PROGRAMS}
    assert running == set(EXPECTED_COMMANDS)


def test_host_ports_are_published_on_loopback_only(resolved):
    published = []
    for name, svc in resolved["services"].items():
        for port in svc.get("ports", []):
            # docker-compose 1.29 writes "HOST_IP:HOST:CONTAINER/proto"; newer ones write a mapping.
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
            published.append(name)
    assert {"mlflow", "ray-head"} <= set(published)


def test_state_lives_in_named_volumes(resolved):
    named = set(resolved["volumes"])
    wanted = {"postgres": "/var/lib/postgresql/data", "minio": "/data", "mlflow": "/var/lib/mlflow",
              "superlink": "/var/lib/flower"}
    for name, target in wanted.items():
        mounts = [str(v).split(":") for v in resolved["services"][name]["volumes"]]
        assert any(src in named and dst == target for src, dst, *_ in mounts), f"{name}: {mounts}"


def test_long_running_services_have_healthchecks(resolved):
    for name, svc in resolved["services"].items():
        if name in ONE_SHOT:
            assert svc.get("restart") in (None, "no"), name
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name


def test_ray_services_use_token_auth_with_the_given_token(resolved):
    for name in RAY_SERVICES:
        env = resolved["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"], name


def test_mlflow_service_runs_with_the_stacks_server_environment(resolved):
    env = resolved["services"]["mlflow"]["environment"]
    assert {k: env.get(k) for k in services.MLFLOW_SERVER_ENV} == services.MLFLOW_SERVER_ENV


def test_mlflow_server_gets_its_secrets_from_the_environment(resolved):
    mlflow = resolved["services"]["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRETS["MLFLOW_ADMIN_PASSWORD"]
    assert env["PGPASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
    # No password in the argv, where `ps` and `docker inspect` would show it.
    assert not any(secret in arg for secret in SECRETS.values() for arg in mlflow["command"])
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert resolved["services"]["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
