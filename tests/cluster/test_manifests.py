"""The cluster manifests (KubeRay, `ray up`) parse and agree with each other and with the project.

KubeRay's CRDs cannot be checked without a Kubernetes API server, so these tests pin what the README promises:
one image name per variant, token auth, the GPU group's limits, the shipped job as the RayJob entrypoint.
The `ray up` file is checked against Ray's own autoscaler schema.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import yaml

import orchard

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
CPU_IMAGE = f"orchard:{orchard.__version__}"
GPU_IMAGE = f"{CPU_IMAGE}-cuda"


def _docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def _ray_spec(kind: str) -> dict:
    if kind == "RayCluster":
        return _docs(KUBERAY / "raycluster.yaml")["RayCluster"]["spec"]
    return _docs(KUBERAY / "rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]


def _containers(spec: dict) -> dict[str, list[dict]]:
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: g["template"]["spec"]["containers"] for name, g in groups.items()}


def test_kuberay_clusters_use_the_platform_image_with_token_auth():
    for kind in ("RayCluster", "RayJob"):
        spec = _ray_spec(kind)
        assert spec["authOptions"]["mode"] == "token", kind
        assert spec["rayVersion"] == _pinned_ray_version(), kind
        for group, containers in _containers(spec).items():
            expected = GPU_IMAGE if group == "gpu" else CPU_IMAGE
            assert [c["image"] for c in containers] == [expected], (kind, group)
            # MLflow's address and credentials come from a Secret, never from the manifest.
            assert containers[0]["envFrom"] == [{"secretRef": {"name": "orchard-mlflow"}}], (kind, group)


def test_raycluster_has_cpu_and_gpu_worker_groups_with_gpu_limits():
    groups = _containers(_ray_spec("RayCluster"))
    assert set(groups) == {"head", "cpu", "gpu"}
    gpu = groups["gpu"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] >= 1
    assert "nvidia.com/gpu" not in groups["cpu"][0]["resources"]["limits"]


def test_rayjob_runs_the_shipped_digits_job():
    spec = _docs(KUBERAY / "rayjob.yaml")["RayJob"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv == ["orchard", "run", "jobs/digits-cnn.yaml"]
    assert (ROOT / argv[2]).is_file()
    # The job asks for this many Ray Train workers; the ephemeral cluster must be able to place them.
    workers = yaml.safe_load((ROOT / argv[2]).read_text())["scaling"]["num_workers"]
    assert sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]) >= workers


def test_ray_up_config_passes_rays_schema_and_uses_the_platform_images():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "ray-up.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["docker"]["image"] == CPU_IMAGE
    types = raw["available_node_types"]
    assert types["gpu_worker"]["docker"]["worker_image"] == GPU_IMAGE
    assert {"head", "cpu_worker", "gpu_worker"} == set(types)
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]


def test_compose_and_manifests_name_the_same_platform_image():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-platform"]["image"] == f"${{ORCHARD_IMAGE:-{CPU_IMAGE}}}"


def _pinned_ray_version() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("ray=="):
            return line.split("==")[1]
    raise AssertionError("ray is not pinned in constraints.txt")
