"""The ``pretrain`` stage: the miniature world's base text-to-image model, trained by the project's own loop.

1. :func:`~stylear_core.miniature.world.ensure_world` trains (or reuses) the VQGAN and the judges.
2. Procedural (prompt, image) pairs in the training styles are VQ-encoded into token shards.
3. The whole ``mini`` backbone trains on them with plain Lumina-mGPT text prompts (no style tokens)
   through :func:`~stylear_core.training.loop.run_training`: Ray Train + DeepSpeed ZeRO, checkpoints,
   resume, exactly as SFT runs.
4. The trained backbone is saved in the Hugging Face layout under the cache, where the ``mini``
   preset's ``backbone_path`` points (a user adapting their own base would do the same).
5. The base is measured: images for held-out prompts, read by the content judge (kind and place).

Every later stage of the miniature pipeline takes :attr:`PretrainConfig.model` with the paths this
stage reports (``summary.model``). A rerun reuses the cached world and base.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from stylear_core.adapters.io import load_adapter
from stylear_core.config import option, to_dict
from stylear_core.curation.tokenize import token_vocab
from stylear_core.data.images import to_tensor
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import TOKEN_SHARDS_SCHEMA, rows_to_table
from stylear_core.data.synthetic import ContentSpec, StyleSpec, render
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.generator import StyleARGenerator
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES, WORLD_IMAGE_SIZE, scenes, token_rows
from stylear_core.miniature.subjects import SubjectScene, classmate_scenes, render_subject_scene
from stylear_core.miniature.world import WorldConfig, WorldPaths, ensure_world, load_judges
from stylear_core.models.config import ModelConfig
from stylear_core.models.presets import build_prompt_tokenizer, build_stylear_model, build_vqgan
from stylear_core.runs import published_model_dir
from stylear_core.stages import StageConfig
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, read_parquet_dataset
from stylear_core.training.export import export_training_outcome
from stylear_core.training.loop import OptimizerConfig, RayTrainConfig, TrainLoopConfig, run_training
from stylear_core.training.objectives import StyleSFTObjective

PRETRAIN_FORMAT = "stylear.pretrain/1"


def mini_model_config(**overrides: Any) -> ModelConfig:
    """The ``mini`` model block (64 px, 16 style tokens) with ``overrides``."""
    return replace(
        ModelConfig(preset="mini", image_size=WORLD_IMAGE_SIZE, lora_rank=8, lora_alpha=8.0), **overrides
    )


def _pretrain_loop() -> TrainLoopConfig:
    return TrainLoopConfig(
        max_steps=3000,
        micro_batch_size=32,
        checkpoint_every=500,
        log_every=50,
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.01, warmup_steps=30, min_lr_ratio=0.05),
    )


@dataclass
class PretrainDataConfig:
    """The procedural pairs the base trains on."""

    rows: int = option(16000, "(prompt, image) pairs in the training styles, for pretraining")
    sft_rows: int = option(3000, "stylized pairs in the training styles written for SFT (sft_tokens/)")
    seed: int = option(0, "seed of the scenes")
    classmate_share: float = option(
        0.0,
        "share of the pretraining pairs that are subject class-mates ('a robot at the left', in colours "
        "not the subject's): the classes a real base knows before subject tuning (Proxy-Tuning's world)",
    )

    def key(self) -> dict[str, Any]:
        """The fields that make the base; without class-mates, as before they existed (cached bases stay valid)."""
        fields = asdict(self)
        if not self.classmate_share:
            fields.pop("classmate_share")
        else:
            # Bases trained before the class-mates were interleaved with the world scenes are not reused.
            fields["order"] = "interleaved"
        return fields


@dataclass
class BaseEvalConfig:
    """How the pretrained base is measured."""

    prompts: int = option(48, "held-out prompts (styles held out too)")
    sampling: SamplingConfig = option(
        SamplingConfig(cfg_scale=3.0, top_k=64, temperature=1.0, noise_strength=0.0),
        "sampling of the measured images",
    )
    seed: int = option(7, "seed of the held-out prompts and samples")


@dataclass
class PretrainConfig(StageConfig):
    """The miniature world: VQGAN and judges (cached), then the base model pretrained on Ray Train."""

    output_dir: str = option("{run_dir}/pretrain", "stage output directory")
    cache_dir: str = option("{run_dir}/.cache", "where the trained world and base are kept and reused")
    world: WorldConfig = option(WorldConfig, "the VQGAN and judges")
    data: PretrainDataConfig = option(PretrainDataConfig, "pretraining pairs")
    model: ModelConfig = option(mini_model_config(trainable="full"), "the base model's sizes")
    train: TrainLoopConfig = option(_pretrain_loop(), "steps, batches, ZeRO, checkpoints")
    ray: RayTrainConfig = option(RayTrainConfig(num_workers=1), "workers, storage, failures")
    eval: BaseEvalConfig = option(BaseEvalConfig, "measuring the base")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _draw_item(item: tuple[ContentSpec, StyleSpec] | SubjectScene) -> tuple[str, Image.Image]:
    if isinstance(item, SubjectScene):
        return item.prompt, render_subject_scene(item)
    content, style = item
    return content.prompt, render(content, style, WORLD_IMAGE_SIZE)


def pretraining_items(data: PretrainDataConfig) -> list[tuple[ContentSpec, StyleSpec] | SubjectScene]:
    """The base's pretraining scenes in training order: world scenes, and ``data.classmate_share`` of them
    class-mates interleaved at random (by ``data.seed``).

    The training loop reads its shards in order (so a resumed run sees the same rows), so the order
    written is the order learnt. Appended as a block, the class-mates made the last quarter of every
    epoch, and the loss jumped from 0.97 to 1.8 there as the base forgot the world scenes."""
    kin = classmate_scenes(data.seed, round(data.rows * data.classmate_share), "pretrain")
    items: list[tuple[ContentSpec, StyleSpec] | SubjectScene] = [
        *scenes(data.seed, data.rows - len(kin), TRAIN_STYLES, "pretrain"),
        *kin,
    ]
    if kin:  # without class-mates the order is the scenes' own, as bases cached before this were trained
        random.Random(f"miniature/pretrain/order/{data.seed}").shuffle(items)
    return items


def write_world_shards(
    directory: Path, model: ModelConfig, items, num_style_tokens: int, id_prefix: str
) -> Path:
    """Token shards of ``items`` (world scenes ``(content, style)`` or subject scenes) for ``model`` in
    ``directory/part-00000.parquet``."""
    vocab = token_vocab(model)  # the backbone's vocab without building the backbone
    tokenizer = build_prompt_tokenizer(model, vocab)
    layout = ImageTokenLayout.for_resolution(WORLD_IMAGE_SIZE, WORLD_IMAGE_SIZE, vocab)
    vq = build_vqgan(model, vocab)
    rows = token_rows(items, vq, layout, tokenizer, num_style_tokens, id_prefix, draw=_draw_item)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "part-00000.parquet.tmp"
    pq.write_table(rows_to_table(rows, TOKEN_SHARDS_SCHEMA), tmp)
    tmp.replace(directory / "part-00000.parquet")
    return directory / "part-00000.parquet"


def save_base(adapter_dir: Path, model: ModelConfig, target: Path) -> None:
    """The fully trained backbone of ``adapter_dir`` -> a Hugging Face-format dir at ``target`` (atomic)."""
    built = build_stylear_model(model)
    load_adapter(built, adapter_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    built.backbone.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def publish(paths: WorldPaths, base_dir: Path, target: Path) -> ModelConfig:
    """Copy the world's parts and the base into ``target`` (the stage's ``model/``), where the later stages'
    model blocks point (``{run_dir}/pretrain/model/...``); returns that ``mini`` model block. A world
    with subjects also publishes its subject judge and diffusion supervisor, which ``proxy_arms`` reads."""
    target.mkdir(parents=True, exist_ok=True)
    parts = [paths.vqgan_ckpt, paths.vqgan_yaml, paths.clip, paths.judges, paths.report]
    parts += [part for part in (paths.subject_judge, paths.supervisor) if part.exists()]
    for source in parts:
        shutil.copy2(source, target / source.name)
    shutil.rmtree(target / "base", ignore_errors=True)
    shutil.copytree(base_dir, target / "base")
    return mini_model_config(
        backbone_path=str(target / "base"),
        vqgan_ckpt=str(target / paths.vqgan_ckpt.name),
        vqgan_yaml=str(target / paths.vqgan_yaml.name),
        clip_checkpoint=str(target / paths.clip.name),
    )


def measure_base(model: ModelConfig, paths: WorldPaths, cfg: BaseEvalConfig) -> dict[str, Any]:
    """Content accuracy of the base on held-out prompts (held-out styles' scenes; text prompts only)."""
    judges = load_judges(paths)
    items = scenes(cfg.seed, cfg.prompts, HELD_OUT_STYLES, "base-eval")
    generator = StyleARGenerator(model, device="cpu", max_batch=cfg.prompts)
    seeds = [cfg.seed * 10_000 + i for i in range(len(items))]
    out = generator.text([c.prompt for c, _ in items], seeds, cfg.sampling)
    images = generator.decode(out.tokens, out.layout)
    correct = judges.content_correct(to_tensor(images), [c for c, _ in items])
    return {"content_accuracy": float(correct.float().mean()), "prompts": len(items)}


def run_pretraining(cfg: PretrainConfig) -> dict[str, Any]:
    """Make (or reuse) the world and the pretrained base; returns the stage summary with the model block."""
    cache = Path(cfg.path(cfg.cache_dir))
    paths, world = ensure_world(cfg.world, cache)
    model = replace(cfg.model, vqgan_ckpt=str(paths.vqgan_ckpt), vqgan_yaml=str(paths.vqgan_yaml))
    key = _digest(cfg.data.key(), to_dict(cfg.model), to_dict(cfg.train), cfg.world.digest())
    base_dir = paths.root / f"base-{key}"
    out = cfg.stage_dir
    trained: dict[str, Any] = {}
    if not (base_dir / "config.json").is_file():
        shards = write_world_shards(out / "tokens", model, pretraining_items(cfg.data), 0, "pretrain")
        dataset = read_parquet_dataset(str(shards), list(TOKEN_SHARD_COLUMNS))
        objective = StyleSFTObjective(model, use_style_tokens=False)
        outcome = run_training(objective, cfg.train, cfg.ray, {"train": dataset}, out)
        adapter = export_training_outcome(outcome.checkpoint, out, model, outcome.metrics, kind="pretrain")
        save_base(adapter, model, base_dir)
        trained = {
            "steps": int(outcome.metrics.get("step", 0)),
            "final_loss": outcome.metrics.get("loss"),
            "metrics_log": str(outcome.metrics_log),
        }
    base_model = publish(paths, base_dir, published_model_dir(out))
    sft_shards = out / "sft_tokens"
    if not (sft_shards / "part-00000.parquet").is_file():
        items = scenes(cfg.data.seed + 1, cfg.data.sft_rows, TRAIN_STYLES, "sft")
        write_world_shards(sft_shards, base_model, items, base_model.num_style_tokens, "sft")
    figures_path = base_dir / "base_eval.json"
    if figures_path.is_file():
        figures = json.loads(figures_path.read_text())
    else:
        figures = measure_base(base_model, paths, cfg.eval)
        figures_path.write_text(json.dumps(figures, indent=2))
    return {
        "world": str(paths.root),
        "base": str(base_dir),
        "vqgan_psnr_db": world["vqgan"]["psnr_db"],
        "judges": world["judges"],
        "base_content_accuracy": figures["content_accuracy"],
        "trained": trained or "reused",
        "model": to_dict(base_model),
        "sft_tokens": str(sft_shards),
    }


__all__ = [
    "PRETRAIN_FORMAT",
    "BaseEvalConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "measure_base",
    "mini_model_config",
    "pretraining_items",
    "run_pretraining",
]
