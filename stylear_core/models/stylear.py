"""StyleAR: a Lumina-mGPT backbone conditioned on style tokens from a reference image.

The frozen CLIP vision tower encodes the style image into penultimate-layer features; the trainable
perceiver resampler turns them into ``N`` style tokens (plus "style-enhancing" Gaussian noise);
the tokens replace the ``N`` placeholder ids of the prompt in the backbone's input embeddings; the
backbone (LoRA-adapted, or fully trained) predicts the image tokens. Training uses next-token
cross-entropy on the image tokens only (Wu et al., "StyleAR: Customizing Multimodal Autoregressive
Model for Style-Aligned Text-to-Image Generation", 2025), plus Lumina-mGPT's z-loss when its weight
is set.

Sequence layout of one training row: ``prompt (L, left-padded) | image tokens (T, right-padded)``
where the image tokens are a full Lumina image (``<racm3:break>``, grid tokens, rows with new-line,
``<eoss>``). With ``padding_free`` (the default) the backbone sees each row reordered to
``real prompt | real image | pads`` with positions ``0..S-1`` and no attention mask, so SDPA runs plain
causal attention (``is_causal``, its flash path on GPU): under a causal mask no real token attends to
the trailing pads, and pad labels are ignored, so losses and log-probabilities equal the masked layout's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from stylear_core.data.layout import TokenVocab
from stylear_core.models.backbone import IGNORE_INDEX, LuminaChameleonForCausalLM, next_token_loss
from stylear_core.models.lora import adapters_disabled, lora_parameters
from stylear_core.models.resampler import StyleResampler
from stylear_core.models.style_tokens import add_style_noise, inject_style_tokens, resample_style_tokens


@dataclass
class StyleAROutput:
    """``loss`` = ``ce + z_loss_weight * z_loss`` over the image tokens; ``logits`` ``(B, L+T, V)`` when asked."""

    loss: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor
    num_tokens: torch.Tensor
    logits: torch.Tensor | None = None


def sequence_labels(
    prompt_len: int, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Labels ``(B, L+T)`` for ``prompt | image``: ``-100`` on every prompt position and padded image position."""
    batch = image_tokens.shape[0]
    prompt = torch.full((batch, prompt_len), IGNORE_INDEX, dtype=torch.long, device=image_tokens.device)
    image = image_tokens.long()
    if image_mask is not None:
        image = image.masked_fill(~image_mask.bool(), IGNORE_INDEX)
    return torch.cat([prompt, image], dim=1)


def image_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of ``log p(label_{p+1} | logits_p)`` over labelled positions: ``(B, S, V), (B, S)`` -> ``(B,)``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != IGNORE_INDEX
    log_probs = torch.log_softmax(shift_logits, dim=-1)
    picked = log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0).sum(dim=1)


def padding_free_order(mask: torch.Tensor) -> torch.Tensor:
    """Per-row permutation ``(B, S)`` putting the real positions of ``mask`` first, each group in its order.

    A stable argsort of ``~mask``: ``x.gather(1, order)`` moves every row's real tokens to the front.
    """
    return torch.argsort((~mask.bool()).to(torch.uint8), dim=1, stable=True)


def gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, order[b, s], ...]`` for ``x`` of shape ``(B, S, ...)`` and ``order`` ``(B, S')``."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index)


class StyleARModel(nn.Module):
    """Backbone + frozen style encoder + trainable resampler, over one :class:`TokenVocab`.

    Takes ``backbone`` (a :class:`LuminaChameleonForCausalLM`, LoRA-injected or not),
    ``style_encoder`` (an ``nn.Module`` mapping CLIP-normalised pixels ``(B, 3, S, S)`` to features
    ``(B, tokens, width)``; frozen and kept in eval mode), ``resampler`` (features -> ``(B, N, hidden)``),
    ``vocab``, the default noise strengths for training and inference, and ``padding_free``: run the
    backbone on rows reordered to ``real | pads`` with no attention mask (True), or on the padded
    layout with an explicit mask (False). Both give the same losses; generation is not affected.
    """

    def __init__(
        self,
        backbone: LuminaChameleonForCausalLM,
        style_encoder: nn.Module,
        resampler: StyleResampler,
        vocab: TokenVocab,
        noise_strength_train: float = 0.0,
        noise_strength_infer: float = 0.0,
        padding_free: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.style_encoder = style_encoder
        self.resampler = resampler
        self.vocab = vocab
        self.noise_strength_train = noise_strength_train
        self.noise_strength_infer = noise_strength_infer
        self.padding_free = padding_free
        self.style_encoder.requires_grad_(False)
        self.style_encoder.eval()
        hidden = backbone.config.hidden_size
        if resampler.output_dim != hidden:
            raise ValueError(
                f"resampler gives width {resampler.output_dim}, backbone hidden size is {hidden}"
            )

    @property
    def num_style_tokens(self) -> int:
        """Style tokens per image (= placeholder ids per prompt)."""
        return self.resampler.num_queries

    def train(self, mode: bool = True) -> StyleARModel:
        """Switch backbone and resampler; the frozen style encoder stays in eval mode."""
        super().train(mode)
        self.style_encoder.eval()
        return self

    def default_noise_strength(self) -> float:
        """The training strength in train mode, the inference strength in eval mode."""
        return self.noise_strength_train if self.training else self.noise_strength_infer

    def style_features(self, style_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels ``(B, 3, S, S)`` -> frozen features ``(B, tokens, width)`` (no gradient)."""
        with torch.no_grad():
            return self.style_encoder(style_pixels)

    def style_tokens(
        self,
        style_pixels: torch.Tensor | None = None,
        style_features: torch.Tensor | None = None,
        noise_strength: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Style tokens ``(B, N, hidden)`` from pixels or precomputed CLIP features, plus noise.

        ``noise_strength`` None uses :meth:`default_noise_strength`; 0 makes the result deterministic.
        """
        if (style_pixels is None) == (style_features is None):
            raise ValueError("pass exactly one of style_pixels or style_features")
        if style_features is None:
            style_features = self.style_features(style_pixels)
        tokens = resample_style_tokens(self.resampler, style_features)
        strength = self.default_noise_strength() if noise_strength is None else noise_strength
        return add_style_noise(tokens, strength, generator)

    def prompt_embeddings(self, prompt_ids: torch.Tensor, style_tokens: torch.Tensor) -> torch.Tensor:
        """Prompt ids ``(B, L)`` with ``N`` placeholders per row -> input embeddings ``(B, L, hidden)``
        with the style tokens in the placeholders' places (the prefill input of generation)."""
        embeds = self.backbone.get_input_embeddings()(prompt_ids)
        return inject_style_tokens(embeds, prompt_ids, style_tokens, self.vocab.style_placeholder)

    def _resolve_style_tokens(self, style_tokens, style_pixels, style_features, noise_strength, generator):
        if style_tokens is not None:
            if style_pixels is not None or style_features is not None:
                raise ValueError("pass style_tokens or style_pixels / style_features, not both")
            return style_tokens
        return self.style_tokens(style_pixels, style_features, noise_strength, generator)

    def sequence_logits(
        self,
        prompt_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        style_tokens: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        padding_free: bool | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, L+T, V)`` of ``prompt | image`` with the style tokens placed in the prompt.

        ``prompt_mask`` (default: ids != pad) marks real prompt tokens of left-padded prompts,
        ``image_mask`` (default: all) real image tokens of right-padded images; positions count
        from each row's first real token. ``padding_free`` (default: the model's setting) picks the
        layout the backbone runs on; the logits come back in the padded layout either way (at padded
        positions they are meaningless).
        """
        logits, order, _ = self._backbone_logits(
            prompt_ids, image_tokens, style_tokens, prompt_mask, image_mask, padding_free
        )
        if order is None:
            return logits
        # Back to the padded layout: position order[b, s] gets compact logit s; the pads cut off by
        # the trim stay zero.
        full = logits.new_zeros(logits.shape[0], order.shape[1], logits.shape[2])
        index = order[:, : logits.shape[1]]
        return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[2]), logits)

    def _backbone_logits(
        self,
        prompt_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        style_tokens: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        padding_free: bool | None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the backbone; give ``(logits, order, labels)`` in the layout it ran on.

        Masked layout: ``order`` is None and ``labels`` as given. Padding-free: ``order`` ``(B, L+T)`` is
        the per-row permutation to ``real | pads`` (:func:`padding_free_order`), and logits and labels
        are in that order, cut after the longest row's real tokens (columns that are pads in every row
        would only be computed to be ignored).
        """
        if prompt_mask is None:
            prompt_mask = prompt_ids != self.vocab.pad
        if image_mask is None:
            image_mask = torch.ones_like(image_tokens, dtype=torch.bool)
        prompt_embeds = self.prompt_embeddings(prompt_ids, style_tokens)
        image_embeds = self.backbone.get_input_embeddings()(image_tokens)
        embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], dim=1)
        mask = torch.cat([prompt_mask, image_mask], dim=1).bool()
        if not (self.padding_free if padding_free is None else padding_free):
            attention_mask = mask.long()
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            out = self.backbone(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            return out.logits, None, labels
        order = padding_free_order(mask)
        # One host sync for the trim: it saves the compute of every all-pad column.
        length = max(int(mask.sum(dim=1).max()), 1)
        keep = order[:, :length]
        position_ids = torch.arange(length, device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        # attention_mask=None with positions 0..S-1: transformers' create_causal_mask finds no padding
        # and no packed sequences and returns None, so SDPA is called with is_causal=True.
        out = self.backbone(
            inputs_embeds=gather_rows(embeds, keep),
            attention_mask=None,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits, order, None if labels is None else labels.gather(1, keep.to(labels.device))

    def forward(
        self,
        prompt_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        style_pixels: torch.Tensor | None = None,
        style_features: torch.Tensor | None = None,
        style_tokens: torch.Tensor | None = None,
        noise_strength: float | torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        generator: torch.Generator | None = None,
    ) -> StyleAROutput:
        """Next-token loss on the image tokens given prompt + style.

        Takes ``prompt_ids (B, L)`` with ``N`` placeholders per row, ``image_tokens (B, T)`` in the
        Lumina layout, and the style as pixels, CLIP features or ready style tokens. Prompt positions
        never contribute to the loss.
        """
        tokens = self._resolve_style_tokens(
            style_tokens, style_pixels, style_features, noise_strength, generator
        )
        labels = sequence_labels(prompt_ids.shape[1], image_tokens, image_mask)
        if return_logits:  # the caller reads logits by padded position
            logits = self.sequence_logits(prompt_ids, image_tokens, tokens, prompt_mask, image_mask)
        else:  # the loss is a sum over labelled positions: any layout's order will do
            logits, _, labels = self._backbone_logits(
                prompt_ids, image_tokens, tokens, prompt_mask, image_mask, None, labels
            )
        terms = next_token_loss(logits, labels, getattr(self.backbone.config, "z_loss_weight", 0.0))
        return StyleAROutput(
            loss=terms.total,
            ce=terms.ce,
            z_loss=terms.z_loss,
            num_tokens=terms.num_tokens,
            logits=logits if return_logits else None,
        )

    def log_probs(
        self,
        prompt_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        style_pixels: torch.Tensor | None = None,
        style_features: torch.Tensor | None = None,
        style_tokens: torch.Tensor | None = None,
        noise_strength: float | torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Summed log-probabilities of each row's image tokens, ``(B,)`` (the DPO policy / reference score)."""
        tokens = self._resolve_style_tokens(
            style_tokens, style_pixels, style_features, noise_strength, generator
        )
        labels = sequence_labels(prompt_ids.shape[1], image_tokens, image_mask)
        logits, _, labels = self._backbone_logits(
            prompt_ids, image_tokens, tokens, prompt_mask, image_mask, None, labels
        )
        return image_token_log_probs(logits, labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: the resampler's and the backbone's with ``requires_grad`` (LoRA or all)."""
        params = [p for p in self.resampler.parameters() if p.requires_grad]
        params += [p for p in self.backbone.parameters() if p.requires_grad]
        return params

    def lora_parameters(self) -> list[nn.Parameter]:
        """The backbone's LoRA factors (empty for full fine-tuning)."""
        return lora_parameters(self.backbone)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the trainable parameters only, keyed as in ``self.state_dict()`` (for adapter checkpoints)."""
        trainable = {id(p) for p in self.trainable_parameters()}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in trainable}

    @contextmanager
    def base_backbone(self) -> Iterator[StyleARModel]:
        """Inside the block the backbone runs without its LoRA adapters (e.g. a DPO reference pass)."""
        with adapters_disabled(self.backbone):
            yield self
