"""Token shards from the procedural style dataset, for the tiny demo and the training tests.

Draws :class:`SyntheticStyleSet` stylized pairs, encodes each image with the model block's VQGAN
into the Lumina layout and its prompt with the StyleAR template (``num_style_tokens`` placeholders),
and writes token-shard parquet (:data:`TOKEN_SHARDS_SCHEMA`, whose ``image`` column holds the PNG of
each target: the ``style_source: image`` input).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from stylear_core.data.images import decode_image
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, TOKEN_SHARDS_SCHEMA, rows_to_table
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.data.tokenizer import style_prompt_ids
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.presets import (
    ModelConfig,
    build_prompt_tokenizer,
    build_vqgan,
    tiny_vqgan_codebook_size,
)
from stylear_core.models.vqgan import encode_images


def synthetic_token_rows(model: ModelConfig, count: int, seed: int = 0, num_styles: int = 4) -> list[dict]:
    """``count`` token-shard rows (plus ``image`` PNG bytes) of stylized synthetic pairs at ``model.image_size``."""
    if model.preset != "tiny":
        raise ValueError("synthetic token shards are for the tiny preset")
    vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    tokenizer = build_prompt_tokenizer(model, vocab)
    vq = build_vqgan(model, vocab)
    size = model.image_size
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    pairs = SyntheticStyleSet(seed=seed, size=size).stylized_pairs(count, num_styles=num_styles)
    images = [decode_image(p["image"]) for p in pairs]
    with torch.no_grad():
        tokens = layout.encode(encode_images(vq, images, size))
    return [
        {
            "id": p["id"],
            "prompt": p["prompt"],
            "prompt_ids": style_prompt_ids(tokenizer, p["prompt"], model.num_style_tokens, size, size),
            "image_tokens": tokens[i].tolist(),
            "height": size,
            "width": size,
            "source": "stylized",
            "image": p["image"],
        }
        for i, p in enumerate(pairs)
    ]


def write_synthetic_token_shards(
    path: str | Path, model: ModelConfig, count: int, seed: int = 0, with_images: bool = True
) -> Path:
    """Write :func:`synthetic_token_rows` as ``<path>/part-00000.parquet``; returns the file."""
    rows = synthetic_token_rows(model, count, seed)
    table = rows_to_table(rows, TOKEN_SHARDS_SCHEMA)  # the rows' PNG is the schema's image column
    if not with_images:  # shards as written before the image column (token_shards/1)
        table = table.drop_columns(["image"]).replace_schema_metadata(
            {b"schema_version": b"stylear.token_shards/1"}
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-00000.parquet")
    return path / "part-00000.parquet"


def synthetic_preference_table(model: ModelConfig, count: int, seed: int = 3, codes_seed: int = 0):
    """``count`` preference pairs (:data:`PREFERENCE_PAIRS_SCHEMA`) of the tiny vocabulary: chosen = a
    procedural image's tokens (:func:`synthetic_token_rows` with ``seed``), rejected = random codes in
    the same layout (``codes_seed``), the style reference = the chosen image."""
    vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    size = model.image_size
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    gen = torch.Generator().manual_seed(codes_seed)
    pairs = []
    for i, r in enumerate(synthetic_token_rows(model, count, seed=seed)):
        codes = torch.randint(0, vocab.codebook_size, (layout.h_latent, layout.w_latent), generator=gen)
        pairs.append(
            {
                **{k: r[k] for k in ("id", "prompt", "prompt_ids")},
                "style_ref": None,
                "style_image": r["image"],
                "height": size,
                "width": size,
                "chosen_tokens": r["image_tokens"],
                "rejected_tokens": layout.encode(codes).tolist(),
                "chosen_score": 1.0,
                "rejected_score": 0.0,
                "chosen_style_score": 0.5,
                "chosen_text_score": 0.5,
                "rejected_style_score": 0.0,
                "rejected_text_score": 0.0,
                "chosen_seed": i,
                "rejected_seed": 100 + i,
                "num_samples": 2,
            }
        )
    return rows_to_table(pairs, PREFERENCE_PAIRS_SCHEMA)
