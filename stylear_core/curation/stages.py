"""The parts of the curation pipeline that run inside Ray Data workers, and the output tables they write.

Every write task's worker imports this module, so it stays light: pyarrow, numpy and Ray only at
import time; torch and the models are imported by the actors' constructors and the row functions
when they first run.

* Output tables: ``output_dir/<name>/*.parquet`` for each name of
  :data:`~stylear_core.data.schemas.TABLE_SCHEMAS`, written and
  read back with the pass kit of :mod:`stylear_core.data.passes` (atomic files, the routed sink that
  sends rows marked ``error`` / ``error_stage`` to ``errors/``).
* Row functions and actor wrappers: :func:`normalize_raw_batch`, :func:`mark_error_stage`,
  :class:`StylizeActor`, :class:`MaskActor`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from stylear_core.data.batch_columns import Batch, batch_num_rows, batch_to_table, batch_values

# ---------------------------------------------------------------------------------------------
# Row functions and actor wrappers (run inside Ray Data tasks / actors)


def normalize_raw_batch(batch: Batch, max_pixels: int = 64_000_000) -> pa.Table:
    """Raw pairs ``{id, prompt, image}`` -> curated columns (PNG image, size, ``source = "raw"``) or an error.

    A row whose image does not decode, or whose prompt is empty, gets ``error`` and
    ``error_stage = "decode"``.
    """
    from stylear_core.data.images import ImageDecodeError, decode_image, encode_png

    n = batch_num_rows(batch)
    ids = [str(i) for i in batch_values(batch, "id", n)]
    prompts = batch_values(batch, "prompt", n)
    images = batch_values(batch, "image", n)
    out_images: list[bytes | None] = [None] * n
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    errors: list[str | None] = [None] * n
    for k in range(n):
        try:
            if not isinstance(prompts[k], str) or not prompts[k].strip():
                raise ValueError("empty prompt")
            img = decode_image(bytes(images[k] or b""), max_pixels=max_pixels)
        except (ImageDecodeError, ValueError) as e:
            errors[k] = str(e)
            continue
        out_images[k] = encode_png(img)
        widths[k], heights[k] = img.size
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "prompt": pa.array([p if isinstance(p, str) else "" for p in prompts], pa.string()),
            "image": pa.array(out_images, pa.binary()),
            "source": pa.array(["raw"] * n, pa.string()),
            "style_ref": pa.nulls(n, pa.string()),
            "clip_text_score": pa.nulls(n, pa.float32()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "seed": pa.nulls(n, pa.int64()),
            "error": pa.array(errors, pa.string()),
            "error_stage": pa.array([None if e is None else "decode" for e in errors], pa.string()),
        }
    )


def mark_error_stage(batch: Batch, stage: str) -> pa.Table:
    """The batch as a table, with ``error_stage = stage`` on its failed rows that have none yet."""
    table = batch_to_table(batch)
    n = table.num_rows
    errors = batch_values(table, "error", n)
    stages = batch_values(table, "error_stage", n)
    marked = pa.array(
        [s if s is not None or e is None else stage for e, s in zip(errors, stages)], pa.string()
    )
    if "error_stage" in table.column_names:
        return table.set_column(table.column_names.index("error_stage"), "error_stage", marked)
    return table.append_column("error_stage", marked)


class StylizeActor:
    """Ray Data actor: the :class:`~stylear_core.curation.stylizer.Stylizer` of ``cfg`` with failed rows tagged ``stylize``."""

    def __init__(self, cfg: Any) -> None:
        from stylear_core.curation.stylizer import Stylizer

        self.stylizer = Stylizer(cfg)

    def __call__(self, batch: Batch) -> pa.Table:
        """Stylize a batch of requests (see :class:`Stylizer`)."""
        return mark_error_stage(self.stylizer(batch), "stylize")


class MaskActor:
    """Ray Data actor: :class:`~stylear_core.curation.sam.StyleRegionMasker` built from ``cfg`` (a ``MaskerConfig``) in the worker."""

    def __init__(self, cfg: Any) -> None:
        from stylear_core.curation.sam import StyleRegionMasker

        self.masker = StyleRegionMasker.from_config(cfg)

    def __call__(self, batch: Batch) -> pa.Table:
        """Mask a batch of references ``{id, image}`` (see :class:`StyleRegionMasker`)."""
        return mark_error_stage(self.masker(batch), "sam")
