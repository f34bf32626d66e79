"""The serving bench's load generator and table, against a real loopback HTTP server (no model servers)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchard.bench.serve import CONCURRENCY, _load, _results

DELAY_S = 0.02


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the bench's clients use
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(DELAY_S)
        out = json.dumps({"predictions": [[float(len(body["inputs"][0]))]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_load_counts_requests_after_the_warmup_and_latency_reflects_the_server(server):
    body = json.dumps({"inputs": [[0.0] * 64]}).encode()
    rate1, p50, p99 = _load(server, body, 1, 1.0, warmup_s=0.3)
    # One client, back to back, each request >= 20 ms: at most 50 per second, and close to it.
    assert 20 <= rate1 <= 1 / DELAY_S
    assert DELAY_S * 1000 <= p50 <= p99 < 1000
    rate4, _, _ = _load(server, body, 4, 1.0, warmup_s=0.3)
    assert rate4 > 2 * rate1  # a threaded server answers 4 clients at once


def test_a_failing_server_is_reported_not_averaged(server):
    with pytest.raises(RuntimeError, match="failed"):
        _load(server + 1 if server < 65535 else server - 1, b"{}", 1, 0.2, warmup_s=0.0)


def test_table_has_a_ratio_over_the_mlflow_server_with_its_spread():
    ours, theirs = "orchard serve (Ray Serve, 1 replica)", "mlflow models serve (1 worker)"
    figures = {(ours, c): [(50.0, 10.0, 30.0), (70.0, 12.0, 40.0)] for c in CONCURRENCY}
    figures |= {(theirs, c): [(100.0, 5.0, 9.0), (100.0, 6.0, 11.0)] for c in CONCURRENCY}
    rows = _results(figures, 2)
    first = rows[0]
    assert first.case.startswith(ours) and first.ratio == pytest.approx(0.6) and first.spread == [0.5, 0.7]
    p99 = next(r for r in rows if r.case.startswith(theirs) and r.metric == "p99 latency")
    assert p99.value == pytest.approx(10.0) and p99.spread == [9.0, 11.0]
    assert len(rows) == 3 * 2 * len(CONCURRENCY)
