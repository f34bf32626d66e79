"""The compose `mlflow` service, run as a real native process: its argv, its environment and the basic-auth
config the image writes, against the machine's PostgreSQL.

Only what needs Docker is swapped: the `postgres` host becomes the test database, the MinIO bucket a temp
folder, the port a free one. What this proves: the password-less backend URI plus ``PGPASSWORD`` reaches
PostgreSQL, the admin user is created from the environment, anonymous calls are refused, and calls that name
the server `mlflow` (as the Ray and Flower containers do) pass MLflow's host check.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_compose import SECRETS, _compose
from tests.net import free_port, stop_group

ROOT = Path(__file__).resolve().parents[2]
PG_URI = os.environ.get("ORCHARD_TEST_PG_URI", "postgresql://orchard:orchard@127.0.0.1:5432/orchard")


def _image_auth_ini(auth_dir: Path) -> str:
    """The basic-auth config the Dockerfile's mlflow stage writes, with its store moved to ``auth_dir``."""
    text = (ROOT / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "basic_auth.ini" in x and "printf" in x)
    words = shlex.split(line[line.index("printf"):].split(">")[0])
    return "\n".join(words[2:]).replace("/var/lib/mlflow", str(auth_dir)) + "\n"


def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_URI)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _call(port: int, path: str, host: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


@pytest.fixture
def mlflow_service(tmp_path):
    from sqlalchemy.engine.url import make_url

    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        pytest.fail("`mlflow server --app-name basic-auth` needs Flask-WTF: pyproject.toml must depend on "
                    "mlflow[auth] (constraints: Flask-WTF==1.3.0, WTForms==3.3.2); then `make install`")
    svc = yaml.safe_load(_compose("config", env=SECRETS).stdout)["services"]["mlflow"]
    argv, env = list(svc["command"]), dict(svc["environment"])
    pg = make_url(PG_URI)
    database = f"orchard_test_{uuid.uuid4().hex[:10]}"
    try:
        _pg_admin(f"CREATE DATABASE {database}")
    except Exception as exc:  # noqa: BLE001 - the message must say how to get PostgreSQL
        pytest.fail(f"PostgreSQL at {PG_URI} is not reachable ({exc}): `make services` starts it")

    backend = make_url(argv[argv.index("--backend-store-uri") + 1])
    assert backend.password is None  # the compose URI must not carry the password
    argv[argv.index("--backend-store-uri") + 1] = backend.set(
        host=pg.host, port=pg.port, username=pg.username, database=database).render_as_string(hide_password=False)
    argv[argv.index("--artifacts-destination") + 1] = str(tmp_path / "bucket")
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[0] = str(Path(sys.executable).with_name("mlflow"))

    (tmp_path / "auth").mkdir()
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(_image_auth_ini(tmp_path / "auth"))
    assert env["PGPASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    env["PGPASSWORD"] = pg.password  # the wiring is compose's; the value is this machine's database
    env = {**os.environ, **env, "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    log = tmp_path / "mlflow.log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # the server forks workers: stop the whole group
    try:
        deadline = time.monotonic() + 120
        while _call(port, "/health", "localhost") != 200:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield port, tmp_path / "auth"
    finally:
        stop_group(proc)
        _pg_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.mark.slow
def test_compose_mlflow_service_serves_authenticated_calls_from_the_stack(mlflow_service):
    port, auth_dir = mlflow_service
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    admin = ("admin", SECRETS["MLFLOW_ADMIN_PASSWORD"])
    assert _call(port, search, "mlflow:5000") == 401
    assert _call(port, search, "mlflow:5000", "admin", "wrong-password-123") == 401
    assert _call(port, search, "mlflow:5000", *admin) == 200
    # A Host the server was not told about is refused even with valid credentials (DNS-rebinding guard).
    assert _call(port, search, "evil.example:5000", *admin) in (400, 403)
    # The user store lives where the image's config puts it: the mlflow-state volume.
    assert (auth_dir / "basic_auth.db").is_file()


def _auth_config_module():
    # mlflow.server.auth's package __init__ needs Flask-WTF; its config reader alone does not.
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_auth_config_reads_back_as_mlflow_expects(tmp_path, monkeypatch):
    read_auth_config = _auth_config_module().read_auth_config
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(_image_auth_ini(Path("/var/lib/mlflow")))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SECRETS["MLFLOW_ADMIN_PASSWORD"])
    cfg = read_auth_config()
    assert cfg.database_uri == "sqlite:////var/lib/mlflow/basic_auth.db"
    assert (cfg.admin_username, cfg.admin_password) == ("admin", SECRETS["MLFLOW_ADMIN_PASSWORD"])
    assert re.fullmatch(r"READ|EDIT|MANAGE|NO_PERMISSIONS", cfg.default_permission)
