"""The shipped serve config is what `serve deploy` accepts, and every serving YAML builds the application."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serving.app import build_app, serving_config
from serving.config import ServingConfig
from serving.ingress import StyleARIngress
from serving.model import StyleARModelDeployment
from stylear_core.config import ConfigError

SERVING = Path(__file__).resolve().parents[2] / "serving"


def test_serve_config_is_a_valid_serve_deploy_config():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((SERVING / "serve_config.yaml").read_text()))
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {StyleARIngress.name, StyleARModelDeployment.name}
    for deployment in deployments.values():
        assert deployment.max_ongoing_requests > 0
        assert deployment.autoscaling_config["max_replicas"] >= deployment.autoscaling_config["min_replicas"]
    model = deployments[StyleARModelDeployment.name]
    assert model.ray_actor_options.num_gpus == 1
    cfg = serving_config(app.args)
    assert cfg.model.preset == "lumina7b" and cfg.device == "cuda"
    assert cfg.adapters_root == "/models/adapters"
    # One decode batch fits in the replica's queue limit, so autoscaling sees the backlog.
    assert model.max_ongoing_requests >= cfg.max_batch_size


@pytest.mark.parametrize("path", sorted((SERVING / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_serving_yaml_builds_the_application(path):
    cfg = serving_config({"config_file": str(path)})
    assert isinstance(cfg, ServingConfig)
    assert isinstance(build_app({"config_file": str(path)}), Application)


def test_inline_args_and_their_errors():
    cfg = serving_config({"model": {"preset": "tiny"}, "sam": {"model_type": "tiny"}, "max_batch_size": 4})
    assert cfg.max_batch_size == 4
    with pytest.raises(ConfigError, match="max_batch_sise"):
        serving_config({"max_batch_sise": 4})
    with pytest.raises(ConfigError, match="sam.checkpoint"):
        serving_config({"sam": {"model_type": "vit_h"}})
    with pytest.raises(ConfigError, match="max_side"):
        serving_config({"sam": {"model_type": "tiny"}, "max_side": 100})
    with pytest.raises(ConfigError, match="overrides"):
        serving_config({"overrides": ["max_batch_size=2"]})
