"""Style tokens land exactly at the placeholder positions; style noise is tokens + randn * strength."""

from __future__ import annotations

import pytest
import torch

from stylear_core.models.style_tokens import StylePlaceholderError, add_style_noise, inject_style_tokens

PH = 7


def test_style_tokens_land_exactly_at_placeholder_positions():
    ids = torch.tensor([[1, PH, 3, PH, PH, 4], [PH, PH, 5, 6, PH, 2]])
    embeds = torch.randn(2, 6, 8)
    style = torch.randn(2, 3, 8, requires_grad=True)
    out = inject_style_tokens(embeds, ids, style, PH)
    for row in range(2):
        positions = (ids[row] == PH).nonzero().squeeze(1)
        torch.testing.assert_close(out[row, positions], style[row].detach())  # in order, row by row
        others = (ids[row] != PH).nonzero().squeeze(1)
        torch.testing.assert_close(out[row, others], embeds[row, others])
    out.sum().backward()
    assert torch.equal(style.grad, torch.ones_like(style))  # every style token used exactly once
    assert not torch.equal(out, embeds)  # the input is not modified in place


def test_wrong_placeholder_count_names_the_row():
    ids = torch.tensor([[PH, PH, 1], [PH, 1, 1]])
    with pytest.raises(StylePlaceholderError, match="row 1 has 1 style-placeholder ids"):
        inject_style_tokens(torch.zeros(2, 3, 4), ids, torch.zeros(2, 2, 4), PH)


def test_style_noise():
    tokens = torch.randn(2, 3, 4)
    assert add_style_noise(tokens, 0.0) is tokens
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = add_style_noise(tokens, 0.3, gen_a)
    torch.testing.assert_close(noisy, add_style_noise(tokens, 0.3, gen_b))
    expected = tokens + torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5)) * 0.3
    torch.testing.assert_close(noisy, expected)
    per_row = add_style_noise(tokens, torch.tensor([0.0, 1.0]), torch.Generator().manual_seed(1))
    torch.testing.assert_close(per_row[0], tokens[0])
    assert not torch.allclose(per_row[1], tokens[1])


def test_content_subtraction_matches_the_release_formula_on_random_weights():
    from stylear_core.models.resampler import tiny_resampler
    from stylear_core.models.style_tokens import subtract_content_style_tokens

    torch.manual_seed(0)
    resampler = tiny_resampler(embedding_dim=24, output_dim=32, num_queries=4).eval()
    e0, e1 = torch.randn(2, 1, 9, 24).unbind(0)
    with torch.no_grad():
        got = subtract_content_style_tokens(resampler, e0, e1)
        # The release, verbatim: the two CLIP images are one batch; row 1 is overwritten in place.
        image_embeds = torch.cat([e0, e1])
        image_embeds[1:2] = image_embeds[0:1, :, :] - 0.8 * image_embeds[1:2, :, :]
        input_embeds = resampler(image_embeds)
        want = 0.2 * input_embeds[0:1, :, :] + 0.8 * input_embeds[1:2, :, :]
        torch.testing.assert_close(got, want)
        # Configurable weights, checked against the formula computed branch by branch.
        e0b, e1b = torch.randn(2, 3, 9, 24).unbind(0)
        got = subtract_content_style_tokens(resampler, e0b, e1b, subtract=0.5, mix=0.3)
        want = 0.7 * resampler(e0b) + 0.3 * resampler(e0b - 0.5 * e1b)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, resampler(e0b))  # the content branch changes the tokens
        torch.testing.assert_close(
            subtract_content_style_tokens(resampler, e0b, e1b, mix=0.0), resampler(e0b)
        )
    with pytest.raises(ValueError, match="content_features"):
        subtract_content_style_tokens(resampler, e0b, e1b[:1])
