"""What `orchard run` prints: progress and a summary, not the engines' log lines."""

import pytest

from tests.cli.test_cli import ROOT, orchard

MLFLOW_STORE_NOISE = ("Creating initial MLflow database tables", "Updating database tables", "INFO mlflow",
                      "alembic", "Running upgrade")


@pytest.mark.slow
def test_a_fresh_tracking_store_logs_its_setup_to_the_engine_log_not_the_terminal(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    out = orchard("run", str(ROOT / "jobs/breast-cancer-mlp.yaml"), "--set", "train.epochs=1",
                  "--set", "scaling.num_workers=1", "--set", "tracking.log_model=false", cwd=tmp_path,
                  env_extra={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "prepare data (Spark)" in out.stdout and "train (Ray Train)" in out.stdout
    shown = out.stdout + out.stderr
    assert not [n for n in MLFLOW_STORE_NOISE if n in shown], shown[-3000:]
    (log,) = tmp_path.glob(".orchard/runs/breast-cancer-mlp-*/engine.log")
    assert "Creating initial MLflow database tables" in log.read_text()  # routed, not lost
