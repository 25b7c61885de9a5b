"""The Ray Serve application: ``StyleARIngress`` (HTTP) -> ``StyleARModel`` (through a DeploymentHandle).

``serve deploy serving/serve_config.yaml`` and ``serve run serving.app:build_app`` call
:func:`build_app` with the application's ``args``: either the :class:`ServingConfig` fields
themselves, or ``config_file`` (a YAML such as ``serving/configs/lumina7b.yaml``, relative paths
resolved against the working directory, then the repository) plus optional ``overrides``
(``key=value`` strings, as on the command line).

Both deployments have bounded queues, so overload is a fast 503 with ``Retry-After`` instead of
growing latency and 504s: the ingress's bound (requests waiting at each HTTP proxy) is in its
decorator, the model's (requests waiting in each ingress replica's handle) is set here. A serve
config's ``deployments:`` entries override both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serving.config import ServingConfig
from serving.ingress import StyleARIngress
from serving.model import StyleARModelDeployment
from stylear_core.config import ConfigError, from_dict, load_config, to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
# Generations waiting in each ingress replica for a model slot: a few decode batches beyond the
# replicas' max_ongoing_requests, enough for autoscaling to see the backlog.
MODEL_MAX_QUEUED_REQUESTS = 64


def serving_config(args: dict[str, Any] | None = None) -> ServingConfig:
    """The validated :class:`ServingConfig` an application's ``args`` describe."""
    args = dict(args or {})
    config_file = args.pop("config_file", None)
    overrides = args.pop("overrides", [])
    if config_file is None:
        if overrides:
            raise ConfigError("overrides: only allowed together with config_file")
        return from_dict(ServingConfig, args)
    if args:
        raise ConfigError(f"{sorted(args)[0]}: give settings in config_file or as overrides, not beside them")
    path = Path(config_file)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return load_config(ServingConfig, path, list(overrides))


def build_app(
    args: dict[str, Any] | None = None,
    *,
    ingress_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> Application:
    """Bind the model deployment and the ingress (which gets the model's handle) into one application.

    ``ingress_options`` / ``model_options`` are extra Ray Serve deployment options (``.options()``),
    e.g. queue bounds for a run started from Python rather than from a serve config.
    """
    cfg = serving_config(args)
    config = to_dict(cfg)
    backpressure = BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)
    model_opts = {"max_queued_requests": MODEL_MAX_QUEUED_REQUESTS, "backpressure_config": backpressure}
    model = StyleARModelDeployment.options(**{**model_opts, **(model_options or {})}).bind(config)
    ingress = StyleARIngress.options(**{"backpressure_config": backpressure, **(ingress_options or {})})
    return ingress.bind(model, config)
