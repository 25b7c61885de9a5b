"""SAM style-region masker: selection on hand-made masks, tiny SAM end to end, real checkpoint loading."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFilter

from stylear_core.curation.sam import (
    MaskerConfig,
    StyleRegionMasker,
    _dilate,
    build_sam,
    centre_box_mask,
    fill_removed,
    select_content_mask,
    tiny_sam,
)
from stylear_core.data.schemas import MASKER_OUTPUT_SCHEMA
from stylear_core.data.synthetic import ContentSpec, ObjectSpec, StyleSpec, corrupt_bytes, render


def box(h: int, w: int, top: int, left: int, bh: int, bw: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top : top + bh, left : left + bw] = True
    return m


def test_selection_removes_the_central_object_and_its_parts():
    h = w = 100
    background = {"segmentation": ~box(h, w, 30, 30, 40, 40)}  # 84% of the image: too large to be an object
    centre = {"segmentation": box(h, w, 30, 30, 40, 40)}  # 16%, centred
    corner = {"segmentation": box(h, w, 0, 0, 35, 35)}  # 12%, in a corner
    part = {"segmentation": box(h, w, 35, 35, 10, 10)}  # inside the central object
    speck = {"segmentation": box(h, w, 90, 90, 5, 5)}  # 0.25%: below min_fraction
    removed = select_content_mask([background, corner, speck, part, centre])
    assert removed is not None
    assert np.array_equal(
        removed, centre["segmentation"]
    )  # the part is inside already; corner/background kept
    # An off-centre object wins only when it is much larger.
    big_side = box(h, w, 0, 0, 55, 55)  # 30%, centroid far from centre
    assert np.array_equal(select_content_mask([corner, {"segmentation": big_side}]), big_side)
    assert np.array_equal(select_content_mask([big_side, centre["segmentation"]]), centre["segmentation"])


def test_selection_unions_overlapping_parts_and_returns_none_without_candidates():
    h = w = 64
    body = box(h, w, 20, 20, 24, 24)
    hat = box(h, w, 16, 26, 10, 12)  # 6 of its 10 rows inside the body: a part of the object
    neighbour = box(h, w, 30, 40, 10, 10)  # 4 of its 10 columns inside: a different thing
    removed = select_content_mask([body, hat, neighbour], part_overlap=0.5)
    assert removed[17, 30] and removed[30, 30]
    assert not removed[35, 48]
    assert removed.sum() == body.sum() + 12 * 4
    assert select_content_mask([]) is None
    assert select_content_mask([np.ones((h, w), dtype=bool)]) is None  # only the whole image


def test_centre_box_and_fill():
    removed = centre_box_mask(40, 60, 0.5)
    assert removed.shape == (40, 60) and removed.sum() == 20 * 30 and removed[20, 30] and not removed[0, 0]
    img = Image.new("RGB", (60, 40), (200, 10, 10))
    img.paste((0, 0, 255), (15, 10, 45, 30))  # a blue object exactly in the box
    for method in ("mean", "blur"):
        out = np.asarray(fill_removed(img, removed, method), dtype=int)
        assert out.shape == (40, 60, 3)
        assert np.abs(out[removed] - [200, 10, 10]).max() <= 2  # the object's colour is gone
        assert np.array_equal(out[~removed], np.asarray(img, dtype=int)[~removed])  # kept pixels untouched


def test_dilation_is_the_square_max_filter_it_replaces():
    rng = np.random.default_rng(0)
    for (h, w), pixels in [
        ((37, 53), 3),
        ((64, 64), 1),
        ((80, 96), 2),
        ((101, 77), 9),
        ((5, 200), 4),
        ((50, 50), 30),
    ]:
        removed = rng.random((h, w)) < 0.03
        square_max = Image.fromarray(removed.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(2 * pixels + 1)
        )
        assert np.array_equal(_dilate(removed, pixels), np.asarray(square_max) > 127), (h, w, pixels)
    assert _dilate(removed, 0) is removed


def test_dilation_cost_does_not_grow_with_the_halo():
    """The masker's halo at 4096 px is 82 px; Pillow's MaxFilter(165) took minutes there, holding the GIL."""
    side = 4096
    removed = centre_box_mask(side, side, 0.5)
    pixels = round(MaskerConfig().dilate_fraction * side)
    started = time.perf_counter()
    grown = _dilate(removed, pixels)
    assert time.perf_counter() - started < 2.0
    assert grown.sum() == (side // 2 + 2 * pixels) ** 2


@pytest.fixture(scope="module")
def masker():
    cfg = MaskerConfig(model_type="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return StyleRegionMasker(tiny_sam(), cfg)


def reference(size: int = 96) -> Image.Image:
    return render(
        ContentSpec((ObjectSpec("circle", "red", "center", "large"),)),
        StyleSpec("vivid", "dots", "filled"),
        size,
    )


def test_tiny_sam_is_small_and_seeded():
    state = torch.random.get_rng_state()
    a, b = tiny_sam(seed=1), tiny_sam(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert sum(p.numel() for p in a.parameters()) < 300_000
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_clean_reference_outputs(masker):
    img = reference(96).resize((96, 80))
    mask_png, kept_fraction, cleaned = masker.clean_reference(img)
    mask = Image.open(io.BytesIO(mask_png))
    assert mask.mode == "L" and mask.size == img.size and cleaned.size == img.size
    kept = np.asarray(mask) == 255
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert 0 < kept_fraction <= 1 and kept_fraction == pytest.approx(kept.mean())
    assert np.array_equal(np.asarray(cleaned)[kept], np.asarray(img)[kept])


def test_sam_generator_masks_have_image_size(masker):
    img = reference(96).resize((96, 80))
    masks = masker.sam_masks(img)
    assert masks, "with both thresholds at 0 the tiny SAM proposes masks"
    assert all(m["segmentation"].shape == (80, 96) and m["segmentation"].dtype == bool for m in masks)


def test_clean_removes_the_object_sam_finds(masker, monkeypatch):
    img = reference(96)
    arr = np.asarray(img, dtype=int)
    obj = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    corner = np.zeros_like(obj)
    corner[:20, :20] = True
    # SAM's proposals for this image, as the generator returns them: a corner, the background, the object.
    monkeypatch.setattr(masker, "sam_masks", lambda image: [{"segmentation": m} for m in (corner, ~obj, obj)])
    out = masker.clean(img)
    assert not out.used_fallback
    kept = np.asarray(Image.open(io.BytesIO(out.mask_png))) == 255
    assert not kept[obj].any() and kept[corner].all()
    cleaned = np.asarray(out.image, dtype=int)
    assert not ((cleaned[..., 0] > 180) & (cleaned[..., 1] < 90) & (cleaned[..., 2] < 90)).any()
    assert 1 - out.kept_fraction > obj.mean()  # the object grown by the halo margin


def test_fallback_when_sam_gives_no_masks():
    strict = StyleRegionMasker(
        tiny_sam(),
        MaskerConfig(model_type="tiny", points_per_side=2, pred_iou_thresh=1.01, dilate_fraction=0.0),
    )
    out = strict.clean(reference(64))
    assert out.used_fallback
    assert out.kept_fraction == pytest.approx(0.75)  # the centre box of half the side is removed
    red = np.asarray(reference(64), dtype=int)
    is_red = (red[..., 0] > 180) & (red[..., 1] < 90)
    cleaned = np.asarray(out.image, dtype=int)
    assert (
        is_red[24:40, 24:40].any()
        and not ((cleaned[..., 0] > 180) & (cleaned[..., 1] < 90))[24:40, 24:40].any()
    )


def test_batch_call_reports_bad_images(masker):
    good = io.BytesIO()
    reference(64).save(good, format="PNG")
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "image": np.array([good.getvalue(), corrupt_bytes()], dtype=object),
    }
    table = masker(batch)
    assert table.schema.equals(MASKER_OUTPUT_SCHEMA)  # typed nulls: batches concatenate whatever failed
    out = table.to_pydict()
    assert out["error"][0] is None and out["error"][1].startswith("ImageDecodeError")
    assert out["mask"][1] is None and out["kept_fraction"][1] is None
    assert Image.open(io.BytesIO(out["cleaned_image"][0])).size == (64, 64)
    assert 0 < out["kept_fraction"][0] <= 1
    # Ray Data may hand the batch over as a pyarrow table.
    assert masker(pa.table(batch)).to_pydict() == out


def test_from_config_builds_tiny():
    m = StyleRegionMasker.from_config(MaskerConfig(model_type="tiny", points_per_side=2))
    assert m.sam.image_encoder.img_size == 256


def test_build_sam_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown SAM"):
        build_sam("vit_x", tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_sam("vit_b", tmp_path / "missing.pth")


def test_build_sam_loads_official_layout(tmp_path):
    """vit_b (the smallest release, 94M parameters) from a random state dict with the released key layout."""
    from segment_anything import sam_model_registry

    state = sam_model_registry["vit_b"]().state_dict()  # random init: another build draws other weights
    torch.save(state, tmp_path / "sam_vit_b_01ec64.pth")
    loaded = build_sam("vit_b", tmp_path / "sam_vit_b_01ec64.pth")
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.state_dict()[key], state[key])
    assert loaded.image_encoder.img_size == 1024
