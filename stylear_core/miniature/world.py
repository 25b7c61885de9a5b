"""The miniature world's trained parts, made on first use and cached: a VQGAN, a style CLIP and judges.

:func:`ensure_world` trains what is missing under ``<cache_dir>/miniature/`` (deterministic by seed)
and measures it on held-out procedural images, writing the figures to ``world.json``:

- ``vqgan.safetensors`` + ``vqgan.yaml``: the VQGAN, in the layout of Chameleon's released tokenizer
  (so the ``mini`` model preset loads it through the same loader as the real one);
- ``judges.pt``: the style and content judges (:mod:`stylear_core.miniature.judges`);
- with ``subject_share`` above 0 (Proxy-Tuning's world, whose VQGAN also learns subject scenes):
  ``subject_judge.pt`` (:mod:`stylear_core.miniature.subjects`) and ``supervisor.pt``, the pretrained
  diffusion supervisor (:mod:`stylear_core.miniature.supervisor`).

A second call with the same config reuses the files; a different config (the hash of its fields is
part of the directory name) trains afresh beside them.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from stylear_core.config import option
from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import ALL_STYLES, ContentSpec, render, sample_content
from stylear_core.data.synthetic_subjects import SUBJECT_NAMES
from stylear_core.miniature.data import HELD_OUT_STYLES
from stylear_core.miniature.judges import (
    ContentJudge,
    Judges,
    JudgeTrainingConfig,
    StyleJudge,
    judge_accuracy,
    procedural_images,
    train_judges,
)
from stylear_core.miniature.style_clip import StyleClipTrainingConfig, train_style_clip
from stylear_core.miniature.subjects import (
    SubjectJudge,
    SubjectJudgeConfig,
    render_subject_scene,
    sample_subject_scene,
    subject_judge_accuracy,
    train_subject_judge,
)
from stylear_core.miniature.supervisor import (
    SupervisorTrainingConfig,
    WorldSupervisor,
    pretrain_supervisor,
    supervisor_content_accuracy,
)
from stylear_core.miniature.vqgan_training import VQGANTrainingConfig, psnr, train_vqgan
from stylear_core.models.config import ModelConfig
from stylear_core.models.presets import build_style_encoder
from stylear_core.models.vqgan import ChameleonVQGAN, mini_vqgan_config, random_vqgan
from stylear_core.models.vqgan_checkpoint import load_chameleon_vqgan, vqgan_config_to_yaml

WORLD_FORMAT = "stylear.miniature_world/2"
# How much more an object pixel's reconstruction error counts than a background pixel's.
OBJECT_WEIGHT = 4.0


@dataclass
class WorldConfig:
    """What the miniature world's trained parts are trained on and how."""

    seed: int = option(0, "seed of every image drawn and every initialisation")
    vq_images: int = option(2000, "procedural images the VQGAN trains on")
    vqgan: VQGANTrainingConfig = option(VQGANTrainingConfig, "VQGAN training")
    style_clip: StyleClipTrainingConfig = option(StyleClipTrainingConfig, "the style encoder's CLIP training")
    judges: JudgeTrainingConfig = option(JudgeTrainingConfig, "style and content judge training")
    held_images: int = option(256, "held-out procedural images the figures are measured on")
    subject_share: float = option(
        0.0,
        "share of the VQGAN's images that are subject scenes; above 0 the world also trains the subject "
        "judge and the diffusion supervisor (Proxy-Tuning's world)",
    )
    subject_judge: SubjectJudgeConfig = option(SubjectJudgeConfig, "subject judge training (with subjects)")
    supervisor: SupervisorTrainingConfig = option(
        SupervisorTrainingConfig, "diffusion supervisor pretraining (with subjects)"
    )

    def digest(self) -> str:
        """A short hash of every field and the world's format: a changed config, or a world whose parts
        changed shape, gets its own cache entry. A world without subjects hashes as it did before the
        subject fields existed, and one whose VQGAN has no autoencoder warm start as it did before that
        option existed, so their cached parts stay valid."""
        fields = asdict(self)
        if not self.vqgan.autoencoder_steps:
            fields["vqgan"].pop("autoencoder_steps")
        if not self.subject_share:
            for name in ("subject_share", "subject_judge", "supervisor"):
                fields.pop(name)
        return hashlib.sha256(json.dumps([WORLD_FORMAT, fields], sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class WorldPaths:
    """Where one trained world lives."""

    root: Path

    @property
    def vqgan_ckpt(self) -> Path:
        return self.root / "vqgan.safetensors"

    @property
    def vqgan_yaml(self) -> Path:
        return self.root / "vqgan.yaml"

    @property
    def clip(self) -> Path:
        return self.root / "clip.safetensors"

    @property
    def judges(self) -> Path:
        return self.root / "judges.pt"

    @property
    def subject_judge(self) -> Path:
        return self.root / "subject_judge.pt"

    @property
    def supervisor(self) -> Path:
        return self.root / "supervisor.pt"

    @property
    def report(self) -> Path:
        return self.root / "world.json"


def world_paths(cache_dir: str | Path, config: WorldConfig) -> WorldPaths:
    """The directory of ``config``'s world under ``cache_dir``."""
    return WorldPaths(Path(cache_dir) / "miniature" / f"world-{config.digest()}")


def _random_images(
    seed: int, count: int, stream: str, subject_share: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random one- or two-object scenes in [-1, 1] (``subject_share`` of them subject scenes),
    and per-pixel loss weights: 1 on the background, :data:`OBJECT_WEIGHT` on the objects (where the
    scene differs from its empty background)."""
    rng = random.Random(f"world/{stream}/{seed}")
    # Subject scenes come from a stream of their own, so a world without them draws what it always drew.
    subject_rng = random.Random(f"world/{stream}/subjects/{seed}")
    images, backgrounds = [], []
    for _ in range(count):
        content, style = sample_content(rng, 2), rng.choice(ALL_STYLES)
        if subject_share and subject_rng.random() < subject_share:
            scene = sample_subject_scene(subject_rng, styles=ALL_STYLES)
            images.append(render_subject_scene(scene, 64))
            style = scene.style
        else:
            images.append(render(content, style, 64))
        backgrounds.append(render(ContentSpec(()), style, 64))
    pixels, empty = to_tensor(images), to_tensor(backgrounds)
    objects = (pixels - empty).abs().amax(dim=1, keepdim=True) > 0
    return pixels, 1.0 + (OBJECT_WEIGHT - 1.0) * objects.float()


@torch.no_grad()
def style_separation(encoder: torch.nn.Module, styles, seed: int, per_style: int = 3) -> dict[str, float]:
    """How well frozen features tell ``styles`` apart when the content varies.

    Leave-one-out nearest neighbour over ``per_style`` scenes of each style (mean-pooled penultimate
    features, cosine): how often the neighbour has the same style, palette, texture and stroke.
    """
    rng = random.Random(f"world/separation/{seed}")
    drawn = [s for s in styles for _ in range(per_style)]
    images = [render(sample_content(rng, 1), s, 64) for s in drawn]
    feats = torch.nn.functional.normalize(encoder(encoder.preprocess(images)).float().mean(dim=1), dim=-1)
    sim = feats @ feats.t()
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(dim=1).tolist()
    out = {"chance_style": 1 / len(styles)}
    for part in ("style_id", "palette", "texture", "stroke"):
        hits = [getattr(drawn[i], part) == getattr(drawn[j], part) for i, j in enumerate(nearest)]
        out[f"retrieval_{part.removesuffix('_id')}"] = sum(hits) / len(hits)
    return out


def load_vqgan(paths: WorldPaths) -> ChameleonVQGAN:
    """The world's trained VQGAN (frozen, eval mode)."""
    return load_chameleon_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml)


def load_judges(paths: WorldPaths) -> Judges:
    """The world's trained judges (eval mode)."""
    state = torch.load(paths.judges, map_location="cpu", weights_only=True)
    style, content = StyleJudge(state["width"]), ContentJudge(state["width"])
    style.load_state_dict(state["style"])
    content.load_state_dict(state["content"])
    return Judges(style.eval(), content.eval())


def load_subject_judge(paths: WorldPaths) -> SubjectJudge:
    """The world's trained subject judge (eval mode); only a world with subjects has one."""
    state = torch.load(paths.subject_judge, map_location="cpu", weights_only=True)
    judge = SubjectJudge(state["width"])
    judge.load_state_dict(state["judge"])
    return judge.eval()


def load_supervisor(paths: WorldPaths) -> WorldSupervisor:
    """The world's pretrained diffusion supervisor over its VQGAN (eval mode); only a world with subjects
    has one."""
    state = torch.load(paths.supervisor, map_location="cpu", weights_only=True)
    supervisor = WorldSupervisor(load_vqgan(paths), state["width"], state["text_dim"])
    supervisor.text.load_state_dict(state["text"])
    supervisor.unet.load_state_dict(state["unet"])
    supervisor.latent_mean.copy_(state["latent_mean"])
    supervisor.latent_std.copy_(state["latent_std"])
    return supervisor.eval()


def _train_subject_parts(
    config: WorldConfig, paths: WorldPaths, report: dict, log: Callable[[str], None]
) -> None:
    if not paths.subject_judge.exists():
        log(f"miniature world: training the subject judge ({config.subject_judge.steps} steps)")
        judge, stats = train_subject_judge(config.subject_judge, vq=load_vqgan(paths))
        report["subject_judge_training"] = stats
        state = {"width": config.subject_judge.width, "judge": judge.state_dict()}
        _atomic_write(paths.subject_judge, lambda p: torch.save(state, p))
    if not paths.supervisor.exists():
        log(f"miniature world: pretraining the diffusion supervisor ({config.supervisor.steps} steps)")
        supervisor, stats = pretrain_supervisor(
            load_vqgan(paths),
            config.supervisor,
            progress=lambda step, loss: log(
                f"  supervisor step {step}/{config.supervisor.steps} loss {loss:.4f}"
            ),
        )
        report["supervisor_training"] = stats
        state = {
            "width": config.supervisor.width,
            "text_dim": config.supervisor.text_dim,
            "text": supervisor.text.state_dict(),
            "unet": supervisor.unet.state_dict(),
            "latent_mean": supervisor.latent_mean,
            "latent_std": supervisor.latent_std,
        }
        _atomic_write(paths.supervisor, lambda p: torch.save(state, p))


@torch.no_grad()
def _measure_subject_parts(
    config: WorldConfig, paths: WorldPaths, vq: ChameleonVQGAN, judges: Judges
) -> dict:
    rng = random.Random(f"world/held-subjects/{config.seed}")
    scenes = [sample_subject_scene(rng, styles=HELD_OUT_STYLES) for _ in range(config.held_images)]
    pixels = to_tensor([render_subject_scene(s) for s in scenes])
    recon = vq.decode(vq.encode(pixels))
    judge = load_subject_judge(paths)
    names, positions = [s.subject for s in scenes], [s.position for s in scenes]
    return {
        "subject_psnr_db": psnr(pixels, recon),
        "subject_judge": {
            **subject_judge_accuracy(judge, config.seed + 1000, config.held_images),
            "vq_reconstruction_at_cell": float(judge.subject_at(recon, names, positions).float().mean()),
            "chance_identity": 1 / len(SUBJECT_NAMES),
        },
        "supervisor": supervisor_content_accuracy(load_supervisor(paths), judges, config.seed + 1000),
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def ensure_world(
    config: WorldConfig, cache_dir: str | Path, log: Callable[[str], None] = print
) -> tuple[WorldPaths, dict]:
    """Train whatever of ``config``'s world is missing under ``cache_dir``; return its paths and figures.

    The figures (``world.json``): VQGAN reconstruction PSNR on held-out images, codebook use, and
    each judge's accuracy on held-out raw images and on their VQGAN reconstructions.
    """
    paths = world_paths(cache_dir, config)
    if paths.report.exists():
        report = json.loads(paths.report.read_text())
        log(f"miniature world: reusing {paths.root}")
        return paths, report
    paths.root.mkdir(parents=True, exist_ok=True)
    report: dict = {"format": WORLD_FORMAT, "config": asdict(config)}
    if not paths.vqgan_ckpt.exists():
        log(f"miniature world: training the VQGAN ({config.vqgan.steps} steps on {config.vq_images} images)")
        vq = random_vqgan(mini_vqgan_config(), seed=config.seed)
        images, weights = _random_images(config.seed, config.vq_images, "vqgan", config.subject_share)
        stats = train_vqgan(
            vq,
            images,
            config.vqgan,
            weights=weights,
            progress=lambda step, loss: log(f"  vqgan step {step}/{config.vqgan.steps} loss {loss:.4f}"),
        )
        report["vqgan_training"] = asdict(stats)
        paths.vqgan_yaml.write_text(vqgan_config_to_yaml(vq.config))
        state = {k: v.detach().contiguous() for k, v in vq.state_dict().items()}
        _atomic_write(paths.vqgan_ckpt, lambda p: save_file(state, str(p)))
    if not paths.clip.exists():
        log(f"miniature world: training the style CLIP ({config.style_clip.steps} steps)")
        clip, stats = train_style_clip(config.style_clip)
        report["style_clip_training"] = stats
        state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
        _atomic_write(paths.clip, lambda p: save_file(state, str(p)))
    if not paths.judges.exists():
        log(f"miniature world: training the judges ({config.judges.steps} steps each)")
        judges, stats = train_judges(config.judges, load_vqgan(paths))
        report["judge_training"] = stats
        state = {
            "width": config.judges.width,
            "style": judges.style.state_dict(),
            "content": judges.content.state_dict(),
        }
        _atomic_write(paths.judges, lambda p: torch.save(state, p))
    if config.subject_share:
        _train_subject_parts(config, paths, report, log)
    start = time.perf_counter()
    vq, judges = load_vqgan(paths), load_judges(paths)
    images, contents, styles = procedural_images(config.seed + 1000, config.held_images)
    pixels = to_tensor(images)
    with torch.no_grad():
        codes = vq.encode(pixels)
        recon = vq.decode(codes)
    report["vqgan"] = {
        "psnr_db": psnr(pixels, recon),
        "codes_used_held": int(codes.unique().numel()),
        "codebook_size": vq.codebook_size,
        "latent_side": int(codes.shape[-1]),
    }
    report["judges"] = {
        "raw": judge_accuracy(judges, pixels, contents, styles),
        "vq_reconstruction": judge_accuracy(judges, recon, contents, styles),
        "chance_style": 1 / len(ALL_STYLES),
        "held_images": config.held_images,
    }
    random_encoder = build_style_encoder(ModelConfig(preset="mini", seed=config.seed))
    trained_encoder = build_style_encoder(ModelConfig(preset="mini", clip_checkpoint=str(paths.clip)))
    report["style_encoder"] = {
        "measured_on": f"{len(HELD_OUT_STYLES)} held-out styles, 3 scenes each, nearest neighbour",
        "random_tiny_clip": style_separation(random_encoder, HELD_OUT_STYLES, config.seed),
        "trained_tiny_clip": style_separation(trained_encoder, HELD_OUT_STYLES, config.seed),
    }
    if config.subject_share:
        report["subjects"] = _measure_subject_parts(config, paths, vq, judges)
    report["measure_seconds"] = time.perf_counter() - start
    _atomic_write(paths.report, lambda p: p.write_text(json.dumps(report, indent=2)))
    log(
        f"miniature world: VQGAN PSNR {report['vqgan']['psnr_db']:.1f} dB; judges on held-out images "
        f"style {report['judges']['raw']['style']:.3f} content {report['judges']['raw']['content']:.3f}"
    )
    return paths, report


__all__ = [
    "WORLD_FORMAT",
    "WorldConfig",
    "WorldPaths",
    "ensure_world",
    "load_judges",
    "load_subject_judge",
    "load_supervisor",
    "load_vqgan",
    "world_paths",
]
