"""Remove a style reference's salient content with SAM, keeping the regions that carry its style.

A style reference brings its objects along with its style; fed as is, the objects leak into the
generated image. :class:`StyleRegionMasker` runs segment-anything's ``SamAutomaticMaskGenerator``
on the reference, picks the salient object (the mask that is large and central, with the masks that
are parts of it), removes it, and fills the hole from the kept pixels. The same function runs in
curation (a Ray Data batch callable) and at request time in serving.

When SAM proposes no usable mask (a random or tiny model often proposes none), a documented
fallback removes a centre box (:func:`centre_box_mask`): references mostly centre their subject,
so the output is still a valid, style-only reference.

The mask written out is the *kept* mask: a mode-L PNG, 255 where the reference pixel is kept
(style region), 0 where it was removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFilter

from stylear_core.curation.masker_config import MaskerConfig
from stylear_core.data.batch_columns import column_values
from stylear_core.data.images import ImageDecodeError, decode_image, encode_png
from stylear_core.data.schemas import MASKER_OUTPUT_SCHEMA
from stylear_core.devices import resolve_device

log = logging.getLogger(__name__)

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")


def build_sam(model_type: str, checkpoint: str | Path) -> torch.nn.Module:
    """The released SAM ``model_type`` (``vit_h``/``vit_l``/``vit_b``) with weights from a local file."""
    from segment_anything import sam_model_registry

    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r} (known: {SAM_MODEL_TYPES})")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} not found (weights are never downloaded)")
    return sam_model_registry[model_type](checkpoint=str(path))


def tiny_sam(
    img_size: int = 256,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    prompt_dim: int = 32,
    seed: int = 0,
) -> torch.nn.Module:
    """A small random SAM built from the real parts (ViT image encoder, prompt encoder, two-way mask decoder).

    Same structure as ``sam_model_registry``'s models (windowed + global attention, relative
    positions), shrunk: at the default 256 px it has about 0.1M parameters.
    """
    patch = 16
    grid = img_size // patch
    with torch.random.fork_rng(devices=[]):  # a seeded build that leaves the caller's random state alone
        torch.manual_seed(seed)
        sam = _tiny_sam_parts(img_size, patch, grid, embed_dim, depth, num_heads, prompt_dim)
    return sam.eval()


def _tiny_sam_parts(
    img_size: int, patch: int, grid: int, embed_dim: int, depth: int, num_heads: int, prompt_dim: int
) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=2.0,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(depth - 1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def centre_box_mask(height: int, width: int, fraction: float = 0.5) -> np.ndarray:
    """Boolean ``(height, width)`` mask of a centred box whose sides are ``fraction`` of the image's."""
    removed = np.zeros((height, width), dtype=bool)
    bh, bw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - bh) // 2, (width - bw) // 2
    removed[top : top + bh, left : left + bw] = True
    return removed


def _segmentation(mask: Mapping[str, Any] | np.ndarray) -> np.ndarray:
    seg = mask["segmentation"] if isinstance(mask, Mapping) else mask
    return np.asarray(seg, dtype=bool)


def select_content_mask(
    masks: Sequence[Mapping[str, Any] | np.ndarray],
    min_fraction: float = 0.01,
    max_fraction: float = 0.6,
    part_overlap: float = 0.5,
) -> np.ndarray | None:
    """The salient-content region among SAM masks, or None.

    ``masks`` are SAM's ``{"segmentation": bool HxW}`` dicts or bool arrays.

    Candidates are masks covering ``min_fraction``..``max_fraction`` of the image (larger ones are
    background or the whole scene). Each is scored ``area * centrality**2``, centrality being 1
    at the image centre and 0 at a corner (of its centroid): squared, so a centred object beats an
    off-centre region up to about twice its size. The best one is the object. Masks with at
    least ``part_overlap`` of their area inside it (its parts) join it. Returns the union, or None
    when no mask is a candidate.
    """
    if not masks:
        return None
    segs = [_segmentation(m) for m in masks]
    height, width = segs[0].shape
    best, best_score = None, -1.0
    for k, seg in enumerate(segs):
        area = seg.mean()
        if not min_fraction <= area <= max_fraction:
            continue
        ys, xs = np.nonzero(seg)
        dy = (ys.mean() + 0.5) / height - 0.5
        dx = (xs.mean() + 0.5) / width - 0.5
        centrality = 1.0 - np.sqrt(dx * dx + dy * dy) / np.sqrt(0.5)
        score = float(area * centrality**2)
        if score > best_score:
            best, best_score = k, score
    if best is None:
        return None
    removed = segs[best].copy()
    for k, seg in enumerate(segs):
        area = seg.sum()
        if (
            k != best
            and area
            and (seg & segs[best]).sum() / area >= part_overlap
            and seg.mean() <= max_fraction
        ):
            removed |= seg
    return removed


def fill_removed(image: Image.Image, removed: np.ndarray, method: str = "blur") -> Image.Image:
    """``image`` with ``removed`` pixels replaced from the kept ones.

    ``mean``: the mean colour of the kept pixels. ``blur``: start from the mean, then repeatedly
    blur and restore the kept pixels, so the surrounding kept colours diffuse smoothly into the
    hole (no hard-edged patch for the style encoder to read as a shape).
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    kept = ~removed
    if not kept.any():
        raise ValueError("nothing is kept: cannot fill from kept pixels")
    out = arr.copy()
    out[removed] = arr[kept].mean(axis=0)
    if method == "blur":
        radius = max(1.0, min(removed.shape) / 32)
        for _ in range(8):
            blurred = np.asarray(
                Image.fromarray(out.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
                dtype=np.float32,
            )
            out[removed] = blurred[removed]
    elif method != "mean":
        raise ValueError(f"unknown fill {method!r} (known: blur, mean)")
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def _grow_along(mask: np.ndarray, pixels: int, axis: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` along one axis: true where any pixel within the window is."""
    length = mask.shape[axis]
    counts = np.cumsum(mask, axis=axis, dtype=np.int32)
    counts = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), counts], axis=axis)
    index = np.arange(length)
    upper = np.take(counts, np.minimum(index + pixels + 1, length), axis=axis)
    lower = np.take(counts, np.maximum(index - pixels, 0), axis=axis)
    return upper > lower


def _dilate(removed: np.ndarray, pixels: int) -> np.ndarray:
    """``removed`` grown by ``pixels`` in every direction: a square max filter of side ``2 * pixels + 1``.

    The square window is separable, and each pass counts the removed pixels in a sliding window
    from cumulative sums, so the cost is linear in the mask's size and independent of ``pixels``
    (a Pillow ``MaxFilter`` costs ~ side^2 * window^2 and holds the GIL throughout: a minute at
    2048 px).
    """
    if pixels <= 0:
        return removed
    return _grow_along(_grow_along(removed, pixels, 0), pixels, 1)


@dataclass(frozen=True)
class CleanedReference:
    """A reference with its content removed: kept mask (PNG, 255 = kept), kept fraction, image."""

    mask_png: bytes
    kept_fraction: float
    image: Image.Image
    used_fallback: bool


class StyleRegionMasker:
    """SAM automatic masks -> the reference with its salient object removed (see the module docstring).

    ``sam`` is a segment-anything ``Sam`` (:func:`build_sam` / :func:`tiny_sam`). As a Ray Data batch
    callable it maps ``{id, image}`` (encoded bytes) to a table of :data:`MASKER_OUTPUT_SCHEMA`
    (the ``stylear.sam_masks/1`` columns plus ``used_fallback`` and ``error``); a bad image gives a
    row with nulls and its ``error``, never an exception.
    """

    def __init__(self, sam: torch.nn.Module, cfg: MaskerConfig | None = None) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.cfg = cfg or MaskerConfig()
        self.sam = sam.to(resolve_device(self.cfg.device)).eval()
        self.generator = SamAutomaticMaskGenerator(
            self.sam,
            points_per_side=self.cfg.points_per_side,
            pred_iou_thresh=self.cfg.pred_iou_thresh,
            stability_score_thresh=self.cfg.stability_score_thresh,
            min_mask_region_area=0,  # > 0 needs OpenCV; tiny regions are dropped by min_object_fraction
            output_mode="binary_mask",
        )

    @classmethod
    def from_config(cls, cfg: MaskerConfig) -> StyleRegionMasker:
        """Build the SAM ``cfg`` names (a local checkpoint, or a random tiny one) and wrap it."""
        sam = tiny_sam() if cfg.model_type == "tiny" else build_sam(cfg.model_type, cfg.checkpoint)
        return cls(sam, cfg)

    @torch.inference_mode()
    def sam_masks(self, image: Image.Image) -> list[dict[str, Any]]:
        """SAM's automatic masks of ``image`` (dicts with a bool ``segmentation`` at the image's size)."""
        return self.generator.generate(np.asarray(image.convert("RGB")))

    def removed_region(self, image: Image.Image) -> tuple[np.ndarray, bool]:
        """Bool mask of the pixels to remove, and whether the centre-box fallback chose it."""
        cfg = self.cfg
        removed = select_content_mask(
            self.sam_masks(image), cfg.min_object_fraction, cfg.max_object_fraction, cfg.part_overlap
        )
        fallback = removed is None
        if fallback:
            removed = centre_box_mask(image.height, image.width, cfg.fallback_box_fraction)
        removed = _dilate(removed, round(cfg.dilate_fraction * min(image.size)))
        if removed.all():  # keep at least something to fill from
            removed = centre_box_mask(image.height, image.width, cfg.fallback_box_fraction)
            fallback = True
        return removed, fallback

    def clean(self, image: Image.Image) -> CleanedReference:
        """``image`` with its salient content removed, with the kept mask and how it was chosen."""
        image = image.convert("RGB")
        removed, fallback = self.removed_region(image)
        kept = ~removed
        return CleanedReference(
            mask_png=encode_png(Image.fromarray(kept.astype(np.uint8) * 255, "L")),
            kept_fraction=float(kept.mean()),
            image=fill_removed(image, removed, self.cfg.fill),
            used_fallback=fallback,
        )

    def clean_reference(self, image: Image.Image) -> tuple[bytes, float, Image.Image]:
        """``image`` -> (kept-mask PNG bytes, kept fraction in (0, 1], cleaned image of the same size)."""
        out = self.clean(image)
        return out.mask_png, out.kept_fraction, out.image

    def content_reference(
        self, image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
    ) -> Image.Image:
        """The salient content cut out of ``image``: the pixels :meth:`clean` removes, the rest ``background``.

        The complement of :meth:`clean`'s image (same region, halo included), for StyleAR's released
        inference, which subtracts this cut-out's CLIP features from the reference's. The background is
        a flat neutral colour (white, as a SAM cut-out is usually shown) so it adds no style of its own.
        """
        image = image.convert("RGB")
        removed, _ = self.removed_region(image)
        out = np.empty((image.height, image.width, 3), dtype=np.uint8)
        out[:] = background
        out[removed] = np.asarray(image)[removed]
        return Image.fromarray(out, "RGB")

    def __call__(self, batch: Mapping[str, Any] | pa.Table) -> pa.Table:
        """Clean a batch of encoded reference images (dict of columns or a table); see the class docstring."""
        ids = [str(i) for i in column_values(batch["id"])]
        images = column_values(batch["image"])
        masks, fractions, cleaned, fallbacks, errors = [], [], [], [], []
        for row_id, data in zip(ids, images):
            try:
                out = self.clean(decode_image(bytes(data or b"")))
            except (ImageDecodeError, RuntimeError, ValueError) as e:
                log.warning("SAM masking of %s failed: %s", row_id, e)
                out, error = None, f"{type(e).__name__}: {e}"
            else:
                error = None
            masks.append(out.mask_png if out else None)
            fractions.append(out.kept_fraction if out else None)
            cleaned.append(encode_png(out.image) if out else None)
            fallbacks.append(out.used_fallback if out else None)
            errors.append(error)
        return pa.table(
            {
                "id": ids,
                "mask": masks,
                "kept_fraction": fractions,
                "cleaned_image": cleaned,
                "used_fallback": fallbacks,
                "error": errors,
            },
            schema=MASKER_OUTPUT_SCHEMA,
        )
