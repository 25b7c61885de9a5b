"""Prompt-adherence filter for stylized pairs: open_clip text-image score against a threshold.

StyleAR keeps a stylized image only if it still shows what its prompt says (the style reference
must not have overridden the content). :class:`ClipFilter` scores every (image, prompt) pair with
:class:`~stylear_core.models.clip.ClipScorer` (CLIP-T: cosine of the L2-normalised embeddings) and
marks the pairs under ``threshold`` as dropped.

Dropped rows are not removed from the batch: they leave with ``error`` set to the reason (score and
threshold) and ``error_stage = "clip_filter"``, so the caller counts them, writes them to the errors
table and does not stylize them again on a rerun. Rows that arrive with an ``error`` already (e.g. a
failed stylization) pass through unscored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from stylear_core.config import option
from stylear_core.data.batch_columns import Batch, batch_to_table, batch_values
from stylear_core.data.images import ImageDecodeError, decode_image
from stylear_core.devices import resolve_device

STAGE = "clip_filter"


@dataclass
class ClipFilterConfig:
    """Which CLIP scores the pairs, and the score a pair needs to be kept."""

    preset: str = option("tiny", "open_clip architecture: tiny (random, CPU) or ViT-H-14 (StyleAR's CLIP)")
    checkpoint: str = option("", "local open_clip weights file or dir; '' = random init (tiny, benchmarks)")
    threshold: float = option(
        0.2, "drop pairs whose CLIP text score (cosine, about 0.3 for a good match) is lower"
    )
    batch_size: int = option(32, "images per CLIP forward pass")
    device: str = option("auto", "torch device; auto = cuda if available else cpu")
    seed: int = option(0, "seed of the random initialisation when no checkpoint is given")


class ClipFilter:
    """Batch callable (a Ray Data actor class): score ``(image, prompt)`` pairs and mark those under the threshold.

    Takes a :class:`ClipFilterConfig`; builds the CLIP once (random with ``seed`` when ``checkpoint``
    is empty). ``__call__`` takes a batch (a pyarrow table or a dict of columns) with at least
    ``prompt`` and ``image`` (encoded bytes) and returns a pyarrow table of every input column
    unchanged plus ``clip_text_score`` (float32, null where the row was not scored) and ``error`` /
    ``error_stage`` (null for a kept row). ``kept`` and ``dropped`` count
    the rows this instance has kept and dropped.
    """

    def __init__(self, cfg: ClipFilterConfig | None = None) -> None:
        from stylear_core.models.clip import ClipScorer

        self.cfg = cfg or ClipFilterConfig()
        device = resolve_device(self.cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.scorer = ClipScorer.from_preset(
                self.cfg.preset,
                checkpoint=self.cfg.checkpoint or None,
                device=device,
                batch_size=self.cfg.batch_size,
            )
        self.kept = 0
        self.dropped = 0

    def score(self, images: list, prompts: list[str]) -> np.ndarray:
        """CLIP text scores ``(B,)`` float32 of PIL ``images[i]`` against ``prompts[i]``."""
        return self.scorer.text_score(images, prompts).numpy().astype(np.float32)

    def __call__(self, batch: Batch) -> pa.Table:
        """Score a batch; see the class docstring for the columns."""
        table = batch_to_table(batch)
        n = table.num_rows
        prompts = batch_values(table, "prompt", n)
        images = batch_values(table, "image", n)
        errors = batch_values(table, "error", n)
        stages = batch_values(table, "error_stage", n)
        scores = np.full(n, np.nan, dtype=np.float32)

        rows, decoded = [], []
        for k in range(n):
            if errors[k] is not None:
                continue
            if not isinstance(prompts[k], str) or not prompts[k].strip():
                errors[k], stages[k] = "empty prompt", STAGE
                continue
            try:
                decoded.append(decode_image(bytes(images[k] or b"")))
            except ImageDecodeError as e:
                errors[k], stages[k] = f"image: {e}", STAGE
                continue
            rows.append(k)
        if rows:
            scores[rows] = self.score(decoded, [prompts[k] for k in rows])
        for k in rows:
            if scores[k] < self.cfg.threshold:
                errors[k] = f"CLIP text score {scores[k]:.4f} below threshold {self.cfg.threshold}"
                stages[k] = STAGE
                self.dropped += 1
            else:
                self.kept += 1

        out = {name: table.column(name) for name in table.column_names}
        out["clip_text_score"] = pa.array(scores, pa.float32(), mask=np.isnan(scores))
        out["error"] = pa.array(errors, pa.string())
        out["error_stage"] = pa.array(stages, pa.string())
        return pa.table(out)
