"""What one training step computes: style-token SFT and DPO on a StyleAR model, behind one interface.

An objective is built on the driver from plain configs, pickled to every Ray Train worker, and
there :meth:`setup` builds the model on the worker's device and returns the ``nn.Module`` DeepSpeed
owns. The generic loop (:mod:`stylear_core.training.loop`) only calls ``setup``, ``collate_fn``,
``compute``, ``probe``, ``export`` and ``parameter_groups``.

DeepSpeed owns the backbone and the resampler (:class:`StyleARTrainingModule`); the frozen CLIP
style encoder and VQGAN stay outside the engine, unsharded, in eval mode: ZeRO-3 would otherwise
partition them, and their non-``forward`` entry points (``encode``, ``decode``) would run on empty
parameter shards.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import make_probe, probe_outputs, probe_style_tokens
from stylear_core.data.style_features import (
    PrecomputedStyleEncoder,
    style_encoder_digest,
    style_feature_shape,
    vq_decoded_images,
)
from stylear_core.models.lora import (
    DEFAULT_ADAPTER,
    adapter_config,
    add_lora,
    lora_state_dict,
    set_lora_state_dict,
)
from stylear_core.models.presets import ModelConfig, build_prompt_tokenizer, build_stylear_model, build_vqgan
from stylear_core.models.stylear import StyleARModel
from stylear_core.preferences import reference as stored_reference
from stylear_core.training.batches import PreferenceBatchCollate, TokenBatchCollate, preference_sequences
from stylear_core.training.export import export_adapter
from stylear_core.training.losses import dpo_loss

REFERENCE_ADAPTER = "reference"
REFERENCE_LOGPS_MODES = ("auto", "cached", "live")


@dataclass
class StepResult:
    """One micro-batch: ``loss`` to back-propagate, ``tokens`` (sequence positions processed, prompt and
    image, all rows: the throughput count) and scalar ``metrics`` to average over the step."""

    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class StyleARTrainingModule(nn.Module):
    """The part of a :class:`StyleARModel` that DeepSpeed owns: ``backbone`` and ``resampler``.

    ``forward(method, **kwargs)`` dispatches to the StyleAR model: ``"loss"`` (its forward),
    ``"log_probs"``, ``"style_tokens"`` or ``"logits"`` (``sequence_logits`` from style features with
    noise 0, as :func:`probe_style_tokens` makes them).
    Going through ``forward`` keeps every call inside the DeepSpeed engine.
    """

    def __init__(self, model: StyleARModel):
        super().__init__()
        self.backbone = model.backbone
        self.resampler = model.resampler
        # A plain attribute, not a submodule: the frozen style encoder stays out of DeepSpeed's reach.
        self.__dict__["stylear"] = model

    def train(self, mode: bool = True) -> StyleARTrainingModule:
        """Switch the StyleAR model too (its noise default depends on it); CLIP stays in eval mode."""
        super().train(mode)
        self.stylear.train(mode)
        return self

    def forward(self, method: str = "loss", **kwargs: Any) -> Any:
        """Run the StyleAR model's ``method`` on ``kwargs`` (see the class docstring)."""
        if method == "loss":
            return self.stylear(**kwargs)
        if method == "log_probs":
            return self.stylear.log_probs(**kwargs)
        if method == "style_tokens":
            return self.stylear.style_tokens(**kwargs)
        if method == "logits":
            tokens = probe_style_tokens(self.stylear, kwargs.pop("style_features"))
            return self.stylear.sequence_logits(style_tokens=tokens, **kwargs)
        raise ValueError(f"unknown method {method!r}")


def _frozen_dtype(model_cfg: ModelConfig, precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else model_cfg.torch_dtype


def _digest_groups(
    model: StyleARModel, extra: dict[str, nn.Module]
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    trainable = {id(p) for p in model.trainable_parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"lora": [], "base": [], "resampler": []}
    for name, p in model.backbone.named_parameters():
        if ".lora_" in name:
            groups["lora"].append((name, p))
        elif id(p) in trainable:
            groups.setdefault("backbone_trained", []).append((name, p))
        else:
            groups["base"].append((name, p))
    groups["resampler"] = list(model.resampler.named_parameters())
    groups["clip"] = list(model.style_encoder.named_parameters())
    for key, module in extra.items():
        groups[key] = list(module.named_parameters())
    return groups


class StyleSFTObjective:
    """StyleAR supervised fine-tuning: next-token loss on image tokens given prompt + style tokens.

    Takes the model block (``ModelConfig``: preset, checkpoints, LoRA or full training, gradient
    checkpointing, training noise strength), ``style_source`` and ``use_style_tokens``. The style tokens
    come from the target image itself (StyleAR needs no reference for training): ``"vq_decode"``
    rebuilds the target from its VQ tokens with the frozen VQGAN, ``"image"`` reads PNG bytes from an
    ``image`` column of the training table, ``"features"`` reads the frozen CLIP features of either,
    precomputed once by curation (:mod:`stylear_core.data.style_features`): then neither CLIP nor the
    VQGAN is built or run, and rows whose features another encoder made are refused
    (``encoder_digest``: the model block's :func:`style_encoder_digest`, computed on the worker when not
    given). The resampler and the style-token noise run in the step whatever the source.
    ``use_style_tokens=False`` trains plain text prompts (subject tuning) with no style tokens.
    """

    name = "sft"

    def __init__(
        self,
        model: ModelConfig,
        style_source: Literal["vq_decode", "image", "features"] = "vq_decode",
        use_style_tokens: bool = True,
        encoder_digest: str | None = None,
    ):
        self.model_cfg = model
        self.style_source = style_source
        self.use_style_tokens = use_style_tokens
        self.encoder_digest = encoder_digest
        self.model: StyleARModel | None = None
        self.vqgan: nn.Module | None = None

    # -- set-up on the worker -------------------------------------------------------------------
    def build_model(self, device: torch.device | str = "cpu") -> StyleARModel:
        """The StyleAR model of the model block, before any training (also used to check exports).

        With ``style_source: features`` the CLIP tower is a weightless stand-in of its shape: no checkpoint
        is read for it and nothing of it sits on the device.
        """
        if self.style_source != "features":
            return build_stylear_model(self.model_cfg, device)
        stand_in = PrecomputedStyleEncoder(*style_feature_shape(self.model_cfg))
        return build_stylear_model(self.model_cfg, device, style_encoder=stand_in)

    def setup(self, device: torch.device, precision: str) -> nn.Module:
        """Build the model on ``device``; returns the module for ``deepspeed.initialize``."""
        self.model = self.build_model(device)
        frozen = _frozen_dtype(self.model_cfg, precision)
        self.model.style_encoder.to(dtype=frozen)
        self.tokenizer = build_prompt_tokenizer(self.model_cfg, self.model.vocab)
        if self.use_style_tokens and self.style_source == "vq_decode":
            self.vqgan = build_vqgan(self.model_cfg, self.model.vocab, device).to(dtype=frozen)
            self.vqgan.requires_grad_(False)
        if self.use_style_tokens and self.style_source == "features" and self.encoder_digest is None:
            self.encoder_digest = style_encoder_digest(self.model_cfg)
        return StyleARTrainingModule(self.model)

    def collate_fn(self) -> TokenBatchCollate:
        """The numpy -> tensor collate for token-shard rows."""
        preprocess = self.model.style_encoder.preprocess if self.style_source == "image" else None
        n = self.model.num_style_tokens if self.use_style_tokens else 0
        if self.use_style_tokens and self.style_source == "features":
            shape = (self.model.style_encoder.num_tokens, self.model.style_encoder.width)
            return TokenBatchCollate(
                self.model.vocab,
                self.tokenizer,
                n,
                features_shape=shape,
                features_encoder=self.encoder_digest,
            )
        return TokenBatchCollate(self.model.vocab, self.tokenizer, n, preprocess)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by role (lora, base, resampler, clip, vqgan, ...) for frozen-weight digests."""
        return _digest_groups(self.model, {"vqgan": self.vqgan} if self.vqgan is not None else {})

    # -- one step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_style_pixels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """CLIP-normalised pixels of each row's own target image, decoded from its VQ tokens."""
        sizes = list(zip(batch["height"].tolist(), batch["width"].tolist()))
        images = vq_decoded_images(self.vqgan, batch["image_tokens"], sizes, self.model.vocab)
        return self.model.style_encoder.preprocess(images)

    def style_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frozen CLIP features of the style images of a batch: precomputed (``style_features``, fp16, cast
        to the resampler's dtype), or computed from pixels or decoded targets."""
        device = self.model.backbone.device
        if "style_features" in batch:
            dtype = next(self.model.resampler.parameters()).dtype
            return batch["style_features"].to(device=device, dtype=dtype)
        pixels = batch["style_pixels"] if "style_pixels" in batch else self.target_style_pixels(batch)
        return self.model.style_features(pixels.to(device))

    def _style_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.use_style_tokens:
            return {"style_features": self.style_features(batch)}
        empty = torch.zeros(batch["prompt_ids"].shape[0], 0, self.model.backbone.config.hidden_size)
        return {"style_tokens": empty.to(self.model.backbone.device)}

    def compute(self, engine: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        """Loss of one micro-batch through the DeepSpeed ``engine`` (training noise strength)."""
        out = engine(
            method="loss",
            prompt_ids=batch["prompt_ids"],
            image_tokens=batch["image_tokens"],
            prompt_mask=batch["prompt_mask"],
            image_mask=batch["image_mask"],
            **self._style_kwargs(batch),
        )
        tokens = int(batch["prompt_mask"].sum() + batch["image_mask"].sum())
        return StepResult(
            out.loss, tokens, {"ce": float(out.ce.detach()), "loss_tokens": float(out.num_tokens)}
        )

    # -- export ----------------------------------------------------------------------------------------
    def probe(self, engine: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Probe inputs from ``batch`` and the engine's outputs on them (collective under ZeRO-3)."""
        if self.use_style_tokens:
            features = self.style_features(batch)
        else:
            features = torch.zeros(batch["prompt_ids"].shape[0], 0, self.model.style_encoder.width)
        probe = make_probe(batch, features)
        on_device = {k: v.to(self.model.backbone.device) for k, v in probe.items()}
        resampler_dtype = next(self.model.resampler.parameters()).dtype
        on_device["style_features"] = on_device["style_features"].to(resampler_dtype)
        return probe, probe_outputs(engine, on_device)

    def export(self, directory: str, rank: int) -> None:
        """Write the adapter (LoRA + resampler; the whole backbone under full training) from rank 0."""
        export_adapter(self.model, directory, rank, full_backbone=self.model_cfg.trainable == "full")


class StyleDPOObjective(StyleSFTObjective):
    """DPO post-training of a StyleAR model on preference pairs (see :func:`dpo_loss`).

    Takes the model block, the SFT artefact directory (``sft_adapter``), ``beta``, ``label_smoothing``,
    the style-noise strength used for both policy and reference, and where the reference's log-probs
    come from (``reference_logps``). The policy is the SFT LoRA, trained further. The resampler is
    frozen, so policy and reference see the same style tokens of the reference image.

    * ``live``: the reference is a second, frozen LoRA adapter holding the SFT factors on the same base
      weights (peft adapter switching, no second copy of the base), run without gradient every step;
      style noise is drawn fresh each step and shared by policy and reference.
    * ``cached``: the batch's stored ``reference_*`` log-probs
      (:mod:`stylear_core.preferences.reference`), scored once for ``reference_digest`` (default: the
      digest of ``sft_adapter``, the model block and ``noise_strength``). No reference forward and no
      adapter switch per step; the reference adapter is not even built. A batch whose values are
      missing or were scored for another digest (another adapter or noise strength) is refused. With
      noise above 0 the stored values hold for one fixed draw per pair, and the policy gets that same
      draw (:func:`~stylear_core.preferences.reference.pair_style_tokens`) instead of a fresh one.
    * ``auto``: per batch, cached when every row's values are valid for ``reference_digest``, else live.
    """

    name = "dpo"

    def __init__(
        self,
        model: ModelConfig,
        sft_adapter: str,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        noise_strength: float = 0.0,
        reference_logps: Literal["auto", "cached", "live"] = "auto",
        reference_digest: str | None = None,
    ):
        super().__init__(model, style_source="image", use_style_tokens=True)
        if model.trainable != "lora":
            raise ValueError(
                "DPO trains a LoRA policy against a frozen LoRA reference: model.trainable must be lora"
            )
        if reference_logps not in REFERENCE_LOGPS_MODES:
            raise ValueError(f"reference_logps: {reference_logps!r} is not one of {REFERENCE_LOGPS_MODES}")
        self.sft_adapter = sft_adapter
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.noise_strength = noise_strength
        self.reference_logps = reference_logps
        if reference_digest is None and reference_logps != "live":
            reference_digest = stored_reference.reference_digest(sft_adapter, model, noise_strength)
        self.reference_digest = reference_digest

    @property
    def has_reference_adapter(self) -> bool:
        """Whether setup builds the live reference adapter (every mode but ``cached``)."""
        return self.reference_logps != "cached"

    def setup(self, device: torch.device, precision: str) -> nn.Module:
        """The SFT model; LoRA "default" is the policy. Unless ``reference_logps`` is ``cached``, a frozen
        reference copy of the SFT LoRA joins it as a second adapter."""
        module = super().setup(device, precision)
        backbone = self.model.backbone
        load_adapter(self.model, self.sft_adapter)
        if not self.has_reference_adapter:
            self._activate(DEFAULT_ADAPTER)
            self.model.resampler.requires_grad_(False)
            return module
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first: that is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            add_lora(
                backbone, adapter_name=REFERENCE_ADAPTER, config=adapter_config(backbone, DEFAULT_ADAPTER)
            )
        set_lora_state_dict(backbone, lora_state_dict(backbone, DEFAULT_ADAPTER), REFERENCE_ADAPTER)
        self._activate(DEFAULT_ADAPTER)
        self.model.resampler.requires_grad_(False)
        return module

    def _activate(self, adapter: str) -> None:
        # peft's per-layer switch also sets requires_grad: the active policy trains, the reference never.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in self.model.backbone.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_adapter(adapter, inference_mode=adapter == REFERENCE_ADAPTER)

    def collate_fn(self) -> PreferenceBatchCollate:
        """The numpy -> tensor collate for preference-pair rows."""
        m = self.model
        digest = self.reference_digest if self.reference_logps != "live" else None
        return PreferenceBatchCollate(
            m.vocab, self.tokenizer, m.num_style_tokens, m.style_encoder.preprocess, digest
        )

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """As for SFT, with the reference adapter's factors in their own ``reference`` group (none when
        the reference comes from stored log-probs: there are no reference weights to digest)."""
        groups = _digest_groups(self.model, {})
        if self.has_reference_adapter:
            groups["reference"] = [(n, p) for n, p in groups["lora"] if f".{REFERENCE_ADAPTER}." in n]
        groups["lora"] = [(n, p) for n, p in groups["lora"] if f".{DEFAULT_ADAPTER}." in n]
        return groups

    def sequence_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows as one batch of ``2B`` sequences."""
        return preference_sequences(batch)

    def uses_cached_reference(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this batch's reference log-probs come from its stored columns (see the class docstring);
        raises ``ValueError`` under ``cached`` when they are missing or scored for another reference."""
        if self.reference_logps == "live":
            return False
        valid = batch.get("reference_valid")
        ok = valid is not None and bool(valid.all())
        if self.reference_logps == "cached" and not ok:
            raise ValueError(
                "reference_logps=cached: this batch has no stored reference log-probs for reference digest "
                f"{self.reference_digest} (missing, or scored for another SFT adapter or noise strength); "
                "score the pairs with reference_logps: precompute, or train with reference_logps: live"
            )
        return ok

    def compute(self, engine: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        """DPO loss of one micro-batch of preference pairs; metrics: reward margin, accuracy, rewards."""
        n = batch["prompt_ids"].shape[0]
        cached = self.uses_cached_reference(batch)
        features = self.style_features(batch)
        with torch.no_grad():
            if cached and self.noise_strength > 0:
                # The stored reference saw each pair's fixed draw: the policy must see the same tokens.
                style = engine(method="style_tokens", style_features=features, noise_strength=0.0)
                style = stored_reference.pair_style_tokens(style, batch["id_hash"], self.noise_strength)
            else:
                style = engine(
                    method="style_tokens", style_features=features, noise_strength=self.noise_strength
                )
        seq = self.sequence_batch(batch)
        style2 = torch.cat([style, style])
        if cached:
            # float32, as the step's own log-probs (image_token_log_probs sums in float32)
            stored = torch.cat([batch["reference_chosen_logp"], batch["reference_rejected_logp"]])
            reference = stored.to(device=seq["prompt_ids"].device, dtype=torch.float32)
        else:
            self._activate(REFERENCE_ADAPTER)
            try:
                with torch.no_grad():
                    reference = engine(method="log_probs", style_tokens=style2, **seq)
            finally:
                self._activate(DEFAULT_ADAPTER)
        policy = engine(method="log_probs", style_tokens=style2, **seq)
        terms = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.label_smoothing
        )
        tokens = int(seq["prompt_mask"].sum() + seq["image_mask"].sum())
        metrics = {
            "reward_margin": float(terms.reward_margin),
            "accuracy": float(terms.accuracy),
            "chosen_reward": float(terms.chosen_rewards.mean()),
            "rejected_reward": float(terms.rejected_rewards.mean()),
            "policy_chosen_logp": float(policy[:n].detach().mean()),
            "policy_rejected_logp": float(policy[n:].detach().mean()),
            "reference_cached": float(cached),
        }
        return StepResult(terms.loss, tokens, metrics)

    def probe(self, engine: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Probe the policy on the chosen rows of ``batch``."""
        rows = {
            "prompt_ids": batch["prompt_ids"],
            "prompt_mask": batch["prompt_mask"],
            "image_tokens": batch["chosen_tokens"],
            "image_mask": batch["chosen_mask"],
            "style_pixels": batch["style_pixels"],
        }
        return super().probe(engine, rows)

    def export(self, directory: str, rank: int) -> None:
        """Write the policy adapter (LoRA "default") and the (unchanged) resampler from rank 0."""
        export_adapter(self.model, directory, rank, adapter_name=DEFAULT_ADAPTER)
