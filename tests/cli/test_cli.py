"""The `orchard` command as a user runs it: exit codes, refusals before compute, the full tracked path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def orchard(*args, cwd: Path, env_extra: dict | None = None, timeout: int = 900):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "orchard.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_lists_the_verbs(tmp_path):
    out = orchard("--help", cwd=tmp_path)
    assert out.returncode == 0
    for verb in ("run", "prep", "demo", "ui", "check"):
        assert verb in out.stdout


def test_a_typo_exits_2_naming_the_key_and_creates_no_run(tmp_path):
    spec = yaml.safe_load((ROOT / "jobs/digits-cnn.yaml").read_text())
    spec["train"]["lerning_rate"] = 0.1
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec))
    db = tmp_path / "mlflow.db"
    out = orchard("run", str(path), cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "train.lerning_rate: unknown key" in out.stdout
    assert not db.exists()  # no MLflow store touched, so no run
    assert not (tmp_path / ".orchard").exists()  # and no data prepared


def test_a_bad_override_exits_2(tmp_path):
    out = orchard("run", str(ROOT / "jobs/digits-cnn.yaml"), "--set", "train.epochs=-1", cwd=tmp_path)
    assert out.returncode == 2
    assert "train.epochs" in out.stdout


def test_an_energy_country_outside_codecarbons_table_exits_2_before_any_compute(tmp_path):
    out = orchard("run", str(ROOT / "jobs/digits-cnn.yaml"), "--set", "tracking.energy_country=XYZ", cwd=tmp_path,
                  env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tracking.energy_country" in out.stdout and "XYZ" in out.stdout
    assert not (tmp_path / ".orchard" / "data").exists()  # refused before Spark


def test_a_missing_spec_file_exits_2(tmp_path):
    out = orchard("run", "nope.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert "nope.yaml" in out.stdout


@pytest.mark.slow
def test_ui_prints_the_dashboard_url_only_once_the_server_answers(tmp_path):
    import json
    import signal
    import time
    import urllib.request

    from orchard.config import JobSpec
    from orchard.tracking import JobRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    JobRun(JobSpec(name="ui-check", kind="train", tracking={"uri": uri})).finish()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchard.cli", "ui", "--port", str(port),
                             "--backend-store-uri", uri], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "orchard ui ended without printing the URL:\n" + "".join(lines)
            lines.append(line)
            if "→ http://" in line:
                break
        # The very moment the URL is shown, the server answers: no "connection refused" for a new user.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
            assert health.status == 200
        assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in line
        req = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
        with urllib.request.urlopen(req, timeout=10) as resp:
            exp_id = json.load(resp)["experiment"]["experiment_id"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200
        rest = [proc.stdout.readline() for _ in range(2)]
        assert any(f"ui-check: http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
                   in r for r in rest), rest
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
