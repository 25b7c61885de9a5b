"""The request-time style path: reference bytes -> (SAM) -> CLIP -> resampler -> noisy style tokens."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stylear_core.curation.sam import MaskerConfig, StyleRegionMasker
from stylear_core.data.images import (
    ImageDecodeError,
    ImageLimitError,
    UnsupportedImageFormatError,
    encode_png,
)
from stylear_core.inference.style_request import ReferenceStyleEncoder, StyleRequestError
from stylear_core.models.presets import ModelConfig, build_resampler, build_style_encoder


@pytest.fixture(scope="module")
def parts():
    cfg = ModelConfig(preset="tiny", num_style_tokens=4)
    encoder = build_style_encoder(cfg)
    resampler = build_resampler(cfg, encoder.width, 64).eval()
    masker = StyleRegionMasker.from_config(MaskerConfig(model_type="tiny", points_per_side=4, device="cpu"))
    return encoder, resampler, masker


def reference_png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse(
        (size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(240, 200, 30)
    )  # a centred "object"
    for x in range(0, size, 8):
        draw.line((x, 0, x, size), fill=(10, 10, 10))  # the "style": stripes
    return encode_png(image)


def test_tokens_are_the_resampled_clip_features_plus_seeded_noise(parts):
    encoder, resampler, _ = parts
    style = ReferenceStyleEncoder(encoder, resampler)
    data = reference_png()
    clean = style(data, use_sam=False, noise_strength=0.0, seed=1)
    with torch.no_grad():
        expected = resampler(encoder.encode([style.load(data)]))[0]
    assert clean.shape == (4, 64)
    assert torch.equal(clean, expected)
    noisy = style(data, use_sam=False, noise_strength=0.3, seed=1)
    assert torch.equal(noisy, style(data, use_sam=False, noise_strength=0.3, seed=1))
    assert not torch.equal(noisy, style(data, use_sam=False, noise_strength=0.3, seed=2))
    assert 0.2 < float((noisy - clean).std()) < 0.4


def test_batched_tokens_do_not_depend_on_neighbours(parts):
    encoder, resampler, _ = parts
    style = ReferenceStyleEncoder(encoder, resampler)
    images = [style.load(reference_png()), style.load(reference_png(96))]
    batched = style.style_tokens(images, [0.2, 0.5], [5, 6])
    alone = style.style_tokens(images[1:], [0.5], [6])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)


def test_one_encode_of_mixed_sam_modes_equals_each_reference_alone(parts):
    """The serving replica batches whatever references are queued, plain and subtract mode together."""
    encoder, resampler, masker = parts
    style = ReferenceStyleEncoder(encoder, resampler, masker)
    asks = [(reference_png(), True, "subtract", 0.3, 11), (reference_png(96), False, "mask", 0.0, 12),
            (reference_png(80), True, "mask", 0.5, 13), (reference_png(72), True, "subtract", 0.0, 14)]  # fmt: skip
    prepared = [style.prepare(data, sam, mode) for data, sam, mode, _, _ in asks]
    assert [p.content is not None for p in prepared] == [True, False, False, True]
    batched = style.encode(prepared, [a[3] for a in asks], [a[4] for a in asks])
    for row, (data, sam, mode, strength, seed) in zip(batched, asks):
        alone = style(data, use_sam=sam, noise_strength=strength, seed=seed, sam_mode=mode)
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(StyleRequestError, match="unknown SAM mode"):
        style.prepare(reference_png(), True, "blur")


def test_sam_cleaning_changes_what_is_encoded(parts):
    encoder, resampler, masker = parts
    style = ReferenceStyleEncoder(encoder, resampler, masker)
    data = reference_png()
    plain = style(data, use_sam=False, noise_strength=0.0, seed=0)
    cleaned = style(data, use_sam=True, noise_strength=0.0, seed=0)
    assert cleaned.shape == plain.shape
    assert not torch.allclose(cleaned, plain)


def test_content_cut_out_is_the_complement_of_the_cleaned_reference(parts):
    _, _, masker = parts
    image = Image.open(io.BytesIO(reference_png())).convert("RGB")
    removed, _ = masker.removed_region(image)
    content = np.asarray(masker.content_reference(image))
    pixels = np.asarray(image)
    assert removed.any() and not removed.all()
    assert np.array_equal(content[removed], pixels[removed])  # the object's own pixels
    assert (content[~removed] == 255).all()  # a flat neutral background elsewhere
    cleaned = np.asarray(masker.clean_reference(image)[2])
    assert np.array_equal(cleaned[~removed], pixels[~removed])  # masking keeps exactly the other part


def test_subtract_mode_is_the_released_mix_of_resampled_features_plus_the_same_noise(parts):
    encoder, resampler, masker = parts
    style = ReferenceStyleEncoder(encoder, resampler, masker)
    data = reference_png()
    image = style.load(data)
    with torch.no_grad():
        e0 = encoder.encode([image])
        e1 = encoder.encode([masker.content_reference(image)])
        expected = (0.2 * resampler(e0) + 0.8 * resampler(e0 - 0.8 * e1))[0]
    clean = style(data, use_sam=True, noise_strength=0.0, seed=3, sam_mode="subtract")
    torch.testing.assert_close(clean, expected, atol=1e-5, rtol=1e-5)
    # The noise is the mask path's: same strength and seed -> the same draw added.
    noisy = style(data, use_sam=True, noise_strength=0.3, seed=3, sam_mode="subtract")
    noise_alone = style(data, use_sam=False, noise_strength=0.3, seed=3) - style(
        data, use_sam=False, noise_strength=0.0, seed=3
    )
    torch.testing.assert_close(noisy - clean, noise_alone, atol=1e-5, rtol=1e-5)
    # Mask mode is what it was: the cleaned image, encoded.
    masked = style(data, use_sam=True, noise_strength=0.0, seed=3, sam_mode="mask")
    assert torch.equal(masked, style(data, use_sam=True, noise_strength=0.0, seed=3))
    with torch.no_grad():
        assert torch.equal(masked, resampler(encoder.encode([style.clean(image)]))[0])
    assert not torch.allclose(masked, clean, atol=1e-4)


def test_subtract_mode_honours_its_weights_and_needs_sam(parts):
    encoder, resampler, masker = parts
    data = reference_png()
    style = ReferenceStyleEncoder(encoder, resampler, masker, subtract_weight=0.5, mix_weight=0.3)
    image = style.load(data)
    with torch.no_grad():
        e0 = encoder.encode([image])
        e1 = encoder.encode([masker.content_reference(image)])
        expected = (0.7 * resampler(e0) + 0.3 * resampler(e0 - 0.5 * e1))[0]
    got = style(data, use_sam=True, noise_strength=0.0, seed=0, sam_mode="subtract")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Per-call weights win over the encoder's.
    default = ReferenceStyleEncoder(encoder, resampler, masker)
    overridden = default(data, True, 0.0, 0, sam_mode="subtract", subtract_weight=0.5, mix_weight=0.3)
    torch.testing.assert_close(overridden, expected, atol=1e-5, rtol=1e-5)
    # mix 0: the plain reference's tokens, whatever is subtracted.
    plain = ReferenceStyleEncoder(encoder, resampler, masker, mix_weight=0.0)
    torch.testing.assert_close(
        plain(data, use_sam=True, noise_strength=0.0, seed=0, sam_mode="subtract"),
        plain(data, use_sam=False, noise_strength=0.0, seed=0),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(StyleRequestError) as err:
        ReferenceStyleEncoder(encoder, resampler)(data, True, 0.0, 0, sam_mode="subtract")
    assert err.value.field == "sam"
    with pytest.raises(StyleRequestError) as err:
        style(data, use_sam=True, noise_strength=0.0, seed=0, sam_mode="bogus")
    assert err.value.field == "sam_mode"


def test_an_adapter_resampler_replaces_the_base_one(parts):
    encoder, resampler, _ = parts
    other = build_resampler(ModelConfig(preset="tiny", num_style_tokens=4, seed=9), encoder.width, 64).eval()
    style = ReferenceStyleEncoder(encoder, resampler)
    data = reference_png()
    assert not torch.allclose(style(data, False, 0.0, 0), style(data, False, 0.0, 0, resampler=other))


def test_bad_references_are_refused(parts):
    encoder, resampler, _ = parts
    style = ReferenceStyleEncoder(encoder, resampler, masker=None, max_pixels=100 * 100)
    with pytest.raises(ImageDecodeError):
        style(b"certainly not an image", False, 0.0, 0)
    with pytest.raises(ImageDecodeError, match="more than"):
        style(reference_png(128), False, 0.0, 0)
    with pytest.raises(StyleRequestError) as info:
        style(reference_png(), True, 0.0, 0)
    assert info.value.field == "sam"


def test_references_are_shrunk_to_the_working_side_right_after_decoding(parts):
    encoder, resampler, _ = parts
    style = ReferenceStyleEncoder(encoder, resampler, working_side=256)
    assert style.load(reference_png(1024)).size == (256, 256)
    wide = Image.new("RGB", (900, 300), (10, 200, 30))
    assert style.load(encode_png(wide)).size == (256, 85)
    assert style.load(reference_png(96)).size == (96, 96)  # small ones are left as they are


def test_a_4096px_reference_is_cleaned_by_sam_in_bounded_time_without_stalling_other_threads(parts):
    """The replica's event loop shares the GIL with this work: it must never wait long for it.

    Before references were shrunk (and the halo was a Pillow MaxFilter) this took minutes and held the
    GIL throughout, so the replica missed its health checks.
    """
    encoder, resampler, masker = parts
    style = ReferenceStyleEncoder(encoder, resampler, masker, working_side=256)  # tiny.yaml's setting
    image = Image.open(io.BytesIO(reference_png(256))).resize((4096, 4096), Image.Resampling.NEAREST)
    data = encode_png(image)
    result: dict[str, object] = {}

    def run() -> None:
        started = time.perf_counter()
        result["tokens"] = style(data, use_sam=True, noise_strength=0.3, seed=1)
        result["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=run)
    worker.start()
    stalls = []
    while worker.is_alive() and len(stalls) < 2000:  # bounded: at most ~10 s of 5 ms naps
        started = time.perf_counter()
        time.sleep(0.005)
        stalls.append(time.perf_counter() - started)
    worker.join(timeout=60)
    assert result["tokens"].shape == (4, 64)
    assert result["seconds"] < 3.0
    assert max(stalls) < 0.5


def test_references_over_the_shape_limits_or_in_other_formats_are_refused(parts):
    encoder, resampler, _ = parts
    style = ReferenceStyleEncoder(encoder, resampler, max_side=64, max_aspect=2.0)
    with pytest.raises(ImageLimitError) as info:
        style(encode_png(Image.new("RGB", (65, 40))), False, 0.0, 0)
    assert info.value.limit == "side"
    with pytest.raises(ImageLimitError) as info:
        style(encode_png(Image.new("RGB", (60, 20))), False, 0.0, 0)
    assert info.value.limit == "aspect"
    qoi = io.BytesIO()
    Image.new("RGB", (8, 8)).save(qoi, format="QOI")
    with pytest.raises(UnsupportedImageFormatError):
        style(qoi.getvalue(), False, 0.0, 0)
