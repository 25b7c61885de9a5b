"""Lumina-mGPT image token layout: round trips, the real 768px numbers, and errors that say where."""

from __future__ import annotations

import pytest
import torch

from stylear_core.data.layout import (
    ImageTokenLayout,
    LayoutError,
    TokenVocab,
    code_from_image_token_name,
    image_token_name,
)


def test_real_768_layout_matches_lumina():
    layout = ImageTokenLayout.for_resolution(768, 768)
    assert (layout.h_latent, layout.w_latent) == (48, 48)
    assert layout.num_tokens == 2356
    assert layout.header == [8197, 8804 + 24, 8804 + 24]
    forced = layout.forced_tokens()
    assert forced[3 + 48] == 8803 and forced[2355] == 8196
    assert len(layout.code_positions()) == 48 * 48


@pytest.mark.parametrize(("h", "w"), [(2, 2), (4, 6), (8, 4), (48, 48)])
def test_round_trip(h: int, w: int):
    layout = ImageTokenLayout(h, w)
    codes = torch.randint(0, 8192, (3, h, w))
    tokens = layout.encode(codes)
    assert tokens.shape == (3, layout.num_tokens)
    assert torch.equal(layout.decode(tokens), codes)
    assert ImageTokenLayout.parse(tokens[0]) == layout


def test_vocabulary_map_order_is_respected():
    # a permuted code -> id map (the real map comes from the tokenizer's IMGIMG names)
    ids = list(range(4, 4 + 16))
    perm = torch.randperm(16).tolist()
    names = {image_token_name(c): ids[perm[c]] for c in range(16)}
    vocab = TokenVocab.from_vocabulary_map(
        names, vocab_size=1024, eos=500, image_end=20, image_start=21, new_line=22, grid_base=23, max_grids=8,
        style_placeholder=600, image_placeholder=601,
    )  # fmt: skip
    assert vocab.image_code_ids == tuple(ids[perm[c]] for c in range(16))
    layout = ImageTokenLayout(2, 4, vocab)
    codes = torch.randint(0, 16, (2, 2, 4))
    tokens = layout.encode(codes)
    assert tokens[0, 3] == vocab.image_code_ids[int(codes[0, 0, 0])]
    assert torch.equal(layout.decode(tokens), codes)
    assert code_from_image_token_name(image_token_name(8191)) == 8191


def test_malformed_sequences_name_the_fault():
    layout = ImageTokenLayout(4, 4)
    tokens = layout.encode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(LayoutError, match="layout needs 24"):
        layout.decode(tokens[:, :-1])
    bad = tokens.clone()
    bad[0, 3 + 4] = 5  # the first row's new-line
    with pytest.raises(LayoutError, match="position 7: expected new-line id 8803"):
        layout.decode(bad)
    bad = tokens.clone()
    bad[0, 4] = 8803  # a new-line where a code belongs
    with pytest.raises(LayoutError, match="position 4: id 8803 is not an image-code token"):
        layout.decode(bad)
    bad = tokens.clone()
    bad[0, -1] = 8710
    with pytest.raises(LayoutError, match="image-end"):
        layout.decode(bad)
    with pytest.raises(LayoutError, match="not a multiple of 32"):
        ImageTokenLayout.for_resolution(100, 64)
    with pytest.raises(LayoutError, match="codes out of range"):
        layout.encode(torch.full((4, 4), 8192))
    with pytest.raises(LayoutError, match="position 1"):
        ImageTokenLayout.parse(torch.tensor([8197, 5, 8806]))
