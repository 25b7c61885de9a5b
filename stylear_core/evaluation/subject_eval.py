"""Subject-driven evaluation: the diffusion supervisor and the AR student on the same prompts, DreamBench metrics.

For every subject, each evaluation prompt template (DreamBench's object prompts by default) is filled
with the subject's identifier and drawn ``images_per_prompt`` times with seeds ``seed .. seed + n - 1``
by both models. Each model's images are scored with :func:`~stylear_core.evaluation.metrics.subject_metrics`
(DINO and CLIP-I against the subject's real instance images, CLIP-T against the prompt with the
identifier removed) and the results go into one table: a row per (model, subject) and a mean row per
model, written as ``metrics.parquet``, ``metrics.csv`` and ``metrics.md``.

* :class:`StudentGenerator` loads a subject adapter (``stylear.adapter/1``, kind ``subject``) onto the
  base model its manifest names and generates with the inference engine (batched CFG, text prompts).
* The supervisor side is :class:`~stylear_core.proxy.supervisor.SupervisorSampler` (stage 1's LoRAs on
  one supervisor pipeline).
* :func:`run_subject_eval` runs supervisor generation, student generation (in parallel) and scoring as
  Ray tasks with the configured GPUs; images are written under ``<output_dir>/images/<model>/<subject>/``
  and a rerun generates only missing images.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stylear_core.config import ConfigError, from_dict, option
from stylear_core.data.images import decode_image, encode_png
from stylear_core.evaluation.metric_models import SubjectMetricsConfig, build_metric_models
from stylear_core.evaluation.metrics import subject_metrics
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.generator import StyleARGenerator
from stylear_core.models.config import ModelConfig
from stylear_core.proxy.supervisor import SupervisorConfig, SupervisorSampler, TunedSubject
from stylear_core.runs import read_manifest

SUBJECT_EVAL_FORMAT = "stylear.evaluate_subject/1"
METRIC_NAMES = ("dino", "clip_i", "clip_t")
MODEL_NAMES = ("supervisor", "student")
MEAN_ROW = "(mean)"
TABLE_COLUMNS = ("model", "subject", "identifier", "class_noun", "images", *METRIC_NAMES)


# ---------------------------------------------------------------------------------------------
# The AR student


@dataclass
class StudentSamplingConfig(SamplingConfig):
    """How the AR student samples (the shared :class:`SamplingConfig`, Lumina-mGPT's defaults; its prompts
    are text-only, so ``noise_strength`` does not apply) and where it runs."""

    max_batch: int = option(16, "images decoded together")
    device: str = option("auto", "torch device; auto = cuda if available else cpu")


class StudentGenerator:
    """The AR student of a subject adapter: ``generate(prompts, seeds)`` -> PIL images at its image size.

    Takes the adapter directory (``stylear.adapter/1``: LoRA or full weights, resampler, a manifest with
    ``model_config``) and the sampling settings. The model is built from the manifest's model block (the
    base the adapter was trained on), the adapter loaded onto it (a
    :class:`~stylear_core.inference.generator.StyleARGenerator`), and prompts are tokenized in Lumina's
    plain text-to-image template (no style tokens), as the subject adapter was trained.
    """

    def __init__(self, adapter_dir: str | Path, sampling: StudentSamplingConfig | None = None) -> None:
        self.sampling = sampling or StudentSamplingConfig()
        manifest = read_manifest(adapter_dir) or {}
        if "model_config" not in manifest:
            raise ConfigError(
                f"{adapter_dir}: the adapter manifest has no model_config (not a training export)"
            )
        self.manifest = manifest
        self.model_cfg = from_dict(ModelConfig, manifest["model_config"])
        self.generator = StyleARGenerator(
            self.model_cfg, adapter_dir, self.sampling.device, max_batch=self.sampling.max_batch
        )

    @property
    def subjects(self) -> list[dict[str, str]]:
        """The subjects the adapter was tuned on (``name``, ``identifier``, ``class_noun``)."""
        return list(self.manifest.get("subjects", []))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One image per prompt, image ``i`` sampled with seed ``seeds[i]``."""
        if not prompts:
            return []
        generated = self.generator.text(prompts, seeds, self.sampling)
        # One VQ decode per image, as the serving model decodes: a batched decode rounds differently.
        return [self.generator.decode(row.unsqueeze(0), generated.layout)[0] for row in generated.tokens]


# ---------------------------------------------------------------------------------------------
# Prompts, images, scores, table


@dataclass(frozen=True)
class EvalPrompt:
    """One image to draw: the ``subject``, its ``prompt`` (with the identifier), the ``plain_prompt``
    CLIP-T scores against (identifier removed), the ``seed`` and the image's file ``stem``."""

    subject: str
    prompt: str
    plain_prompt: str
    seed: int
    stem: str


def eval_prompts(
    subjects: Sequence[TunedSubject], templates: Sequence[str], images_per_prompt: int, seed: int = 0
) -> list[EvalPrompt]:
    """Every subject's prompts: each template filled with its ``identifier`` / ``class_noun``, drawn
    ``images_per_prompt`` times with seeds ``seed, seed + 1, ...`` (the same for both models)."""
    out = []
    for s in subjects:
        for t, template in enumerate(templates):
            prompt = template.format(identifier=s.identifier, class_noun=s.class_noun)
            plain = s.without_identifier(prompt)
            out.extend(
                EvalPrompt(s.name, prompt, plain, seed + j, f"p{t:03d}-{j:02d}")
                for j in range(images_per_prompt)
            )
    return out


def image_path(output_dir: str | Path, model: str, prompt: EvalPrompt) -> Path:
    """Where ``model``'s image of ``prompt`` is written: ``<output_dir>/images/<model>/<subject>/<stem>.png``."""
    return Path(output_dir) / "images" / model / prompt.subject / f"{prompt.stem}.png"


def write_missing_images(
    generate: Any, output_dir: str | Path, model: str, prompts: Sequence[EvalPrompt], by_subject: bool = False
) -> list[str]:
    """Draw the images of ``prompts`` not yet on disk with ``generate(prompts, seeds) -> images`` (per subject
    after ``generate.activate(subject)`` when ``by_subject``); returns every image path, in prompt order."""
    paths = [image_path(output_dir, model, p) for p in prompts]
    groups: dict[str, list[int]] = {}
    for i, (p, path) in enumerate(zip(prompts, paths)):
        if not path.is_file():
            groups.setdefault(p.subject if by_subject else "", []).append(i)
    for subject, members in groups.items():
        if by_subject:
            generate.activate(subject)
        images = generate.generate([prompts[i].prompt for i in members], [prompts[i].seed for i in members])
        for i, image in zip(members, images):
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[i].with_suffix(".tmp")
            tmp.write_bytes(encode_png(image))
            tmp.replace(paths[i])  # a killed run never leaves a half-written image
    return [str(p) for p in paths]


def score_models(
    metrics: SubjectMetricsConfig,
    subjects: Sequence[Mapping[str, Any]],
    prompts: Sequence[EvalPrompt],
    images: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """The metrics table rows: per model (``images``: model -> image paths in prompt order) and subject
    (``subjects``: name, identifier, class_noun, ``image_paths`` of the real instance images), DINO, CLIP-I
    and CLIP-T; then a mean row per model (the mean over subjects, as DreamBench averages)."""
    dino, clip = build_metric_models(metrics)
    rows = []
    for model, paths in images.items():
        per_subject = []
        for s in subjects:
            members = [i for i, p in enumerate(prompts) if p.subject == s["name"]]
            generated = [decode_image(Path(paths[i]).read_bytes()) for i in members]
            references = [decode_image(Path(p).read_bytes()) for p in s["image_paths"]]
            plain = [prompts[i].plain_prompt for i in members]
            scores = subject_metrics(generated, references, plain, dino, clip)
            per_subject.append(
                {
                    "model": model,
                    "subject": s["name"],
                    "identifier": s["identifier"],
                    "class_noun": s["class_noun"],
                    "images": len(members),
                    **scores,
                }
            )
        rows.extend(per_subject)
        mean = {m: sum(r[m] for r in per_subject) / len(per_subject) for m in METRIC_NAMES}
        images_total = sum(r["images"] for r in per_subject)
        rows.append(
            {
                "model": model,
                "subject": MEAN_ROW,
                "identifier": "",
                "class_noun": "",
                "images": images_total,
                **mean,
            }
        )
    return rows


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Table rows -> a pyarrow table of :data:`TABLE_COLUMNS` (metrics float64, images int32)."""
    types = {"images": pa.int32(), **{m: pa.float64() for m in METRIC_NAMES}}
    return pa.table({c: pa.array([r[c] for r in rows], types.get(c, pa.string())) for c in TABLE_COLUMNS})


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a GitHub markdown table (metrics to 4 decimals)."""
    header = ["model", "subject", "images", "DINO", "CLIP-I", "CLIP-T"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], r["subject"], str(r["images"]), *(f"{r[m]:.4f}" for m in METRIC_NAMES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics_table(rows: Sequence[Mapping[str, Any]], output_dir: str | Path) -> dict[str, str]:
    """Write ``metrics.parquet``, ``metrics.csv`` and ``metrics.md`` under ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out / "metrics.parquet", "csv": out / "metrics.csv", "markdown": out / "metrics.md"}
    pq.write_table(metrics_table(rows), paths["parquet"])
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(markdown_table(rows))
    return {k: str(v) for k, v in paths.items()}


def model_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{model: {dino, clip_i, clip_t}}`` from the mean rows of a metrics table."""
    return {r["model"]: {m: float(r[m]) for m in METRIC_NAMES} for r in rows if r["subject"] == MEAN_ROW}


# ---------------------------------------------------------------------------------------------
# The Ray run


def _supervisor_images(
    supervisor: SupervisorConfig, loras: Mapping[str, str], output_dir: str, prompts: Sequence[EvalPrompt]
) -> list[str]:
    missing = [p for p in prompts if not image_path(output_dir, "supervisor", p).is_file()]
    sampler = SupervisorSampler(supervisor, loras) if missing else None
    return write_missing_images(sampler, output_dir, "supervisor", prompts, by_subject=True)


def _student_images(
    adapter_dir: str, sampling: StudentSamplingConfig, output_dir: str, prompts: Sequence[EvalPrompt]
) -> list[str]:
    missing = [p for p in prompts if not image_path(output_dir, "student", p).is_file()]
    generator = StudentGenerator(adapter_dir, sampling) if missing else None
    return write_missing_images(generator, output_dir, "student", prompts)


def check_adapter_subjects(adapter_dir: str | Path, subjects: Sequence[TunedSubject]) -> None:
    """Raise :class:`ConfigError` unless ``adapter_dir`` is a subject adapter tuned on every one of ``subjects``
    with the same identifiers."""
    manifest = read_manifest(adapter_dir) or {}
    if manifest.get("kind") != "subject":
        raise ConfigError(f"{adapter_dir}: not a subject adapter (manifest kind {manifest.get('kind')!r})")
    known = {s.get("name"): s.get("identifier") for s in manifest.get("subjects", [])}
    for s in subjects:
        if known.get(s.name) != s.identifier:
            raise ConfigError(
                f"{adapter_dir}: subject {s.name!r} (identifier {s.identifier!r}) is not among "
                f"the adapter's subjects {known}"
            )


def run_subject_eval(
    subjects: Sequence[TunedSubject],
    supervisor: SupervisorConfig,
    adapter_dir: str | Path,
    prompts: Sequence[EvalPrompt],
    sampling: StudentSamplingConfig,
    metrics: SubjectMetricsConfig,
    output_dir: str | Path,
    num_gpus: float = 1.0,
    num_cpus: float = 1.0,
) -> dict[str, Any]:
    """Generate ``prompts`` with the supervisor (stage-1 LoRAs of ``subjects``) and the student (``adapter_dir``)
    as two parallel Ray tasks, score both in a third, write the table under ``output_dir``.

    Gives ``{"rows", "models" (per-model means), "table" (file paths), "images"}``. Call ``ray.init`` first.
    """
    import ray

    check_adapter_subjects(adapter_dir, subjects)
    out = str(Path(output_dir).resolve())
    options = {"num_gpus": num_gpus, "num_cpus": num_cpus}
    loras = {s.name: s.lora_dir for s in subjects}
    supervisor_ref = (
        ray.remote(_supervisor_images).options(**options).remote(supervisor, loras, out, list(prompts))
    )
    student_ref = (
        ray.remote(_student_images).options(**options).remote(str(adapter_dir), sampling, out, list(prompts))
    )
    images = dict(zip(MODEL_NAMES, ray.get([supervisor_ref, student_ref])))
    entries = [{**s.entry(), "image_paths": list(s.image_paths)} for s in subjects]
    rows = ray.get(
        ray.remote(score_models).options(**options).remote(metrics, entries, list(prompts), images)
    )
    if not all(math.isfinite(r[m]) for r in rows for m in METRIC_NAMES):
        raise RuntimeError(f"non-finite metric in {rows}")
    table = write_metrics_table(rows, out)
    return {
        "rows": rows,
        "models": model_means(rows),
        "table": table,
        "images": sum(len(v) for v in images.values()),
    }


__all__ = [
    "SUBJECT_EVAL_FORMAT",
    "MEAN_ROW",
    "EvalPrompt",
    "StudentGenerator",
    "StudentSamplingConfig",
    "check_adapter_subjects",
    "eval_prompts",
    "image_path",
    "markdown_table",
    "metrics_table",
    "model_means",
    "run_subject_eval",
    "score_models",
    "write_metrics_table",
    "write_missing_images",
]
