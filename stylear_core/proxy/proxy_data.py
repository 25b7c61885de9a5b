"""Stage 2 of Proxy-Tuning: the DreamBooth-tuned supervisor writes proxy images of each subject, on Ray Data.

Proxy-Tuning (Wu et al., 2025, "Proxy-Tuning: Tailoring Multimodal Autoregressive Models for
Subject-Driven Image Generation", arXiv:2503.10125) trains the autoregressive student on images the
diffusion supervisor generates of the subject under many prompts. This module builds that set:

1. **rows**: per subject (a stage-1 output, :func:`~stylear_core.proxy.supervisor.tuned_subjects`),
   ``prompts.images_per_subject`` prompts drawn in turn from the context, style and action templates
   (:mod:`stylear_core.proxy.prompts`), each naming the subject by its identifier ("a photo of olis
   robot on the beach") with its own diffusion seed;
2. **generate**: :class:`~stylear_core.proxy.proxy_actors.ProxyGenerateActor` (a Ray Data actor pool,
   ``resources.gpus`` per actor) holds one supervisor pipeline with every subject's LoRA loaded as a named
   diffusers adapter, switches to each row's subject and generates;
3. **filter**: :class:`~stylear_core.proxy.proxy_actors.SubjectFilterActor` scores each image against the
   subject's real instance images (DINO or CLIP-I,
   :func:`~stylear_core.evaluation.metrics.subject_similarity`) and against its prompt with the
   identifier removed (CLIP-T) and drops those under the thresholds;
4. **tokenize**: the kept records go through the curation
   :class:`~stylear_core.curation.tokenize.TokenizeActor` in the plain text-to-image prompt format
   (no style placeholders), with ``source = "proxy"``.

Output directory (the curation layout; tables in the formats of :mod:`stylear_core.data.schemas`)::

    output_dir/
      curated/   stylear.curated/2 records + proxy columns (subject, identifier, dino_score, clip_i_score)
      tokens/    stylear.token_shards/2, source "proxy", text prompts with the identifier
      errors/    stylear.errors/1: failed generations and filtered images (with their scores)
      manifest.json   format stylear.proxy_generate/1: status, subjects (name, identifier, class noun), summary

Curated rows carry ``source = "proxy"`` and ``style_ref = <subject name>``
(:data:`~stylear_core.data.schemas.PROXY_CURATED_SCHEMA`). Reruns do only missing work: ids
already in ``curated/`` or recorded in ``errors/`` are not generated again, and curated ids already
tokenized are not tokenized again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stylear_core.config import ConfigError, Resources, option, to_dict
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.passes import (
    ActorPoolConfig,
    InputTable,
    PassResult,
    RoutedParquetSink,
    error_ids,
    map_actors,
    read_table,
    table_dir,
    table_files,
    write_pass,
    written_ids,
)
from stylear_core.data.schemas import (
    CURATED_SCHEMA,
    PROXY_CURATED_SCHEMA,
    TOKEN_SHARDS_SCHEMA,
    schema_version,
)
from stylear_core.models.presets import ModelConfig
from stylear_core.proxy.prompts import ACTION_TEMPLATES, CONTEXT_TEMPLATES, STYLE_TEMPLATES
from stylear_core.proxy.proxy_actors import (
    GENERATE_STAGE,
    GENERATION_STAGES,
    PROMPT_FILTER_STAGE,
    SUBJECT_FILTER_STAGE,
    TOKENIZE_STAGE,
    ProxyFilterConfig,
    ProxyGenerateActor,
    SubjectFilterActor,
    with_token_source,
)
from stylear_core.proxy.supervisor import SupervisorConfig, TunedSubject, resolve_supervisor, tuned_subjects
from stylear_core.runs import is_complete, read_manifest, write_manifest
from stylear_core.stages import StageConfig

log = logging.getLogger(__name__)

PROXY_FORMAT = "stylear.proxy_generate/1"


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
class ProxyGenerateConfig(StageConfig):
    """The proxy-data stage: tuned subjects, prompts, supervisor, filter, tokenizer and actor pools."""

    output_dir: str = option("runs/tiny/proxy_generate", "stage output directory (tables + manifest)")
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
    generate_pool: ActorPoolConfig = option(
        ActorPoolConfig(resources=Resources(gpus=1.0), batch_size=4), "supervisor actors"
    )
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


# Prompt rows


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
# The stage


class ProxyDataRun:
    """One run of stage 2 over ``cfg`` (see the module docstring); :meth:`run` returns the summary."""

    def __init__(self, cfg: ProxyGenerateConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = cfg.stage_dir
        self.subjects = tuned_subjects(
            cfg.path(cfg.dreambooth_dir),
            cfg.path(cfg.subjects_dir),
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

    Rows already generated or tokenized are not redone. Skipping a finished output directory is
    :func:`~stylear_core.stages.run_stage`'s part.
    """
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
    "PROXY_FORMAT",
    "ProxyDataRun",
    "ProxyGenerateConfig",
    "ProxyPromptConfig",
    "interleaved_templates",
    "proxy_prompt_rows",
    "proxy_subject_entries",
    "run_proxy_generation",
    "summary_lines",
]
