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
