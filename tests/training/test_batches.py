"""Collating token-shard and preference rows: padding sides, masks, and prompts re-tokenised to hold style placeholders."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from stylear_core.data.tokenizer import ByteTokenizer, style_prompt_ids
from stylear_core.models.clip import ClipVisionTower
from stylear_core.testing.fixtures import numpy_batch
from stylear_core.training.batches import (
    PreferenceBatchCollate,
    TokenBatchCollate,
    id_hash,
    left_pad,
    right_pad,
)


def test_padding_sides_and_masks():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, mask = right_pad([[5], [6, 7]], pad_id=1)
    assert ids.tolist() == [[5, 1], [6, 7]] and mask.tolist() == [[True, False], [True, True]]


def test_token_batch_keeps_stored_prompts_and_retokenises_mismatched_ones(token_shards, model_cfg, vocab):
    table = pq.read_table(token_shards).slice(0, 3)
    batch = numpy_batch(table)
    tokenizer = ByteTokenizer(vocab)
    # Row 1 was written for plain text-to-image (no placeholders): it must come back as a StyleAR prompt.
    batch["prompt_ids"][1] = np.asarray([vocab.bos, 300, 301])
    out = TokenBatchCollate(vocab, tokenizer, model_cfg.num_style_tokens)(batch)
    placeholders = (out["prompt_ids"] == vocab.style_placeholder).sum(dim=1)
    assert placeholders.tolist() == [model_cfg.num_style_tokens] * 3
    row1 = out["prompt_ids"][1][out["prompt_mask"][1]].tolist()
    size = model_cfg.image_size
    assert row1 == style_prompt_ids(tokenizer, batch["prompt"][1], model_cfg.num_style_tokens, size, size)
    row0 = out["prompt_ids"][0][out["prompt_mask"][0]].tolist()
    assert row0 == table.column("prompt_ids")[0].as_py()
    assert out["image_tokens"].tolist() == table.column("image_tokens").to_pylist()
    assert out["id_hash"][2].item() == id_hash(batch["id"][2])
    assert "style_pixels" not in out


def test_token_batch_without_style_tokens_uses_text_prompts(token_shards, vocab):
    batch = numpy_batch(pq.read_table(token_shards).slice(0, 2))
    out = TokenBatchCollate(vocab, ByteTokenizer(vocab), num_style_tokens=0)(batch)
    assert not (out["prompt_ids"] == vocab.style_placeholder).any()
    assert out["prompt_ids"][:, -1].tolist() == [vocab.eos, vocab.eos]  # the human turn's end


def test_preference_batch_pads_chosen_and_rejected_together(preference_pairs, model_cfg, vocab):
    table = pq.read_table(preference_pairs).slice(0, 2)
    batch = numpy_batch(table)
    batch["rejected_tokens"][0] = batch["rejected_tokens"][0][:10]  # a shorter (e.g. smaller) image
    torch.manual_seed(0)
    encoder = ClipVisionTower.from_preset("tiny")
    out = PreferenceBatchCollate(vocab, ByteTokenizer(vocab), model_cfg.num_style_tokens, encoder.preprocess)(
        batch
    )
    assert out["chosen_tokens"].shape == out["rejected_tokens"].shape
    assert out["rejected_mask"][0].sum().item() == 10 and out["chosen_mask"].all()
    assert out["style_pixels"].shape == (2, 3, encoder.image_size, encoder.image_size)
