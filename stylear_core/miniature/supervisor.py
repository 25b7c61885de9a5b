"""The miniature world's diffusion supervisor: a tiny latent diffusion model for Proxy-Tuning.

Proxy-Tuning needs a diffusion model that already draws the world, so that DreamBooth can bind a
subject to it and its samples can teach the AR student. This one is diffusers' own
``UNet2DConditionModel`` (the SD / SDXL denoiser) at tiny width, denoising the world VQGAN's
pre-quantisation latents (64 px -> 8x8x16), conditioned by cross-attention on a small word-level
text encoder trained with it. Samples are decoded by the same VQGAN, so supervisor and student share
one pixel space::

    supervisor = pretrain_supervisor(vq, SupervisorTrainingConfig())   # world (prompt, image) pairs
    images = supervisor.sample(["a large red circle at the left"], seeds=[0])

Training is the DDPM objective with v-prediction (``DDPMScheduler``, cosine schedule), with the prompt
dropped for a share of rows so that sampling can use classifier-free guidance
(``DDIMScheduler``). Everything is seeded.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch import nn

from stylear_core.config import option
from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import caption_words, render
from stylear_core.data.synthetic_subjects import SUBJECT_NAMES
from stylear_core.miniature.data import TRAIN_STYLES, WORLD_IMAGE_SIZE, scenes
from stylear_core.miniature.judges import Judges
from stylear_core.miniature.subjects import classmate_scenes, render_subject_scene, subject_token
from stylear_core.models.vqgan import ChameleonVQGAN

_WORD = re.compile(r"[A-Za-z0-9]+")
MAX_PROMPT_WORDS = 24
TRAIN_TIMESTEPS = 1000


def supervisor_words() -> tuple[str, ...]:
    """The text encoder's vocabulary: the world's caption words, then every subject's token and noun.

    The subjects' words are in the vocabulary from the start but never seen in pretraining, as a rare
    token is in a real text encoder; DreamBooth gives them their meaning."""
    subject_words = [w for name in SUBJECT_NAMES for w in (subject_token(name), name)]
    return tuple(dict.fromkeys([*caption_words(), *subject_words]))


class WordTextEncoder(nn.Module):
    """Prompt words -> ``(B, MAX_PROMPT_WORDS, dim)`` states: embeddings, positions, two causal transformer
    layers.

    Causal, as CLIP's text transformer is: a word's state depends only on the words before it, so
    ``"a sks robot"`` means the same whatever place words follow. With bidirectional attention,
    DreamBooth bound the subject to its instance prompt as a whole: the tuned supervisor drew the robot
    for ``"a sks robot in the center"`` (0.88 of samples) and almost never at any other place (0.11).
    Id 0 pads (and stands for the empty prompt), id 1 is any word outside the vocabulary."""

    def __init__(self, words: Sequence[str], dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.words = tuple(words)
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}
        self.embed = nn.Embedding(len(self.words) + 2, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(MAX_PROMPT_WORDS, dim))
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, MAX_PROMPT_WORDS)`` word ids of ``prompts`` (truncated, 0-padded)."""
        out = torch.zeros(len(prompts), MAX_PROMPT_WORDS, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = [self._ids.get(w.lower(), 1) for w in _WORD.findall(prompt)][:MAX_PROMPT_WORDS]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Encoder states of word ids (padding masked out of attention; an all-pad row attends to itself)."""
        pad = ids == 0
        pad[:, 0] = False  # an empty prompt still has one position to attend to
        h = self.embed(ids) + self.position[: ids.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=torch.bool)
        return self.norm(self.encoder(h, mask=causal, src_key_padding_mask=pad, is_causal=True))


def tiny_unet(latent_channels: int, cross_attention_dim: int, width: int = 32) -> UNet2DConditionModel:
    """diffusers' SD denoiser at tiny width over 8x8 latents: two cross-attention levels."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


@dataclass
class SupervisorTrainingConfig:
    """How the supervisor is pretrained on world (prompt, image) pairs."""

    rows: int = option(6000, "world scenes (training styles) it trains on")
    steps: int = option(5000, "optimizer steps (2000 gave content accuracy 0.23, 5000 gave 0.67)")
    batch_size: int = option(32, "pairs per step")
    lr: float = option(1e-3, "peak AdamW learning rate (cosine decay to 5%)")
    width: int = option(32, "UNet width of the first level")
    text_dim: int = option(64, "text encoder width (the UNet's cross-attention size)")
    prompt_dropout: float = option(0.1, "share of rows trained with the empty prompt (for guidance)")
    classmate_share: float = option(
        0.25,
        "share of rows that are class-mate scenes ('a robot at the top left', in random colours): the class "
        "knowledge DreamBooth builds on",
    )
    seed: int = option(0, "seed of scenes, initialisation and noise")


class WorldSupervisor(nn.Module):
    """Text encoder + UNet over the VQGAN's latents; ``sample`` decodes through the VQGAN."""

    def __init__(self, vq: ChameleonVQGAN, width: int = 32, text_dim: int = 64) -> None:
        super().__init__()
        self.text = WordTextEncoder(supervisor_words(), text_dim)
        self.unet = tiny_unet(vq.config.embed_dim, text_dim, width)
        self.vq = vq.eval().requires_grad_(False)
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=False,
            prediction_type="v_prediction",
        )
        # Per-channel mean and std of the VQGAN's latents (set by `fit_latent_scale`): the denoiser works
        # on unit-variance latents, as Stable Diffusion scales its VAE's.
        channels = vq.config.embed_dim
        self.register_buffer("latent_mean", torch.zeros(channels, 1, 1))
        self.register_buffer("latent_std", torch.ones(channels, 1, 1))

    @torch.no_grad()
    def raw_latents(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        """``(N, embed_dim, 8, 8)`` pre-quantisation latents of ``images``, as the VQGAN gives them."""
        return torch.cat(
            [
                self.vq.encode_latents(to_tensor(list(images[i : i + batch_size])))
                for i in range(0, len(images), batch_size)
            ]
        )

    def fit_latent_scale(self, raw: torch.Tensor) -> None:
        """Set the latent normalisation from ``raw`` latents (the pretraining images)."""
        self.latent_mean.copy_(raw.mean(dim=(0, 2, 3))[:, None, None])
        self.latent_std.copy_(raw.std(dim=(0, 2, 3)).clamp_min(1e-3)[:, None, None])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        """Normalised latents of ``images``: what the denoiser trains on."""
        return (self.raw_latents(images, batch_size) - self.latent_mean) / self.latent_std

    def loss(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v-prediction MSE on ``latents`` noised at ``timesteps`` (default: drawn uniformly).

        v (a mix of noise and signal) rather than the noise: at high noise, predicting the noise is
        nearly free and the loss hardly asks for the prompt; v asks for the image there."""
        noise = torch.randn(latents.shape, generator=generator)
        t = timesteps
        if t is None:
            t = torch.randint(0, TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
        noisy = self.train_scheduler.add_noise(latents, noise, t)
        states = self.text(self.text.ids(prompts))
        target = self.train_scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(self.unet(noisy, t, states).sample, target)

    @torch.no_grad()
    def sample_latents(
        self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 3.0
    ) -> torch.Tensor:
        """DDIM with classifier-free guidance: ``(B, 16, 8, 8)`` latents for ``prompts``, one seed each."""
        scheduler = DDIMScheduler.from_config(self.train_scheduler.config)
        scheduler.set_timesteps(steps)
        shape = (self.vq.config.embed_dim, 8, 8)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        cond = self.text(self.text.ids(prompts))
        uncond = self.text(self.text.ids([""] * len(prompts)))
        states = torch.cat([cond, uncond])
        for t in scheduler.timesteps:
            v_cond, v_uncond = self.unet(torch.cat([x, x]), t, states).sample.chunk(2)
            x = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, x).prev_sample
        return x

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 3.0
    ) -> torch.Tensor:
        """Pixels ``(B, 3, 64, 64)`` in [-1, 1]: sampled latents snapped to the VQ codebook, then decoded
        (the student sees the supervisor's images as VQ codes anyway)."""
        was_training = self.training
        self.eval()
        latents = self.sample_latents(prompts, seeds, steps, guidance)
        codes = self.vq.quantize.nearest_codes(latents * self.latent_std + self.latent_mean)
        self.train(was_training)
        return self.vq.decode(codes)


def train_supervisor(
    supervisor: WorldSupervisor,
    latents: torch.Tensor,
    prompts: Sequence[str],
    steps: int,
    batch_size: int,
    lr: float,
    prompt_dropout: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Denoising steps over (latent, prompt) rows; returns the first and last 50-step mean losses.

    Seeded throughout: batches, noise and the text encoder's dropout (drawn from torch's global stream,
    which is forked and seeded here, so a run repeats and the caller's stream is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(f"miniature/supervisor/batches/{seed}")
    params = [p for p in supervisor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.475 * (1 + math.cos(math.pi * s / steps)))
    )
    supervisor.train()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            index = [rng.randrange(len(prompts)) for _ in range(batch_size)]
            batch_prompts = ["" if rng.random() < prompt_dropout else prompts[i] for i in index]
            loss = supervisor.loss(latents[index], batch_prompts, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None and (step + 1) % 100 == 0:
                progress(step + 1, sum(losses[-100:]) / len(losses[-100:]))
    supervisor.eval()
    window = min(50, len(losses))
    return {"first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window}


@dataclass
class DreamBoothConfig:
    """How a pretrained supervisor is tuned on a subject's instance images (DreamBooth)."""

    steps: int = option(800, "optimizer steps")
    batch_size: int = option(16, "rows per step; half instance rows, half prior rows")
    lr: float = option(
        1e-3, "peak AdamW learning rate (2e-4 for 400 steps bound the robot in 0.25 of samples)"
    )
    prior_rows: int = option(
        1000, "prior-preservation rows: world scenes, and class-mates of the tuned subjects for half of them"
    )
    seed: int = option(0, "seed of batches and noise")


def prior_pairs(
    subjects: Sequence[str],
    count: int,
    seed: int,
    streams: tuple[str, str] = ("dreambooth-prior", "supervisor-prior"),
) -> list[tuple[str, Image.Image]]:
    """``count`` prior-preservation ``(prompt, image)`` pairs in the training styles: world scenes of one or
    two objects, then class-mates of ``subjects`` (``"a robot at the left"`` in colours not the subject's,
    half beside a world object) for half of them when there are subjects. ``streams`` name the class-mates'
    and the world scenes' random streams (DreamBooth's by default)."""
    kin = classmate_scenes(seed, count // 2, streams[0], subjects) if subjects else []
    world = scenes(seed, count - len(kin), TRAIN_STYLES, streams[1], max_objects=2)
    return [(content.prompt, render(content, style, WORLD_IMAGE_SIZE)) for content, style in world] + [
        (scene.prompt, render_subject_scene(scene)) for scene in kin
    ]


def dreambooth(
    supervisor: WorldSupervisor, instances: Sequence[tuple[str, Image.Image]], config: DreamBoothConfig
) -> tuple[WorldSupervisor, dict[str, float]]:
    """A copy of ``supervisor`` tuned on the ``(prompt, image)`` instance views of one or more subjects.

    The whole UNet and the text encoder train (DreamBooth's full fine-tune). Prior preservation keeps
    world scenes and class-mates of the tuned subjects (``"a robot at the left"``, other colours) in
    every batch, so the rest of the world and the class are not forgotten while the identifier words
    take the subject's meaning. Several subjects tune one model together."""
    start = time.perf_counter()
    tuned = copy.deepcopy(supervisor)
    kinds = sorted(
        {name for name in SUBJECT_NAMES for prompt, _ in instances if subject_token(name) in prompt.split()}
    )
    prior = prior_pairs(kinds, config.prior_rows, config.seed)
    instance_latents = tuned.encode_images([image for _, image in instances])
    prior_latents = tuned.encode_images([image for _, image in prior])
    prior_prompts = [prompt for prompt, _ in prior]
    # Batches are drawn uniformly over the rows: repeating the instance rows as often as there are
    # prior rows makes about half of every batch instance views.
    repeat = max(1, len(prior_prompts) // len(instances))
    latents = torch.cat([instance_latents.repeat(repeat, 1, 1, 1), prior_latents])
    prompts = [prompt for prompt, _ in instances] * repeat + prior_prompts
    stats = train_supervisor(
        tuned, latents, prompts, config.steps, config.batch_size, config.lr, 0.1, config.seed
    )
    stats["seconds"] = time.perf_counter() - start
    return tuned, stats


def pretrain_supervisor(
    vq: ChameleonVQGAN, config: SupervisorTrainingConfig, progress: Callable[[int, float], None] | None = None
) -> tuple[WorldSupervisor, dict[str, float]]:
    """A supervisor trained from scratch on ``config.rows`` world scenes in the training styles."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        supervisor = WorldSupervisor(vq, config.width, config.text_dim)
    kin = classmate_scenes(config.seed, round(config.rows * config.classmate_share), "supervisor")
    items = scenes(config.seed, config.rows - len(kin), TRAIN_STYLES, "supervisor", max_objects=2)
    images = [render(content, style, WORLD_IMAGE_SIZE) for content, style in items]
    raw = supervisor.raw_latents(images + [render_subject_scene(scene) for scene in kin])
    supervisor.fit_latent_scale(raw)
    latents = (raw - supervisor.latent_mean) / supervisor.latent_std
    stats = train_supervisor(
        supervisor,
        latents,
        [content.prompt for content, _ in items] + [scene.prompt for scene in kin],
        config.steps,
        config.batch_size,
        config.lr,
        config.prompt_dropout,
        config.seed,
        progress=progress,
    )
    stats["seconds"] = time.perf_counter() - start
    return supervisor, stats


@torch.no_grad()
def supervisor_content_accuracy(
    supervisor: WorldSupervisor, judges: Judges, seed: int, count: int = 48, guidance: float = 3.0
) -> dict[str, float]:
    """The content judge on the supervisor's samples for ``count`` one-object world prompts: the share
    with the prompt's object kind at the prompt's place, against the same for samples of the prompts
    rotated by one (a measured chance: right images, wrong prompt) and for the VQ round trip of the
    exact renders (the ceiling the VQGAN allows)."""
    items = scenes(seed, count, TRAIN_STYLES, "supervisor-eval", max_objects=1)
    contents = [content for content, _ in items]
    prompts = [content.prompt for content in contents]
    seeds = list(range(seed, seed + count))
    samples = supervisor.sample(prompts, seeds, guidance=guidance)
    rotated = supervisor.sample(prompts[1:] + prompts[:1], seeds, guidance=guidance)
    exact = to_tensor([render(content, style, WORLD_IMAGE_SIZE) for content, style in items])
    ceiling = supervisor.vq.decode(supervisor.vq.encode(exact))
    return {
        "content": float(judges.content_correct(samples, contents).float().mean()),
        "content_wrong_prompt": float(judges.content_correct(rotated, contents).float().mean()),
        "content_vq_ceiling": float(judges.content_correct(ceiling, contents).float().mean()),
        "prompts": count,
        "guidance": guidance,
    }


__all__ = [
    "DreamBoothConfig",
    "dreambooth",
    "SupervisorTrainingConfig",
    "WordTextEncoder",
    "WorldSupervisor",
    "pretrain_supervisor",
    "prior_pairs",
    "supervisor_content_accuracy",
    "supervisor_words",
    "tiny_unet",
    "train_supervisor",
]
