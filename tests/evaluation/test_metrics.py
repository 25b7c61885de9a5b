"""DreamBench metrics: parity with a direct cosine computation, with fixed and with real tiny extractors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stylear_core.evaluation.dino import DinoFeatureExtractor
from stylear_core.evaluation.metrics import (
    cosine_matrix,
    paired_cosine,
    per_image_subject_scores,
    subject_metrics,
    subject_similarity,
)
from stylear_core.models.clip import ClipScorer


class MeanColour:
    """A fixed feature map for exact expected values: an image's mean RGB; a prompt's colour word."""

    COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "yellow": (1.0, 1.0, 0.0)}

    def image_features(self, images):
        return torch.stack([torch.tensor(im.getpixel((0, 0)), dtype=torch.float32) / 255 for im in images])

    def text_features(self, prompts):
        return torch.tensor([self.COLOURS[p.split()[-1]] for p in prompts])


def _flat(rgb: tuple[int, int, int], size: int = 48) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_cosine_functions_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=g) * 3, torch.randn(5, 16, generator=g)
    direct = torch.tensor([[F.cosine_similarity(x, y, dim=0).item() for y in b] for x in a])
    torch.testing.assert_close(cosine_matrix(a, b), direct)
    torch.testing.assert_close(subject_similarity(a, b), direct.mean(dim=1))
    torch.testing.assert_close(paired_cosine(a, b[:4]), torch.diagonal(direct[:, :4]))
    with pytest.raises(ValueError, match="one shape"):
        paired_cosine(a, b)


def test_scores_average_over_generated_reference_pairs():
    colours = MeanColour()
    generated = [_flat((255, 0, 0)), _flat((255, 255, 0))]
    references = [_flat((255, 0, 0)), _flat((0, 255, 0))]
    prompts = ["a red", "a green"]
    scores = per_image_subject_scores(generated, references, prompts, colours, colours)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(scores["dino"], torch.tensor([(1 + 0) / 2, (s + s) / 2]))
    torch.testing.assert_close(scores["clip_i"], scores["dino"])
    torch.testing.assert_close(scores["clip_t"], torch.tensor([1.0, s]))
    metrics = subject_metrics(generated, references, prompts, colours, colours)
    assert metrics == pytest.approx({"dino": (0.5 + s) / 2, "clip_i": (0.5 + s) / 2, "clip_t": (1 + s) / 2})
    with pytest.raises(ValueError, match="2 generated images but 1 prompts"):
        subject_metrics(generated, references, prompts[:1], colours, colours)


def test_subject_metrics_with_tiny_dino_and_clip_match_direct_features():
    dino = DinoFeatureExtractor.from_preset("tiny")
    clip = ClipScorer.from_preset("tiny")
    g = torch.Generator().manual_seed(3)

    def noise_image() -> Image.Image:
        return Image.fromarray(torch.randint(0, 256, (48, 48, 3), generator=g, dtype=torch.uint8).numpy())

    generated = [noise_image(), noise_image()]
    references = [noise_image(), noise_image(), noise_image()]
    prompts = ["a photo of a robot", "a robot on the beach"]
    metrics = subject_metrics(generated, references, prompts, dino, clip)

    with torch.no_grad():
        dino_gen = dino.model(pixel_values=dino.preprocess(generated)).last_hidden_state[:, 0]
        dino_ref = dino.model(pixel_values=dino.preprocess(references)).last_hidden_state[:, 0]
        clip_gen = clip.bundle.model.encode_image(
            torch.stack([clip.bundle.preprocess(im) for im in generated])
        )
        clip_ref = clip.bundle.model.encode_image(
            torch.stack([clip.bundle.preprocess(im) for im in references])
        )
        clip_txt = clip.bundle.model.encode_text(clip.bundle.tokenizer(prompts))
    expected_dino = F.cosine_similarity(dino_gen[:, None], dino_ref[None], dim=-1).mean()
    expected_clip_i = F.cosine_similarity(clip_gen[:, None], clip_ref[None], dim=-1).mean()
    expected_clip_t = F.cosine_similarity(clip_gen, clip_txt, dim=-1).mean()
    assert metrics["dino"] == pytest.approx(expected_dino.item(), abs=1e-5)
    assert metrics["clip_i"] == pytest.approx(expected_clip_i.item(), abs=1e-5)
    assert metrics["clip_t"] == pytest.approx(expected_clip_t.item(), abs=1e-5)
    assert metrics["dino"] < 0.999  # distinct random images are not scored as the same subject

    same = subject_metrics(generated[:1], generated[:1], prompts[:1], dino, clip)
    assert same["dino"] == pytest.approx(1.0, abs=1e-5)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)
