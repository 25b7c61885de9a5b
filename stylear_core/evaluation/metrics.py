"""Subject-driven generation metrics as DreamBench computes them: DINO, CLIP-I and CLIP-T.

DreamBooth (Ruiz et al., 2023, arXiv:2208.12242) scores subject fidelity with DINO and CLIP-I, the
average cosine similarity between embeddings of generated and real subject images, and prompt
fidelity with CLIP-T, the average cosine similarity between a generated image's CLIP embedding and
its prompt's. Here every generated image is compared with every real image of its subject and the
similarities are averaged over all those pairs.

The functions take the feature extractors as arguments: anything with ``image_features(images)``
(:class:`~stylear_core.evaluation.dino.DinoFeatureExtractor`,
:class:`~stylear_core.models.clip.ClipScorer`) and, for CLIP-T, ``text_features(prompts)``. Scores
are plain cosines in [-1, 1] (not scaled by 100, not clipped at 0). For CLIP-T of subject prompts,
pass the prompts with the rare identifier removed (``SubjectSet.without_identifier``): a base CLIP
does not know the identifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image


class ImageFeatureExtractor(Protocol):
    """Gives one embedding per image: ``(B, D)``."""

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class TextImageFeatureExtractor(ImageFeatureExtractor, Protocol):
    """A joint text-image embedding (CLIP): ``image_features`` and ``text_features`` of one space."""

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor: ...


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` ``(A, D)`` with every row of ``b`` ``(B, D)``: ``(A, B)``."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``a[i]`` with ``b[i]``: ``(B,)`` for two ``(B, D)`` tensors."""
    if a.shape != b.shape:
        raise ValueError(f"paired features must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def subject_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image, its mean cosine with all reference images: ``(G,)`` from ``(G, D)``, ``(R, D)``.

    The mean of this is the DINO / CLIP-I score; per image it is the subject-similarity filter of
    proxy data.
    """
    return cosine_matrix(generated, references).mean(dim=1)


def per_image_subject_scores(
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image],
    prompts: Sequence[str],
    dino: ImageFeatureExtractor,
    clip: TextImageFeatureExtractor,
) -> dict[str, torch.Tensor]:
    """``{"dino", "clip_i", "clip_t"}``, each ``(G,)``: per generated image, its mean DINO and CLIP image
    cosine with the real subject images and its CLIP cosine with its own prompt (``prompts[i]``)."""
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} generated images but {len(prompts)} prompts")
    if len(references) == 0:
        raise ValueError("no reference images given")
    clip_generated = clip.image_features(generated)
    return {
        "dino": subject_similarity(dino.image_features(generated), dino.image_features(references)),
        "clip_i": subject_similarity(clip_generated, clip.image_features(references)),
        "clip_t": paired_cosine(clip_generated, clip.text_features(prompts)),
    }


def subject_metrics(
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image],
    prompts: Sequence[str],
    dino: ImageFeatureExtractor,
    clip: TextImageFeatureExtractor,
) -> dict[str, float]:
    """DreamBench's ``{"dino", "clip_i", "clip_t"}`` for one subject.

    Takes the generated images, the real subject images, each generated image's prompt and the two
    feature extractors; gives DINO and CLIP-I averaged over all (generated, real) pairs and CLIP-T
    averaged over the generated images.
    """
    scores = per_image_subject_scores(generated, references, prompts, dino, clip)
    return {name: float(values.mean()) for name, values in scores.items()}
