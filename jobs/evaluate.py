"""Style evaluation of the tuned adapters against the untuned base model, and the run's report.html.

Takes held (prompt, style reference) pairs (procedural, a seed the training data does not use), the
model block (default: the one in the ``tuned`` adapter's manifest) and ``adapters`` (variant name ->
adapter dir). Every variant -- ``base`` plus each adapter -- generates and scores the pairs in its own
Ray task (see :mod:`stylear_core.evaluation.style_eval`). Gives ``<output_dir>/{samples,metrics}.parquet``,
``metrics.json``, the sample and reference PNGs, ``manifest.json``, and ``<run_dir>/report.html``.

    python -m jobs.evaluate --config jobs/configs/evaluate/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stylear_core.config import ConfigError, from_dict, option, parse_job_args, to_dict
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
from stylear_core.ray_connection import connect_ray
from stylear_core.runs import read_manifest, write_manifest


@dataclass
class Config:
    """Variants, held pairs, sampling and resources of the evaluation stage."""

    output_dir: str = option("runs/tiny/evaluate", "stage output directory")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
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
    cpus_per_variant: float = option(1.0, "CPUs per variant task")
    gpus_per_variant: float = option(0.0, "GPUs per variant task")
    require_improvement: bool = option(False, "fail the stage unless the tuned style scores beat the base")
    report: bool = option(True, "write <run_dir>/report.html")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )

    def validate(self) -> None:
        """The headline variant must be one of the adapters; ``base`` is reserved."""
        if BASE_VARIANT in self.adapters:
            raise ConfigError(f"adapters: {BASE_VARIANT!r} names the untuned model and cannot be an adapter")
        if self.tuned not in self.adapters:
            raise ConfigError(f"tuned: {self.tuned!r} is not one of adapters {sorted(self.adapters)}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(Config, argv, __doc__)
    import ray

    adapters = {v: str(Path(p.format(run_dir=cfg.run_dir)).resolve()) for v, p in cfg.adapters.items()}
    missing = [p for p in adapters.values() if read_manifest(p) is None]
    if missing:
        raise FileNotFoundError(f"adapter dir(s) without a manifest: {missing}")
    model = cfg.model or from_dict(ModelConfig, read_manifest(adapters[cfg.tuned])["model_config"])
    pairs = held_pairs(cfg.pairs, model.image_size)
    connect_ray(cfg.ray_address, log_prefix="[evaluate]")
    task = ray.remote(evaluate_variant).options(num_cpus=cfg.cpus_per_variant, num_gpus=cfg.gpus_per_variant)
    variants: dict[str, str | None] = {BASE_VARIANT: None, **adapters}
    futures = [task.remote(v, a, model, pairs, cfg.sampling) for v, a in variants.items()]
    rows = [row for result in ray.get(futures) for row in result]
    summary = summarize(rows, variants, cfg.tuned, cfg.headline)
    out = Path(cfg.output_dir.format(run_dir=cfg.run_dir)).resolve()
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
    print(f"[evaluate] {headline}", flush=True)
    if failed:
        raise RuntimeError(
            f"the tuned adapter's style scores are not above the base: {summary['delta_tuned_minus_base']}"
        )
    return headline


if __name__ == "__main__":
    main()
