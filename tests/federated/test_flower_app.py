"""The standard Flower App (``orchard.federated.app``) under the unmodified ``flwr run`` CLI, and its config errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from orchard.config import load_spec
from tests.federated.test_deployment import BIN, Processes, flwr
from tests.net import free_port, listening, wait_for

SPEC = {"name": "fed-app", "kind": "federated", "model": {"family": "mlp", "hidden": [64]},
        "train": {"batch_size": 32, "lr": 3e-3},
        "federated": {"clients": 4, "rounds": 2, "partition": "dirichlet", "alpha": 1.0, "local_epochs": 3}}


def _spec_file(tmp_path: Path, spec: dict = SPEC) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class _Context:  # the two fields the app reads; a real flwr Context needs a run and a node
    def __init__(self, run_config: dict, node_config: dict | None = None) -> None:
        self.run_config, self.node_config = run_config, node_config or {}


def test_a_missing_spec_is_named_with_its_run_config_key(tmp_path):
    from orchard.federated.app import AppConfigError, spec_from

    with pytest.raises(AppConfigError, match=r"run config 'spec': no job spec at .*nope\.yaml"):
        spec_from({"spec": str(tmp_path / "nope.yaml")})


def test_a_train_spec_is_refused_by_the_flower_app(tmp_path):
    from orchard.federated.app import AppConfigError, spec_from

    path = _spec_file(tmp_path, {"name": "central", "kind": "train"})
    with pytest.raises(AppConfigError, match="'train' job"):
        spec_from({"spec": str(path)})


def test_overrides_in_the_run_config_reach_the_spec(tmp_path):
    from orchard.federated.app import spec_from

    spec = spec_from({"spec": str(_spec_file(tmp_path)), "overrides": "federated.rounds=7 federated.clients=3"})
    assert (spec.federated.rounds, spec.federated.clients) == (7, 3)


def test_unprepared_data_points_at_orchard_prep(tmp_path):
    from orchard.federated.app import AppConfigError, prepared_from

    spec = load_spec(_spec_file(tmp_path))
    with pytest.raises(AppConfigError, match="run `orchard prep SPEC` first"):
        prepared_from(spec, {"data-dir": str(tmp_path / "empty")})


def test_each_node_folder_holds_the_manifest_and_only_its_own_partition(fresh_digits, tmp_path):
    from orchard.data.manifest import read_xy
    from orchard.federated.app import AppConfigError, export_node_data, partition_folder

    spec = load_spec(_spec_file(tmp_path))
    folders = export_node_data(fresh_digits, spec, tmp_path / "nodes")
    rows = 0
    for i, folder in enumerate(folders):
        assert sorted(p.name for p in folder.iterdir()) == [f"client-{i}.parquet", "manifest.json"]
        found, manifest = partition_folder(spec, _Context({}, {"partition-id": i, "data-dir": str(folder)}))
        assert found == folder and manifest["content_hash"] == fresh_digits.manifest["content_hash"]
        rows += len(read_xy([folder / f"client-{i}.parquet"], manifest["feature_dim"])[1])
    assert rows == fresh_digits.manifest["counts"]["train"]
    with pytest.raises(AppConfigError, match="'partition-id'=4"):
        partition_folder(spec, _Context({}, {"partition-id": 4, "data-dir": str(folders[0])}))
    with pytest.raises(AppConfigError, match="needs manifest.json and client-1.parquet"):
        partition_folder(spec, _Context({}, {"partition-id": 1, "data-dir": str(folders[0])}))


@pytest.mark.slow
def test_flwr_run_simulates_the_app_from_the_repo_root(fresh_digits, tmp_path):
    """``flwr run . local-simulation --stream`` against a simulation SuperLink started here (own ports)."""
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local-simulation"\n\n[superlink.local-simulation]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0"}
    procs = Processes(tmp_path)
    try:
        # What Flower's `:local:` connection starts, but on a free port and without `uv sync` (offline).
        link, log = procs.start("superlink", ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                                              "--port", str(port), "--disable-runtime-dependency-installation"], env)
        wait_for(lambda: listening(port) or link.poll() is not None, "simulation SuperLink port", log)
        run = flwr("run", ".", "local-simulation", "--stream",
                   "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
                   "-c", f'spec="{_spec_file(tmp_path)}" data-dir="{fresh_digits.path}" connect-timeout-s=60.0',
                   env=env, timeout=300)
    finally:
        procs.stop_all()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert [int(r) for r in re.findall(r"orchard round (\d+): ", out)] == [1, 2], out[-4000:]
    assert "clients=4.0000" in out  # every simulated SuperNode trained in each round
    accuracy = float(re.search(r"orchard federation finished: 2 round\(s\), final accuracy ([\d.]+)", out).group(1))
    print(f"flwr run simulation: final accuracy {accuracy:.4f}", file=sys.stderr)
    # Observed 0.88 for this spec (4 Dirichlet(1.0) clients, 2 rounds x 3 local epochs); chance is 0.1.
    assert accuracy >= 0.75, out[-4000:]
    # The app derived the partitions from the spec (server side) before the first round.
    assert re.search(r"orchard partitions: .*dirichlet-a1(\.0)?-n4", out), out[-4000:]
