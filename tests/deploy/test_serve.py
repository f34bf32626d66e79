"""Registry and serving: a real model logged the way a run logs it, registered, promoted, served over HTTP.

One model and one pair of servers for the module: ``orchard serve`` (Ray Serve, its own local Ray) and
``mlflow models serve`` start together, as real subprocesses on free ports, and are talked to with urllib.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import orchard
from orchard.cli import main
from orchard.config import JobSpec
from orchard.data.manifest import read_head, read_split
from orchard.deploy.registry import promote
from orchard.runner import _register
from orchard.tracking import JobRun
from tests.net import free_port, listening, stop_group, wait_for

pytestmark = pytest.mark.slow

NAME = "digits-mlp"
START_S = 240.0  # a loaded 2-core box took ~60 s before Ray Serve's first answer


def _tiny_mlp(prepared) -> torch.nn.Module:
    x, y = (torch.from_numpy(a) for a in read_split(prepared, "train"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):  # full batch: ~0.95 test accuracy in well under a second
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits_prepared):
    """A model logged by ``JobRun.log_model`` and registered by the runner's own ``_register``, v1 = champion."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = JobSpec(name="serve-test", kind="train", tracking={"uri": uri, "register": NAME})
    model = _tiny_mlp(digits_prepared)
    x_test, y_test = read_split(digits_prepared, "test")
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    accuracy = float((expected.argmax(1) == y_test).mean())
    job = JobRun(spec)
    model_uri = job.log_model(model, read_head(digits_prepared, "test", 4))
    job.finish()
    version_uri = _register(job, spec, model_uri, SimpleNamespace(test={"test/accuracy": accuracy}))
    promote(uri, NAME, "1", "champion")
    return SimpleNamespace(uri=uri, root=root, run_id=job.run_id, model_uri=model_uri, version_uri=version_uri,
                           x=x_test, expected=expected, accuracy=accuracy)


def _env(uri: str) -> dict[str, str]:
    platform_dir = str(Path(orchard.__file__).resolve().parents[1])
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv
    # (CI runs the tests with the venv's python but without its bin on PATH).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": platform_dir, "MLFLOW_TRACKING_URI": uri, "PATH": path}


@pytest.fixture(scope="module")
def servers(registered):
    """``orchard serve models:/NAME@champion`` and ``mlflow models serve`` on the same URI, started together."""
    ours, theirs = free_port(), free_port()
    uri = f"models:/{NAME}@champion"
    logs = registered.root / "orchard-serve.log", registered.root / "mlflow-serve.log"
    cmds = ([sys.executable, "-m", "orchard.cli", "serve", uri, "--port", str(ours), "--tracking-uri", registered.uri],
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "-p", str(theirs), "-h", "127.0.0.1", "-w", "1"])
    procs = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(registered.uri),
                              start_new_session=True) for cmd, log in zip(cmds, logs, strict=True)]
    try:
        ready = f"at http://127.0.0.1:{ours}/invocations"
        wait_for(lambda: ready in logs[0].read_text() or procs[0].poll() is not None, "orchard serve", logs[0], START_S)
        assert procs[0].poll() is None, logs[0].read_text()[-3000:]
        wait_for(lambda: listening(theirs), "mlflow models serve", logs[1], START_S)
        yield SimpleNamespace(ours=f"http://127.0.0.1:{ours}", theirs=f"http://127.0.0.1:{theirs}",
                              proc=procs[0], log=logs[0])
    finally:
        stop_group(*procs)


def _post(url: str, body, timeout: float = 60.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read()


def test_register_tags_the_version_with_test_metrics_and_promote_moves_the_alias(registered, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(registered.uri)
    assert registered.version_uri == f"models:/{NAME}/1"
    v1 = client.get_model_version(NAME, "1")
    assert v1.run_id == registered.run_id
    assert float(v1.tags["test/accuracy"]) == pytest.approx(registered.accuracy) and registered.accuracy > 0.8
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    again = JobSpec(name="serve-test", kind="train", tracking={"uri": registered.uri, "register": NAME})
    job = SimpleNamespace(uri=registered.uri)
    assert _register(job, again, registered.model_uri, SimpleNamespace(test={"test/f1": 0.5})) == f"models:/{NAME}/2"
    assert main(["promote", NAME, "2", "--alias", "champion", "--tracking-uri", registered.uri]) == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    capsys.readouterr()
    assert main(["promote", "no-such-model", "1", "--tracking-uri", registered.uri]) == 2
    assert "no-such-model" in capsys.readouterr().out
    assert main(["promote", NAME, "9", "--tracking-uri", registered.uri]) == 2
    out = capsys.readouterr().out
    assert "no version '9'" in out and "1, 2" in out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"  # a refused promote moves nothing


def test_register_needs_a_valid_name_and_a_logged_model():
    from orchard.config import SpecError, validate_spec

    with pytest.raises(SpecError, match="tracking.register"):
        validate_spec({"name": "x", "kind": "train", "tracking": {"register": "a/b"}})
    with pytest.raises(SpecError, match="log_model"):
        validate_spec({"name": "x", "kind": "train", "tracking": {"register": "ok", "log_model": False}})


def test_serve_refuses_an_unknown_model_or_a_taken_port_before_starting_ray(registered, capsys):
    assert main(["serve", f"models:/{NAME}/7", "--tracking-uri", registered.uri]) == 2
    assert f"models:/{NAME}/7" in capsys.readouterr().out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", registered.version_uri, "--port", str(port), "--tracking-uri", registered.uri]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["dataframe_split", "instances", "inputs"])
def test_serve_answers_each_scoring_format_with_the_models_own_predictions(servers, registered, shape):
    rows = registered.x[:5]
    body = {shape: {"columns": [f"pixel_{i}" for i in range(64)], "data": rows.tolist()}
            if shape == "dataframe_split" else rows.tolist()}
    status, answer = _post(servers.ours, body)
    assert status == 200
    np.testing.assert_allclose(np.array(answer["predictions"]), registered.expected[:5], atol=1e-5)


@pytest.mark.parametrize(("body", "message"), [
    ({"inputs": [[0.0] * 10]}, "expected shape (N, 64) of float32"),
    ({"instances": [[0.0] * 64, [0.0] * 63]}, "expected shape (N, 64)"),
    ({"inputs": [["a"] * 64]}, "got text values"),
    ({"rows": [[0.0] * 64]}, "exactly one of"),
    (b"not json", "not JSON"),
])
def test_serve_refuses_input_that_does_not_fit_the_signature_with_400(servers, body, message):
    status, answer = _post(servers.ours, body)
    assert status == 400 and answer["error_code"] == "BAD_REQUEST"
    assert message in answer["message"]


def test_serve_answers_16_concurrent_requests_each_with_its_own_rows(servers, registered):
    def ask(i: int) -> np.ndarray:
        status, answer = _post(servers.ours, {"inputs": registered.x[i: i + 1 + i % 3].tolist()})
        assert status == 200
        return np.array(answer["predictions"])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got, registered.expected[i: i + 1 + i % 3], atol=1e-5)
    status, health = _get(f"{servers.ours}/health")
    assert status == 200 and json.loads(health)["largest_batch"] > 1  # @serve.batch joined some of them


def test_serve_health_and_ping_answer(servers):
    status, body = _get(f"{servers.ours}/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["input"] == "(N, 64) of float32"
    assert health["model_uri"] == f"models:/{NAME}@champion"
    assert _get(f"{servers.ours}/ping")[0] == 200


def test_mlflow_models_serve_answers_the_same_uri(servers, registered):
    status, answer = _post(servers.theirs, {"inputs": registered.x[:3].tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(answer["predictions"]), registered.expected[:3], atol=1e-5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_stops_orchard_serve_and_its_own_ray(servers):
    os.kill(servers.proc.pid, signal.SIGTERM)  # the command only: it must take its replicas and Ray down itself
    assert servers.proc.wait(60) == 0, servers.log.read_text()[-3000:]
    # nothing of its process group (Ray's daemons, the replica) outlives it
    wait_for(lambda: not _group_alive(servers.proc.pid), "exit of orchard serve's Ray processes", timeout_s=30)
