"""The path filter of the stack's MLflow app (orchard.remote.mlflow_guard), request by request.

The compose service runs it in front of a real MLflow server in tests/cluster/test_mlflow_service.py; here
each rule is shown on its own, including the ASGI body replay that lets MLflow still read a checked body.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from orchard.remote.mlflow_guard import Guard, plain_path_problem, refusal

ART = "/api/2.0/mlflow-artifacts/artifacts"


@pytest.mark.parametrize("path", ["", "model/MLmodel", "plots/learning curve.png", "a/b.c/d..e", "x%20y"])
def test_plain_relative_paths_pass(path):
    assert plain_path_problem(path) is None


@pytest.mark.parametrize("path", ["../x", "a/../../x", "%2e%2e/x", "%252e%252e/x", "..%2fx", "..;/x", "..\\x",
                                  "x#/../x", "x;/y", "/etc/passwd", "file:///etc/passwd", "%2fetc/passwd",
                                  "s3://other/x", "x\x00y"])
def test_climbing_absolute_or_odd_paths_are_refused(path):
    assert plain_path_problem(path) is not None


def test_each_route_checks_its_own_fields():
    assert refusal("GET", f"{ART}/1/run/artifacts/ok.txt", [], None) is None
    assert "artifact path" in refusal("PUT", f"{ART}/..;/planted.txt", [], None)
    assert "path" in refusal("GET", "/get-artifact", [("run_id", "r"), ("path", "../../x")], None)
    assert refusal("GET", "/api/2.0/mlflow/runs/search", [("filter", "tags.a = 'x;y#z'")], None) is None
    create = "/api/2.0/mlflow/experiments/create"
    assert refusal("POST", create, [], {"name": "e"}) is None
    assert refusal("POST", create, [], {"name": "e", "artifact_location": "mlflow-artifacts:/team/e"}) is None
    for loc in ("file:///etc", "/tmp/x", "s3://other-bucket/x", "mlflow-artifacts:/../..", "mlflow-artifacts:/x#/.."):
        assert "artifact_location" in refusal("POST", create, [], {"name": "e", "artifact_location": loc})
    mv = "/ajax-api/2.0/mlflow/model-versions/create"
    for ok in ("runs:/abc123/model", "models:/m-0123", "mlflow-artifacts:/1/models/m-1/artifacts"):
        assert refusal("POST", mv, [], {"name": "m", "source": ok}) is None, ok
    for bad in ("file:///etc", "/etc", "runs:/abc/x#/../../..", "runs:/abc/../../..", "http:///#/../x", ""):
        assert "source" in refusal("POST", mv, [], {"name": "m", "source": bad}), bad


def _call(method: str, path: str, body: bytes = b"", query: bytes = b"") -> tuple[int, bytes, bytes]:
    """Run one request through Guard around an app that echoes the body it reads."""
    seen: list[bytes] = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []
    chunks = [body[:5], body[5:]]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    asyncio.run(Guard(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), b"".join(seen)


def test_the_asgi_guard_refuses_with_mlflows_error_json_and_replays_a_checked_body():
    body = json.dumps({"name": "e", "artifact_location": "file:///etc"}).encode()
    status, data, seen = _call("POST", "/api/2.0/mlflow/experiments/create", body)
    assert status == 400 and seen == b""  # MLflow never saw it
    assert json.loads(data)["error_code"] == "INVALID_PARAMETER_VALUE" and "artifact_location" in json.loads(data)["message"]
    good = json.dumps({"name": "e"}).encode()
    assert _call("POST", "/api/2.0/mlflow/experiments/create", good) == (200, b"ok", good)  # read whole, in two chunks
    assert _call("GET", "/get-artifact", query=b"run_id=r&path=%252e%252e/x")[0] == 400
    assert _call("GET", "/get-artifact", query=b"run_id=r&path=model/MLmodel")[0] == 200
