"""Publish a trained adapter for serving: check it on the serving path, copy it under an adapters root.

Takes the adapter a training stage exported (``adapter``, ``stylear.adapter/1``), the name to serve it
under, the evaluation stage's metrics (attached to its manifest) and a serving config to extend. The
adapter's probe is rerun through the serving path (base model + LoRA slot, see
:mod:`stylear_core.evaluation.adapter_parity`) on a Ray task; past ``tolerance`` the stage fails. The
copy under the adapters root appears in one step (:func:`stylear_core.adapters.publish.publish_adapter`).
Gives::

    <output_dir>/adapters/<name>/     the adapter files + manifest (name, source, parity, evaluation)
    <output_dir>/serving.yaml         the serving config with adapters_root and the adapter's model block
                                      (python -m serving --config <output_dir>/serving.yaml)
    <output_dir>/serve_config.yaml    a Ray Serve config for `serve deploy` / `serve run` using it
    <output_dir>/manifest.json

    python -m jobs.export --config jobs/configs/export/tiny.yaml [key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from stylear_core.adapters.format import check_adapter_name
from stylear_core.adapters.publish import check_parity, publish_adapter, served_parity_on_ray
from stylear_core.config import from_dict, load_config, option, parse_job_args, to_dict
from stylear_core.models.presets import ModelConfig
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import read_manifest, write_manifest

FORMAT = "stylear.export/1"


@dataclass
class Config:
    """What to publish, under which name, and the serving config to write."""

    output_dir: str = option("runs/tiny/export", "stage output directory")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    adapter: str = option("{run_dir}/train_dpo/adapter", "the trained adapter directory to publish")
    name: str = option("stylear-tiny", "adapter name clients ask for (letters, digits, '.', '_', '-')")
    evaluation: str = option(
        "{run_dir}/evaluate", "evaluation stage dir whose metrics go in the manifest ('' = none)"
    )
    serving_config: str = option(
        "serving/configs/tiny.yaml", "serving config the written serving.yaml extends"
    )
    tolerance: float = option(1e-4, "largest allowed probe difference between trained and served adapter")
    cpus: float = option(1.0, "CPUs of the parity-check task")
    gpus: float = option(0.0, "GPUs of the parity-check task")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )

    def validate(self) -> None:
        """The name must be servable."""
        check_adapter_name(self.name)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(Config, argv, __doc__)
    from serving.config import ServingConfig

    source = Path(cfg.adapter.format(run_dir=cfg.run_dir)).resolve()
    manifest = read_manifest(source)
    if manifest is None or manifest.get("status") != "complete":
        raise FileNotFoundError(f"{source}: no complete adapter manifest")
    model = from_dict(ModelConfig, manifest["model_config"])
    serving = load_config(ServingConfig, cfg.serving_config)
    lora_rank = int((manifest.get("lora") or {}).get("r") or model.lora_rank)
    slot_rank = max(serving.adapter_slot_rank, lora_rank)
    connect_ray(cfg.ray_address, log_prefix="[export]")
    parity = served_parity_on_ray(model, source, slot_rank, cfg.cpus, cfg.gpus)
    check_parity(parity, cfg.tolerance, source)

    out = Path(cfg.output_dir.format(run_dir=cfg.run_dir)).resolve()
    root = out / "adapters"
    evaluation = {}
    eval_file = Path(cfg.evaluation.format(run_dir=cfg.run_dir)) / "metrics.json" if cfg.evaluation else None
    if eval_file is not None and eval_file.is_file():
        summary = json.loads(eval_file.read_text())
        evaluation = {
            "metrics": summary["metrics"],
            "delta_tuned_minus_base": summary["delta_tuned_minus_base"],
        }
    published = {k: v for k, v in manifest.items() if k not in ("format", "written_at")}
    published.update(name=cfg.name, source=str(source), served_parity=parity, evaluation=evaluation)
    target = publish_adapter(source, root, cfg.name, manifest={**published, "format": manifest["format"]})

    serving = dataclasses.replace(serving, model=model, adapters_root=str(root), adapter_slot_rank=slot_rank)
    serving.validate()
    (out / "serving.yaml").write_text(yaml.safe_dump(to_dict(serving), sort_keys=False))
    serve_app = {
        "applications": [
            {
                "name": "stylear",
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {"config_file": str(out / "serving.yaml")},
            }
        ]
    }
    (out / "serve_config.yaml").write_text(yaml.safe_dump(serve_app, sort_keys=False))
    summary = {
        "adapter": str(target),
        "name": cfg.name,
        "adapters_root": str(root),
        "serving_config": str(out / "serving.yaml"),
        "served_parity": parity,
        "step": manifest.get("step"),
    }
    write_manifest(out, FORMAT, status="complete", config=to_dict(cfg), summary=summary)
    print(f"[export] {summary}", flush=True)
    return summary


if __name__ == "__main__":
    main()
