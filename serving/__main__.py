"""``python -m serving``: run the service locally (a private Ray instance on 127.0.0.1), tiny preset by default.

    python -m serving                                  # tiny models on CPU, http://127.0.0.1:8000
    python -m serving --port 8100 adapters_root=runs/adapters
    python -m serving --config serving/configs/lumina7b.yaml
    python -m serving --no-autoscaling                 # one replica of each deployment, fixed
    python -m serving --serve-config my_serve.yaml     # another policy file of the same shape

The deployments run with the Ray Serve options of ``serving/serve_config.yaml`` (or ``--serve-config``:
the autoscaling policy, ``max_ongoing_requests``, health checks, graceful shutdown), read from that
file so a local run scales as production does. Only resources are fitted to this machine: a model
replica asks for ``torch_threads`` CPUs (at least one) and a GPU only when the model runs on CUDA, and
the model's ``max_replicas`` is capped at what ``--num-cpus`` (and the GPUs) can hold.

Ctrl-C and SIGTERM (what docker, systemd and Kubernetes send) stop it the same way: Ray Serve, then
every process of the Ray instance it started, exit status 0. The Ray instance lives in its own
directory under the temp dir (``TMPDIR``), printed at start.
"""

from __future__ import annotations

import argparse
import copy
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cluster.local import apply_project_env
from stylear_core.config import describe

if TYPE_CHECKING:
    from serving.config import ServingConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
MODEL, INGRESS = "StyleARModel", "StyleARIngress"


def read_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """A Ray Serve config file (``serve_config.yaml``'s shape), parsed."""
    return yaml.safe_load(Path(path).read_text())


def serve_config_deployments(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``deployments:`` options of the (single) application in a parsed serve config, by deployment name."""
    (app,) = spec["applications"]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}


def deployment_options(
    cfg: ServingConfig,
    *,
    autoscaling: bool = True,
    num_cpus: int = 4,
    num_gpus: int = 0,
    serve_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``.options(...)`` for each deployment of a local run: the serve config's, fitted to this machine.

    ``num_cpus``/``num_gpus`` are what the local Ray instance offers. With ``autoscaling=False`` each
    deployment runs one fixed replica; everything else from the serve config (parsed; default
    ``serve_config.yaml``) is kept.
    """
    options = copy.deepcopy(
        serve_config_deployments(read_serve_config() if serve_config is None else serve_config)
    )
    ingress, model = options.setdefault(INGRESS, {}), options.setdefault(MODEL, {})
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and num_gpus > 0)
    actor = model.setdefault("ray_actor_options", {})
    # Production sizes a model replica for a GPU host; locally its decode thread uses torch_threads.
    actor["num_cpus"] = max(1, cfg.torch_threads)
    if not on_cuda:
        actor.pop("num_gpus", None)
    ingress_cpus = ingress.get("ray_actor_options", {}).get("num_cpus", 1)
    ingress_min = ingress.get("autoscaling_config", {}).get("min_replicas", 1)
    fit = (num_cpus - ingress_cpus * ingress_min) // actor["num_cpus"]
    if actor.get("num_gpus"):
        fit = min(fit, int(num_gpus // actor["num_gpus"]))
    fit = max(1, fit)
    for opts in (ingress, model):
        policy = opts.get("autoscaling_config")
        if policy is None:
            continue
        if not autoscaling:
            del opts["autoscaling_config"]
            opts["num_replicas"] = 1
        elif opts is model:
            # Replicas the machine cannot hold would wait for resources forever: cap the policy there.
            for key in ("max_replicas", "min_replicas", "initial_replicas"):
                if key in policy:
                    policy[key] = min(policy[key], fit)
    return options


def _stop_on_sigterm() -> None:
    # SIGTERM raises KeyboardInterrupt in the main thread, so it takes the Ctrl-C path below. Without
    # this, Ray's own driver handler exits at once and the Ray agents outlive the service.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--config``, ``--host``, ``--port``, ``--num-cpus``, ``--no-autoscaling`` and ``key=value``
    overrides, then serve until Ctrl-C or SIGTERM."""
    apply_project_env()
    import ray
    import torch
    from ray import serve

    from serving.app import build_app, serving_config
    from serving.config import ServingConfig
    from stylear_core.ray_connection import short_temp_dir

    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Run the StyleAR generation service on a private local Ray instance.",
        epilog="config keys:\n" + "\n".join(describe(ServingConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serving YAML (serving/configs/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the local Ray instance offers")
    parser.add_argument(
        "--serve-config",
        type=Path,
        default=SERVE_CONFIG,
        help=f"Ray Serve config whose deployment options (replicas, autoscaling, queues) apply (default {SERVE_CONFIG.name})",
    )
    parser.add_argument(
        "--no-autoscaling",
        dest="autoscaling",
        action="store_false",
        help="one fixed replica per deployment instead of the serve config's autoscaling policy",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapters_root=runs/adapters")
    args = parser.parse_args(argv)

    app_args = {"config_file": str(args.config), "overrides": list(args.overrides)}
    num_gpus = torch.cuda.device_count()
    serve_config = read_serve_config(args.serve_config)
    options = deployment_options(
        serving_config(app_args),
        autoscaling=args.autoscaling,
        num_cpus=args.num_cpus,
        num_gpus=num_gpus,
        serve_config=serve_config,
    )
    application = build_app(app_args, ingress_options=options[INGRESS], model_options=options[MODEL])
    http_timeout = serve_config.get("http_options", {}).get("request_timeout_s")
    temp_dir = short_temp_dir("sar-serve-")
    _stop_on_sigterm()
    try:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
        )
        _stop_on_sigterm()  # ray.init installed its own handler over ours
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": http_timeout})
        serve.run(application, name="stylear", route_prefix="/")
        model_policy = options[MODEL].get("autoscaling_config")
        scaling = (
            f"{model_policy['min_replicas']}-{model_policy['max_replicas']} model replicas"
            if model_policy
            else "1 model replica (no autoscaling)"
        )
        print(
            f"StyleAR service on http://{args.host}:{args.port} ({scaling}; Ray in {temp_dir}). "
            "POST /v1/generate/style; Ctrl-C or SIGTERM stops it.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if ray.is_initialized():  # serve.shutdown() would otherwise start a Ray instance to look for Serve
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
