"""A headless Chromium driven over the DevTools protocol: open a page, wait for its text, take a screenshot.

Chromium's one-shot ``--dump-dom --virtual-time-budget`` mode hangs on MLflow's single-page app (it keeps
requests open), so the tests drive a real browser and wait, in real time, for what they look for.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.net import free_port, wait_for

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,900"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One headless Chromium with one page; use as a context manager (the process ends on exit)."""

    def __init__(self, profile: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={self.port}", "about:blank"],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        self._ws = None

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        wait_for(self._page_target, "Chromium DevTools endpoint", self.log, timeout_s=60)
        self._ws = connect(self._page_target(), max_size=64 * 2**20, open_timeout=30)
        self.call("Page.enable")
        return self

    def __exit__(self, *exc) -> None:
        if self._ws is not None:
            self._ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _page_target(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                targets = json.load(r)
        except OSError:
            return None
        return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

    def call(self, method: str, **params):
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        res = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True)
        return res.get("result", {}).get("value") or ""

    def url(self) -> str:
        return self.call("Runtime.evaluate", expression="location.href", returnByValue=True)["result"]["value"]

    def wait_for_text(self, *needles: str, timeout_s: float = 120.0) -> str:
        """The page's visible text once it contains every needle; fails with what it shows instead."""
        deadline, text = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(1.0)
        raise AssertionError(f"page never showed {needles} within {timeout_s:.0f} s; it shows:\n{text[:3000]}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
