"""``orchard serve MODEL_URI``: a logged or registered model behind a Ray Serve REST endpoint.

It speaks MLflow's scoring protocol (``POST /invocations`` with ``dataframe_split``, ``dataframe_records``,
``instances`` or ``inputs``; ``GET /ping``), so a client of ``mlflow models serve`` works unchanged. On top of
it: every request is checked against the model's signature before it reaches a replica's batch (a wrong
shape or dtype is a 400 naming the expected one, never a 500), concurrent requests share one forward pass
(``@serve.batch``), and ``--replicas`` scales it out across a Ray cluster.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ray import serve

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")  # MLflow's scoring protocol keys
MAX_BATCH = 64  # requests in one forward pass; a replica accepts 2x that many at once, so a batch can fill
BATCH_WAIT_S = 0.005  # how long a batch waits for company: short, a lone request pays at most this
READY_TIMEOUT_S = 180.0
APP = "orchard"  # the Serve application's name on the cluster


class BadRequest(ValueError):
    """The request does not fit the model's signature: answered with HTTP 400 and this message."""


class BadModel(ValueError):
    """The model URI or address cannot be served (unknown model, no single-tensor signature, port taken): exit 2."""


@dataclass(frozen=True)
class InputSpec:
    """The model's one tensor input, from its logged signature: shape with -1 for any size, and dtype."""

    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("N" if d == -1 else str(d) for d in self.shape)
        return f"({dims}) of {self.dtype}"


def input_spec(model_uri: str, tracking_uri: str) -> InputSpec:
    """Read the signature from the model's MLmodel (no weights loaded): fails before any Ray process starts."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.types.schema import TensorSpec

    mlflow.set_tracking_uri(tracking_uri)
    try:
        signature = mlflow.models.get_model_info(model_uri).signature
    except (MlflowException, OSError) as exc:
        raise BadModel(f"cannot read model {model_uri!r} from {tracking_uri}: {exc}") from exc
    inputs = signature.inputs.inputs if signature is not None and signature.inputs is not None else []
    if len(inputs) != 1 or not isinstance(inputs[0], TensorSpec):
        raise BadModel(f"model {model_uri!r} has no single-tensor input signature (Orchard logs one); "
                       "serve it with `mlflow models serve` instead")
    return InputSpec(tuple(int(d) for d in inputs[0].shape), str(inputs[0].type))


def parse_request(body: bytes, spec: InputSpec) -> np.ndarray:
    """The rows of a scoring-protocol JSON body as an array of the model's dtype; ``BadRequest`` if they do not fit."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    keys = [k for k in FORMATS if k in payload] if isinstance(payload, dict) else []
    if len(keys) != 1:
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise BadRequest(f"the body must be a JSON object with exactly one of {', '.join(FORMATS)}; got {got}")
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or "data" not in data:
            raise BadRequest('dataframe_split must be {"columns": [...], "data": [[...], ...]}')
        data = data["data"]
    elif keys[0] == "dataframe_records":
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise BadRequest("dataframe_records must be a list of {column: value} objects")
        data = [list(r.values()) for r in data]
    try:
        x = np.asarray(data)
    except ValueError as exc:  # ragged rows
        raise BadRequest(f"rows of unequal length; expected shape {spec.describe()}") from exc
    if x.dtype.kind not in "iuf":
        got = {"U": "text", "O": "null or mixed", "b": "boolean"}.get(x.dtype.kind, x.dtype.name)
        raise BadRequest(f"expected numbers ({spec.dtype}), got {got} values; "
                         f"expected shape {spec.describe()}")
    if x.ndim != len(spec.shape) or any(want not in (-1, got) for got, want in zip(x.shape, spec.shape, strict=True)):
        raise BadRequest(f"input shape {tuple(x.shape)} does not match the model's signature: "
                         f"expected shape {spec.describe()}")
    if x.shape[0] == 0:
        raise BadRequest(f"no rows; expected shape {spec.describe()}")
    return x.astype(spec.dtype, copy=False)


@serve.deployment(max_ongoing_requests=2 * MAX_BATCH, ray_actor_options={"num_cpus": 1})
class ModelServer:
    """One replica: the model loaded once through MLflow's pyfunc, answering the scoring protocol."""

    def __init__(self, model_uri: str, tracking_uri: str, spec: InputSpec, threads: int) -> None:
        import mlflow
        import torch

        torch.set_num_threads(threads)  # replicas share the node's cores rather than each taking them all
        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.model_uri, self.spec = model_uri, spec
        self.largest_batch = 0  # requests in the biggest forward pass so far; /health shows it

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        self.largest_batch = max(self.largest_batch, len(batches))
        out = np.asarray(self.model.predict(np.concatenate(batches)))
        return np.split(out, np.cumsum([len(b) for b in batches])[:-1])

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        if path in ("/ping", "/health") and method == "GET":
            if path == "/ping":
                return PlainTextResponse("\n")  # what MLflow's scoring server answers
            return JSONResponse({"status": "ok", "model_uri": self.model_uri, "input": self.spec.describe(),
                                 "largest_batch": self.largest_batch})
        if path != "/invocations":
            return JSONResponse({"error_code": "NOT_FOUND", "message": f"no route {path}"}, status_code=404)
        if method != "POST":
            return JSONResponse({"error_code": "BAD_REQUEST", "message": "POST a JSON body"}, status_code=405)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind != "application/json":
            return JSONResponse({"error_code": "BAD_REQUEST", "message": f"content type {kind!r}: only "
                                 "application/json is served"}, status_code=415)
        try:
            x = parse_request(await request.body(), self.spec)
        except BadRequest as exc:
            return JSONResponse({"error_code": "BAD_REQUEST", "message": str(exc)}, status_code=400)
        return JSONResponse({"predictions": (await self.predict(x)).tolist()})


def serve_model(model_uri: str, tracking_uri: str, *, host: str = "127.0.0.1", port: int = 8000,
                replicas: int = 1, on_ready: Callable[[str, float], None] | None = None) -> None:
    """Serve ``model_uri`` until interrupted (Ctrl-C or SIGTERM); ``on_ready(url, seconds)`` once it answers."""
    import ray

    from orchard.raystart import start_ray

    spec = input_spec(model_uri, tracking_uri)
    _check_port_free(host, port)
    t0 = time.monotonic()
    started = start_ray(min_cpus=replicas)  # each replica reserves one CPU: a small box must still fit them
    # SIGTERM (a supervisor, a test) ends like Ctrl-C, so the replicas and our own Ray go down with us.
    # Set after ray.init, which installs a handler of its own that only logs and dies.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # serve.run restarts Serve with default HTTP options and warns that it keeps ours: noise, not news.
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        serve.start(http_options={"host": host, "port": port})
        threads = max(1, (os.cpu_count() or 1) // replicas)
        app = ModelServer.options(num_replicas=replicas).bind(model_uri, tracking_uri, spec, threads)
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        _wait_until_answers(url)
        if on_ready:
            on_ready(url, time.monotonic() - t0)
        while True:
            time.sleep(1.0)
    finally:
        if started:
            ray.shutdown()  # our own instance: its replicas, proxy and controller go with it
        else:
            serve.delete(APP)  # a shared cluster: remove only our application, not others' Serve apps


def _check_port_free(host: str, port: int) -> None:
    """A taken port would leave Serve's proxy retrying its bind while serve.run waits: refuse it up front."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BadModel(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _wait_until_answers(url: str) -> None:
    import urllib.request

    host = url.replace("://0.0.0.0:", "://127.0.0.1:")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{host}/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the endpoint at {url} did not answer within {READY_TIMEOUT_S:.0f} s") from None
        time.sleep(0.3)
