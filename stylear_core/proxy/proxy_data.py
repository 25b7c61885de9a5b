"""Stage 2 of Proxy-Tuning: the DreamBooth-tuned supervisor writes proxy images of each subject, on Ray Data.

Proxy-Tuning (Wu et al., 2025, "Proxy-Tuning: Tailoring Multimodal Autoregressive Models for
Subject-Driven Image Generation", arXiv:2503.10125) trains the autoregressive student on images the
diffusion supervisor generates of the subject under many prompts. This module builds that set:

1. **rows**: per subject (a stage-1 output, :func:`tuned_subjects`), ``prompts.images_per_subject``
   prompts drawn in turn from the context, style and action templates, each naming the subject by its
   identifier ("a photo of olis robot on the beach") with its own diffusion seed;
2. **generate**: :class:`ProxyGenerateActor` (a Ray Data actor pool, ``num_gpus`` per actor) holds one
   supervisor pipeline with every subject's LoRA loaded as a named diffusers adapter, switches to each
   row's subject and generates;
3. **filter**: :class:`SubjectFilterActor` scores each image against the subject's real instance images
   (DINO or CLIP-I, :func:`~stylear_core.evaluation.metrics.subject_similarity`) and against its prompt
   with the identifier removed (CLIP-T) and drops those under the thresholds;
4. **tokenize**: the kept records go through the curation
   :class:`~stylear_core.curation.tokenize.TokenizeActor` in the plain text-to-image prompt format
   (no style placeholders), with ``source = "proxy"``.

Output directory (the curation layout; tables in the formats of :mod:`stylear_core.data.schemas`)::

    output_dir/
      curated/   stylear.curated/1 records + proxy columns (subject, identifier, dino_score, clip_i_score)
      tokens/    stylear.token_shards/1, source "proxy", text prompts with the identifier
      errors/    stylear.errors/1: failed generations and filtered images (with their scores)
      manifest.json   format stylear.proxy_generate/1: status, subjects (name, identifier, class noun), summary

Curated rows carry ``source = "stylized"`` and ``style_ref = <subject name>``: the curated schema's
``source`` does not allow ``"proxy"`` yet (:data:`CURATED_SOURCE`). Reruns do only missing work: ids
already in ``curated/`` or recorded in ``errors/`` are not generated again, and curated ids already
tokenized are not tokenized again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from stylear_core.config import ConfigError, option, to_dict
from stylear_core.curation.pipeline import ActorPoolConfig, InputTable, PassResult, map_actors, write_pass
from stylear_core.curation.stages import (
    RoutedParquetSink,
    error_ids,
    read_table,
    table_dir,
    table_files,
    written_ids,
)
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.images import ImageDecodeError, decode_image, encode_png
from stylear_core.data.schemas import CURATED_SCHEMA, TOKEN_SHARDS_SCHEMA, schema_version
from stylear_core.devices import resolve_device
from stylear_core.evaluation.metrics import paired_cosine, subject_similarity
from stylear_core.evaluation.subject_eval import SubjectMetricsConfig, build_metric_models
from stylear_core.models.presets import ModelConfig
from stylear_core.proxy.dreambooth import (
    DTYPES,
    LORA_FORMAT,
    LORA_WEIGHT_NAME,
    load_supervisor,
)
from stylear_core.proxy.subjects import SubjectSet, SubjectSetError
from stylear_core.runs import is_complete, read_manifest, write_manifest

log = logging.getLogger(__name__)

PROXY_FORMAT = "stylear.proxy_generate/1"
CURATED_SOURCE = (
    "stylized"  # CURATED_SCHEMA's `source` has no "proxy" choice yet; style_ref names the subject
)
TOKEN_SOURCE = "proxy"
GENERATE_STAGE = "generate"
SUBJECT_FILTER_STAGE = "subject_filter"
PROMPT_FILTER_STAGE = "prompt_filter"
TOKENIZE_STAGE = "tokenize"
GENERATION_STAGES = (GENERATE_STAGE, SUBJECT_FILTER_STAGE, PROMPT_FILTER_STAGE)

PROXY_CURATED_SCHEMA = pa.schema(
    [
        *CURATED_SCHEMA,
        pa.field("subject", pa.string(), nullable=False),
        pa.field("identifier", pa.string(), nullable=False),
        pa.field("dino_score", pa.float32(), nullable=True),
        pa.field("clip_i_score", pa.float32(), nullable=True),
    ],
    metadata=CURATED_SCHEMA.metadata,
)
"""Curated records (``stylear.curated/1``, whose readers allow extra columns) plus the proxy columns."""

# DreamBench's object prompts (Ruiz et al., 2023), with the subject written as "{identifier} {class_noun}".
CONTEXT_TEMPLATES = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} with a wheat field in the background",
    "a {identifier} {class_noun} with a tree and autumn leaves in the background",
    "a {identifier} {class_noun} floating on top of water",
    "a {identifier} {class_noun} on top of green grass with sunflowers around it",
    "a {identifier} {class_noun} on top of a mirror",
    "a {identifier} {class_noun} on top of a dirt road",
)
STYLE_TEMPLATES = (
    "a watercolor painting of a {identifier} {class_noun}",
    "an oil painting of a {identifier} {class_noun}",
    "a pencil sketch of a {identifier} {class_noun}",
    "a cartoon drawing of a {identifier} {class_noun}",
    "a pixel art image of a {identifier} {class_noun}",
    "a 3d render of a {identifier} {class_noun}",
    "a red {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
)
ACTION_TEMPLATES = (
    "a {identifier} {class_noun} floating in an ocean of milk",
    "a {identifier} {class_noun} held in a hand",
    "a {identifier} {class_noun} sinking into water",
    "a {identifier} {class_noun} falling through the air",
    "a {identifier} {class_noun} being lit by a spotlight",
    "a {identifier} {class_noun} half buried in sand",
)


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ProxyPromptConfig:
    """Which prompts the supervisor draws each subject under, and how many images per subject."""

    contexts: list[str] = option(list(CONTEXT_TEMPLATES), "context templates ({identifier}, {class_noun})")
    styles: list[str] = option(list(STYLE_TEMPLATES), "style templates ({identifier}, {class_noun})")
    actions: list[str] = option(list(ACTION_TEMPLATES), "action templates ({identifier}, {class_noun})")
    images_per_subject: int = option(200, "proxy images generated per subject (before filtering)")
    seed: int = option(0, "image k of a subject is drawn with diffusion seed seed + k")

    def validate(self) -> None:
        """Raise :class:`ConfigError` for no templates, a template without the identifier, or no images."""
        templates = [*self.contexts, *self.styles, *self.actions]
        if not templates:
            raise ConfigError("prompts: no templates")
        for t in templates:
            if "{identifier}" not in t:
                raise ConfigError(f"prompts: template {t!r} does not name the subject's {{identifier}}")
        if self.images_per_subject < 1:
            raise ConfigError("prompts.images_per_subject: must be >= 1")


@dataclass
class SupervisorConfig:
    """The supervisor pipeline and how it samples (its preset and weights default to stage 1's)."""

    preset: str = option("", "sdxl or sd3; '' = the preset stage 1 trained")
    pretrained_dir: str = option("", "local diffusers pipeline dir; '' = the one stage 1 trained on")
    resolution: int = option(1024, "generated image side in pixels")
    num_inference_steps: int = option(30, "denoising steps")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    dtype: str = option("float32", "pipeline dtype", choices=tuple(DTYPES))
    device: str = option("", "torch device (empty: cuda when visible, else cpu)")


@dataclass
class ProxyFilterConfig:
    """Which proxy images are kept: subject similarity and prompt adherence thresholds."""

    subject_metric: str = option(
        "dino", "subject-similarity score: dino or clip_i", choices=("dino", "clip_i")
    )
    subject_threshold: float = option(0.5, "drop images whose mean cosine with the instance images is lower")
    text_threshold: float = option(0.2, "drop images whose CLIP-T (identifier removed) is lower")
    models: SubjectMetricsConfig = option(SubjectMetricsConfig, "the DINO and CLIP feature extractors")


@dataclass
class ProxyGenerateConfig:
    """The proxy-data stage: tuned subjects, prompts, supervisor, filter, tokenizer and actor pools."""

    output_dir: str = option("runs/tiny/proxy_generate", "stage output directory (tables + manifest)")
    run_dir: str = option("runs/tiny", "the pipeline run; paths may say {run_dir}")
    ray_address: str = option(
        "auto",
        "Ray cluster: auto (RAY_ADDRESS, else the last `ray start` here), local (private instance) or host:port",
    )
    subjects_dir: str = option(
        "{run_dir}/subjects", "subject sets: <subjects_dir>/<name>/(*.png, subject.json)"
    )
    dreambooth_dir: str = option("{run_dir}/dreambooth", "stage-1 output: <dreambooth_dir>/<name>/ LoRA")
    subjects: list[str] = option([], "subjects to generate for (empty: every subject stage 1 finished)")
    prompts: ProxyPromptConfig = option(ProxyPromptConfig, "prompt templates and images per subject")
    supervisor: SupervisorConfig = option(SupervisorConfig, "the supervisor pipeline and its sampling")
    filter: ProxyFilterConfig = option(ProxyFilterConfig, "subject-similarity and prompt-adherence filter")
    model: ModelConfig = option(
        ModelConfig, "the AR model whose VQGAN / tokenizer / image size make the tokens"
    )
    tokenize: TokenizeConfig = option(TokenizeConfig(prompt_format="text"), "VQ tokenization (text prompts)")
    generate_pool: ActorPoolConfig = option(ActorPoolConfig(num_gpus=1.0, batch_size=4), "supervisor actors")
    filter_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "DINO / CLIP filter actors")
    tokenize_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "tokenizer actors")
    rows_per_file: int = option(1024, "rows gathered into one parquet file (at least)")
    progress_bars: bool = option(True, "show Ray Data's progress bars")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable setting."""
        for name in ("generate_pool", "filter_pool", "tokenize_pool"):
            try:
                getattr(self, name).validate()
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
        if self.tokenize.prompt_format != "text":
            raise ConfigError("tokenize.prompt_format: subject tuning trains text prompts, set it to text")
        if self.rows_per_file < 1:
            raise ConfigError("rows_per_file: must be >= 1")


def resolve_run_path(path: str, run_dir: str) -> str:
    """``path`` with ``{run_dir}`` filled in, made absolute (Ray workers need not share the driver's cwd)."""
    return str(Path(path.format(run_dir=run_dir)).resolve()) if path else path


# ---------------------------------------------------------------------------------------------
# Subjects and rows


@dataclass(frozen=True)
class TunedSubject:
    """A subject with its stage-1 supervisor LoRA: ``name``, ``identifier``, ``class_noun``, ``lora_dir``,
    the instance image files, and the supervisor ``preset`` / ``pretrained_dir`` the LoRA was trained on."""

    name: str
    identifier: str
    class_noun: str
    lora_dir: str
    image_paths: tuple[str, ...]
    preset: str
    pretrained_dir: str

    def without_identifier(self, prompt: str) -> str:
        """``prompt`` with the identifier word removed (what a base CLIP can score for prompt adherence)."""
        return SubjectSet(self.name, self.class_noun, self.identifier, (), Path(".")).without_identifier(
            prompt
        )

    def entry(self) -> dict[str, str]:
        """``{"name", "identifier", "class_noun"}``: the subject as adapter manifests list it."""
        return {"name": self.name, "identifier": self.identifier, "class_noun": self.class_noun}


def tuned_subjects(
    dreambooth_dir: str | Path, subjects_dir: str | Path, names: Sequence[str] | None = None
) -> list[TunedSubject]:
    """Every subject with a complete stage-1 LoRA under ``dreambooth_dir`` (only ``names`` when given), by name.

    The identifier and class noun are the ones the LoRA was trained with (its manifest); the instance
    images are read from ``subjects_dir/<name>``. Raises :class:`SubjectSetError` for a requested
    subject without a finished LoRA, or when no subject is found.
    """
    root = Path(dreambooth_dir)
    found = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p, LORA_FORMAT))
        if root.is_dir()
        else []
    )
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise SubjectSetError(
                f"{root}: no finished DreamBooth LoRA for subject(s) {missing} (found: {found})"
            )
        found = [n for n in found if n in set(names)]
    if not found:
        raise SubjectSetError(f"{root}: no finished DreamBooth LoRA (run stage 1, jobs.dreambooth, first)")
    subjects = []
    for name in found:
        manifest = read_manifest(root / name) or {}
        subject = SubjectSet.from_folder(Path(subjects_dir) / name, identifier=manifest["identifier"])
        subjects.append(
            TunedSubject(
                name=name,
                identifier=subject.identifier,
                class_noun=manifest.get("class_noun", subject.class_noun),
                lora_dir=str((root / name).resolve()),
                image_paths=tuple(str(p.resolve()) for p in subject.image_paths),
                preset=manifest["preset"],
                pretrained_dir=manifest["pretrained_dir"],
            )
        )
    return subjects


def resolve_supervisor(cfg: SupervisorConfig, subjects: Sequence[TunedSubject]) -> SupervisorConfig:
    """``cfg`` with an empty preset / pretrained_dir taken from the subjects' LoRAs, which must share one base."""
    bases = sorted({(s.preset, s.pretrained_dir) for s in subjects})
    if (not cfg.preset or not cfg.pretrained_dir) and len(bases) > 1:
        raise ConfigError(f"supervisor: the subjects' LoRAs were trained on different bases {bases}; set one")
    preset, pretrained = bases[0]
    return replace(cfg, preset=cfg.preset or preset, pretrained_dir=cfg.pretrained_dir or pretrained)


def interleaved_templates(cfg: ProxyPromptConfig) -> list[tuple[str, str]]:
    """``(kind, template)`` pairs taking contexts, styles and actions in turn, so any prefix is diverse."""
    lists = [("context", cfg.contexts), ("style", cfg.styles), ("action", cfg.actions)]
    out = []
    for i in range(max(len(t) for _, t in lists)):
        out.extend((kind, templates[i]) for kind, templates in lists if i < len(templates))
    return out


def proxy_prompt_rows(subjects: Sequence[TunedSubject], cfg: ProxyPromptConfig) -> list[dict[str, Any]]:
    """The generation rows of every subject: ``{id, subject, identifier, prompt, plain_prompt, kind, seed}``.

    Image ``k`` of a subject uses the ``k``-th interleaved template (cycling) and seed ``cfg.seed + k``;
    ``plain_prompt`` is the prompt without the identifier (what a base CLIP can score).
    """
    templates = interleaved_templates(cfg)
    rows = []
    for subject in subjects:
        for k in range(cfg.images_per_subject):
            kind, template = templates[k % len(templates)]
            prompt = template.format(identifier=subject.identifier, class_noun=subject.class_noun)
            rows.append(
                {
                    "id": f"{subject.name}-{k:06d}",
                    "subject": subject.name,
                    "identifier": subject.identifier,
                    "prompt": prompt,
                    "plain_prompt": subject.without_identifier(prompt),
                    "kind": kind,
                    "seed": cfg.seed + k,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Actors


Batch = pa.Table | Mapping[str, Any]


def _column(batch: Batch, name: str, n: int) -> list[Any]:
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if name not in names:
        return [None] * n
    values = batch[name]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _num_rows(batch: Batch) -> int:
    return batch.num_rows if isinstance(batch, pa.Table) else len(batch["id"])


class SupervisorSampler:
    """One supervisor pipeline with many subjects' stage-1 LoRAs: ``activate(subject)``, then ``generate``.

    Takes the resolved :class:`SupervisorConfig` and ``{subject: lora_dir}``. Each LoRA is loaded on first
    use as a diffusers adapter named after the subject and switched on alone with ``set_adapters``; the
    base weights are loaded once and never reloaded (the same images as ``load_supervisor(...,
    lora_dir=...)`` of that one subject).
    """

    def __init__(self, cfg: SupervisorConfig, loras: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.loras = dict(loras)
        self.device = resolve_device(cfg.device)
        self.pipe = load_supervisor(cfg.preset, cfg.pretrained_dir, self.device, DTYPES[cfg.dtype])
        self.loaded: set[str] = set()

    def activate(self, subject: str) -> None:
        """Load ``subject``'s LoRA (once) and make it the only active adapter."""
        if subject not in self.loras:
            raise KeyError(f"no supervisor LoRA for subject {subject!r} (have {sorted(self.loras)})")
        if subject not in self.loaded:
            self.pipe.load_lora_weights(
                self.loras[subject], weight_name=LORA_WEIGHT_NAME, adapter_name=subject
            )
            self.loaded.add(subject)
        self.pipe.set_adapters([subject])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One image per prompt from the active subject's supervisor, image ``i`` drawn with seed ``seeds[i]``."""
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return self.pipe(
            prompt=list(prompts),
            height=self.cfg.resolution,
            width=self.cfg.resolution,
            num_inference_steps=self.cfg.num_inference_steps,
            guidance_scale=self.cfg.guidance_scale,
            generator=generators,
        ).images


class ProxyGenerateActor:
    """Ray Data actor: generation rows -> proxy images from each row's subject supervisor (:class:`SupervisorSampler`).

    Takes the resolved :class:`SupervisorConfig` and ``{subject: lora_dir}``. ``__call__`` gives curated
    columns (PNG ``image``, size, ``seed``, ``source``, ``style_ref`` = the subject) plus the row's
    ``subject``, ``identifier``, ``plain_prompt`` and ``error`` / ``error_stage`` (a subject group that
    fails to generate is marked, not raised).
    """

    def __init__(self, cfg: SupervisorConfig, loras: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.sampler = SupervisorSampler(cfg, loras)

    def __call__(self, batch: Batch) -> pa.Table:
        """Generate a batch of rows (see the class docstring for the columns)."""
        n = _num_rows(batch)
        ids = [str(i) for i in _column(batch, "id", n)]
        subjects = _column(batch, "subject", n)
        prompts = _column(batch, "prompt", n)
        seeds = [int(s) for s in _column(batch, "seed", n)]
        images: list[bytes | None] = [None] * n
        errors: list[str | None] = [None] * n
        groups: dict[str, list[int]] = {}
        for k, subject in enumerate(subjects):
            groups.setdefault(subject, []).append(k)
        for subject, members in groups.items():
            try:
                self.sampler.activate(subject)
                generated = self.sampler.generate([prompts[k] for k in members], [seeds[k] for k in members])
            except Exception as e:  # one subject's failure must not lose the others' images
                log.warning("proxy generation failed for %s: %s", subject, e)
                for k in members:
                    errors[k] = f"{type(e).__name__}: {e}"
                continue
            for k, image in zip(members, generated):
                images[k] = encode_png(image)
        side = self.cfg.resolution
        ok = [e is None for e in errors]
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "prompt": pa.array(prompts, pa.string()),
                "image": pa.array(images, pa.binary()),
                "source": pa.array([CURATED_SOURCE] * n, pa.string()),
                "style_ref": pa.array(subjects, pa.string()),
                "clip_text_score": pa.nulls(n, pa.float32()),
                "width": pa.array([side if good else None for good in ok], pa.int32()),
                "height": pa.array([side if good else None for good in ok], pa.int32()),
                "seed": pa.array(seeds, pa.int64()),
                "subject": pa.array(subjects, pa.string()),
                "identifier": pa.array(_column(batch, "identifier", n), pa.string()),
                "plain_prompt": pa.array(_column(batch, "plain_prompt", n), pa.string()),
                "error": pa.array(errors, pa.string()),
                "error_stage": pa.array([None if good else GENERATE_STAGE for good in ok], pa.string()),
            }
        )


class SubjectFilterActor:
    """Ray Data actor: score proxy images for subject fidelity and prompt adherence, mark those under threshold.

    Takes the :class:`ProxyFilterConfig` and ``{subject: instance image files}``. Builds DINO and CLIP
    once and encodes each subject's instance images once. Per row: ``dino_score`` / ``clip_i_score``
    (mean cosine with the instance images), ``clip_text_score`` (cosine with ``plain_prompt``, the
    prompt without the identifier). A row under ``subject_threshold`` (on ``subject_metric``) gets
    ``error_stage = "subject_filter"``, else one under ``text_threshold`` gets ``"prompt_filter"``;
    rows that arrive with an error pass through unscored.
    """

    def __init__(self, cfg: ProxyFilterConfig, references: Mapping[str, Sequence[str]]) -> None:
        self.cfg = cfg
        self.references = {k: list(v) for k, v in references.items()}
        self.dino, self.clip = build_metric_models(cfg.models)
        self._reference_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference_features(self, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
        """DINO and CLIP features of ``subject``'s instance images (computed once)."""
        if subject not in self._reference_features:
            images = [decode_image(Path(p).read_bytes()) for p in self.references[subject]]
            self._reference_features[subject] = (
                self.dino.image_features(images),
                self.clip.image_features(images),
            )
        return self._reference_features[subject]

    def __call__(self, batch: Batch) -> pa.Table:
        """Score and filter a batch (see the class docstring for the columns)."""
        table = (
            batch
            if isinstance(batch, pa.Table)
            else pa.table({k: _column(batch, k, _num_rows(batch)) for k in batch})
        )
        n = table.num_rows
        errors = _column(table, "error", n)
        stages = _column(table, "error_stage", n)
        subjects = _column(table, "subject", n)
        plain = _column(table, "plain_prompt", n)
        images = _column(table, "image", n)
        scores = {name: np.full(n, np.nan, dtype=np.float32) for name in ("dino", "clip_i", "clip_t")}
        rows, decoded = [], []
        for k in range(n):
            if errors[k] is not None:
                continue
            try:
                decoded.append(decode_image(bytes(images[k] or b"")))
            except ImageDecodeError as e:
                errors[k], stages[k] = f"image: {e}", GENERATE_STAGE
                continue
            rows.append(k)
        if rows:
            dino = self.dino.image_features(decoded)
            clip = self.clip.image_features(decoded)
            text = self.clip.text_features([plain[k] for k in rows])
            scores["clip_t"][rows] = paired_cosine(clip, text).numpy()
            for j, k in enumerate(rows):
                ref_dino, ref_clip = self.reference_features(subjects[k])
                scores["dino"][k] = float(subject_similarity(dino[j : j + 1], ref_dino)[0])
                scores["clip_i"][k] = float(subject_similarity(clip[j : j + 1], ref_clip)[0])
        subject_scores = scores[self.cfg.subject_metric]
        for k in rows:
            if subject_scores[k] < self.cfg.subject_threshold:
                errors[k] = (
                    f"{self.cfg.subject_metric} subject score {subject_scores[k]:.4f} "
                    f"below threshold {self.cfg.subject_threshold}"
                )
                stages[k] = SUBJECT_FILTER_STAGE
            elif scores["clip_t"][k] < self.cfg.text_threshold:
                errors[k] = (
                    f"CLIP-T score {scores['clip_t'][k]:.4f} below threshold {self.cfg.text_threshold}"
                )
                stages[k] = PROMPT_FILTER_STAGE
        out = table.drop_columns(
            [c for c in ("error", "error_stage", "clip_text_score") if c in table.column_names]
        )
        for name, column in (
            ("dino_score", "dino"),
            ("clip_i_score", "clip_i"),
            ("clip_text_score", "clip_t"),
        ):
            out = out.append_column(
                name, pa.array(scores[column], pa.float32(), mask=np.isnan(scores[column]))
            )
        out = out.append_column("error", pa.array(errors, pa.string()))
        return out.append_column("error_stage", pa.array(stages, pa.string()))


def with_token_source(batch: pa.Table) -> pa.Table:
    """Curated proxy rows -> the tokenizer's input ``{id, prompt, image, source = "proxy"}``."""
    table = batch.select(["id", "prompt", "image"])
    return table.append_column("source", pa.array([TOKEN_SOURCE] * table.num_rows, pa.string()))


# ---------------------------------------------------------------------------------------------
# The stage


class ProxyDataRun:
    """One run of stage 2 over ``cfg`` (see the module docstring); :meth:`run` returns the summary."""

    def __init__(self, cfg: ProxyGenerateConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(resolve_run_path(cfg.output_dir, cfg.run_dir))
        self.subjects = tuned_subjects(
            resolve_run_path(cfg.dreambooth_dir, cfg.run_dir),
            resolve_run_path(cfg.subjects_dir, cfg.run_dir),
            cfg.subjects or None,
        )
        self.supervisor = resolve_supervisor(cfg.supervisor, self.subjects)
        self.rows = proxy_prompt_rows(self.subjects, cfg.prompts)
        self.passes: list[PassResult] = []

    def _sink(self, table: str, schema: pa.Schema, default_stage: str, input_ref: str) -> RoutedParquetSink:
        return RoutedParquetSink(
            table_dir(self.out, table), schema, table_dir(self.out, "errors"), default_stage, input_ref,
            self.cfg.rows_per_file,
        )  # fmt: skip

    def _write(self, name: str, ds: Any, sink: RoutedParquetSink, rows_in: int, t0: float) -> PassResult:
        result = write_pass(name, ds, sink, rows_in, t0, kind="proxy")
        self.passes.append(result)
        return result

    def generate_pass(self) -> PassResult:
        """Rows not yet curated or failed -> supervisor -> subject / prompt filter -> ``curated/`` (+ ``errors/``)."""
        t0 = time.time()
        done = written_ids(table_dir(self.out, "curated")) | error_ids(self.out, GENERATION_STAGES)
        todo = [r["id"] for r in self.rows if r["id"] not in done]
        if not todo:
            return PassResult("generate")
        source = InputTable("proxy_rows", "proxy prompt rows", table=pa.Table.from_pylist(self.rows))
        ds = source.dataset(todo, self.cfg.generate_pool.batch_size)
        loras = {s.name: s.lora_dir for s in self.subjects}
        ds = map_actors(ds, ProxyGenerateActor, (self.supervisor, loras), self.cfg.generate_pool, "pyarrow")
        references = {s.name: list(s.image_paths) for s in self.subjects}
        ds = map_actors(
            ds, SubjectFilterActor, (self.cfg.filter, references), self.cfg.filter_pool, "pyarrow"
        )
        sink = self._sink("curated", PROXY_CURATED_SCHEMA, GENERATE_STAGE, str(self.out / "curated"))
        return self._write("generate", ds, sink, len(todo), t0)

    def tokenize_pass(self) -> PassResult:
        """``curated/`` rows not yet tokenized -> TokenizeActor (text prompts) -> ``tokens/`` (+ ``errors/``)."""
        t0 = time.time()
        curated_dir = table_dir(self.out, "curated")
        done = written_ids(table_dir(self.out, "tokens")) | error_ids(self.out, (TOKENIZE_STAGE,))
        todo = sorted(written_ids(curated_dir) - done)
        if not todo:
            return PassResult("tokenize")
        curated = InputTable("curated", str(curated_dir), files=[str(f) for f in table_files(curated_dir)])
        pool = self.cfg.tokenize_pool
        ds = curated.dataset(todo, pool.batch_size, ("id", "prompt", "image"))
        ds = ds.map_batches(with_token_source, batch_format="pyarrow", batch_size=pool.batch_size)
        ds = map_actors(ds, TokenizeActor, (self.cfg.model, self.cfg.tokenize), pool, "pyarrow")
        sink = self._sink("tokens", TOKEN_SHARDS_SCHEMA, TOKENIZE_STAGE, str(curated_dir))
        return self._write("tokenize", ds, sink, len(todo), t0)

    def run(self) -> dict[str, Any]:
        """Both passes, then the manifest (status complete, subjects, summary); returns the summary."""
        import ray.data

        t0 = time.time()
        ray.data.DataContext.get_current().enable_progress_bars = self.cfg.progress_bars
        fields = {"config": to_dict(self.cfg), "subjects": [s.entry() for s in self.subjects]}
        write_manifest(self.out, PROXY_FORMAT, status="running", **fields)
        self.generate_pass()
        self.tokenize_pass()
        summary = {**self.summary(time.time() - t0), "status": "complete"}
        tables = {"curated": schema_version(CURATED_SCHEMA), "tokens": schema_version(TOKEN_SHARDS_SCHEMA)}
        write_manifest(self.out, PROXY_FORMAT, status="complete", summary=summary, tables=tables, **fields)
        return summary

    def summary(self, seconds: float) -> dict[str, Any]:
        """Counts of this run's passes and, per subject, of the tables after it."""
        subject_of = {r["id"]: r["subject"] for r in self.rows}
        curated = read_table(table_dir(self.out, "curated"), ["id"])
        tokens = read_table(table_dir(self.out, "tokens"), ["id"])
        errors = read_table(table_dir(self.out, "errors"), ["id", "stage"])
        per_subject: dict[str, Counter[str]] = {s.name: Counter() for s in self.subjects}
        for name, table in (("kept", curated), ("tokens", tokens)):
            for i in table.column("id").to_pylist() if table is not None else []:
                if i in subject_of:
                    per_subject[subject_of[i]][name] += 1
        if errors is not None:
            for i, stage in zip(errors.column("id").to_pylist(), errors.column("stage").to_pylist()):
                if i in subject_of:
                    per_subject[subject_of[i]][stage] += 1
        by_stage: Counter[str] = Counter()
        for p in self.passes:
            by_stage.update(p.errors_by_stage)
        return {
            "subjects": {
                s.name: {
                    **s.entry(),
                    "requested": self.cfg.prompts.images_per_subject,
                    "kept": per_subject[s.name]["kept"],
                    "filtered": per_subject[s.name][SUBJECT_FILTER_STAGE]
                    + per_subject[s.name][PROMPT_FILTER_STAGE],
                    "failed": per_subject[s.name][GENERATE_STAGE] + per_subject[s.name][TOKENIZE_STAGE],
                    "tokens": per_subject[s.name]["tokens"],
                }
                for s in self.subjects
            },
            "rows_in": sum(p.rows_in for p in self.passes if p.name == "generate"),
            "kept": sum(p.rows_written for p in self.passes if p.name == "generate"),
            "tokens_written": sum(p.rows_written for p in self.passes if p.name == "tokenize"),
            "errors_by_stage": dict(by_stage),
            "totals": {
                "curated": curated.num_rows if curated is not None else 0,
                "tokens": tokens.num_rows if tokens is not None else 0,
                "errors": errors.num_rows if errors is not None else 0,
            },
            "seconds": round(seconds, 2),
        }


def run_proxy_generation(cfg: ProxyGenerateConfig) -> dict[str, Any]:
    """Run stage 2 of ``cfg`` on the current Ray cluster (``ray.init`` first); returns the summary.

    A finished output directory (manifest complete) is returned as it is, with ``status: skipped``.
    """
    out = Path(resolve_run_path(cfg.output_dir, cfg.run_dir))
    if is_complete(out, PROXY_FORMAT):
        return {**(read_manifest(out) or {}).get("summary", {}), "status": "skipped"}
    return ProxyDataRun(cfg).run()


def proxy_subject_entries(proxy_dir: str | Path) -> list[dict[str, str]]:
    """The subjects a finished stage-2 directory generated for: ``[{"name", "identifier", "class_noun"}]``.

    Raises :class:`FileNotFoundError` when ``proxy_dir`` holds no complete stage-2 manifest.
    """
    if not is_complete(proxy_dir, PROXY_FORMAT):
        raise FileNotFoundError(
            f"{proxy_dir}: no complete {PROXY_FORMAT} manifest (run jobs.proxy_generate first)"
        )
    return [dict(s) for s in (read_manifest(proxy_dir) or {})["subjects"]]


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A human-readable rendering of a stage-2 summary."""
    lines = [
        f"{name}: kept {s['kept']}/{s['requested']}, filtered {s['filtered']}, failed {s['failed']}, "
        f"tokens {s['tokens']} ({s['identifier']} {s['class_noun']})"
        for name, s in summary.get("subjects", {}).items()
    ]
    lines.append(f"totals {json.dumps(summary.get('totals', {}))} in {summary.get('seconds')}s")
    return lines


__all__ = [
    "ACTION_TEMPLATES",
    "CONTEXT_TEMPLATES",
    "CURATED_SOURCE",
    "PROXY_CURATED_SCHEMA",
    "PROXY_FORMAT",
    "STYLE_TEMPLATES",
    "TOKEN_SOURCE",
    "ProxyDataRun",
    "ProxyFilterConfig",
    "ProxyGenerateActor",
    "ProxyGenerateConfig",
    "ProxyPromptConfig",
    "SubjectFilterActor",
    "SupervisorSampler",
    "SupervisorConfig",
    "TunedSubject",
    "interleaved_templates",
    "proxy_prompt_rows",
    "proxy_subject_entries",
    "resolve_run_path",
    "resolve_supervisor",
    "run_proxy_generation",
    "summary_lines",
    "tuned_subjects",
    "with_token_source",
]
