"""Procedural style data: deterministic by seed, content follows the prompt, style follows the style spec."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylear_core.data.images import ImageDecodeError, decode_image
from stylear_core.data.schemas import RAW_PAIRS_SCHEMA, rows_to_table
from stylear_core.data.synthetic import (
    ALL_STYLES,
    COLOURS,
    ContentSpec,
    ObjectSpec,
    StyleSpec,
    SyntheticStyleSet,
    corrupt_bytes,
    png_size,
    render,
)
from stylear_core.data.synthetic_subjects import procedural_subjects, render_subject


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_same_seed_same_records_and_prefix_stability():
    a, b = SyntheticStyleSet(seed=3, size=32), SyntheticStyleSet(seed=3, size=32)
    assert a.raw_pairs(6) == b.raw_pairs(6)
    assert a.raw_pairs(3) == b.raw_pairs(6)[:3]  # a record does not depend on how many were asked for
    assert a.stylization_requests(4) == b.stylization_requests(4)
    assert a.style_references(3) == b.style_references(3)
    other = SyntheticStyleSet(seed=4, size=32).raw_pairs(6)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in a.raw_pairs(6)]


def test_raw_pairs_fit_the_raw_schema_and_have_unique_ids():
    rows = SyntheticStyleSet(seed=0, size=48).raw_pairs(20)
    table = rows_to_table(rows, RAW_PAIRS_SCHEMA)
    assert table.num_rows == 20 and len(set(table.column("id").to_pylist())) == 20
    assert all(png_size(r["image"]) == (48, 48) for r in rows)


def test_prompt_describes_content():
    content = ContentSpec(
        (ObjectSpec("circle", "red", "top left", "large"), ObjectSpec("star", "blue", "center", "small"))
    )
    assert content.prompt == "a large red circle at the top left and a small blue star in the center"


def test_object_is_drawn_where_and_in_the_colour_the_prompt_says():
    style = StyleSpec("vivid", "gradient", "filled")
    img = np.asarray(
        render(ContentSpec((ObjectSpec("square", "red", "top left", "large"),)), style, 96), dtype=int
    )
    red = (img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert red.sum() > 100
    assert xs.mean() < 96 / 3 and ys.mean() < 96 / 3  # top-left third
    assert not red[48:, :].any() and not red[:, 48:].any()


def test_styles_differ_and_content_stays():
    content = ContentSpec((ObjectSpec("triangle", "green", "center", "large"),))
    images = {
        s.style_id: np.asarray(render(content, s, 64), dtype=int) for s in ALL_STYLES[:: len(ALL_STYLES) // 8]
    }
    ids = list(images)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert np.abs(images[ids[i]] - images[ids[j]]).mean() > 2, (ids[i], ids[j])
    # Two contents in one style differ where the objects are.
    style = StyleSpec("pastel", "stripes", "hatched")
    other = ContentSpec((ObjectSpec("circle", "green", "bottom right", "small"),))
    assert np.abs(
        np.asarray(render(content, style, 64), dtype=int) - np.asarray(render(other, style, 64), int)
    ).sum()
    assert StyleSpec.from_id(style.style_id) == style


def test_render_is_deterministic_including_noise_texture():
    content = ContentSpec((ObjectSpec("house", "orange", "bottom", "small"),))
    style = StyleSpec("night", "noise", "outline")
    assert render(content, style, 40).tobytes() == render(content, style, 40).tobytes()


def test_stylization_requests_and_ideal_targets_agree():
    data = SyntheticStyleSet(seed=2, size=32)
    requests, targets = data.stylization_requests(6, num_styles=3), data.stylized_pairs(6, num_styles=3)
    refs = data.style_references(3)
    assert len({r["style_ref"] for r in requests}) <= 3
    for req, tgt in zip(requests, targets):
        assert (req["id"], req["prompt"], req["style_ref"], req["seed"]) == (
            tgt["id"],
            tgt["prompt"],
            tgt["style_ref"],
            tgt["seed"],
        )
        assert req["style_image"] == refs[req["style_ref"]]
        style = StyleSpec.from_id(req["style_ref"])
        # The reference shows other content than the prompt asks for.
        assert data.reference_content(style).prompt != req["prompt"]


def test_subjects_are_distinct_with_several_views():
    subjects = procedural_subjects(count=3, images_per_subject=5, size=64, seed=0)
    assert len({s.token for s in subjects}) == 3 and len({s.name for s in subjects}) == 3
    assert subjects[0].prompt == f"a {subjects[0].token} {subjects[0].class_noun}"
    for s in subjects:
        assert len(s.images) == 5 and len(set(s.images)) == 5  # views differ
    # Every view shows the subject: its part colours (read off a render on a plain background) appear.
    palettes = []
    for s in subjects:
        plain = np.asarray(render_subject(s.name, 64, background=(0, 0, 0))).reshape(-1, 3)
        colours = {tuple(c) for c in plain if tuple(c) != (0, 0, 0)}
        palettes.append(colours)
        for view in s.images:
            present = {tuple(c) for c in pixels(view).reshape(-1, 3)}
            assert colours <= present, s.name
    assert palettes[0] != palettes[1] != palettes[2]
    with pytest.raises(ValueError):
        procedural_subjects(images_per_subject=2)
    with pytest.raises(ValueError, match="unknown subject"):
        render_subject("dragon")


def test_corrupt_bytes_do_not_decode():
    for kind in ("truncated", "random", "empty", "header"):
        with pytest.raises(ImageDecodeError):
            decode_image(corrupt_bytes(kind))
    assert corrupt_bytes("random", seed=1) != corrupt_bytes("random", seed=2)


def test_palette_keeps_hue_recognisable():
    from stylear_core.data.synthetic import PALETTES

    for name, palette in PALETTES.items():
        red = palette.object_colour(COLOURS["red"])
        blue = palette.object_colour(COLOURS["blue"])
        assert red[0] > red[2] and blue[2] > blue[0], name
