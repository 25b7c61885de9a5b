"""Frozen style features computed once per row: the ``style_features`` column of token shards.

SFT's style tokens come from each row's own target image: the frozen CLIP vision tower's penultimate
hidden states (:meth:`~stylear_core.models.stylear.StyleARModel.style_features`) feed the trainable
resampler. The tower and its input never change during training, so curation's tokenize step
(``tokenize.style_features: image | vq_decode``) computes them once and stores them beside the tokens,
from the same input the on-the-fly paths use: the row's working-size PNG (``image``) or the VQ round
trip of its tokens (``vq_decode``: tokens -> frozen VQGAN decode -> PIL -> CLIP preprocessing). Training
with ``style_source: features`` reads them and builds neither CLIP nor the VQGAN; the resampler and the
style-token noise stay in the training step.

Columns (optional, nullable, within ``stylear.token_shards/2``):

* ``style_features``: ``list<float16>``, the ``(tokens, width)`` features flattened row-major.
* ``style_features_key``: which encoder and input made them, e.g.
  ``stylear.style_features/1;encoder=ViT-H-14:3f9c...;source=vq_decode``. The encoder part is the
  architecture and a SHA-256 of its weights (of the local checkpoint file, or of the seeded random
  weights when none is set, see :func:`style_encoder_digest`); training refuses rows whose key names
  another encoder, since the resampler would learn on features it never sees at inference.

fp16, not the compute dtype: CLIP's penultimate activations sit well inside fp16's range, and fp16's
10-bit mantissa rounds less than the bf16 the GPU path computes in.

Bytes per row (``tokens x width x 2``):

* CLIP ViT-H/14 at 224 px (lumina7b): 257 x 1280 x 2 = 657,920 B (642.5 KiB). Near-random mantissas:
  parquet's compression gains little on them.
* tiny and mini presets (the tiny CLIP, 64 px, patch 16): 17 x 64 x 2 = 2,176 B. Measured on 64 tiny
  rows in parquet: 2,342 B a row (no compression gain), a shard row growing from 1.5 KB to 3.8 KB.

Why a column and not an external store keyed by row id: each SFT row's style image is its own target,
so its features belong to that row alone (nothing is shared that a store could deduplicate), and a
column stays aligned with its row through shuffles, ``limit`` and the ordered resumable reads without
a join. Parquet is columnar, so readers that do not ask for the column (``vq_decode``/``image``
training, evaluation) never read its bytes. The cost is storage, 0.66 MB per 768 px row against about
9.6 KB of image-token ids and a 10 to 570 KB PNG (66 GB per 100k rows), and the read rate it needs is
small: at the 7B baseline of 7,236 tokens/s on one GPU (about 2.4k tokens, i.e. one row, per 0.33 s)
it is about 2 MB/s per GPU. Two things would favour a store: features shared by many rows (DPO's style
references, not SFT's targets) or switching encoders without rewriting shards. For ViT-H features,
keep files and row groups modest (a few hundred rows; 1024 rows make a 0.67 GB file).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from stylear_core.data.images import to_pil
from stylear_core.data.layout import ImageTokenLayout, TokenVocab
from stylear_core.data.schemas import SchemaError, parquet_files
from stylear_core.models.config import ModelConfig

FEATURES_FORMAT = "stylear.style_features/1"
FEATURES_COLUMN = "style_features"
KEY_COLUMN = "style_features_key"
FEATURE_SOURCES = ("image", "vq_decode")
FEATURE_DTYPE = torch.float16
PRECOMPUTE_HINT = (
    "precompute them with curation's tokenize step (tokenize.style_features: vq_decode or image, with "
    "this model block), or train with style_source: vq_decode or image"
)

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def style_encoder_arch(cfg: ModelConfig) -> str:
    """The open_clip architecture of the style encoder of ``cfg`` (tiny and mini share the tiny CLIP)."""
    return "tiny" if cfg.preset in ("tiny", "mini") else "ViT-H-14"


def style_feature_shape(cfg: ModelConfig) -> tuple[int, int]:
    """``(tokens, width)`` of one image's features, from the architecture alone (nothing is built)."""
    from stylear_core.models.clip import clip_model_config

    vision = clip_model_config(style_encoder_arch(cfg))["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]
    return grid * grid + 1, vision["width"]


def _file_digest(path: Path) -> str:
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_DIGESTS[cache_key] = h.hexdigest()
    return _FILE_DIGESTS[cache_key]


def style_encoder_digest(cfg: ModelConfig) -> str:
    """``<arch>:<sha256 prefix>`` of the style encoder's weights: the local checkpoint file's bytes when
    ``clip_checkpoint`` is used, else the seeded random weights (built in fp32 on the CPU and hashed
    name by name), so the same model block gives the same digest on any machine and dtype."""
    from stylear_core.models.clip import resolve_clip_checkpoint

    arch = style_encoder_arch(cfg)
    if cfg.clip_checkpoint and cfg.preset != "tiny":  # the tiny preset ignores clip_checkpoint
        return f"{arch}:{_file_digest(resolve_clip_checkpoint(cfg.clip_checkpoint))[:16]}"
    from stylear_core.models.presets import build_style_encoder

    encoder = build_style_encoder(dataclasses.replace(cfg, dtype="float32"), "cpu")
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().numpy().tobytes())
    return f"{arch}:{h.hexdigest()[:16]}"


def features_key(encoder_digest: str, source: str) -> str:
    """The ``style_features_key`` value of features from ``source`` through the encoder of ``encoder_digest``."""
    if source not in FEATURE_SOURCES:
        raise ValueError(f"style-feature source must be one of {FEATURE_SOURCES}, got {source!r}")
    return f"{FEATURES_FORMAT};encoder={encoder_digest};source={source}"


def key_encoder(key: str) -> str | None:
    """The ``encoder=`` part of a ``style_features_key`` of this format (None for anything else)."""
    parts = key.split(";")
    if parts[0] != FEATURES_FORMAT:
        return None
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return fields.get("encoder")


def check_feature_keys(keys: Sequence[str | None], encoder_digest: str, where: str) -> None:
    """Raise :class:`SchemaError` unless every key is set and names ``encoder_digest``."""
    missing = sum(k is None for k in keys)
    if missing:
        raise SchemaError(f"{where}: {missing} row(s) have no style features; {PRECOMPUTE_HINT}")
    foreign = sorted({str(k) for k in keys if key_encoder(str(k)) != encoder_digest})
    if foreign:
        raise SchemaError(
            f"{where}: style features made by another encoder or format ({foreign[0]!r}); this model block's "
            f"style encoder is {encoder_digest!r} ({FEATURES_FORMAT}): {PRECOMPUTE_HINT}"
        )


def check_feature_files(path: str | Path | Sequence[str | Path], encoder_digest: str) -> None:
    """Before training: every local parquet file of ``path`` has features of ``encoder_digest`` on every
    row (reads only the small key column; remote paths are left to the per-batch check)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if any("://" in str(p) for p in paths):
        return
    for f in parquet_files(paths):
        if f.is_file():
            keys = pq.read_table(f, columns=[KEY_COLUMN]).column(KEY_COLUMN).unique().to_pylist()
            check_feature_keys(keys, encoder_digest, str(f))


def vq_decoded_images(
    vqgan: nn.Module, image_tokens: torch.Tensor, sizes: Sequence[tuple[int, int]], vocab: TokenVocab
) -> list[Image.Image]:
    """Each row's image rebuilt from its Lumina-layout tokens by the frozen VQGAN (``sizes``: (h, w) per
    row; rows of one size decode together): the ``vq_decode`` style input, on the fly or precomputed."""
    images: list[Image.Image | None] = [None] * len(sizes)
    for size in sorted(set(sizes)):
        members = [i for i, s in enumerate(sizes) if s == size]
        layout = ImageTokenLayout.for_resolution(size[0], size[1], vocab)
        tokens = image_tokens[members, : layout.num_tokens].cpu()
        with torch.no_grad():
            pixels = vqgan.decode(layout.decode(tokens))
        for i, image in zip(members, to_pil(pixels)):
            images[i] = image
    return images  # type: ignore[return-value]


@torch.no_grad()
def compute_style_features(
    encoder: nn.Module, images: Sequence[Image.Image], batch_size: int = 16
) -> torch.Tensor:
    """PIL images -> the frozen encoder's features ``(B, tokens, width)`` in fp16 on the CPU (``encoder``:
    a :class:`~stylear_core.models.clip.ClipVisionTower`, in chunks of ``batch_size``)."""
    param = next(encoder.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        pixels = encoder.preprocess(images[start : start + batch_size])
        out.append(encoder(pixels.to(device=param.device, dtype=param.dtype)).to(FEATURE_DTYPE).cpu())
    return torch.cat(out)


def features_arrow(features: Sequence[torch.Tensor | None]) -> pa.Array:
    """Per-row features ``(tokens, width)`` (None: none) -> the ``list<float16>`` column, flattened."""
    values = [None if f is None else f.to(FEATURE_DTYPE).reshape(-1).numpy() for f in features]
    return pa.array(values, pa.list_(pa.float16()))


def features_tensor(
    values: Sequence[np.ndarray | None], shape: tuple[int, int], where: str = "batch"
) -> torch.Tensor:
    """The column's per-row flat fp16 arrays (as Ray Data hands them) -> ``(B, tokens, width)`` fp16;
    raises :class:`SchemaError` naming the shape when a row holds another encoder's size."""
    expected = shape[0] * shape[1]
    rows = []
    for v in values:
        if v is None:
            raise SchemaError(f"{where}: a row has no style features; {PRECOMPUTE_HINT}")
        arr = np.asarray(v, dtype=np.float16)
        if arr.size != expected:
            raise SchemaError(
                f"{where}: a row holds {arr.size} style-feature values, this style encoder gives "
                f"{shape[0]} x {shape[1]}; {PRECOMPUTE_HINT}"
            )
        rows.append(arr.reshape(shape))
    return torch.from_numpy(np.stack(rows))


class PrecomputedStyleEncoder(nn.Module):
    """Stands in for the CLIP tower when training reads precomputed features: it has the tower's
    ``width`` and ``num_tokens`` (what the resampler is built from) and no weights; calling it is an error."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.width = width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Refuse: with ``style_source: features`` no style image is encoded during training."""
        raise RuntimeError("style_source: features reads precomputed style features; no CLIP is built")


__all__ = [
    "FEATURES_COLUMN",
    "FEATURES_FORMAT",
    "FEATURE_SOURCES",
    "KEY_COLUMN",
    "PRECOMPUTE_HINT",
    "PrecomputedStyleEncoder",
    "check_feature_files",
    "check_feature_keys",
    "compute_style_features",
    "features_arrow",
    "features_key",
    "features_tensor",
    "key_encoder",
    "style_encoder_arch",
    "style_encoder_digest",
    "style_feature_shape",
    "vq_decoded_images",
]
