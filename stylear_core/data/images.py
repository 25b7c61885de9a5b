"""Image conversions shared by curation, the VQ tokenizer and serving: bytes <-> PIL <-> tensors."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image (the message says why)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image; raises :class:`ImageDecodeError` for corrupt, empty or oversized data."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(f"image is {img.width}x{img.height}, more than {max_pixels} pixels")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageDecodeError(f"unreadable image: {e}") from None
    return img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def center_crop_resize(img: Image.Image, height: int, width: int) -> Image.Image:
    """Crop the largest centred box of the target aspect ratio, then resize to ``height x width``."""
    w, h = img.size
    target = width / height
    if w / h > target:
        new_w = round(h * target)
        left = (w - new_w) // 2
        img = img.crop((left, 0, left + new_w, h))
    else:
        new_h = round(w / target)
        top = (h - new_h) // 2
        img = img.crop((0, top, w, top + new_h))
    return img.resize((width, height), Image.BICUBIC)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> float tensor ``(B, 3, H, W)`` scaled to [-1, 1] (the VQGAN's input range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Tensor ``(B, 3, H, W)`` in [-1, 1] -> RGB PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]
