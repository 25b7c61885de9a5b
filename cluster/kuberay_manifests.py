"""Render the KubeRay manifests in ``cluster/kuberay/`` from one table of pipeline stages.

One ``RayJob`` (``ray.io/v1``, KubeRay v1.x) per stage in :data:`STAGES`, each running
``python -m jobs.<stage> --config jobs/configs/<stage>/lumina7b.yaml`` on its own RayCluster
(CPU head + the GPU worker groups the stage needs, autoscaled, deleted after the job), and one
``RayService`` whose ``serveConfigV2`` is ``serving/serve_config.yaml``. The runtime env comes from
``cluster/runtime_env.yaml``. The container image is this project on Ray's GPU image (built from
``cluster/kuberay/Dockerfile``), with the repository at :data:`PROJECT_DIR`.

    python -m cluster.kuberay_manifests [--image REGISTRY/stylear:TAG] [--out-dir DIR] [--check]

``--check`` writes nothing and exits 1 if any file in the output dir differs from what it renders.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.local import REPO_ROOT

RAY_VERSION = "2.60.0"
IMAGE = "registry.example.com/stylear:0.1.0-ray2.60.0-py311-gpu"
PROJECT_DIR = "/home/ray/stylear"
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
RUNTIME_ENV_PATH = REPO_ROOT / "cluster" / "runtime_env.yaml"
SERVE_CONFIG_PATH = REPO_ROOT / "serving" / "serve_config.yaml"
SERVE_PORT = 8000  # KubeRay's serve Service targets this container port
# Shared volumes every pod mounts: read-only checkpoints and the run dir of the lumina7b configs.
MODELS_CLAIM, MODELS_MOUNT = "stylear-models", "/models"
STORAGE_CLAIM, STORAGE_MOUNT = "stylear-cluster-storage", "/mnt/cluster_storage"


@dataclass(frozen=True)
class WorkerGroup:
    """A KubeRay worker group: pods of one shape on one instance type, autoscaled between min and max."""

    name: str
    instance_type: str
    gpus: int
    cpu: str
    memory: str
    shm: str
    min_replicas: int
    max_replicas: int

    def scaled(self, min_replicas: int, max_replicas: int) -> WorkerGroup:
        """The same pod shape with other replica bounds."""
        return WorkerGroup(**{**self.__dict__, "min_replicas": min_replicas, "max_replicas": max_replicas})


# Pod sizes leave room on the node for the kubelet and daemon sets (p5.48xlarge: 192 vCPU, 2 TiB;
# p5.4xlarge: 16 vCPU, 256 GiB).
TRAIN_8XH100 = WorkerGroup("gpu-8xh100", "p5.48xlarge", 8, "180", "1800Gi", "256Gi", 0, 2)
GPU_1XH100 = WorkerGroup("gpu-1xh100", "p5.4xlarge", 1, "14", "220Gi", "64Gi", 0, 8)


@dataclass(frozen=True)
class JobStage:
    """One pipeline stage run as a RayJob: its ``jobs.<stage>`` module and the worker groups it needs."""

    stage: str
    summary: str
    groups: tuple[WorkerGroup, ...]

    @property
    def module(self) -> str:
        return f"jobs.{self.stage}"

    @property
    def config(self) -> str:
        return f"jobs/configs/{self.stage}/lumina7b.yaml"

    @property
    def entrypoint(self) -> str:
        return f"python -m {self.module} --config {self.config}"

    @property
    def resource_name(self) -> str:
        return f"stylear-{self.stage.replace('_', '-')}"

    @property
    def filename(self) -> str:
        return f"rayjob-{self.stage.replace('_', '-')}.yaml"


STAGES: tuple[JobStage, ...] = (
    JobStage("curate", "Ray Data: stylize, CLIP-filter, SAM-mask and tokenize", (GPU_1XH100.scaled(0, 16),)),
    JobStage("train_style", "Ray Train + DeepSpeed: style-token SFT with LoRA", (TRAIN_8XH100.scaled(1, 2),)),
    JobStage("make_preferences", "sample and score preference pairs", (GPU_1XH100.scaled(0, 8),)),
    JobStage("train_dpo", "Ray Train + DeepSpeed: DPO post-training", (TRAIN_8XH100.scaled(1, 2),)),
    JobStage("dreambooth", "DreamBooth LoRA supervisors, one GPU per subject", (GPU_1XH100.scaled(0, 8),)),
    JobStage("proxy_generate", "Ray Data: proxy images from the supervisors", (GPU_1XH100.scaled(0, 16),)),
    JobStage("train_subject", "Ray Train: AR subject tuning on proxy data", (TRAIN_8XH100.scaled(1, 1),)),
    JobStage(
        "pipeline",
        "every StyleAR stage in order under one run dir",
        (TRAIN_8XH100.scaled(0, 2), GPU_1XH100.scaled(0, 16)),
    ),
)
SERVE_WORKERS = GPU_1XH100.scaled(1, 8)


def _project_env_vars() -> dict[str, str]:
    return dict(yaml.safe_load(RUNTIME_ENV_PATH.read_text()).get("env_vars", {}))


def runtime_env_for_kubernetes() -> dict[str, Any]:
    """``cluster/runtime_env.yaml`` with the image's copy of the repo as working dir.

    The submitter pod runs the same image, so ``ray job submit`` uploads :data:`PROJECT_DIR` as it
    would upload ``.`` from a laptop, and relative config paths in the entrypoint resolve.
    """
    env = yaml.safe_load(RUNTIME_ENV_PATH.read_text())
    return {"working_dir": PROJECT_DIR, **env}


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM, "readOnly": True}},
        {"name": "cluster-storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}},
    ]


def _volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        {"name": "cluster-storage", "mountPath": STORAGE_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


# The serving preset requires an API token (serving/configs/lumina7b.yaml: auth_required); the RayService's
# pods read it from this Secret: kubectl create secret generic stylear-api-token --from-literal=token=...
API_TOKEN_SECRET = {"name": "stylear-api-token", "key": "token"}
API_TOKEN_ENV = "STYLEAR_API_TOKEN"


def _api_token_env() -> dict[str, Any]:
    return {"name": API_TOKEN_ENV, "valueFrom": {"secretKeyRef": dict(API_TOKEN_SECRET)}}


def _container(
    name: str, image: str, cpu: str, memory: str, gpus: int, ports: list[dict], serve: bool = False
) -> dict:
    # Ray reads its CPU/GPU/memory counts from the limits; requests == limits keeps pods Guaranteed.
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = gpus
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": dict(amounts), "requests": dict(amounts)},
        "env": [
            *({"name": k, "value": v} for k, v in _project_env_vars().items()),
            # Serve replicas (the ingress among them) inherit the node's environment.
            *([_api_token_env()] if serve else []),
        ],
        "volumeMounts": _volume_mounts(),
        # Lets Ray drain the node's tasks before Kubernetes kills the pod.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if ports:
        container["ports"] = ports
    return container


def _pod_spec(container: dict, shm: str, instance_type: str, gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [*_volumes(), {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}],
        "nodeSelector": {"node.kubernetes.io/instance-type": instance_type},
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def head_group_spec(image: str, serve: bool = False) -> dict[str, Any]:
    """The CPU head: GCS, dashboard, autoscaler and job drivers; ``num-cpus: 0`` keeps work off it."""
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    if serve:
        ports.append({"containerPort": SERVE_PORT, "name": "serve"})
    container = _container("ray-head", image, "8", "32Gi", 0, ports, serve=serve)
    return {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"spec": _pod_spec(container, "8Gi", "m7i.4xlarge", gpu=False)},
    }


def worker_group_spec(group: WorkerGroup, image: str, serve: bool = False) -> dict[str, Any]:
    """A GPU worker group; starts at ``min_replicas`` and the in-tree autoscaler grows it to the max."""
    container = _container("ray-worker", image, group.cpu, group.memory, group.gpus, [], serve=serve)
    return {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": {"spec": _pod_spec(container, group.shm, group.instance_type, gpu=group.gpus > 0)},
    }


def ray_cluster_spec(groups: tuple[WorkerGroup, ...], image: str, serve: bool = False) -> dict[str, Any]:
    """A ``RayClusterSpec``: head + worker groups, in-tree autoscaling and Ray token auth."""
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 600, "upscalingMode": "Default"},
        # KubeRay >= 1.5.1 creates the token Secret and injects it into every Ray container.
        "authOptions": {"mode": "token"},
        "headGroupSpec": head_group_spec(image, serve=serve),
        "workerGroupSpecs": [worker_group_spec(g, image, serve=serve) for g in groups],
    }


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "stylear", "app.kubernetes.io/component": component}


def rayjob_manifest(stage: JobStage, image: str = IMAGE) -> dict[str, Any]:
    """The ``RayJob`` for one stage: its entrypoint, runtime env and a RayCluster deleted after the job."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": stage.resource_name, "labels": _labels(stage.stage)},
        "spec": {
            "entrypoint": stage.entrypoint,
            "runtimeEnvYAML": yaml.safe_dump(runtime_env_for_kubernetes(), sort_keys=False),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            # Keep the finished cluster 10 minutes for log inspection before it is deleted.
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": ray_cluster_spec(stage.groups, image),
        },
    }


def kubernetes_serve_config(serve_config: dict[str, Any]) -> dict[str, Any]:
    """A ``serve deploy`` config adapted for a RayService; the input is not modified.

    Two things differ from a local deployment: the HTTP proxy must listen on all interfaces at
    :data:`SERVE_PORT` (KubeRay's serve Service targets it), and an application's local
    ``working_dir`` does not exist in the pod (the image already holds the project), so it is dropped;
    remote ``working_dir`` URIs are kept.
    """
    cfg = copy.deepcopy(serve_config)
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "0.0.0.0", "port": SERVE_PORT}
    for app in cfg.get("applications", []):
        env = app.get("runtime_env") or {}
        if "working_dir" in env and "://" not in str(env["working_dir"]):
            del env["working_dir"]
            env.pop("excludes", None)  # only meaningful for an uploaded local dir
            if not env:
                app.pop("runtime_env")
    return cfg


def rayservice_manifest(serve_config: dict[str, Any], image: str = IMAGE) -> dict[str, Any]:
    """The ``RayService``: the serve config as ``serveConfigV2`` on a head + single-GPU worker cluster."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "stylear-serve", "labels": _labels("serve")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(kubernetes_serve_config(serve_config), sort_keys=False),
            "rayClusterConfig": ray_cluster_spec((SERVE_WORKERS,), image, serve=True),
        },
    }


class _BlockStyleDumper(yaml.SafeDumper):
    """Writes multi-line strings (runtimeEnvYAML, serveConfigV2) as readable ``|`` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _str_representer)


def dump_manifest(manifest: dict[str, Any], source: str) -> str:
    """YAML text of one manifest, headed by a do-not-edit line naming its source."""
    header = f"# Generated by `python -m cluster.kuberay_manifests` from {source}; do not edit.\n"
    return header + yaml.dump(manifest, Dumper=_BlockStyleDumper, sort_keys=False, width=110)


def render_manifests(image: str = IMAGE, serve_config_path: Path = SERVE_CONFIG_PATH) -> dict[str, str]:
    """File name -> YAML text for every manifest; the RayService only once the serve config exists."""
    out = {s.filename: dump_manifest(rayjob_manifest(s, image), "its stage table") for s in STAGES}
    if serve_config_path.exists():
        serve_config = yaml.safe_load(serve_config_path.read_text())
        rel = (
            serve_config_path.relative_to(REPO_ROOT)
            if serve_config_path.is_relative_to(REPO_ROOT)
            else serve_config_path
        )
        out["rayservice.yaml"] = dump_manifest(rayservice_manifest(serve_config, image), str(rel))
    return out


def stale_manifests(out_dir: Path, rendered: dict[str, str]) -> list[str]:
    """Names of rendered manifests that are missing from out_dir or differ from the files there."""
    return sorted(
        name
        for name, text in rendered.items()
        if not (out_dir / name).exists() or (out_dir / name).read_text() != text
    )


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the manifests; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", default=IMAGE, help="container image with this project installed")
    parser.add_argument("--out-dir", type=Path, default=KUBERAY_DIR)
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ; write nothing")
    args = parser.parse_args(argv)
    rendered = render_manifests(args.image, args.serve_config)
    if not args.serve_config.exists():
        print(f"note: {args.serve_config} does not exist yet; RayService not rendered", file=sys.stderr)
    if args.check:
        stale = stale_manifests(args.out_dir, rendered)
        for name in stale:
            print(f"stale: {args.out_dir / name}", file=sys.stderr)
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out_dir / name).write_text(text)
        print(args.out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
