"""The Lumina-mGPT backbone: a Chameleon decoder with an unmasked LM head, its builders and presets.

transformers' ``ChameleonForConditionalGeneration`` writes text only (it sets image-token logits to
-inf) and carries the VQ encoder inside ``ChameleonModel``. Lumina-mGPT generates images, so
:class:`LuminaChameleonForCausalLM` keeps transformers' decoder layers, attention, RoPE and caches but

* returns image-token logits unless the config's ``mask_image_logits`` is set (Lumina's switch),
* adds Lumina's residual dropout (``dropout``) and z-loss (``z_loss_weight``) config fields,
* never builds the VQ model (images are tokenized by :mod:`stylear_core.models.vqgan`), so the
  backbone holds no VQ weights; a checkpoint's ``model.vqmodel.*`` tensors are skipped on load.

State-dict keys follow the Lumina / Hugging Face checkpoint layout (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``).
Lumina's checkpoints (written by its copy of the pre-release HF Chameleon code) store the qk-norm
parameters once per model-parallel shard, ``(model_parallel_size, head_dim)``; transformers keeps
them per head, ``(heads, head_dim)``, so the loader repeats them per head. The loader and that
conversion are :mod:`stylear_core.models.backbone_checkpoint`.

Builders: :func:`chameleon_backbone` takes every size; :func:`lumina_mgpt_7b_768` and
:func:`tiny_backbone` are fixed presets;
:func:`~stylear_core.models.backbone_checkpoint.load_lumina_backbone` reads a local checkpoint dir.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import ChameleonConfig
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonDecoderLayer,
    ChameleonImageVocabularyMapping,
    ChameleonModel,
    ChameleonPreTrainedModel,
    ChameleonRMSNorm,
    ChameleonRotaryEmbedding,
    ChameleonSwinDecoderLayer,
)

from stylear_core.data.layout import TokenVocab
from stylear_core.data.tokenizer import (
    BOS_NAME,
    IMAGE_END_NAME,
    IMAGE_PLACEHOLDER_NAME,
    IMAGE_START_NAME,
    PAD_NAME,
    reserved_token_name,
    special_token_names,
    style_placeholder_name,
)

IGNORE_INDEX = -100


def chameleon_vocabulary_map(vocab: TokenVocab) -> dict[str, int]:
    """The ``vocabulary_map`` for a Chameleon config: image-code names, ``<image>`` and the special names."""
    return {**vocab.vocabulary_map(), **special_token_names(vocab)}


def vocab_from_vocabulary_map(
    vocabulary_map: Mapping[str, int], vocab_size: int, prompt_template: str = "lumina"
) -> TokenVocab:
    """Read a :class:`TokenVocab` from a checkpoint's name -> id map (image codes and special ids).

    The style placeholder is ``prompt_template``'s entry (``<reserved08896>``, or ``S*`` for
    ``stylear_release``). Special tokens missing from the map keep the real Lumina-mGPT ids.
    """
    real = TokenVocab.for_prompt_template(prompt_template)
    kwargs: dict[str, int] = {}
    wanted = {
        "bos": BOS_NAME,
        "pad": PAD_NAME,
        "image_start": IMAGE_START_NAME,
        "image_end": IMAGE_END_NAME,
        "image_placeholder": IMAGE_PLACEHOLDER_NAME,
        "eos": reserved_token_name(real.eos),
        "new_line": reserved_token_name(real.new_line),
        "grid_base": reserved_token_name(real.grid_base),
        "style_placeholder": style_placeholder_name(real),
    }
    for field_name, name in wanted.items():
        if name in vocabulary_map:
            kwargs[field_name] = int(vocabulary_map[name])
    # Grid tokens run <reserved08800+g> for g = 0, 1, ...; the layout allows at most real.max_grids.
    grids = 0
    while grids < real.max_grids and reserved_token_name(real.grid_base + grids + 1) in vocabulary_map:
        grids += 1
    if grids:
        kwargs["max_grids"] = grids
    kwargs.setdefault("style_placeholder", real.style_placeholder)
    return TokenVocab.from_vocabulary_map(
        dict(vocabulary_map), vocab_size=vocab_size, prompt_template=prompt_template, **kwargs
    )


@strict
class LuminaChameleonConfig(ChameleonConfig):
    r"""ChameleonConfig plus Lumina-mGPT's fields.

    z_loss_weight (`float`, defaults to 0.0):
        Weight of the z-loss ``logsumexp(logits)^2`` added to the next-token loss.
    dropout (`float`, defaults to 0.0):
        Residual dropout after attention and MLP in every decoder layer.
    mask_image_logits (`bool`, defaults to `False`):
        Set image-token logits to the dtype minimum (text-only decoding, as stock Chameleon does).
    """

    z_loss_weight: float = 0.0
    dropout: float | int = 0.0
    mask_image_logits: bool = False


class LuminaDecoderLayer(ChameleonDecoderLayer):
    """Chameleon's pre-norm decoder layer with Lumina's residual dropout (``config.dropout``)."""

    def __init__(self, config: LuminaChameleonConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.dropout = nn.Dropout(getattr(config, "dropout", 0.0))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, ...]:
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            output_attentions=output_attentions,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self.dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = residual + self.dropout(hidden_states)
        if output_attentions:
            return hidden_states, attn_weights
        return (hidden_states,)


class LuminaChameleonModel(ChameleonModel):
    """``ChameleonModel`` without the VQ encoder: token embeddings, decoder layers, final RMSNorm, RoPE.

    Takes ``input_ids`` or ``inputs_embeds`` (``(B, S)`` / ``(B, S, hidden)``) and gives the final
    hidden states; ``pixel_values`` are not accepted (images arrive as VQ token ids).
    """

    _no_split_modules = ["LuminaDecoderLayer", "ChameleonSwinDecoderLayer"]

    def __init__(self, config: LuminaChameleonConfig):
        # ChameleonModel.__init__ would build the VQ model; set up the same modules without it.
        ChameleonPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.vocabulary_mapping = ChameleonImageVocabularyMapping(config.vocabulary_map or {})
        layer_cls = ChameleonSwinDecoderLayer if config.swin_norm else LuminaDecoderLayer
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ChameleonRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ChameleonRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_image_tokens(self, pixel_values: torch.Tensor):
        raise NotImplementedError(
            "the backbone has no VQ model; tokenize images with stylear_core.models.vqgan"
        )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        raise NotImplementedError(
            "the backbone has no VQ model; tokenize images with stylear_core.models.vqgan"
        )


@dataclass
class NextTokenLoss:
    """Terms of the next-token loss: ``total = ce + z_loss_weight * z_loss`` (means over target tokens)."""

    total: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor
    num_tokens: torch.Tensor


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float = 0.0) -> NextTokenLoss:
    """Shifted cross-entropy of ``logits (B, S, V)`` against ``labels (B, S)`` (``-100`` = ignored).

    Position ``p``'s logits predict label ``p + 1``. The z-loss (``logsumexp(logits)^2`` on the same
    positions, PaLM / Lumina-mGPT) keeps the softmax normaliser near 1 in bf16 training.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != IGNORE_INDEX
    num = valid.sum()
    denom = num.clamp(min=1)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    ce = ce / denom
    if z_loss_weight > 0:
        lse = torch.logsumexp(shift_logits, dim=-1)
        z = torch.where(valid, lse.pow(2), 0.0).sum() / denom
    else:
        z = ce.new_zeros(())
    return NextTokenLoss(total=ce + z_loss_weight * z, ce=ce, z_loss=z, num_tokens=num)


class LuminaChameleonForCausalLM(ChameleonPreTrainedModel, GenerationMixin):
    """Lumina-mGPT's causal LM: :class:`LuminaChameleonModel` (``.model``) and a linear ``.lm_head``.

    ``forward`` takes ``input_ids`` *or* ``inputs_embeds``, ``attention_mask`` (``(B, past+S)``, 1 =
    attend), ``position_ids``, ``past_key_values`` / ``use_cache`` (transformers ``Cache`` objects),
    ``cache_position`` (used as ``position_ids`` when those are not given), ``logits_to_keep`` and
    optional ``labels`` (then ``loss`` = :func:`next_token_loss` with the config's z-loss weight).
    It returns a ``CausalLMOutputWithPast`` whose logits cover every id, image codes included,
    unless ``config.mask_image_logits`` is set.
    """

    config_class = LuminaChameleonConfig
    _no_split_modules = ["LuminaDecoderLayer", "ChameleonSwinDecoderLayer"]

    def __init__(self, config: LuminaChameleonConfig):
        super().__init__(config)
        self.model = LuminaChameleonModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def image_logit_mask(self, device: torch.device) -> torch.Tensor:
        """Boolean ``(vocab_size,)`` mask of the image-code ids (from the config's vocabulary map)."""
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
        ids = self.model.vocabulary_mapping.image_tokens
        if ids:
            mask[torch.tensor(ids, device=device)] = True
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if position_ids is None and cache_position is not None:
            position_ids = cache_position.unsqueeze(0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        if getattr(self.config, "mask_image_logits", False):
            mask = self.image_logit_mask(logits.device)
            logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, getattr(self.config, "z_loss_weight", 0.0)).total
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def chameleon_config(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: TokenVocab,
    rope_theta: float = 10000.0,
    max_positions: int = 4096,
    rms_norm_eps: float = 1e-5,
    dropout: float = 0.0,
    z_loss_weight: float = 0.0,
    mask_image_logits: bool = False,
    attn_implementation: str = "sdpa",
) -> LuminaChameleonConfig:
    """A :class:`LuminaChameleonConfig` of the given sizes whose vocabulary map matches ``vocab``."""
    config = LuminaChameleonConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        pad_token_id=vocab.pad,
        vocabulary_map=chameleon_vocabulary_map(vocab),
        z_loss_weight=float(z_loss_weight),
        dropout=float(dropout),
        mask_image_logits=mask_image_logits,
    )
    config._attn_implementation = attn_implementation
    return config


def chameleon_backbone(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: TokenVocab,
    rope_theta: float = 10000.0,
    max_positions: int = 4096,
    rms_norm_eps: float = 1e-5,
    dropout: float = 0.0,
    z_loss_weight: float = 0.0,
    mask_image_logits: bool = False,
    attn_implementation: str = "sdpa",
) -> LuminaChameleonForCausalLM:
    """A randomly initialised Lumina / Chameleon causal LM of the given sizes.

    Builds on the current default device, so ``with torch.device("meta"): chameleon_backbone(...)``
    gives an unallocated model (for parameter counts or for loading with ``assign=True``).
    """
    config = chameleon_config(
        hidden,
        layers,
        heads,
        kv_heads,
        ffn,
        vocab,
        rope_theta=rope_theta,
        max_positions=max_positions,
        rms_norm_eps=rms_norm_eps,
        dropout=dropout,
        z_loss_weight=z_loss_weight,
        mask_image_logits=mask_image_logits,
        attn_implementation=attn_implementation,
    )
    return LuminaChameleonForCausalLM(config)


def lumina_mgpt_7b_768(vocab: TokenVocab | None = None, **overrides) -> LuminaChameleonForCausalLM:
    """Lumina-mGPT-7B-768: vocab 65536, hidden 4096, FFN 11008, 32 layers, 32 heads / 32 KV heads, RoPE 10000.

    Random weights (about 7.0B parameters); use under ``torch.device("meta")`` to inspect without allocating.
    ``overrides`` go to :func:`chameleon_backbone` (e.g. ``dropout=0.05, z_loss_weight=1e-5`` for training).
    """
    kwargs = dict(
        hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, rope_theta=10000.0, max_positions=4096
    )
    kwargs.update(overrides)
    return chameleon_backbone(vocab=vocab or TokenVocab(), **kwargs)


def tiny_vocab(
    codebook_size: int = 256,
    vocab_size: int = 1024,
    max_grids: int = 16,
    prompt_template: str = "lumina",
    pixels_per_latent: int = 16,
) -> TokenVocab:
    """A small vocabulary with the real special-token structure, for tests and the CPU demo.

    Ids: ``<s>`` 0, ``<pad>`` 1, image codes ``4 .. 4+C-1``, then image-end, image-start, end-of-turn
    (``eos``), ``<image>``, new-line, the grid tokens ``grid_base + 0 .. max_grids`` and the style
    placeholder (named by ``prompt_template``: ``<reserved08896>`` or ``S*``); everything above is
    free for text (the byte tokenizer puts its 256 bytes there).
    """
    first = 4 + codebook_size
    vocab = TokenVocab(
        vocab_size=vocab_size,
        codebook_size=codebook_size,
        bos=0,
        pad=1,
        image_end=first,
        image_start=first + 1,
        eos=first + 2,
        image_placeholder=first + 3,
        new_line=first + 4,
        grid_base=first + 5,
        max_grids=max_grids,
        style_placeholder=first + 6 + max_grids,
        prompt_template=prompt_template,
        pixels_per_latent=pixels_per_latent,
    )
    return vocab


# The miniature world's backbone and vocabulary: small enough to pretrain on two CPU cores, large
# enough to draw a procedural scene (8x8 codes of a 512-code VQGAN at 8 px per code).
MINI_CODEBOOK_SIZE = 512
MINI_PIXELS_PER_LATENT = 8


def mini_vocab(prompt_template: str = "lumina") -> TokenVocab:
    """The miniature world's vocabulary: :func:`tiny_vocab` over its 512-code VQGAN at 8 px per code."""
    return tiny_vocab(
        codebook_size=MINI_CODEBOOK_SIZE,
        vocab_size=1024,
        prompt_template=prompt_template,
        pixels_per_latent=MINI_PIXELS_PER_LATENT,
    )


def mini_backbone(vocab: TokenVocab | None = None, **overrides) -> LuminaChameleonForCausalLM:
    """The miniature world's backbone: hidden 128, 4 layers, 4 heads, FFN 344, on :func:`mini_vocab`."""
    kwargs = dict(hidden=128, layers=4, heads=4, kv_heads=4, ffn=344, rope_theta=10000.0, max_positions=1024)
    kwargs.update(overrides)
    return chameleon_backbone(vocab=vocab or mini_vocab(), **kwargs)


def tiny_backbone(vocab: TokenVocab | None = None, **overrides) -> LuminaChameleonForCausalLM:
    """A tiny random Lumina backbone (hidden 64, 2 layers, 4 heads, FFN 172) on :func:`tiny_vocab`."""
    kwargs = dict(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, rope_theta=10000.0, max_positions=4096)
    kwargs.update(overrides)
    return chameleon_backbone(vocab=vocab or tiny_vocab(), **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
