"""Training on condition images: shards whose rows carry depth-map tokens, read, collated and trained on.

The shards come from curation's :class:`TokenizeActor` with the tiny depth estimator; the training
stages read only the required columns and get ``condition_tokens`` too; the collate splices each
row's condition tokens where its prompt's ``<image>`` id stands; and a tiny SFT run on those batches,
the objective a Ray Train worker runs (without DeepSpeed), lowers its loss while only LoRA and the
resampler move.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.schemas import TOKEN_SHARDS_SCHEMA, conform_table
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.testing.fixtures import numpy_batch
from stylear_core.testing.tiny_depth import save_tiny_depth_estimator
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, TokenBatchCollate, read_parquet_dataset
from stylear_core.training.objectives import StyleSFTObjective

ROWS = 8
STEPS = 24


@pytest.fixture(scope="module")
def condition_shards(tmp_path_factory, model_cfg):
    """Token shards of 8 stylized synthetic pairs, each with its image's depth map as condition."""
    root = tmp_path_factory.mktemp("condition_shards")
    depth = save_tiny_depth_estimator(root / "dpt", seed=0)
    actor = TokenizeActor(model_cfg, TokenizeConfig(condition="depth", depth_estimator_path=str(depth)))
    pairs = SyntheticStyleSet(seed=2, size=model_cfg.image_size).stylized_pairs(ROWS, num_styles=2)
    table = actor(pa.Table.from_pylist([{**p, "source": "stylized"} for p in pairs]))
    assert table.column("error").null_count == ROWS
    (root / "tokens").mkdir()
    pq.write_table(conform_table(table, TOKEN_SHARDS_SCHEMA), root / "tokens" / "part-00000.parquet")
    return root / "tokens"


def test_the_stages_read_the_condition_column_and_the_collate_splices_it(
    ray_session, tmp_path, condition_shards, token_shards, model_cfg, vocab
):
    objective = StyleSFTObjective(model_cfg, style_source="image")
    objective.setup(torch.device("cpu"), "fp32")
    collate = objective.collate_fn()
    # The columns the training stages ask for; the condition column comes along.
    dataset = read_parquet_dataset(str(condition_shards), [*TOKEN_SHARD_COLUMNS, "image"])
    rows = dataset.take_batch(ROWS, batch_format="numpy")
    assert "condition_tokens" in rows
    batch = collate(rows)
    for i in range(ROWS):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i]].tolist()
        condition = rows["condition_tokens"][i].tolist()
        k = rows["prompt_ids"][i].tolist().index(vocab.image_placeholder)
        assert prompt[k : k + len(condition)] == condition and vocab.image_placeholder not in prompt
        assert prompt.count(vocab.style_placeholder) == model_cfg.num_style_tokens
    # Shards with an all-null column (no conditions) and shards written before the column: no condition.
    written = pq.read_table(token_shards).slice(0, 2)
    assert written.column("condition_tokens").null_count == 2
    pq.write_table(written.drop_columns(["condition_tokens"]), tmp_path / "old.parquet")
    old = read_parquet_dataset(str(tmp_path / "old.parquet"), list(TOKEN_SHARD_COLUMNS)).take_batch(2)
    assert "condition_tokens" not in old
    plain = TokenBatchCollate(vocab, objective.tokenizer, model_cfg.num_style_tokens)
    for rows in (old, numpy_batch(written)):
        assert vocab.image_start not in plain(rows)["prompt_ids"].flatten().tolist()


def test_a_tiny_condition_conditioned_run_lowers_its_loss_and_moves_only_lora_and_resampler(
    condition_shards, model_cfg
):
    objective = StyleSFTObjective(
        dataclasses.replace(model_cfg, noise_strength_train=0.0), style_source="image"
    )
    module = objective.setup(torch.device("cpu"), "fp32")
    batch = objective.collate_fn()(numpy_batch(pq.read_table(condition_shards)))
    assert batch["prompt_ids"].shape[1] > 76  # every prompt carries its condition image's 24 tokens

    model = objective.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3)
    module.train()
    losses = []
    for _ in range(STEPS):
        loss = objective.compute(module, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"condition SFT loss {losses[0]:.4f} -> {losses[-1]:.4f} over {STEPS} steps")
    assert losses[-1] < losses[0] - 0.3, losses

    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, _ in model.backbone.named_parameters() if ".lora_" in n}
    resampler = {f"resampler.{n}" for n, _ in model.resampler.named_parameters()}
    assert any(f"backbone.{n}" in moved for n in lora) and resampler & moved
    assert moved <= {f"backbone.{n}" for n in lora} | resampler, sorted(moved - resampler)[:5]
