"""Image conversions shared by curation, the VQ tokenizer and serving: bytes <-> PIL <-> tensors.

Decoding untrusted bytes (:func:`decode_image`, :func:`probe_image`) is bounded before any pixel is
decoded: the header alone decides the format, the pixel count, each side and the aspect ratio, so a
PNG of a few KB that declares 1 x 16,777,216 pixels is refused before it costs memory. Every failure of
Pillow on hostile bytes (its plugins raise ``OSError``, ``ValueError``, ``NotImplementedError``,
``EOFError``, ``struct.error``, ``SyntaxError``, decompression-bomb errors, ...) becomes an
:class:`ImageDecodeError`; its subclasses :class:`UnsupportedImageFormatError` and
:class:`ImageLimitError` say when the bytes are a known but unaccepted format or over a limit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch loads only in the two tensor helpers: the HTTP ingress decodes headers only
    import torch

WEB_FORMATS = ("PNG", "JPEG", "WEBP")
"""The formats uploaded references may use (Pillow format ids): what the serving API documents."""


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image (the message says why)."""


class UnsupportedImageFormatError(ImageDecodeError):
    """Bytes of an image format outside the accepted ones; ``format`` is Pillow's id for it."""

    def __init__(self, message: str, format: str) -> None:
        super().__init__(message)
        self.format = format


class ImageLimitError(ImageDecodeError):
    """An image whose header exceeds a limit; ``limit`` is ``"pixels"``, ``"side"`` or ``"aspect"``."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: Pillow's ``format`` id, ``width`` and ``height`` in pixels."""

    format: str
    width: int
    height: int


def _format_list(formats: Sequence[str]) -> str:
    names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _sniff_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with (Pillow's own ``accept`` checks; nothing is parsed)."""
    Image.init()
    prefix = data[:16]  # what Image.open hands the accept checks
    for format_id in Image.ID:
        accept = Image.OPEN[format_id][1]
        try:
            if accept is not None and accept(prefix):
                return format_id
        except Exception:  # an accept check that chokes on odd bytes simply does not claim them
            continue
    return None


def _open(data: bytes, formats: Sequence[str] | None) -> Image.Image:
    """Pillow's lazy open (header only) of ``data``, restricted to ``formats`` when given."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        return Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None)
    except Exception as e:  # Pillow's plugins raise many types on hostile headers; all mean "unreadable"
        if formats is not None:
            found = _sniff_format(data)
            if found is not None and found not in formats:
                raise UnsupportedImageFormatError(
                    f"{found} images are not accepted (send {_format_list(formats)})", found
                ) from None
            what = f"unreadable image: not a valid {_format_list(formats)} file"
        else:
            what = "unreadable image"
        # Pillow's "cannot identify image file <BytesIO ...>" says nothing more than ``what``.
        detail = "" if isinstance(e, UnidentifiedImageError) else f" ({type(e).__name__}: {e})"
        raise ImageDecodeError(what + detail) from None


def _check_shape(
    width: int, height: int, max_pixels: int | None, max_side: int | None, max_aspect: float | None
) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{width}x{height} has no pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLimitError(f"{width}x{height} has more than {max_pixels} pixels", "pixels")
    if max_side is not None and max(width, height) > max_side:
        raise ImageLimitError(f"{width}x{height} has a side longer than {max_side} pixels", "side")
    if max_aspect is not None and max(width, height) / min(width, height) > max_aspect:
        raise ImageLimitError(
            f"{width}x{height} is more elongated than the {max_aspect:g}:1 aspect-ratio limit", "aspect"
        )


def probe_image(
    data: bytes,
    max_pixels: int | None = None,
    *,
    max_side: int | None = None,
    max_aspect: float | None = None,
    formats: Sequence[str] | None = None,
) -> ImageHeader:
    """Check ``data``'s header against the limits without decoding pixels; raises like :func:`decode_image`.

    Cheap whatever the image's size (milliseconds), so request handlers can call it inline. A file
    whose header passes may still fail to decode (truncated or corrupt pixel data).
    """
    with _open(data, formats) as img:
        _check_shape(img.width, img.height, max_pixels, max_side, max_aspect)
        return ImageHeader(format=img.format or "", width=img.width, height=img.height)


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled so its longer side is ``side`` (aspect kept, each side at least 1)."""
    scale = side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def decode_image(
    data: bytes,
    max_pixels: int | None = None,
    *,
    max_side: int | None = None,
    max_aspect: float | None = None,
    formats: Sequence[str] | None = None,
    working_side: int | None = None,
) -> Image.Image:
    """Bytes -> RGB PIL image; raises :class:`ImageDecodeError` for corrupt, empty or oversized data.

    ``max_pixels``, ``max_side`` (longer side) and ``max_aspect`` (longer / shorter side) are checked
    on the header before decoding (:class:`ImageLimitError`); ``formats`` restricts the Pillow formats
    tried (others are :class:`UnsupportedImageFormatError`; ``None``: any Pillow reads). With
    ``working_side`` an image whose longer side exceeds it comes back shrunk to that side (aspect
    kept); a JPEG at least twice that side is decoded at a reduced DCT scale, so its full-size bitmap
    is never built.
    """
    img = _open(data, formats)
    try:
        _check_shape(img.width, img.height, max_pixels, max_side, max_aspect)
        if working_side is not None and max(img.size) > working_side and img.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, no smaller than asked: twice the target
            # keeps the final resize close to fair resampling (as Image.thumbnail's reducing_gap).
            img.draft(None, _fit(img.size, 2 * working_side))
        rgb = img.convert("RGB")  # decodes the pixels
        if working_side is not None and max(rgb.size) > working_side:
            rgb.thumbnail((working_side, working_side), Image.Resampling.BICUBIC)
    except ImageDecodeError:
        raise
    except Exception as e:  # truncated data, unsupported pixel layouts, decoder bugs: all unreadable
        raise ImageDecodeError(
            f"unreadable image: broken {img.format} data ({type(e).__name__}: {e})"
        ) from None
    finally:
        img.close()
    return rgb


def encode_png(img: Image.Image) -> bytes:
    """PIL image -> PNG bytes."""
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
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Tensor ``(B, 3, H, W)`` in [-1, 1] -> RGB PIL images."""
    import torch

    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]
