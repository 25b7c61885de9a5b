"""From parquet rows to padded training tensors: the collate functions of the SFT and DPO loops.

Ray Data hands each worker numpy batches whose list columns (``prompt_ids``, ``image_tokens``) are
object arrays of variable-length int arrays. The collate functions here (``NumpyBatchCollateFn``
subclasses, run on Ray Data's prefetch threads) pad them into one batch:

* prompts are **left**-padded with ``vocab.pad`` (``prompt_mask`` marks real tokens), so every row's
  prompt ends right before its image;
* image-token sequences are **right**-padded (``image_mask``), so every row's image starts at the
  same column.

StyleAR prompts carry exactly ``num_style_tokens`` style-placeholder ids. A row whose stored
``prompt_ids`` do not (a token shard written for plain text-to-image, or for another style-token
count) is re-tokenised from its ``prompt`` text with :func:`style_prompt_ids`, so the same shards
serve StyleAR (style tokens) and subject tuning (``num_style_tokens=0``, plain text prompts).

A row with ``condition_tokens`` (a condition image, e.g. its depth map, in the Lumina layout) trains on
the condition wording: those tokens are spliced into its prompt where the ``<image>`` placeholder
stands, as StyleAR's release feeds a condition image (:mod:`stylear_core.data.condition_tokens`).
Shards carry the column when curation derived conditions; :func:`read_parquet_dataset` reads it
whenever every file has it, so the training stages need not name it.

With ``features_shape`` the collate yields ``style_features`` (fp16 ``(B, tokens, width)``) from the rows'
precomputed ``style_features`` column (:mod:`stylear_core.data.style_features`) after checking that
their ``style_features_key`` names the model's style encoder; the stage asks for the column by name.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

try:
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError:  # a GPU box without Ray still runs the in-process benchmark paths
    NumpyBatchCollateFn = object  # type: ignore[assignment,misc]

from stylear_core.data.condition_tokens import splice_condition_tokens
from stylear_core.data.images import decode_image
from stylear_core.data.layout import TokenVocab
from stylear_core.data.schemas import SchemaError, parquet_files, require_parquet_columns
from stylear_core.data.style_features import (
    FEATURES_COLUMN,
    KEY_COLUMN,
    PRECOMPUTE_HINT,
    check_feature_keys,
    features_tensor,
)
from stylear_core.data.tokenizer import PromptTokenizer, style_prompt_ids, text_prompt_ids

TOKEN_SHARD_COLUMNS = ("id", "prompt", "prompt_ids", "image_tokens", "height", "width")
# Read along with the columns asked for whenever every file has them (newer shards).
OPTIONAL_TOKEN_SHARD_COLUMNS = ("condition_tokens",)
IMAGE_COLUMN_HINT = (
    "SFT's style_source: image reads each row's image from the token shards, which curation writes "
    "since stylear.token_shards/2: tokenize the curated set again with this version, or train with "
    "style_source: vq_decode."
)
FEATURES_COLUMN_HINT = f"SFT's style_source: features reads precomputed style features: {PRECOMPUTE_HINT}."


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad int sequences to one length: ``(ids (B, L) int64, mask (B, L) bool)``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) :] = torch.as_tensor(np.asarray(row), dtype=torch.long)
            mask[i, length - len(row) :] = True
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad int sequences to one length: ``(ids (B, T) int64, mask (B, T) bool)``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(np.asarray(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def id_hash(row_id: str) -> int:
    """A stable 32-bit hash of a record id (CRC32), to carry record identity through tensor batches."""
    return zlib.crc32(str(row_id).encode())


def conditioned_prompt_ids(
    stored: Sequence[int] | None,
    prompt: str,
    height: int,
    width: int,
    tokenizer: PromptTokenizer,
    num_style_tokens: int,
    condition: Sequence[int] | None = None,
) -> list[int]:
    """The prompt ids to train on: ``stored`` when they hold exactly ``num_style_tokens`` style
    placeholders (0 = a plain text prompt), else the prompt re-tokenised in the right template.

    With ``condition`` (a condition image's tokens; None or empty: none) the prompt is the condition
    wording (one ``<image>`` id, re-tokenised if ``stored`` lacks it) with the tokens spliced there.
    """
    vocab = tokenizer.vocab
    has_condition = condition is not None and len(condition) > 0
    ids = None
    if stored is not None and len(stored):
        stored_ids = np.asarray(stored)
        if int(np.sum(stored_ids == vocab.style_placeholder)) == num_style_tokens and (
            not has_condition or int(np.sum(stored_ids == vocab.image_placeholder)) == 1
        ):
            ids = [int(i) for i in stored_ids]
    if ids is None and num_style_tokens > 0:
        ids = style_prompt_ids(tokenizer, prompt, num_style_tokens, height, width, condition=has_condition)
    elif ids is None:
        ids = text_prompt_ids(tokenizer, prompt, height, width, condition=has_condition)
    return splice_condition_tokens(ids, condition, vocab) if has_condition else ids


def style_pixels_from_png(
    images: Sequence[bytes], preprocess: Callable[[Sequence[Image.Image]], torch.Tensor]
):
    """PNG/JPEG bytes -> CLIP-normalised pixels ``(B, 3, S, S)`` through the style encoder's preprocessing."""
    return preprocess([decode_image(bytes(b)) for b in images])


class TokenBatchCollate(NumpyBatchCollateFn):
    """Token-shard rows -> ``{prompt_ids, prompt_mask, image_tokens, image_mask, height, width, id_hash}``
    (plus ``style_pixels``, from the rows' ``image`` column, when ``preprocess`` is given, or
    ``style_features``, from their precomputed features, when ``features_shape`` is). Rows with
    ``condition_tokens`` get them spliced into their prompt ids (:func:`conditioned_prompt_ids`).

    Takes the model's ``vocab``, the prompt ``tokenizer``, ``num_style_tokens`` (0 for prompts without
    style tokens) and optionally the style encoder's PIL preprocessing, or the ``(tokens, width)`` of its
    features and its digest ``features_encoder`` (rows whose features another encoder made are refused).
    """

    def __init__(
        self,
        vocab: TokenVocab,
        tokenizer: PromptTokenizer,
        num_style_tokens: int,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor] | None = None,
        features_shape: tuple[int, int] | None = None,
        features_encoder: str | None = None,
    ):
        if features_shape is not None and (preprocess is not None or features_encoder is None):
            raise ValueError("precomputed features take features_encoder and no preprocess")
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.num_style_tokens = num_style_tokens
        self.preprocess = preprocess
        self.features_shape = features_shape
        self.features_encoder = features_encoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        heights = [int(h) for h in batch["height"]]
        widths = [int(w) for w in batch["width"]]
        stored = batch.get("prompt_ids")
        conditions = batch.get("condition_tokens")
        prompts = [
            conditioned_prompt_ids(
                stored[i] if stored is not None else None,
                str(batch["prompt"][i]),
                heights[i],
                widths[i],
                self.tokenizer,
                self.num_style_tokens,
                conditions[i] if conditions is not None else None,
            )
            for i in range(len(heights))
        ]
        prompt_ids, prompt_mask = left_pad(prompts, self.vocab.pad)
        image_tokens, image_mask = right_pad(list(batch["image_tokens"]), self.vocab.pad)
        out = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "image_tokens": image_tokens,
            "image_mask": image_mask,
            "height": torch.tensor(heights, dtype=torch.long),
            "width": torch.tensor(widths, dtype=torch.long),
            "id_hash": torch.tensor([id_hash(i) for i in batch["id"]], dtype=torch.long),
        }
        if self.preprocess is not None:
            if "image" not in batch:  # else the objective would look for a VQGAN it never built
                raise SchemaError(f"token-shard rows carry no 'image' column. {IMAGE_COLUMN_HINT}")
            out["style_pixels"] = style_pixels_from_png(list(batch["image"]), self.preprocess)
        if self.features_shape is not None:
            if FEATURES_COLUMN not in batch or KEY_COLUMN not in batch:
                raise SchemaError(
                    f"token-shard rows carry no {FEATURES_COLUMN!r} column. {FEATURES_COLUMN_HINT}"
                )
            check_feature_keys(list(batch[KEY_COLUMN]), self.features_encoder, "token-shard batch")
            out["style_features"] = features_tensor(list(batch[FEATURES_COLUMN]), self.features_shape)
        return out


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


class PreferenceBatchCollate(NumpyBatchCollateFn):
    """Preference-pair rows (``stylear.preference_pairs/1``) -> ``{prompt_ids, prompt_mask, chosen_tokens,
    chosen_mask, rejected_tokens, rejected_mask, style_pixels, id_hash}``.

    Chosen and rejected sequences are padded to one common length, so they stack into one forward
    batch. ``style_pixels`` are the style references through the style encoder's ``preprocess``.

    Rows with stored reference log-probs (the ``reference_*`` columns) also give
    ``reference_chosen_logp`` / ``reference_rejected_logp`` (float64, NaN where null) and
    ``reference_valid`` (bool: values present and scored for ``reference_digest``, the digest of the
    reference this run trains against; None: no row is valid).
    """

    def __init__(
        self,
        vocab: TokenVocab,
        tokenizer: PromptTokenizer,
        num_style_tokens: int,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        reference_digest: str | None = None,
    ):
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.num_style_tokens = num_style_tokens
        self.preprocess = preprocess
        self.reference_digest = reference_digest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        n = len(batch["id"])
        prompts = [
            conditioned_prompt_ids(
                batch["prompt_ids"][i],
                str(batch["prompt"][i]),
                int(batch["height"][i]),
                int(batch["width"][i]),
                self.tokenizer,
                self.num_style_tokens,
            )
            for i in range(n)
        ]
        prompt_ids, prompt_mask = left_pad(prompts, self.vocab.pad)
        both, both_mask = right_pad([*batch["chosen_tokens"], *batch["rejected_tokens"]], self.vocab.pad)
        out = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "chosen_tokens": both[:n],
            "chosen_mask": both_mask[:n],
            "rejected_tokens": both[n:],
            "rejected_mask": both_mask[n:],
            "style_pixels": style_pixels_from_png(list(batch["style_image"]), self.preprocess),
            "id_hash": torch.tensor([id_hash(i) for i in batch["id"]], dtype=torch.long),
        }
        if "reference_chosen_logp" in batch and "reference_digest" in batch:
            chosen = [_float_or_nan(v) for v in batch["reference_chosen_logp"]]
            rejected = [_float_or_nan(v) for v in batch["reference_rejected_logp"]]
            out["reference_chosen_logp"] = torch.tensor(chosen, dtype=torch.float64)
            out["reference_rejected_logp"] = torch.tensor(rejected, dtype=torch.float64)
            finite = out["reference_chosen_logp"].isfinite() & out["reference_rejected_logp"].isfinite()
            digests = [None if d is None else str(d) for d in batch["reference_digest"]]
            scored_here = [self.reference_digest is not None and d == self.reference_digest for d in digests]
            out["reference_valid"] = finite & torch.tensor(scored_here, dtype=torch.bool)
        return out


def preference_sequences(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`PreferenceBatchCollate` batch of ``B`` pairs as one batch of ``2B`` sequences for
    ``StyleARModel.log_probs``: the chosen rows, then the rejected rows, on the same prompts."""
    return {
        "prompt_ids": torch.cat([batch["prompt_ids"], batch["prompt_ids"]]),
        "prompt_mask": torch.cat([batch["prompt_mask"], batch["prompt_mask"]]),
        "image_tokens": torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]]),
        "image_mask": torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
    }


def _columns_in_every_file(
    path: str | list[str], names: Sequence[str], exclude: Sequence[str] = ()
) -> list[str]:
    """Those of ``names`` (but not ``exclude``) that every local parquet file of ``path`` has (footers only;
    none for remote paths, whose files are not listed here)."""
    paths = [path] if isinstance(path, str) else list(path)
    files = (
        [f for f in parquet_files(paths) if f.is_file()] if not any("://" in str(p) for p in paths) else []
    )
    if not files:
        return []
    schemas = [set(pq.read_schema(f).names) for f in files]
    return [n for n in names if n not in exclude and all(n in s for s in schemas)]


def read_parquet_dataset(
    path: str | list[str],
    columns: Sequence[str] | None = None,
    limit: int | None = None,
    cache: bool = False,
    shuffle_seed: int | None = None,
) -> Any:
    """A parquet file or directory (or a list of files) as a Ray Dataset (optionally only ``columns``, the first ``limit`` rows;
    ``cache`` materialises it in the object store, so later epochs do not read and list files again).
    With ``columns``, :data:`OPTIONAL_TOKEN_SHARD_COLUMNS` that every file has are read too.

    Files are read in path order, or with ``shuffle_seed`` in an order shuffled by it: the same order on
    every epoch and every attempt. Writers group rows by file (curation writes the raw pairs' files, then
    the stylized pairs'; proxy data one subject's files after another's), so path order would train on one
    group, then the other, in every epoch. The training loops read with ``preserve_order``, so a resumed
    run sees the same rows in the same order as the run it continues.
    """
    import ray.data
    from ray.data import FileShuffleConfig

    if columns:  # a missing column (an older shard version) fails here with its file, not deep in Ray
        hints = {
            "image": IMAGE_COLUMN_HINT,
            FEATURES_COLUMN: FEATURES_COLUMN_HINT,
            KEY_COLUMN: FEATURES_COLUMN_HINT,
        }
        require_parquet_columns(path, columns, hints)
        columns = [*columns, *_columns_in_every_file(path, OPTIONAL_TOKEN_SHARD_COLUMNS, exclude=columns)]
    # One seeded order for every execution: a reseeded order per epoch would differ in a resumed attempt.
    shuffle = (
        None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    )
    ds = ray.data.read_parquet(
        path, columns=list(columns) if columns else None, file_extensions=["parquet"], shuffle=shuffle
    )
    if limit:
        ds = ds.limit(limit)
    return ds.materialize() if cache else ds
