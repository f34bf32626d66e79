"""MLflow's own dashboard, rendered in headless Chromium, shows an Orchard job the way a new user needs it.

MLflow 3.17 opens an experiment on its GenAI overview (traces, tokens, an assistant) unless told it holds
model training; the run page shows "No description" and no source unless the run carries them.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cli.test_cli import ROOT, orchard
from tests.net import free_port
from tests.tracking.browser import Browser, chromium_binary

pytestmark = pytest.mark.slow

GENAI_OVERVIEW = ("Token Usage", "Cost Breakdown", "Tokens per Trace")  # what the GenAI overview shows


def _ui_links(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[list[str], dict[str, str]]:
    """Read ``orchard ui``'s output until it lists the experiments' links; returns (lines, name → link)."""
    lines, links, deadline = [], {}, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("    ") and ": http" in line:
            name, link = line.strip().split(": ", 1)
            links[name] = link
            break
    return lines, links


def test_an_orchard_experiment_opens_in_the_training_view_with_a_described_run(tmp_path):
    if chromium_binary() is None:
        pytest.skip("no chromium binary on PATH: `make test-sysdeps` installs Debian's chromium")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = orchard("run", str(ROOT / "jobs/breast-cancer-mlp.yaml"), "--set", "train.epochs=2", cwd=tmp_path,
                  env_extra={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("breast-cancer-mlp")
    (run,) = client.search_runs([exp.experiment_id])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert "breast-cancer-mlp.yaml" in run.data.tags["mlflow.source.name"]

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchard.cli", "ui", "--port", str(port), "--backend-store-uri", uri],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        lines, links = _ui_links(ui)
        assert "breast-cancer-mlp" in links, "\n".join(lines)
        with Browser(tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
            browser.open(links["breast-cancer-mlp"])
            runs = browser.wait_for_text("Run Name", run.info.run_name)
            assert not [t for t in GENAI_OVERVIEW if t in runs], f"GenAI overview shown:\n{runs[:2000]}"
            assert "/runs?" in browser.url() and "workflowType=machine_learning" in browser.url()
            browser.screenshot(tmp_path / "dashboard.png")

            browser.open(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                         "?workflowType=machine_learning")
            page = browser.wait_for_text("Description", "result: test accuracy")
            assert "No description" not in page
            assert re.search(r"breast-cancer-mlp: Orchard train job", page), page[-3000:]
            assert re.search(r"model: mlp, [\d,]+ parameters", page) and re.search(r"test accuracy 0\.\d{4}", page)
            assert "breast-cancer-mlp.yaml" in page  # the Source row
            browser.call("Runtime.evaluate", expression="[...document.querySelectorAll('li,p,span,div')]"
                         ".find(e => e.textContent.startsWith('result: test'))?.scrollIntoView()")
            browser.screenshot(tmp_path / "run.png")
        if os.environ.get("ORCHARD_SCREENSHOT_DIR"):  # to look at the rendering by eye
            for png in ("dashboard.png", "run.png"):
                shutil.copy(tmp_path / png, Path(os.environ["ORCHARD_SCREENSHOT_DIR"]) / png)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
