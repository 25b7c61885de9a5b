"""The style evaluation stage: every tuned adapter against the untuned base model, and the run's report.

:func:`run_style_evaluation` takes a :class:`StyleEvalStageConfig`: held (prompt, style reference) pairs
(your own from parquet, ``pairs.path``, or procedural from a seed the training data does not use), the model block (default: the one in the ``tuned``
adapter's manifest) and ``adapters`` (variant name -> adapter dir). Every variant -- ``base`` plus each
adapter -- generates and scores the pairs in its own Ray task
(:func:`~stylear_core.evaluation.style_eval.evaluate_variant`, ``resources`` each). It writes
``<output_dir>/{samples,metrics}.parquet``, ``metrics.json``, the PNGs, ``manifest.json``
(:data:`~stylear_core.evaluation.style_eval.EVALUATE_FORMAT`) and ``<run_dir>/report.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from stylear_core.adapters.format import adapter_model_config
from stylear_core.config import ConfigError, Resources, option, to_dict
from stylear_core.evaluation.style_eval import (
    BASE_VARIANT,
    EVALUATE_FORMAT,
    EvalSamplingConfig,
    HeldPairsConfig,
    evaluate_variant,
    held_pairs,
    summarize,
    write_style_eval,
)
from stylear_core.models.presets import ModelConfig
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.stages import StageConfig


@dataclass
class StyleEvalStageConfig(StageConfig):
    """Variants, held pairs, sampling and resources of the evaluation stage."""

    RENAMED_KEYS: ClassVar[dict] = {
        **StageConfig.RENAMED_KEYS,
        "cpus_per_variant": "resources.cpus",
        "gpus_per_variant": "resources.gpus",
    }

    output_dir: str = option("runs/tiny/evaluate", "stage output directory")
    adapters: dict[str, str] = option(
        {"sft": "{run_dir}/train_style/adapter", "dpo": "{run_dir}/train_dpo/adapter"},
        "variant name -> adapter dir, evaluated beside the untuned base model",
    )
    tuned: str = option("dpo", "the variant the headline compares with the base")
    headline: str = option(
        "code_style",
        "the style score that decides style_improved (code_style: VQ codes shared with the reference)",
        choices=("code_style", "palette", "clip_style"),
    )
    model: ModelConfig | None = option(None, "model block (default: the one in the tuned adapter's manifest)")
    pairs: HeldPairsConfig = option(HeldPairsConfig, "held (prompt, style reference) pairs")
    sampling: EvalSamplingConfig = option(EvalSamplingConfig, "sampling and the reference view")
    resources: Resources = option(Resources, "CPUs and GPUs of each variant's task")
    require_improvement: bool = option(False, "fail the stage unless the tuned style scores beat the base")
    report: bool = option(True, "write <run_dir>/report.html")

    def validate(self) -> None:
        """The headline variant must be one of the adapters; ``base`` is reserved."""
        if BASE_VARIANT in self.adapters:
            raise ConfigError(f"adapters: {BASE_VARIANT!r} names the untuned model and cannot be an adapter")
        if self.tuned not in self.adapters:
            raise ConfigError(f"tuned: {self.tuned!r} is not one of adapters {sorted(self.adapters)}")


def run_style_evaluation(cfg: StyleEvalStageConfig) -> dict[str, Any]:
    """Evaluate every variant of ``cfg`` on the attached cluster, write the outputs, the manifest and the report.

    Returns the headline. With ``require_improvement`` and no improvement, the manifest says ``failed``
    (a rerun evaluates again) and :class:`RuntimeError` is raised.
    """
    import ray

    adapters = {v: cfg.path(p) for v, p in cfg.adapters.items()}
    missing = [p for p in adapters.values() if read_manifest(p) is None]
    if missing:
        raise FileNotFoundError(f"adapter dir(s) without a manifest: {missing}")
    model = adapter_model_config(adapters[cfg.tuned], cfg.model)
    held = replace(cfg.pairs, path=cfg.path(cfg.pairs.path)) if cfg.pairs.path else cfg.pairs
    pairs = held_pairs(held, model.image_size)
    task = ray.remote(evaluate_variant).options(**cfg.resources.ray_options())
    variants: dict[str, str | None] = {BASE_VARIANT: None, **adapters}
    futures = [task.remote(v, a, model, pairs, cfg.sampling) for v, a in variants.items()]
    rows = [row for result in ray.get(futures) for row in result]
    summary = summarize(rows, variants, cfg.tuned, cfg.headline)
    out = cfg.stage_dir
    write_style_eval(out, rows, summary)
    headline = {
        "tuned": cfg.tuned,
        "pairs": len(pairs),
        "samples": len(rows),
        "style_improved": summary["style_improved"],
        **{
            f"{v}_{k}": summary["metrics"][v][k]
            for v in variants
            for k in ("code_style", "palette", "clip_style", "clip_text")
        },
        **{f"delta_{k}": v for k, v in summary["delta_tuned_minus_base"].items()},
    }
    # A required improvement that did not happen leaves the stage "failed": a rerun evaluates again.
    failed = cfg.require_improvement and not summary["style_improved"]
    status = "failed" if failed else "complete"
    write_manifest(out, EVALUATE_FORMAT, status=status, config=to_dict(cfg), summary=headline)
    if cfg.report:
        from stylear_core.evaluation.run_report import write_report

        print(f"[evaluate] report: {write_report(Path(cfg.run_dir).resolve())}", flush=True)
    if failed:
        print(f"[evaluate] {headline}", flush=True)
        raise RuntimeError(
            f"the tuned adapter's style scores are not above the base: {summary['delta_tuned_minus_base']}"
        )
    return headline


__all__ = ["StyleEvalStageConfig", "run_style_evaluation"]
