"""The model block of every StyleAR job config, and the builders that turn it into models.

``preset: tiny`` builds seeded random tiny instances of every real architecture (CPU tests, the
demo); ``preset: lumina7b`` builds the real sizes and loads every local checkpoint path that is set
(a path left empty means random weights of the real size, e.g. for GPU benchmarks). Nothing is
ever downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from stylear_core.config import ConfigError
from stylear_core.data.layout import TokenVocab
from stylear_core.data.synthetic import caption_words
from stylear_core.data.tokenizer import PromptTokenizer, load_prompt_tokenizer, template_words
from stylear_core.models.backbone import (
    LuminaChameleonForCausalLM,
    lumina_mgpt_7b_768,
    mini_backbone,
    mini_vocab,
    tiny_backbone,
    tiny_vocab,
    vocab_from_vocabulary_map,
)
from stylear_core.models.backbone_checkpoint import load_lumina_backbone
from stylear_core.models.clip import ClipScorer, ClipVisionTower
from stylear_core.models.config import ModelConfig
from stylear_core.models.lora import add_lora, load_stylear_release
from stylear_core.models.resampler import StyleResampler, tiny_resampler
from stylear_core.models.stylear import StyleARModel
from stylear_core.models.vqgan import (
    ChameleonVQGAN,
    chameleon_vqgan,
    mini_vqgan_config,
    random_vqgan,
    tiny_vqgan,
    tiny_vqgan_config,
)
from stylear_core.models.vqgan_checkpoint import load_chameleon_vqgan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_backbone(
    cfg: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[LuminaChameleonForCausalLM, TokenVocab]:
    """The bare backbone (no LoRA) and its vocab: tiny random, a loaded Lumina dir, or random 7B.

    The vocab's style placeholder follows ``cfg.resolved_prompt_template``.
    """
    template = cfg.resolved_prompt_template
    if cfg.preset == "tiny":
        vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size(), prompt_template=template)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            backbone = tiny_backbone(vocab)
        return backbone.to(device=device, dtype=cfg.torch_dtype), vocab
    if cfg.preset == "mini":
        vocab = mini_vocab(prompt_template=template)
        if cfg.backbone_path:  # the miniature world's pretrained base (Hugging Face layout)
            backbone = load_lumina_backbone(cfg.backbone_path, dtype=cfg.torch_dtype, device=device)
            return backbone, vocab
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            backbone = mini_backbone(vocab)
        return backbone.to(device=device, dtype=cfg.torch_dtype), vocab
    if cfg.backbone_path:
        backbone = load_lumina_backbone(cfg.backbone_path, dtype=cfg.torch_dtype, device=device)
        return backbone, vocab_from_vocabulary_map(
            backbone.config.vocabulary_map or {}, backbone.config.vocab_size, template
        )
    vocab = TokenVocab.for_prompt_template(template)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(cfg.seed)
        backbone = lumina_mgpt_7b_768(vocab)
    return backbone.to(dtype=cfg.torch_dtype), vocab


def tiny_vqgan_codebook_size() -> int:
    """Codebook size of the tiny VQGAN (the tiny vocab reserves exactly that many image-code ids)."""
    return tiny_vqgan_config().n_embed


def build_style_encoder(cfg: ModelConfig, device: str | torch.device = "cpu") -> ClipVisionTower:
    """The frozen CLIP vision tower: random tiny ViT, or ViT-H/14 from ``clip_checkpoint`` (random if unset)."""
    if cfg.preset in ("tiny", "mini"):
        # mini: the miniature world's trained tiny CLIP when clip_checkpoint is set, else random.
        checkpoint = cfg.clip_checkpoint if cfg.preset == "mini" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            return ClipVisionTower.from_preset("tiny", checkpoint, device=device, dtype=cfg.torch_dtype)
    return ClipVisionTower.from_preset(
        "ViT-H-14", checkpoint=cfg.clip_checkpoint, device=device, dtype=cfg.torch_dtype
    )


def build_clip_scorer(cfg: ModelConfig, device: str | torch.device = "cpu") -> ClipScorer:
    """The style encoder's CLIP (same preset, checkpoint and seed) with its text tower: CLIP-I / CLIP-T scores."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # build_style_encoder's seed: one CLIP for style and score
        if cfg.preset == "tiny":
            return ClipScorer.from_preset("tiny", device=device)
        if cfg.preset == "mini":
            return ClipScorer.from_preset("tiny", cfg.clip_checkpoint, device=device)
        return ClipScorer.from_preset("ViT-H-14", cfg.clip_checkpoint, device=device)


def build_resampler(
    cfg: ModelConfig, embedding_dim: int, output_dim: int, device: str | torch.device = "cpu"
) -> StyleResampler:
    """The perceiver resampler: tiny, or StyleAR's sizes (dim 4096, depth 4, 12 heads of 64, ff x4)."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(cfg.seed + 2)
        if cfg.preset in ("tiny", "mini"):
            resampler = tiny_resampler(embedding_dim, output_dim, num_queries=cfg.num_style_tokens)
        else:
            resampler = StyleResampler(
                dim=4096,
                depth=4,
                dim_head=64,
                heads=12,
                num_queries=cfg.num_style_tokens,
                embedding_dim=embedding_dim,
                output_dim=output_dim,
                ff_mult=4,
            )
    return resampler.to(dtype=cfg.torch_dtype)


def build_stylear_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", style_encoder: nn.Module | None = None
) -> StyleARModel:
    """Compose backbone (+LoRA or full training), frozen style encoder and resampler into a :class:`StyleARModel`.

    With ``stylear_release`` set, the released LoRA and ``image_proj.pth`` are loaded (rank and alpha
    from the release); otherwise a fresh LoRA of ``lora_rank`` / ``lora_alpha`` is added when
    ``trainable`` is ``lora``, or every backbone weight trains when it is ``full``. ``style_encoder``
    replaces the preset's CLIP tower (e.g. a stand-in when features are precomputed: no ViT is built);
    it needs a ``width``.
    """
    cfg.validate()
    backbone, vocab = build_backbone(cfg, device)
    encoder = style_encoder if style_encoder is not None else build_style_encoder(cfg, device)
    resampler = build_resampler(cfg, encoder.width, backbone.config.hidden_size, device)
    if cfg.trainable == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 3)
            if cfg.stylear_release:
                load_stylear_release(cfg.stylear_release, backbone, resampler)
            else:
                add_lora(backbone, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        backbone.to(device=device, dtype=cfg.torch_dtype)
    else:
        backbone.requires_grad_(True)
    checkpointed = set(cfg.checkpointed_layers(len(backbone.model.layers)))
    if checkpointed:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # A fraction: the other layers keep their activations (transformers reads the flag per layer).
        for i, layer in enumerate(backbone.model.layers):
            layer.gradient_checkpointing = i in checkpointed
    return StyleARModel(
        backbone,
        encoder,
        resampler,
        vocab,
        noise_strength_train=cfg.noise_strength_train,
        noise_strength_infer=cfg.noise_strength_infer,
        padding_free=cfg.padding_free,
    )


def build_prompt_tokenizer(cfg: ModelConfig, vocab: TokenVocab) -> PromptTokenizer:
    """The prompt tokenizer: ``tokenizer_path`` (or ``backbone_path``) for lumina7b; for ``mini`` the word
    tokenizer over the templates' and the procedural captions' words; else the byte tokenizer."""
    path = cfg.tokenizer_path or (cfg.backbone_path if cfg.preset == "lumina7b" else None)
    words = (*template_words(), *caption_words()) if cfg.preset == "mini" else ()
    return load_prompt_tokenizer(path, vocab, words)


def build_vqgan(cfg: ModelConfig, vocab: TokenVocab, device: str | torch.device = "cpu") -> ChameleonVQGAN:
    """The image tokenizer: tiny random VQGAN, Chameleon's from ``vqgan_ckpt`` (+yaml), or random Chameleon-size.

    Raises :class:`ConfigError` if its codebook size differs from ``vocab``'s image-code count.
    """
    if cfg.preset == "tiny":
        vq = tiny_vqgan(seed=cfg.seed)
    elif cfg.vqgan_ckpt:  # Chameleon's tokenizer, or the miniature world's trained one (with its yaml)
        vq = load_chameleon_vqgan(cfg.vqgan_ckpt, cfg.vqgan_yaml)
    elif cfg.preset == "mini":
        vq = random_vqgan(mini_vqgan_config(), seed=cfg.seed)
    else:
        vq = chameleon_vqgan(seed=cfg.seed)
    if vq.codebook_size != vocab.codebook_size:
        raise ConfigError(
            f"VQGAN codebook has {vq.codebook_size} codes, the vocab maps {vocab.codebook_size}"
        )
    return vq.to(device).eval()
