"""The compose `mlflow` service, run as a real native process: its argv, its environment and the basic-auth
config the image writes, against the machine's PostgreSQL.

Only what needs Docker is swapped: the `postgres` host becomes the test database, the MinIO bucket a temp
folder, the port a free one. What this proves: the password-less backend URI plus ``PGPASSWORD`` reaches
PostgreSQL, the admin user is created from the environment, anonymous calls are refused, and calls that name
the server `mlflow` (as the Ray and Flower containers do) pass MLflow's host check.
"""

from __future__ import annotations

import base64
import json
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


@pytest.fixture(scope="module")
def mlflow_service(tmp_path_factory):
    """One server for this module's tests (a start costs ~25 s here). Yields (port, auth dir); the bucket
    (the artifact root) is ``bucket`` beside the auth dir."""
    from sqlalchemy.engine.url import make_url

    tmp_path = tmp_path_factory.mktemp("mlflow-service")

    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        pytest.fail("`mlflow server --app-name orchard-auth` (MLflow basic auth) needs Flask-WTF: pyproject.toml must depend on "
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
        deadline = time.monotonic() + 300  # a start takes ~25 s alone, minutes on a busy 2-core box
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


# -- hostile input: path traversal against the artifact routes and model-version sources ------------------
# MLflow's published path-traversal / local-file-read advisories (GHSA for CVE-2023-1177, CVE-2023-2780,
# CVE-2023-6909, CVE-2023-6831, CVE-2023-6975, CVE-2023-6976, CVE-2024-1483, CVE-2024-1558, CVE-2024-1594,
# CVE-2024-3848 ...) are all fixed in 2.x releases (the latest of them in 2.12); the pinned server is MLflow
# 3.17.2 (pyproject.toml), above every one. This test does not trust that: it throws the advisories' shapes
# of input at the running compose service and checks what comes back and what lands on disk.
UP = ("../", "%2e%2e/", "%252e%252e/", "..%2f", "..;/", "..\\")


def _raw(port: int, method: str, target: str, body: bytes | None = None, host: str = "localhost",
         auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """One request with the target sent byte for byte: urllib3 would resolve the dot segments itself."""
    import http.client

    headers = {"Host": host, "Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _tree(root: Path, skip: set[Path]) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not any(p == s or s in p.parents for s in skip)}


def _traversal_corpus(base: Path, run_id: str, token: str) -> list[tuple[str, str, bytes | None]]:
    """(method, target, body) tuples; each names a file outside the artifact root ``base/bucket``.

    Depth 1 climbs out of the bucket (the mlflow-artifacts routes' root), depth 4 out of a run's artifact
    folder (``bucket/<experiment>/<run>/artifacts``). Kept to ~140 calls: each one checks a password hash.
    """
    secret = base / "secret.txt"
    rels = [up * depth + "secret.txt" for up in UP for depth in (1, 4)]
    rels += ["x#/../../../../secret.txt", "x;/../../../../secret.txt", "%2e%2e/auth/basic_auth.db"]
    absolute = [str(secret), f"file://{secret}", f"%2f{str(secret)[1:]}"]
    calls: list[tuple[str, str, bytes | None]] = []
    for path in rels + absolute:
        calls += [
            ("GET", f"/get-artifact?run_id={run_id}&path={path}", None),
            ("GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path={path}", None),
            ("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}", None),
            ("GET", f"/api/2.0/mlflow-artifacts/artifacts?path={path}", None),
            ("GET", f"/model-versions/get-artifact?name=traversal&version=1&path={path}", None),
        ]
        dest = path.replace("secret.txt", f"planted-{token}.txt")
        if dest != path:
            calls.append(("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{dest}", token.encode()))
    sources = [f"file://{base}", str(base), f"file:///{base}#", f"file://{base}/bucket#/../..", "file:///etc",
               f"runs:/{run_id}/x#/../../..", f"//{base}", f"http:///#/../../../../../..{base}"]
    sources += [f"mlflow-artifacts:/{up * 2}" for up in UP[:4]] + [f"runs:/{run_id}/{up * 4}" for up in UP[:2]]
    for i, source in enumerate(sources):
        # CVE-2024-1483 / CVE-2024-3848: an experiment whose artifact root is outside the bucket.
        body = json.dumps({"name": f"traversal-{token[:6]}-{i}", "artifact_location": source}).encode()
        calls.append(("POST", "/api/2.0/mlflow/experiments/create", body))
        # CVE-2023-1177 and its bypasses: a model version whose source is outside the bucket.
        body = json.dumps({"name": "traversal", "source": source, "run_id": run_id}).encode()
        calls.append(("POST", "/api/2.0/mlflow/model-versions/create", body))
    return calls


@pytest.mark.slow
def test_compose_mlflow_service_refuses_a_path_traversal_corpus_and_reads_no_byte_outside_its_root(
        mlflow_service, monkeypatch):
    from mlflow.tracking import MlflowClient

    port, auth_dir = mlflow_service
    base = auth_dir.parent
    admin = ("admin", SECRETS["MLFLOW_ADMIN_PASSWORD"])
    token = uuid.uuid4().hex
    (base / "secret.txt").write_text(f"ORCHARD-SECRET-{token}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    client = MlflowClient(f"http://localhost:{port}")
    exp = client.create_experiment(f"traversal-{token[:6]}")
    run_id = client.create_run(exp).info.run_id
    client.log_text(run_id, "inside the root", "ok.txt")
    client.create_registered_model("traversal")
    client.create_model_version("traversal", f"runs:/{run_id}/ok.txt", run_id)  # version 1, a legal one
    assert _raw(port, "GET", f"/get-artifact?run_id={run_id}&path=ok.txt", auth=admin) == (200, b"inside the root")

    skip = {base / "bucket", auth_dir, base / "mlflow.log"}
    before = _tree(base, skip)
    calls = _traversal_corpus(base, run_id, token)
    accepted, leaked = [], []
    for method, target, body in calls:
        status, data = _raw(port, method, target, body, auth=admin)
        if not 400 <= status < 500:
            accepted.append((status, method, target, body))
        if token.encode() in data or b"SQLite format 3" in data:
            leaked.append((method, target, body))
    # Whatever got through must still serve nothing from outside: read through it the legal way.
    for exp_ in client.search_experiments(filter_string=f"name LIKE 'traversal-{token[:6]}-%'"):
        rid = client.create_run(exp_.experiment_id).info.run_id
        uri = client.get_run(rid).info.artifact_uri
        if uri.startswith("mlflow-artifacts:"):  # the server writes these: one upload, where it lands is checked below
            path = uri.split(":", 1)[1].lstrip("/")
            _raw(port, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{path}/probe-{token}.txt", token.encode(), auth=admin)
        for target in (f"/api/2.0/mlflow/artifacts/list?run_id={rid}", f"/get-artifact?run_id={rid}&path=../../secret.txt"):
            status, data = _raw(port, "GET", target, auth=admin)
            if token.encode() in data or b'"secret.txt"' in data:
                leaked.append(("GET", target, exp_.artifact_location))
    for v in client.search_model_versions("name='traversal'"):
        status, data = _raw(port, "GET", f"/model-versions/get-artifact?name=traversal&version={v.version}"
                                         "&path=secret.txt", auth=admin)
        if token.encode() in data:
            leaked.append(("GET", f"version {v.version}", v.source))
    refused = len(calls) - len(accepted)
    print(f"path traversal: {refused}/{len(calls)} attempts refused; accepted: {accepted}")
    assert _raw(port, "GET", f"/get-artifact?run_id={run_id}&path=ok.txt", auth=admin) == (200, b"inside the root")
    assert not leaked, leaked
    assert _tree(base, skip) == before, "a file outside the artifact root was created or changed"
    escaped = [p for d in (base.parent, *base.parents[1:3]) for p in d.glob(f"**/*{token}*" if d == base.parent
                                                                         else f"*{token}*")]
    assert not [p for p in escaped if base / "bucket" not in p.parents], "an upload landed outside the root"
    # Stock MLflow 3.17.2 lets 29 of these through (`..;/x`, `..<backslash>x` and `x#/../x` name files inside
    # its root; experiments/create takes any artifact_location by design); the stack's orchard-auth app
    # (orchard.remote.mlflow_guard) refuses every one before MLflow sees it.
    assert not accepted, accepted
    # A foreign Host is refused even with valid credentials and a legal path (DNS rebinding).
    assert _raw(port, "GET", f"/get-artifact?run_id={run_id}&path=ok.txt", host="evil.example",
                auth=admin)[0] in (400, 403)
