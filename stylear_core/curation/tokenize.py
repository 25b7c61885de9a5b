"""Token shards: curated (prompt, image) records -> prompt ids and Lumina-layout image token ids.

:class:`TokenizeActor` decodes each image, centre-crops and resizes it to the model's square
resolution (``model.image_size``), VQGAN-encodes the batch in chunks and writes the codes in the
Lumina-mGPT layout (:meth:`ImageTokenLayout.encode`: image start, grid tokens, rows closed by the
new-line token, image end), with the cropped image itself as PNG (what ``style_source: image``
training shows the style encoder). The prompt is tokenized with the model's prompt tokenizer in the
format the trainer consumes: StyleAR's (``"... Given image style is S*..."`` with
``model.num_style_tokens`` placeholder ids, the default) or plain Lumina-mGPT text-to-image.

Condition images (StyleAR's depth control): a row's ``condition`` column (encoded image bytes, e.g.
a depth map someone made) or, with ``condition: depth``, the depth map of the row's working image
from a depth estimator (:mod:`stylear_core.models.depth`, ``depth_estimator_path``) is VQ-encoded
into ``condition_tokens`` by the same path as the image, and the row's prompt takes the condition
wording (one ``<image>`` placeholder that training replaces with those tokens).

Style features (``style_features: image | vq_decode``): the frozen style encoder of the ``model`` block
encodes each row's style image once -- its working-size PNG, or the VQ round trip of its tokens, the
inputs of SFT's ``style_source: image`` / ``vq_decode`` -- into the fp16 ``style_features`` column, with
``style_features_key`` naming the encoder and input (:mod:`stylear_core.data.style_features`: layout,
bytes per row, why a column); SFT with ``style_source: features`` then runs neither CLIP nor the VQGAN.

Models come from the ``model`` block of the job config (:class:`~stylear_core.models.presets.ModelConfig`):
``preset: tiny`` builds the seeded random tiny VQGAN and the byte tokenizer over the tiny vocab;
``preset: lumina7b`` loads ``vqgan_ckpt`` (random Chameleon-size weights when unset) and the
Chameleon tokenizer of ``tokenizer_path`` / ``backbone_path``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch
from PIL import Image

from stylear_core.config import ConfigError, option
from stylear_core.data.batch_columns import Batch, batch_values
from stylear_core.data.condition_tokens import encode_image_tokens
from stylear_core.data.images import (
    ImageDecodeError,
    center_crop_resize,
    decode_image,
    encode_png,
)
from stylear_core.data.layout import ImageTokenLayout, TokenVocab
from stylear_core.data.style_features import (
    compute_style_features,
    features_arrow,
    features_key,
    style_encoder_digest,
    vq_decoded_images,
)
from stylear_core.data.tokenizer import style_prompt_ids, text_prompt_ids
from stylear_core.devices import resolve_device
from stylear_core.models.depth import build_depth_estimator
from stylear_core.models.presets import ModelConfig, build_prompt_tokenizer, build_style_encoder, build_vqgan

STAGE = "tokenize"


@dataclass
class TokenizeConfig:
    """How records are tokenized (the resolution and vocabulary come from the ``model`` block)."""

    prompt_format: Literal["style", "text"] = option(
        "style", "style: StyleAR prompt with the style placeholders; text: plain Lumina-mGPT prompt"
    )
    encode_batch_size: int = option(16, "images per VQGAN forward pass")
    device: str = option("auto", "torch device; auto = cuda if available else cpu")
    max_pixels: int = option(64_000_000, "refuse to decode images with more pixels (decompression bombs)")
    condition: Literal["none", "depth"] = option(
        "none",
        "condition image of every row: none (only a row's own condition column, if any), or depth = "
        "the depth map of its image from the depth estimator (StyleAR's depth control)",
        choices=("none", "depth"),
    )
    depth_estimator_path: str = option(
        "", "local transformers depth model dir (DPT, Depth Anything); tiny preset: '' = a tiny random one"
    )
    style_features: Literal["none", "image", "vq_decode"] = option(
        "none",
        "precompute each row's frozen style-encoder features for SFT's style_source: features, from the "
        "row's image or from the VQ round trip of its tokens (match the source SFT would use on the fly); "
        "none = no features (null column)",
        choices=("none", "image", "vq_decode"),
    )


def token_vocab(model: ModelConfig) -> TokenVocab:
    """The vocabulary the backbone of ``model`` uses, without building the backbone.

    tiny: the tiny vocab sized to the tiny VQGAN; mini: the miniature world's; lumina7b: the
    ``vocabulary_map`` of ``backbone_path/config.json`` when set, else the real Lumina-mGPT ids.
    """
    from stylear_core.models.backbone import mini_vocab, tiny_vocab, vocab_from_vocabulary_map
    from stylear_core.models.presets import tiny_vqgan_codebook_size

    if model.preset == "tiny":
        return tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    if model.preset == "mini":
        return mini_vocab()
    if model.backbone_path:
        config = json.loads((Path(model.backbone_path) / "config.json").read_text())
        vocabulary_map = config.get("vocabulary_map") or {}
        if vocabulary_map:
            return vocab_from_vocabulary_map(vocabulary_map, int(config["vocab_size"]))
    return TokenVocab()


class TokenizeActor:
    """Batch callable (a Ray Data actor class): curated records -> token-shard rows.

    Takes the ``model`` block (preset, checkpoint paths, ``image_size``, ``num_style_tokens``) and a
    :class:`TokenizeConfig`; builds the VQGAN, the vocab and the prompt tokenizer once.
    ``__call__`` takes a batch (a pyarrow table or a dict of columns) with ``id``, ``prompt``, ``image`` (encoded bytes) and optionally
    ``source`` and ``condition`` (encoded bytes) and returns a ``pyarrow.Table`` with the
    ``stylear.token_shards/2`` columns (``id, prompt, prompt_ids, image_tokens, height, width, source,
    image, condition_tokens, style_features, style_features_key``: ``image`` is the PNG of the working-size
    crop the tokens encode, ``condition_tokens`` null on rows without a condition, the style features
    null unless ``style_features`` is set) plus ``error`` / ``error_stage``; a row whose
    image (or condition) does not decode or whose prompt does not tokenize carries its reason in
    ``error`` (and empty id lists and image) instead of failing the batch. With ``condition: depth`` a
    depth estimator is built once too, and rows without a ``condition`` get their image's depth map. With ``style_features`` the style encoder is built once too.
    """

    def __init__(self, model: ModelConfig, cfg: TokenizeConfig | None = None) -> None:
        self.model = model
        self.cfg = cfg or TokenizeConfig()
        self.device = resolve_device(self.cfg.device)
        self.vocab = token_vocab(model)
        self.vq = build_vqgan(model, self.vocab, self.device)
        self.tokenizer = build_prompt_tokenizer(model, self.vocab)
        self.size = model.image_size
        self.layout = ImageTokenLayout.for_resolution(self.size, self.size, self.vocab)
        self.depth = None
        if self.cfg.condition == "depth":
            if not self.cfg.depth_estimator_path:
                raise ConfigError("tokenize.depth_estimator_path: condition: depth needs a depth estimator")
            self.depth = build_depth_estimator(self.cfg.depth_estimator_path, self.device)
        self.style_encoder = None
        self.features_key = None
        if self.cfg.style_features != "none":
            self.style_encoder = build_style_encoder(model, self.device)
            self.features_key = features_key(style_encoder_digest(model), self.cfg.style_features)

    def style_features(self, pngs: Sequence[bytes], tokens: torch.Tensor) -> torch.Tensor:
        """Frozen style features ``(B, tokens, width)`` fp16 of rows with these PNGs and image tokens, from
        the configured source: the PNG decoded as ``style_source: image`` reads it, or the tokens decoded
        by the VQGAN as ``style_source: vq_decode`` does."""
        if self.cfg.style_features == "image":
            images = [decode_image(png) for png in pngs]
        else:
            sizes = [(self.size, self.size)] * tokens.shape[0]
            images = vq_decoded_images(self.vq, tokens, sizes, self.vocab)
        return compute_style_features(self.style_encoder, images, self.cfg.encode_batch_size)

    def prompt_ids(self, prompt: str, condition: bool = False) -> list[int]:
        """The prompt's ids in the configured format, for an image of the configured resolution
        (``condition``: in the condition wording, with its one ``<image>`` placeholder)."""
        if self.cfg.prompt_format == "style":
            n = self.model.num_style_tokens
            return style_prompt_ids(self.tokenizer, prompt, n, self.size, self.size, condition=condition)
        return text_prompt_ids(self.tokenizer, prompt, self.size, self.size, condition=condition)

    def working_image(self, image: Image.Image) -> Image.Image:
        """``image`` centre-cropped and resized to the model's square resolution (what the VQGAN encodes)."""
        if image.size == (self.size, self.size):
            return image
        return center_crop_resize(image, self.size, self.size)

    def _given_condition(self, data: bytes | None) -> Image.Image | None:
        """A row's own condition image (its ``condition`` bytes), working size; None without one."""
        if data is None or not len(data):
            return None
        try:
            return self.working_image(decode_image(bytes(data), max_pixels=self.cfg.max_pixels))
        except ImageDecodeError as e:
            raise ImageDecodeError(f"condition: {e}") from None

    def condition_tokens(
        self, rows: Sequence[int], images: Sequence[Image.Image], given: Sequence[Image.Image | None]
    ) -> dict[int, list[int]]:
        """Row -> condition token ids: each row's given condition, else (``condition: depth``) the depth
        map of its working image; rows with neither are left out."""
        missing = [i for i, c in enumerate(given) if c is None]
        depth = self.depth([images[i] for i in missing]) if self.depth is not None and missing else []
        chosen = list(given)
        for i, depth_map in zip(missing, depth):
            chosen[i] = depth_map
        kept = [i for i, c in enumerate(chosen) if c is not None]
        if not kept:
            return {}
        tokens = self.image_tokens([chosen[i] for i in kept]).tolist()
        return {rows[i]: seq for i, seq in zip(kept, tokens)}

    def image_tokens(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> token ids ``(B, layout.num_tokens)``: crop/resize, VQGAN-encode in chunks, lay out."""
        return encode_image_tokens(self.vq, images, self.layout, self.cfg.encode_batch_size)

    def __call__(self, batch: Batch) -> pa.Table:
        """Tokenize a batch; see the class docstring for the columns."""
        ids = [str(i) for i in batch_values(batch, "id", len(batch["id"]))]
        n = len(ids)
        prompts = batch_values(batch, "prompt", n)
        images = batch_values(batch, "image", n)
        sources = [s or "raw" for s in batch_values(batch, "source", n)]
        given = batch_values(batch, "condition", n)
        prompt_ids: list[list[int]] = [[] for _ in range(n)]
        image_ids: list[list[int]] = [[] for _ in range(n)]
        condition_ids: list[list[int] | None] = [None] * n
        errors: list[str | None] = [None] * n

        rows, decoded, conditions = [], [], []
        for k in range(n):
            try:
                if not isinstance(prompts[k], str) or not prompts[k].strip():
                    raise ValueError("empty prompt")
                condition = self._given_condition(given[k])
                has_condition = condition is not None or self.depth is not None
                prompt_ids[k] = self.prompt_ids(prompts[k], condition=has_condition)
                image = decode_image(bytes(images[k] or b""), max_pixels=self.cfg.max_pixels)
                decoded.append(self.working_image(image))
                conditions.append(condition)
            except (ImageDecodeError, ValueError, KeyError) as e:
                errors[k] = f"{type(e).__name__}: {e}"
                continue
            rows.append(k)
        pngs: list[bytes] = [b""] * n
        features: list[torch.Tensor | None] = [None] * n
        if rows:
            token_tensor = self.image_tokens(decoded)
            tokens = token_tensor.tolist()
            for k, seq, image in zip(rows, tokens, decoded):
                image_ids[k] = seq
                pngs[k] = encode_png(image)
            for k, seq in self.condition_tokens(rows, decoded, conditions).items():
                condition_ids[k] = seq
            if self.style_encoder is not None:
                for k, f in zip(rows, self.style_features([pngs[k] for k in rows], token_tensor)):
                    features[k] = f

        ok = [e is None for e in errors]
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "prompt": pa.array([p if isinstance(p, str) else "" for p in prompts], pa.string()),
                "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
                "image_tokens": pa.array(image_ids, pa.list_(pa.int32())),
                "height": pa.array([self.size if good else 0 for good in ok], pa.int32()),
                "width": pa.array([self.size if good else 0 for good in ok], pa.int32()),
                "source": pa.array(sources, pa.string()),
                "image": pa.array(pngs, pa.binary()),
                "condition_tokens": pa.array(condition_ids, pa.list_(pa.int32())),
                "style_features": features_arrow(features),
                "style_features_key": pa.array(
                    [self.features_key if f is not None else None for f in features], pa.string()
                ),
                "error": pa.array(errors, pa.string()),
                "error_stage": pa.array([None if good else STAGE for good in ok], pa.string()),
            }
        )
