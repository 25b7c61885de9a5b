"""Preference pairs for DPO: sample K images per (prompt, style reference) with the SFT model, score, pick.

For each held (prompt, style reference) row, :class:`PreferencePairSampler` (a Ray Data actor UDF)
generates ``num_samples`` images with the SFT-tuned StyleAR model through the inference engine
(batched CFG, each sample its own seed and its own style-noise draw), decodes them with the VQGAN and
scores each one:

* ``style_score``: similarity to the style reference (style adherence), by ``style_scorer``: CLIP image
  similarity (``clip``), or the Bhattacharyya coefficient of the two images' colour histograms
  (``palette``: the features of the miniature world's
  :class:`~stylear_core.miniature.judges.ColourPaletteJudge`, compared with the reference itself rather
  than with class means, so it scores any reference),
* ``text_score``: CLIP text score against the prompt (prompt adherence),
* ``score = style_weight * style_score + text_weight * text_score``.

The best sample is ``chosen``, the worst ``rejected``; rows whose two scores are within ``min_margin``
are dropped (no preference). The same actor then scores each kept pair under the SFT model (DPO's
reference) once, so DPO needs no reference forward per step (:mod:`stylear_core.preferences.reference`).
Output rows follow :data:`PREFERENCE_PAIRS_SCHEMA` (``stylear.preference_pairs/1``), which
:class:`~stylear_core.training.batches.PreferenceBatchCollate` reads.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from stylear_core.config import option
from stylear_core.data.images import decode_image, to_tensor
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, rows_to_table
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.generator import StyleARGenerator
from stylear_core.models.presets import ModelConfig, build_clip_scorer
from stylear_core.preferences.reference import reference_digest, score_reference_columns
from stylear_core.training.batches import PreferenceBatchCollate


@dataclass
class PreferenceSamplingConfig(SamplingConfig):
    """How candidates are sampled (the shared :class:`SamplingConfig` plus how many, the base seed) and
    ranked."""

    num_samples: int = option(4, "images sampled per (prompt, style) row (K >= 2)")
    style_scorer: Literal["clip", "palette"] = option(
        "clip", "style score: CLIP image similarity, or colour-histogram similarity to the reference"
    )
    palette_bins: int = option(6, "colour levels per channel of the palette scorer's histograms")
    style_weight: float = option(1.0, "weight of the style score in the score")
    text_weight: float = option(1.0, "weight of CLIP text score in the score")
    min_margin: float = option(0.0, "drop rows whose chosen and rejected scores differ by no more than this")
    seed: int = option(0, "base seed; each sample's seed derives from it and the row id")

    def validate(self) -> None:
        """At least two samples, or there is nothing to prefer."""
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self.num_samples}")


def preference_sample_seed(base: int, row_id: str, k: int) -> int:
    """The seed of sample ``k`` of row ``row_id``: stable across runs, workers and batchings."""
    return (base * 1_000_003 + zlib.crc32(f"{row_id}/{k}".encode())) % 2**62


class PaletteStyleScorer:
    """Style adherence read off colours alone: the Bhattacharyya coefficient (in [0, 1]) of an image's and
    its reference's colour histograms, with the features of the miniature world's palette judge.

    Needs no fitting, so it scores references of any style, held-out ones included; it reads the palette
    only (not texture or stroke), which is what a world this small carries through its VQGAN.
    """

    def __init__(self, bins: int = 6) -> None:
        self.bins = bins

    @torch.no_grad()
    def image_similarity(
        self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]
    ) -> torch.Tensor:
        """``(B,)`` histogram similarity of ``images_a[i]`` with ``images_b[i]`` (same size or not)."""
        from stylear_core.miniature.judges import colour_histogram_features

        if len(images_a) != len(images_b):
            raise ValueError(f"{len(images_a)} images against {len(images_b)}")
        a = torch.cat([colour_histogram_features(to_tensor([im]), self.bins) for im in images_a])
        b = torch.cat([colour_histogram_features(to_tensor([im]), self.bins) for im in images_b])
        return (a * b).sum(dim=1)


def synthetic_style_requests(
    count: int, seed: int = 1, size: int = 64, num_styles: int = 4
) -> list[dict[str, Any]]:
    """``count`` held (prompt, style reference) rows ``{id, prompt, style_ref, style_image}`` drawn from the
    procedural style set with ``seed`` (use a seed other than the training data's to hold them out)."""
    rows = SyntheticStyleSet(seed=seed, size=size).stylization_requests(count, num_styles=num_styles)
    return [{k: r[k] for k in ("id", "prompt", "style_ref", "style_image")} for r in rows]


def world_style_requests(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """``count`` held (prompt, style reference) rows ``{id, prompt, style_ref, style_image}`` of the
    miniature world: a one-object prompt and a reference in one of its *training* styles
    (:data:`~stylear_core.miniature.data.TRAIN_STYLES`, never the held-out styles its evaluation judges),
    drawn on another object elsewhere, as the evaluation's references are."""
    from stylear_core.data.images import encode_png
    from stylear_core.miniature.data import TRAIN_STYLES, reference_for, scenes

    rows = []
    for i, (content, style) in enumerate(scenes(seed, count, TRAIN_STYLES, "preferences")):
        _, reference = reference_for(style, content, seed * 1_000_003 + i)
        rows.append(
            {
                "id": f"world-pref-{seed}-{i:06d}",
                "prompt": content.prompt,
                "style_ref": style.style_id,
                "style_image": encode_png(reference),
            }
        )
    return rows


class PreferencePairSampler:
    """Ray Data actor: (prompt, style reference) rows -> preference-pair rows (``PREFERENCE_PAIRS_SCHEMA``).

    Takes the model block, the SFT artefact directory, a :class:`PreferenceSamplingConfig`, the
    style-noise strength of the DPO run the pairs are for (``reference_noise_strength``; None: store no
    reference log-probs) and the device (``"auto"``: CUDA when the actor has a GPU). Builds the SFT model's
    :class:`~stylear_core.inference.generator.StyleARGenerator` and a CLIP scorer (the model block's CLIP,
    with its text tower) once per actor; the generator's model also scores the reference log-probs.
    """

    def __init__(
        self,
        model: ModelConfig,
        adapter_dir: str,
        sampling: PreferenceSamplingConfig,
        device: str = "auto",
        reference_noise_strength: float | None = 0.0,
    ):
        sampling.validate()
        self.sampling = sampling
        self.model_cfg = model
        self.generator = StyleARGenerator(model, adapter_dir, device)
        self.device = self.generator.device
        self.vqgan = self.generator.vq
        self.scorer = build_clip_scorer(model, self.device)  # the style encoder's CLIP
        self.style_scorer = (
            PaletteStyleScorer(sampling.palette_bins) if sampling.style_scorer == "palette" else self.scorer
        )
        self.reference_noise_strength = reference_noise_strength
        if reference_noise_strength is not None:
            g = self.generator
            self.reference_digest = reference_digest(adapter_dir, model, reference_noise_strength)
            self.reference_collate = PreferenceBatchCollate(
                g.vocab, g.tokenizer, g.num_style_tokens, g.model.style_encoder.preprocess
            )

    def pair_for_row(self, row_id: str, prompt: str, style_image: bytes) -> dict[str, Any]:
        """Sample, score and pick for one row: the preference-pair fields (without ``id``/``style_ref``)."""
        s = self.sampling
        size = self.model_cfg.image_size
        reference = decode_image(style_image)
        seeds = [preference_sample_seed(s.seed, row_id, k) for k in range(s.num_samples)]
        generated = self.generator.style([prompt] * s.num_samples, [reference] * s.num_samples, seeds, s)
        samples = generated.tokens
        images = self.generator.decode(samples, generated.layout)
        style_scores = self.style_scorer.image_similarity(images, [reference] * len(images))
        text_scores = self.scorer.text_score(images, [prompt] * len(images))
        scores = s.style_weight * style_scores + s.text_weight * text_scores
        best, worst = int(scores.argmax()), int(scores.argmin())
        return {
            "prompt": prompt,
            "prompt_ids": self.generator.style_prompt_ids(prompt, size, size),
            "style_image": style_image,
            "height": size,
            "width": size,
            "chosen_tokens": samples[best].tolist(),
            "rejected_tokens": samples[worst].tolist(),
            "chosen_score": float(scores[best]),
            "rejected_score": float(scores[worst]),
            "chosen_style_score": float(style_scores[best]),
            "chosen_text_score": float(text_scores[best]),
            "rejected_style_score": float(style_scores[worst]),
            "rejected_text_score": float(text_scores[worst]),
            "chosen_seed": seeds[best],
            "rejected_seed": seeds[worst],
            "num_samples": s.num_samples,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A numpy batch of request rows -> a ``stylear.preference_pairs/1`` table (rows without a
        preference above ``min_margin`` are dropped)."""
        rows = []
        for i in range(len(batch["id"])):
            row = self.pair_for_row(
                str(batch["id"][i]), str(batch["prompt"][i]), bytes(batch["style_image"][i])
            )
            if row["chosen_score"] - row["rejected_score"] <= self.sampling.min_margin:
                continue
            style_ref = batch["style_ref"][i] if "style_ref" in batch else None
            rows.append(
                {"id": str(batch["id"][i]), "style_ref": None if style_ref is None else str(style_ref), **row}
            )
        if rows and self.reference_noise_strength is not None:
            columns = ("id", "prompt", "prompt_ids", "style_image", "height", "width")
            numpy_rows = {k: _object_array([r[k] for r in rows]) for k in columns}
            for k in ("chosen_tokens", "rejected_tokens"):
                numpy_rows[k] = _object_array([np.asarray(r[k]) for r in rows])
            scored = score_reference_columns(
                self.generator.model,
                self.reference_collate,
                numpy_rows,
                self.reference_noise_strength,
                self.reference_digest,
            )
            for i, row in enumerate(rows):
                row.update({k: v[i] for k, v in scored.items()})
        return rows_to_table(rows, PREFERENCE_PAIRS_SCHEMA)


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def make_preference_pairs(
    requests: Any,
    model: ModelConfig,
    adapter_dir: str,
    sampling: PreferenceSamplingConfig,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 4,
    reference_noise_strength: float | None = 0.0,
) -> Any:
    """A Ray Dataset of request rows (``id, prompt, style_image[, style_ref]``) -> a lazy Dataset of
    preference pairs with reference log-probs at ``reference_noise_strength`` (None: without), computed
    by up to ``actors`` :class:`PreferencePairSampler` actors."""
    from ray.data import ActorPoolStrategy

    return requests.map_batches(
        PreferencePairSampler,
        fn_constructor_kwargs={
            "model": model,
            "adapter_dir": adapter_dir,
            "sampling": sampling,
            "reference_noise_strength": reference_noise_strength,
        },
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
