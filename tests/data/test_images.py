"""Decoding untrusted image bytes: header-checked limits, format restriction, every failure an ImageDecodeError."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image

from stylear_core.data.images import (
    WEB_FORMATS,
    ImageDecodeError,
    ImageLimitError,
    UnsupportedImageFormatError,
    decode_image,
    encode_png,
    probe_image,
)
from stylear_core.data.synthetic import corrupt_bytes


def black_png(width: int, height: int) -> bytes:
    """A greyscale PNG of black pixels: a few KB whatever shape it declares."""
    return encode_png(Image.new("L", (width, height)))


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **kwargs)
    return buf.getvalue()


def pattern(width: int, height: int) -> Image.Image:
    """A smooth RGB gradient: resizing it is well defined, so shrunk decodes can be compared."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def dds_with_unknown_pixel_flags() -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "DDS"))
    struct.pack_into("<I", data, 80, 0x80000000)  # DDS_PIXELFORMAT.dwFlags: no flag Pillow knows
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def test_shape_limits_are_checked_on_the_header_before_any_pixel_is_decoded():
    tall = black_png(1, 16_777_216)  # 32 KB; CLIP's resize of its shorter side would need ~275 GB
    assert len(tall) < 50_000 and 16_777_216 <= 4096 * 4096  # passes a pixel cap alone
    started = time.perf_counter()
    with pytest.raises(ImageLimitError, match="longer than 8192") as info:
        decode_image(tall, 4096 * 4096, max_side=8192, max_aspect=4.0)
    assert info.value.limit == "side"
    with pytest.raises(ImageLimitError) as info:
        decode_image(truncated(tall), max_side=8192)  # the broken pixel data is never reached
    assert info.value.limit == "side"
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ImageLimitError) as info:
        decode_image(black_png(100_000, 1), max_side=8192)
    assert info.value.limit == "side"
    with pytest.raises(ImageLimitError, match="4:1") as info:
        decode_image(black_png(8000, 1), max_side=8192, max_aspect=4.0)
    assert info.value.limit == "aspect"
    with pytest.raises(ImageLimitError, match="more than 1000 pixels") as info:
        probe_image(black_png(40, 40), 1000)
    assert info.value.limit == "pixels"
    assert decode_image(black_png(400, 100), max_side=400, max_aspect=4.0).size == (400, 100)
    header = probe_image(black_png(400, 100), 40_000, max_side=400, max_aspect=4.0, formats=WEB_FORMATS)
    assert (header.format, header.width, header.height) == ("PNG", 400, 100)


@pytest.mark.parametrize("format", ["QOI", "DDS", "GIF", "BMP", "TIFF"])
def test_formats_outside_the_accepted_ones_are_named_and_refused_but_still_read_unrestricted(format):
    image = pattern(24, 16)
    data = encoded(image, format)
    with pytest.raises(UnsupportedImageFormatError, match="send PNG, JPEG or WebP") as info:
        decode_image(data, formats=WEB_FORMATS)
    assert info.value.format == format
    with pytest.raises(UnsupportedImageFormatError):
        probe_image(data, formats=WEB_FORMATS)
    # Curation's readers pass no format list: what they read before they still read.
    assert decode_image(data).size == (24, 16)


@pytest.mark.parametrize("format", WEB_FORMATS)
def test_the_accepted_formats_decode_under_the_restriction(format):
    image = pattern(40, 24)
    decoded = decode_image(
        encoded(image, format, quality=95) if format != "PNG" else encode_png(image), formats=WEB_FORMATS
    )
    assert decoded.mode == "RGB" and decoded.size == (40, 24)
    assert np.abs(np.asarray(decoded, int) - np.asarray(image, int)).mean() < 4


HOSTILE = {
    "truncated QOI": lambda: truncated(encoded(pattern(64, 64), "QOI")),  # Pillow: ValueError
    "truncated DDS": lambda: truncated(encoded(pattern(64, 64), "DDS")),  # Pillow: ValueError
    "DDS with unknown pixel flags": dds_with_unknown_pixel_flags,  # Pillow: NotImplementedError
    "truncated PNG": lambda: corrupt_bytes("truncated"),
    "truncated JPEG": lambda: truncated(encoded(pattern(64, 64), "JPEG")),
    "truncated WebP": lambda: truncated(encoded(pattern(64, 64), "WEBP")),
    "PNG signature then garbage": lambda: corrupt_bytes("header"),
    "random bytes": lambda: corrupt_bytes("random"),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("formats", [None, WEB_FORMATS], ids=["any-format", "web-formats"])
def test_every_decode_failure_is_an_image_decode_error(name, formats):
    with pytest.raises(ImageDecodeError):
        decode_image(HOSTILE[name](), formats=formats)


def test_modes_become_rgb():
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    for data in (
        encode_png(palette),
        encoded(cmyk, "JPEG"),
        encode_png(Image.new("LA", (8, 8))),
        encode_png(Image.new("I;16", (8, 8))),
    ):
        assert decode_image(data, formats=WEB_FORMATS).mode == "RGB"


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_large_images_are_shrunk_to_the_working_side(format):
    image = pattern(2048, 1024)
    data = encoded(image, format, quality=95) if format == "JPEG" else encode_png(image)
    shrunk = decode_image(data, working_side=256)  # JPEG: decoded at 1/4 scale, then resized
    assert shrunk.size == (256, 128) and shrunk.mode == "RGB"
    expected = np.asarray(image.resize((256, 128), Image.Resampling.BICUBIC), int)
    assert np.abs(np.asarray(shrunk, int) - expected).mean() < 3
    assert decode_image(data, working_side=4096).size == (2048, 1024)  # never enlarged
