"""Proxy data (stage 2): prompt rows, one supervisor for many subject LoRAs, the DINO / CLIP-T filter, and the
Ray Data job writing curated records and token shards that reruns do not redo."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from jobs import proxy_generate as job
from stylear_core.config import ConfigError, load_config
from stylear_core.curation.tokenize import token_vocab
from stylear_core.data.images import decode_image, encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import CURATED_SCHEMA, TOKEN_SHARDS_SCHEMA, validate_table
from stylear_core.data.tokenizer import text_prompt_ids
from stylear_core.evaluation.metric_models import build_metric_models
from stylear_core.evaluation.metrics import per_image_subject_scores
from stylear_core.models.presets import build_prompt_tokenizer
from stylear_core.proxy.dreambooth import LORA_FORMAT, DreamBoothConfig, add_denoiser_lora
from stylear_core.proxy.families import load_supervisor, supervisor_family
from stylear_core.proxy.proxy_actors import ProxyGenerateActor, SubjectFilterActor
from stylear_core.proxy.proxy_data import (
    PROXY_FORMAT,
    ProxyPromptConfig,
    proxy_prompt_rows,
    proxy_subject_entries,
)
from stylear_core.proxy.subjects import SubjectSetError, write_synthetic_subjects
from stylear_core.proxy.supervisor import SupervisorSampler, resolve_supervisor, tuned_subjects
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.testing.tiny_pipelines import build_tiny_sdxl_dir

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "proxy_generate" / "tiny.yaml"


def write_stage1(run_dir: Path, subjects, seed: int = 0) -> None:
    """Stage-1 outputs without training: each subject's LoRA with seeded random factors, saved as stage 1 does."""
    supervisor = build_tiny_sdxl_dir(run_dir / "models" / "tiny-sdxl-supervisor")
    family = supervisor_family("sdxl")
    for i, subject in enumerate(subjects):
        pipe = load_supervisor("sdxl", supervisor)
        torch.manual_seed(seed + i)
        params = add_denoiser_lora(family.denoiser(pipe), DreamBoothConfig(rank=4), family)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.2)
        out = run_dir / "dreambooth" / subject.name
        family.save_lora(pipe, out)
        write_manifest(
            out, LORA_FORMAT, status="complete", subject=subject.name, identifier=subject.identifier,
            class_noun=subject.class_noun, preset="sdxl", pretrained_dir=str(supervisor),
        )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proxy-run")
    write_stage1(root, write_synthetic_subjects(root / "subjects", count=2))
    return root


def tiny_config(run_dir: Path, *overrides: str):
    return load_config(job.Config, TINY_CONFIG, [f"run_dir={run_dir}", *overrides])


def test_prompt_rows_interleave_contexts_styles_actions_and_name_the_subject(run_dir):
    subjects = tuned_subjects(run_dir / "dreambooth", run_dir / "subjects")
    assert [(s.name, s.identifier, s.class_noun) for s in subjects] == [
        ("mushroom", "zwx", "mushroom"),
        ("robot", "sks", "robot"),
    ]
    cfg = ProxyPromptConfig(
        contexts=["a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"],
        styles=["a watercolor painting of a {identifier} {class_noun}"],
        actions=["a {identifier} {class_noun} held in a hand"],
        images_per_subject=6,
        seed=10,
    )
    rows = proxy_prompt_rows(subjects, cfg)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    robot = [r for r in rows if r["subject"] == "robot"]
    assert [r["kind"] for r in robot] == ["context", "style", "action", "context", "context", "style"]
    assert [r["seed"] for r in robot] == [10, 11, 12, 13, 14, 15]
    assert robot[1]["prompt"] == "a watercolor painting of a sks robot"
    assert robot[1]["plain_prompt"] == "a watercolor painting of a robot"
    assert all("sks" in r["prompt"] and "sks" not in r["plain_prompt"] for r in robot)


def test_configs_and_subjects_that_cannot_work_are_rejected(run_dir):
    with pytest.raises(ConfigError, match="does not name the subject"):
        tiny_config(run_dir, "prompts.styles=['a painting of a {class_noun}']")
    with pytest.raises(ConfigError, match="prompt_format"):
        tiny_config(run_dir, "tokenize.prompt_format=style")
    with pytest.raises(SubjectSetError, match=r"no finished DreamBooth LoRA for subject\(s\) \['teapot'\]"):
        tuned_subjects(run_dir / "dreambooth", run_dir / "subjects", ["teapot"])
    with pytest.raises(FileNotFoundError, match="no complete"):
        proxy_subject_entries(run_dir)


def test_one_supervisor_switches_subject_loras_exactly_like_loading_each_alone(run_dir):
    subjects = tuned_subjects(run_dir / "dreambooth", run_dir / "subjects")
    supervisor = resolve_supervisor(tiny_config(run_dir).supervisor, subjects)
    assert supervisor.preset == "sdxl" and supervisor.pretrained_dir.endswith("tiny-sdxl-supervisor")
    sampler = SupervisorSampler(supervisor, {s.name: s.lora_dir for s in subjects})
    prompts, seeds = ["a sks robot on the beach"] * 2, [3, 4]
    switched = {}
    for s in ("robot", "mushroom", "robot"):
        sampler.activate(s)
        switched.setdefault(s, []).append([np.asarray(im) for im in sampler.generate(prompts, seeds)])
    alone = load_supervisor("sdxl", supervisor.pretrained_dir, lora_dir=subjects[1].lora_dir)
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    expected = alone(
        prompt=prompts, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, generator=generator
    )
    for got in switched["robot"]:
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(got, expected.images))
    assert np.abs(switched["mushroom"][0][0].astype(int) - switched["robot"][0][0].astype(int)).max() > 0
    with pytest.raises(KeyError, match="no supervisor LoRA"):
        sampler.activate("teapot")


def test_filter_scores_match_the_metric_functions_and_drop_rows_under_threshold(run_dir):
    subjects = tuned_subjects(run_dir / "dreambooth", run_dir / "subjects")
    robot = subjects[1]
    instance = decode_image(Path(robot.image_paths[0]).read_bytes())
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompts = ["a sks robot on the beach", "a sks robot in the snow", "a sks robot held in a hand"]
    batch = pa.table(
        {
            "id": ["a", "b", "c"],
            "subject": ["robot"] * 3,
            "prompt": prompts,
            "plain_prompt": [robot.without_identifier(p) for p in prompts],
            "image": [encode_png(instance), encode_png(noise), None],
            "error": [None, None, "Boom: generation failed"],
            "error_stage": [None, None, "generate"],
        }
    )
    cfg = tiny_config(run_dir).filter
    keep_all = SubjectFilterActor(
        replace(cfg, subject_threshold=-1.0, text_threshold=-1.0), {"robot": robot.image_paths}
    )
    scored = keep_all(batch).to_pydict()
    dino, clip = build_metric_models(cfg.models)
    references = [decode_image(Path(p).read_bytes()) for p in robot.image_paths]
    direct = per_image_subject_scores(
        [instance, noise], references, [robot.without_identifier(p) for p in prompts[:2]], dino, clip
    )
    for column, metric in (("dino_score", "dino"), ("clip_i_score", "clip_i"), ("clip_text_score", "clip_t")):
        np.testing.assert_allclose(scored[column][:2], direct[metric].numpy(), atol=1e-5)
        assert scored[column][2] is None  # an already failed row is not scored
    assert scored["error"] == [None, None, "Boom: generation failed"]
    # The real instance image is closer to its subject than noise: a threshold between them splits them.
    assert scored["dino_score"][0] > scored["dino_score"][1]
    middle = (scored["dino_score"][0] + scored["dino_score"][1]) / 2
    split = SubjectFilterActor(
        replace(cfg, subject_threshold=middle, text_threshold=-1.0), {"robot": robot.image_paths}
    )
    out = split(batch).to_pydict()
    assert out["error"][0] is None and out["error_stage"][1] == "subject_filter"
    assert "below threshold" in out["error"][1] and out["error_stage"][2] == "generate"
    strict_text = SubjectFilterActor(
        replace(cfg, subject_threshold=-1.0, text_threshold=1.01), {"robot": robot.image_paths}
    )
    assert strict_text(batch).to_pydict()["error_stage"][:2] == ["prompt_filter", "prompt_filter"]


def _read(directory: Path) -> pa.Table:
    return pads.dataset(str(directory), format="parquet").to_table()


def test_job_generates_filters_and_tokenizes_proxy_data_under_ray(ray_session, run_dir):
    # Score the job's rows in this process first: a threshold at their median must split them.
    cfg = tiny_config(run_dir, "prompts.images_per_subject=4")
    subjects = tuned_subjects(run_dir / "dreambooth", run_dir / "subjects")
    rows = proxy_prompt_rows(subjects, cfg.prompts)
    supervisor = resolve_supervisor(cfg.supervisor, subjects)
    generated = ProxyGenerateActor(supervisor, {s.name: s.lora_dir for s in subjects})(
        pa.Table.from_pylist(rows)
    )
    keep_all = replace(cfg.filter, subject_threshold=-1.0, text_threshold=-1.0)
    local = SubjectFilterActor(keep_all, {s.name: s.image_paths for s in subjects})(generated).to_pydict()
    threshold = float(np.median(local["dino_score"]))
    local_scores = dict(zip(local["id"], local["dino_score"]))

    out = run_dir / "proxy_generate"
    argv = [
        "--config",
        str(TINY_CONFIG),
        f"run_dir={run_dir}",
        f"output_dir={out}",
        "prompts.images_per_subject=4",
    ]
    argv += [f"filter.subject_threshold={threshold}", "filter.text_threshold=-1.0"]
    summary = job.main(argv)

    curated, tokens, errors = _read(out / "curated"), _read(out / "tokens"), _read(out / "errors")
    validate_table(curated, CURATED_SCHEMA)
    validate_table(tokens, TOKEN_SHARDS_SCHEMA)
    kept, dropped = set(curated.column("id").to_pylist()), set(errors.column("id").to_pylist())
    assert kept | dropped == {r["id"] for r in rows} and not kept & dropped and kept and dropped
    for row in curated.to_pylist():
        # Ray Data actors generated and scored exactly what this process did.
        assert row["dino_score"] == pytest.approx(local_scores[row["id"]], abs=1e-5)
        assert (
            row["dino_score"] >= threshold and row["style_ref"] == row["subject"] and row["source"] == "proxy"
        )
        assert decode_image(row["image"]).size == (64, 64)
    assert set(errors.column("stage").to_pylist()) == {"subject_filter"}
    assert all(local_scores[i] < threshold for i in dropped)

    tokenizer = build_prompt_tokenizer(cfg.model, token_vocab(cfg.model))
    layout = ImageTokenLayout.for_resolution(64, 64, tokenizer.vocab)
    assert set(tokens.column("id").to_pylist()) == kept
    for row in tokens.to_pylist():
        assert row["source"] == "proxy" and row["prompt_ids"] == text_prompt_ids(
            tokenizer, row["prompt"], 64, 64
        )
        assert tokenizer.vocab.style_placeholder not in row["prompt_ids"]
        assert layout.decode(torch.tensor(row["image_tokens"])).shape == (4, 4)

    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["format"] == PROXY_FORMAT
    assert proxy_subject_entries(out) == [s.entry() for s in subjects]
    per_subject = summary["subjects"]
    assert sum(s["kept"] for s in per_subject.values()) == len(kept) == summary["tokens_written"]
    assert sum(s["filtered"] for s in per_subject.values()) == len(dropped)

    # A finished stage is skipped; without its manifest and token shards only tokenization is redone.
    files = {p: p.stat().st_mtime_ns for p in (out / "curated").glob("*.parquet")}
    assert job.main(argv)["status"] == "skipped"
    (out / "manifest.json").unlink()
    for f in (out / "tokens").glob("*.parquet"):
        f.unlink()
    rerun = job.main(argv)
    assert rerun["status"] == "complete" and rerun["rows_in"] == 0 and rerun["tokens_written"] == len(kept)
    assert {p: p.stat().st_mtime_ns for p in (out / "curated").glob("*.parquet")} == files
