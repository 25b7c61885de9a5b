"""The Ray Data actors of proxy data (stage 2): supervisor generation and the subject / prompt filter.

:class:`ProxyGenerateActor` turns generation rows into proxy images with each row's subject LoRA
(:class:`~stylear_core.proxy.supervisor.SupervisorSampler`); :class:`SubjectFilterActor` scores them
against the subject's instance images (DINO / CLIP-I) and the prompt without the identifier (CLIP-T)
and marks those under :class:`ProxyFilterConfig`'s thresholds with ``error`` / ``error_stage``;
:func:`with_token_source` makes kept rows the tokenizer's input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stylear_core.config import option
from stylear_core.data.batch_columns import Batch, batch_num_rows, batch_to_table, batch_values
from stylear_core.data.images import ImageDecodeError, decode_image, encode_png
from stylear_core.evaluation.metric_models import SubjectMetricsConfig, build_metric_models
from stylear_core.evaluation.metrics import paired_cosine, subject_similarity
from stylear_core.proxy.supervisor import SupervisorConfig, SupervisorSampler

log = logging.getLogger(__name__)

PROXY_SOURCE = "proxy"  # the ``source`` of proxy rows, curated and tokenized alike
GENERATE_STAGE = "generate"
SUBJECT_FILTER_STAGE = "subject_filter"
PROMPT_FILTER_STAGE = "prompt_filter"
TOKENIZE_STAGE = "tokenize"
GENERATION_STAGES = (GENERATE_STAGE, SUBJECT_FILTER_STAGE, PROMPT_FILTER_STAGE)


@dataclass
class ProxyFilterConfig:
    """Which proxy images are kept: subject similarity and prompt adherence thresholds."""

    subject_metric: str = option(
        "dino", "subject-similarity score: dino or clip_i", choices=("dino", "clip_i")
    )
    subject_threshold: float = option(0.5, "drop images whose mean cosine with the instance images is lower")
    text_threshold: float = option(0.2, "drop images whose CLIP-T (identifier removed) is lower")
    models: SubjectMetricsConfig = option(SubjectMetricsConfig, "the DINO and CLIP feature extractors")


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
        n = batch_num_rows(batch)
        ids = [str(i) for i in batch_values(batch, "id", n)]
        subjects = batch_values(batch, "subject", n)
        prompts = batch_values(batch, "prompt", n)
        seeds = [int(s) for s in batch_values(batch, "seed", n)]
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
                "source": pa.array([PROXY_SOURCE] * n, pa.string()),
                "style_ref": pa.array(subjects, pa.string()),
                "clip_text_score": pa.nulls(n, pa.float32()),
                "width": pa.array([side if good else None for good in ok], pa.int32()),
                "height": pa.array([side if good else None for good in ok], pa.int32()),
                "seed": pa.array(seeds, pa.int64()),
                "subject": pa.array(subjects, pa.string()),
                "identifier": pa.array(batch_values(batch, "identifier", n), pa.string()),
                "plain_prompt": pa.array(batch_values(batch, "plain_prompt", n), pa.string()),
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
        table = batch_to_table(batch)
        n = table.num_rows
        errors = batch_values(table, "error", n)
        stages = batch_values(table, "error_stage", n)
        subjects = batch_values(table, "subject", n)
        plain = batch_values(table, "plain_prompt", n)
        images = batch_values(table, "image", n)
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
    return table.append_column("source", pa.array([PROXY_SOURCE] * table.num_rows, pa.string()))


__all__ = [
    "GENERATION_STAGES",
    "PROXY_SOURCE",
    "ProxyFilterConfig",
    "ProxyGenerateActor",
    "SubjectFilterActor",
    "with_token_source",
]
