"""deploy/'s cluster manifests: valid for their tools, and in agreement with the serve config.

`ray up` (deploy/ray-cluster.yaml) is checked against Ray's own launcher schema; the KubeRay
manifest and the Dockerfile by structure. Agreement: the GPU node bounds equal the fleet's
workers / max_workers at one GPU per lorafleet worker, the head serves the config it ships, and
every port the config names is exposed.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def _kuberay() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "lorafleet.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["ConfigMap", "RayCluster", "Service"], kinds
    return {d["kind"]: d for d in docs}


def _gpu_bounds(gpus_per_node: int, low: int, high: int) -> tuple[int, int]:
    """GPU workers a node group can hold at its lower and upper bound."""
    return low * gpus_per_node, high * gpus_per_node


# ------------------------------------------------------------------ ray up


def test_launcher_config_passes_rays_own_schema() -> None:
    ray_commands = pytest.importorskip("ray.autoscaler._private.commands")
    from ray.autoscaler._private.util import validate_config

    validate_config(ray_commands.prepare_config(_launcher()))
    broken = copy.deepcopy(_launcher())
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4  # a typo Ray must refuse
    with pytest.raises(Exception, match="max_worker"):
        validate_config(ray_commands.prepare_config(broken))


def test_launcher_gpu_bounds_match_the_serve_config() -> None:
    config = _launcher()
    head_cmds = " ".join(config["head_start_ray_commands"])
    served = re.search(r"lorafleet serve --config ~/lorafleet/(\S+)", head_cmds)
    assert served, "the head must run `lorafleet serve --config` on a file of this checkout"
    serve = ServeConfig.load(ROOT / served.group(1))
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert len(gpu_types) == 1
    gpu = gpu_types[0]
    low, high = _gpu_bounds(gpu["resources"]["GPU"], gpu["min_workers"], gpu["max_workers"])
    assert high == serve.max_workers, "GPU nodes at their bound must hold exactly max_workers workers"
    assert low >= serve.workers and gpu["min_workers"] == math.ceil(serve.workers / gpu["resources"]["GPU"])
    assert config["max_workers"] == gpu["max_workers"]
    assert serve.device == "cuda"


def test_launcher_head_keeps_no_gpu_and_every_node_uses_token_auth() -> None:
    config = _launcher()
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--num-gpus=0" in head
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in command, command
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_launcher_setup_installs_this_checkout() -> None:
    config = _launcher()
    assert config["file_mounts"]["~/lorafleet"] == "."
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install [^&]*torch", setup), "torch goes in first, on its own"
    assert "pip install -q -e ~/lorafleet" in setup


def test_no_deploy_file_runs_a_bare_ray_stop() -> None:
    # `ray stop` ends every Ray process on the machine, other users' too.
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".sh", ".yaml", ".yml", "") and path.name != "Dockerfile":
            code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
            assert not re.search(r"\bray stop\b", code), f"{path} runs `ray stop`"


# ------------------------------------------------------------------ KubeRay


def test_kuberay_cluster_structure() -> None:
    cluster = _kuberay()["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert head["image"] == worker["image"], "head and workers must run the same lorafleet build"
    assert "KUBERAY_GEN_RAY_START_CMD" in " ".join(head["args"])
    assert "--block" in " ".join(worker["args"])
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


def test_kuberay_bounds_and_ports_match_its_serve_config() -> None:
    docs = _kuberay()
    serve = ServeConfig.from_dict(yaml.safe_load(docs["ConfigMap"]["data"]["serve.yaml"]))
    spec = docs["RayCluster"]["spec"]
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert int(group["rayStartParams"]["num-gpus"]) == gpus
    low, high = _gpu_bounds(gpus, group["minReplicas"], group["maxReplicas"])
    assert high == serve.max_workers and low >= serve.workers
    assert serve.device == "cuda" and serve.host == "0.0.0.0"

    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    config_path = re.search(r"lorafleet serve --config (\S+)", " ".join(head["args"]))
    assert config_path and Path(config_path.group(1)).parent == Path(mounts["serve-config"])
    assert serve.model.startswith(mounts["models"] + "/"), "the model must be on the mounted volume"

    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == serve.port and ports["metrics"] == serve.metrics_port
    service = docs["Service"]["spec"]
    assert service["selector"]["ray.io/node-type"] == "head"
    assert service["selector"]["ray.io/cluster"] == docs["RayCluster"]["metadata"]["name"]
    assert {p["targetPort"] for p in service["ports"]} == {"grpc", "metrics"}


def test_kuberay_config_keeps_the_example_configs_fleet_shape() -> None:
    # One fleet shape in deploy/: the KubeRay config and serve.example.yaml differ only where
    # Kubernetes needs it (the Ray address of the head pod).
    kube = yaml.safe_load(_kuberay()["ConfigMap"]["data"]["serve.yaml"])
    example = yaml.safe_load((DEPLOY / "serve.example.yaml").read_text())
    for key in ("model", "adapters_dir", "workers", "max_workers", "device", "dtype", "port", "metrics_port"):
        assert kube[key] == example[key], key


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_builds_on_cuda_and_installs_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, flags=re.M)
    assert base and base.group(1).startswith("nvidia/cuda:"), "the image needs a CUDA base"
    torch_at = text.index('pip install "torch==')
    assert torch_at < text.index("RUN pip install ."), "torch before the package, pinned"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\S+) \1$", text, flags=re.M))
    assert set(package_dirs.values()) <= copied, "every package folder must be in the image"
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, flags=re.M) for p in line.split()}
    defaults = ServeConfig(model="/m")
    assert {defaults.port, defaults.metrics_port} <= exposed
