"""The StyleAR model's settings as a plain dataclass, importable without torch (the HTTP ingress loads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stylear_core.config import ConfigError, option

if TYPE_CHECKING:
    import torch


@dataclass
class ModelConfig:
    """Which StyleAR model to build: preset, local checkpoint paths, adapter and style-token settings."""

    preset: Literal["tiny", "mini", "lumina7b"] = option(
        "tiny",
        "tiny random models (CPU plumbing), the miniature world's sizes (CPU; trained weights from "
        "backbone_path / vqgan_ckpt, see stylear_core.miniature) or the real Lumina-mGPT-7B sizes",
    )
    backbone_path: str | None = option(
        None, "local Hugging Face-format Lumina-mGPT dir (config.json + safetensors)"
    )
    tokenizer_path: str | None = option(
        None, "local Chameleon/Lumina tokenizer dir (default: backbone_path; tiny: byte-level tokenizer)"
    )
    vqgan_ckpt: str | None = option(
        None, "Chameleon vqgan.ckpt (taming layout), or its tensors-only .safetensors conversion"
    )
    vqgan_yaml: str | None = option(None, "Chameleon vqgan.yaml (default: Chameleon's sizes)")
    clip_checkpoint: str | None = option(None, "local open_clip ViT-H-14 weights file or dir")
    stylear_release: str | None = option(
        None, "dir with StyleAR's released model.safetensors (LoRA) + image_proj.pth"
    )
    prompt_template: Literal["auto", "lumina", "stylear_release"] = option(
        "auto",
        "style-prompt wording and placeholder: lumina (resolution template, <reserved08896>), "
        "stylear_release (the release's 'Instant style Generation ... S* ...', S* = id 16393); "
        "auto = stylear_release when stylear_release is set, else lumina",
    )
    lora_rank: int = option(4, "LoRA rank on q/k/v/o, MLP down_proj and lm_head")
    lora_alpha: float = option(4.0, "LoRA alpha (scaling = alpha / rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    num_style_tokens: int = option(
        16, "style tokens per image = placeholder ids per prompt (resampler queries)"
    )
    noise_strength_train: float = option(0.1, "std of the Gaussian noise added to style tokens in training")
    noise_strength_infer: float = option(0.3, "std of the Gaussian noise added to style tokens at inference")
    image_size: int = option(768, "generated / trained image side in pixels (multiple of 32)")
    trainable: Literal["lora", "full"] = option("lora", "train LoRA factors only, or the whole backbone")
    gradient_checkpointing: bool | float = option(
        False,
        "recompute decoder layers in the backward pass: true = every layer, false = none, a number in "
        "(0, 1] = that fraction of the decoder layers, spread evenly (0.5 = every 2nd, 0.25 = every 4th): "
        "less recompute for more activation memory. The 7B LoRA default is to be chosen from a GPU run "
        "(the smallest fraction whose step fits in memory, benchmarks/gpu_check.sh); until that run the "
        "lumina7b configs keep true",
    )
    padding_free: bool = option(
        True,
        "training and scoring run each row as real prompt | real image | pads with no attention mask "
        "(causal SDPA, its flash path on GPU); false = the padded layout with an explicit mask",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "parameter dtype of the built models"
    )
    seed: int = option(0, "seed of the random initialisation (tiny preset, missing checkpoints)")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot build a model."""
        if self.num_style_tokens <= 0:
            raise ConfigError(f"num_style_tokens: must be positive, got {self.num_style_tokens}")
        if self.image_size <= 0 or self.image_size % 32:
            raise ConfigError(f"image_size: {self.image_size} is not a positive multiple of 32")
        if self.lora_rank <= 0:
            raise ConfigError(f"lora_rank: must be positive, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        for name in ("noise_strength_train", "noise_strength_infer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        gc = self.gradient_checkpointing
        if not isinstance(gc, bool) and not 0.0 <= gc <= 1.0:
            raise ConfigError(f"gradient_checkpointing: a fraction must be in [0, 1], got {gc}")
        if self.stylear_release and self.trainable != "lora":
            raise ConfigError("stylear_release: the release is a LoRA adapter; it needs trainable: lora")

    def checkpointed_layers(self, num_layers: int) -> list[int]:
        """Indices of the decoder layers that ``gradient_checkpointing`` recomputes, of ``num_layers``.

        A fraction ``f`` checkpoints ``round(f * num_layers)`` layers (at least one when ``f > 0``), spread
        evenly from layer 0: which layers does not change the memory saved, spreading keeps it even.
        """
        gc = self.gradient_checkpointing
        fraction = (1.0 if gc else 0.0) if isinstance(gc, bool) else float(gc)
        if fraction <= 0 or num_layers <= 0:
            return []
        count = min(num_layers, max(1, round(fraction * num_layers)))
        return sorted({(j * num_layers) // count for j in range(count)})

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, not at module level: configs load where torch is not needed (the HTTP ingress)

        return getattr(torch, self.dtype)

    @property
    def resolved_prompt_template(self) -> str:
        """``prompt_template`` with ``auto`` resolved: released weights get the wording they were trained on."""
        if self.prompt_template == "auto":
            return "stylear_release" if self.stylear_release else "lumina"
        return self.prompt_template
