"""The export stage: publish a trained adapter for serving once the serving path reproduces its probe.

:func:`run_export` takes an :class:`ExportStageConfig`: the adapter a training stage exported
(``adapter``, ``stylear.adapter/1``), the name to serve it under, the evaluation stage's metrics (attached
to the published manifest) and a serving config to extend. The adapter's probe is rerun through the
serving path (base model + LoRA slot, :func:`~stylear_core.adapters.publish.served_parity_on_ray`) on a Ray
task with ``resources``; past ``tolerance`` the stage fails. The copy under the adapters root appears in
one step (:func:`~stylear_core.adapters.publish.publish_adapter`). Gives::

    <output_dir>/adapters/<name>/     the adapter files + manifest (name, source, parity, evaluation)
    <output_dir>/serving.yaml         the serving config with adapters_root and the adapter's model block
    <output_dir>/serve_config.yaml    a Ray Serve config for `serve deploy` / `serve run` using it
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from stylear_core.adapters.format import adapter_model_config, check_adapter_name
from stylear_core.adapters.publish import check_parity, publish_adapter, served_parity_on_ray
from stylear_core.config import Resources, load_config, option, to_dict
from stylear_core.runs import read_manifest
from stylear_core.stages import StageConfig

EXPORT_FORMAT = "stylear.export/1"


@dataclass
class ExportStageConfig(StageConfig):
    """What to publish, under which name, and the serving config to write."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "cpus": "resources.cpus",
        "gpus": "resources.gpus",
    }

    output_dir: str = option("runs/tiny/export", "stage output directory")
    adapter: str = option("{run_dir}/train_dpo/adapter", "the trained adapter directory to publish")
    name: str = option("stylear-tiny", "adapter name clients ask for (letters, digits, '.', '_', '-')")
    evaluation: str = option(
        "{run_dir}/evaluate", "evaluation stage dir whose metrics go in the manifest ('' = none)"
    )
    serving_config: str = option(
        "serving/configs/tiny.yaml", "serving config the written serving.yaml extends"
    )
    tolerance: float = option(1e-4, "largest allowed probe difference between trained and served adapter")
    resources: Resources = option(Resources, "CPUs and GPUs of the parity-check task")

    def validate(self) -> None:
        """The name must be servable."""
        check_adapter_name(self.name)


def evaluation_metrics(evaluation_dir: str) -> dict[str, Any]:
    """The style evaluation's metrics and tuned-minus-base deltas from ``<evaluation_dir>/metrics.json``, if any."""
    eval_file = Path(evaluation_dir) / "metrics.json" if evaluation_dir else None
    if eval_file is None or not eval_file.is_file():
        return {}
    summary = json.loads(eval_file.read_text())
    return {"metrics": summary["metrics"], "delta_tuned_minus_base": summary["delta_tuned_minus_base"]}


def serve_app_config(serving_yaml: Path) -> dict[str, Any]:
    """A Ray Serve config (``serve deploy`` / ``serve run``) of the application that reads ``serving_yaml``."""
    return {
        "applications": [
            {
                "name": "stylear",
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {"config_file": str(serving_yaml)},
            }
        ]
    }


def run_export(cfg: ExportStageConfig) -> dict[str, Any]:
    """Check the adapter on the serving path (Ray task), publish it, write the serving configs; the summary."""
    from serving.config import ServingConfig

    source = Path(cfg.path(cfg.adapter))
    manifest = read_manifest(source)
    if manifest is None or manifest.get("status") != "complete":
        raise FileNotFoundError(f"{source}: no complete adapter manifest")
    model = adapter_model_config(source)
    serving = load_config(ServingConfig, cfg.serving_config)
    lora_rank = int((manifest.get("lora") or {}).get("r") or model.lora_rank)
    slot_rank = max(serving.adapter_slot_rank, lora_rank)
    parity = served_parity_on_ray(model, source, slot_rank, cfg.resources.cpus, cfg.resources.gpus)
    check_parity(parity, cfg.tolerance, source)

    out = cfg.stage_dir
    root = out / "adapters"
    evaluation = evaluation_metrics(cfg.path(cfg.evaluation))
    published = {k: v for k, v in manifest.items() if k not in ("format", "written_at")}
    published.update(name=cfg.name, source=str(source), served_parity=parity, evaluation=evaluation)
    target = publish_adapter(source, root, cfg.name, manifest={**published, "format": manifest["format"]})

    serving = dataclasses.replace(serving, model=model, adapters_root=str(root), adapter_slot_rank=slot_rank)
    serving.validate()
    (out / "serving.yaml").write_text(yaml.safe_dump(to_dict(serving), sort_keys=False))
    (out / "serve_config.yaml").write_text(
        yaml.safe_dump(serve_app_config(out / "serving.yaml"), sort_keys=False)
    )
    return {
        "adapter": str(target),
        "name": cfg.name,
        "adapters_root": str(root),
        "serving_config": str(out / "serving.yaml"),
        "served_parity": parity,
        "step": manifest.get("step"),
    }


__all__ = ["EXPORT_FORMAT", "ExportStageConfig", "evaluation_metrics", "run_export", "serve_app_config"]
