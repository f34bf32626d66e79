"""The stack's MLflow server app: MLflow's basic auth behind a filter that refuses path-traversal input.

``mlflow server --app-name orchard-auth`` (the compose service) loads :func:`create_app` through the
``mlflow.app`` entry point in pyproject.toml. MLflow 3.17 already refuses ``../`` and absolute paths in its
artifact routes, but it accepts requests that only look harmless once you know how each layer reads them:
``..;/x`` and ``..\\x`` are plain file names on POSIX, ``x#/../../x`` is cut at ``#``, and
``experiments/create`` takes any ``artifact_location`` (``file:///etc``, another bucket) by design. A
shared tracking server should not have to be right about every one of those, so this filter refuses them
all before MLflow (or its password check) sees the request:

- artifact paths (the ``mlflow-artifacts`` URL path, and the ``path`` / ``artifact_path`` query or JSON
  values of every route) must be plain relative paths: no ``..`` segment, no leading ``/``, no URI scheme,
  no ``\\``, ``;``, ``#`` or NUL, after decoding percent-escapes as many times as a layer below might;
- ``experiments/create`` may only omit ``artifact_location`` (the server's artifact root) or name a
  plain path below it (``mlflow-artifacts:/...``);
- ``model-versions/create`` takes a ``source`` of ``runs:/``, ``models:/`` or ``mlflow-artifacts:/`` with
  a plain path, nothing else (no ``file:``, no absolute or remote location).

A refused request gets ``400`` with MLflow's error JSON (``INVALID_PARAMETER_VALUE``) naming the field.
The server must parse requests with uvicorn's h11 implementation (``--uvicorn-opts "--http h11"``, as
``orchard.remote.services.mlflow_server`` starts it): httptools drops whatever follows a ``#`` in the
request target, so ``x#/../../secret`` would reach this filter (and MLflow) as a harmless ``x``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

APP_NAME = "orchard-auth"  # the entry point name: `mlflow server --app-name orchard-auth`
ARTIFACT_ROUTES = ("/api/2.0/mlflow-artifacts/artifacts", "/ajax-api/2.0/mlflow-artifacts/artifacts")
PATH_KEYS = ("path", "artifact_path")
MAX_BODY = 1 << 20  # the JSON bodies checked here are a few hundred bytes; larger ones are refused
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SOURCE_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def _decoded(value: str) -> str:
    """Percent-decoded until stable (``%252e`` → ``%2e`` → ``.``), at most a few rounds."""
    for _ in range(4):
        nxt = unquote(value)
        if nxt == value:
            break
        value = nxt
    return value


def plain_path_problem(value: str) -> str | None:
    """Why ``value`` is not a plain relative path below a root, or None if it is one ('' is the root)."""
    v = _decoded(value)
    if any(c in v for c in "\\;#\x00"):
        return "contains one of \\ ; # or NUL"
    if v.startswith("/") or _SCHEME.match(v):
        return "is absolute or carries a URI scheme"
    if ".." in v.split("/"):
        return "climbs out of its root with '..'"
    return None


def _source_problem(source: str, scheme_ok: tuple[str, ...]) -> str | None:
    v = _decoded(source)
    scheme = next((s for s in scheme_ok if v.startswith(s)), None)
    if scheme is None:
        return f"must start with one of {', '.join(scheme_ok)}"
    return plain_path_problem(v[len(scheme):].lstrip("/"))


def refusal(method: str, path: str, query: Iterable[tuple[str, str]], body: dict[str, Any] | None) -> str | None:
    """The reason to refuse this request, or None to pass it on. ``path`` is the decoded URL path."""
    for route in ARTIFACT_ROUTES:
        if path == route or path.startswith(route + "/"):
            if problem := plain_path_problem(path[len(route):].lstrip("/")):
                return f"artifact path {problem}"
    fields = list(query) + [(k, v) for k, v in (body or {}).items() if isinstance(v, str)]
    for key, value in fields:
        if key in PATH_KEYS and (problem := plain_path_problem(value)):
            return f"{key} {problem}"
    if method == "POST" and body is not None:
        if path.endswith("/experiments/create") and (loc := body.get("artifact_location")):
            if problem := _source_problem(str(loc), ("mlflow-artifacts:/",)):
                return f"artifact_location {problem}: experiments live under the server's artifact root"
        if path.endswith("/model-versions/create"):
            if problem := _source_problem(str(body.get("source") or ""), _SOURCE_SCHEMES):
                return f"source {problem}"
    return None


def _needs_body(method: str, path: str) -> bool:
    return method == "POST" and path.endswith(("/experiments/create", "/model-versions/create"))


def _error(message: str) -> bytes:
    return json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": f"refused: {message}"}).encode()


class Guard:
    """ASGI middleware (uvicorn, MLflow's default server) applying :func:`refusal` in front of ``app``."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        body, chunks = None, []
        if _needs_body(method, path):
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > MAX_BODY:
                    await self._refuse(send, "request body too large", 413)
                    return
            try:
                body = json.loads(b"".join(chunks) or b"{}")
            except ValueError:
                body = None  # not JSON: MLflow's own parser answers it
            if not isinstance(body, dict):
                body = None
        if reason := refusal(method, path, query, body):
            await self._refuse(send, reason)
            return
        if chunks:
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_again() -> dict:
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_again, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send: Callable, reason: str, status: int = 400) -> None:
        data = _error(reason)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _flask_guard() -> Any:
    """The same filter as a Flask ``before_request`` hook (gunicorn or waitress serve Flask directly)."""
    from flask import Response, request

    def check() -> Response | None:
        body = request.get_json(silent=True) if _needs_body(request.method, request.path) else None
        reason = refusal(request.method, request.path, request.args.items(multi=True),
                         body if isinstance(body, dict) else None)
        return Response(_error(reason), status=400, mimetype="application/json") if reason else None

    return check


def _bootstrap_admin_once() -> None:
    """What ``mlflow server`` does for ``basic-auth`` before it forks workers, done here under a file lock:
    create the auth store and its admin user once, so workers only open the store."""
    from mlflow.server.auth import auth_config, bootstrap_admin_user

    key = hashlib.sha256(auth_config.database_uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"orchard-auth-{key}.lock", "a") as lock:  # the workers of one server
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            bootstrap_admin_user()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    os.environ["_MLFLOW_AUTH_ADMIN_BOOTSTRAPPED"] = "true"


def create_app() -> Any:
    """The ``orchard-auth`` app: ``mlflow.server.auth.create_app`` wrapped by :class:`Guard`."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth_app

    if os.environ.get("_MLFLOW_AUTH_ADMIN_BOOTSTRAPPED") != "true":
        _bootstrap_admin_once()
    flask_app.before_request_funcs.setdefault(None, []).insert(0, _flask_guard())
    app = basic_auth_app(flask_app)
    return app if app is flask_app else Guard(app)
