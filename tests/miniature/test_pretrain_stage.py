"""The pretrain stage on real Ray Train + DeepSpeed: the miniature world's base model trains, is published
where the later stages' model blocks point, and a rerun reuses the cached world and base. The run read is
the session's cut-down world (this folder's conftest), which the quality gates judge."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from jobs import pretrain
from stylear_core.config import from_dict
from stylear_core.models.config import ModelConfig
from stylear_core.models.presets import build_backbone, build_prompt_tokenizer
from stylear_core.training.metrics import read_metrics_log

pytestmark = pytest.mark.usefixtures("ray_session")


def test_pretrain_trains_publishes_and_reuses_the_base(cut_down_world):
    run_dir, summary = cut_down_world.run_dir, cut_down_world.pretrain
    assert summary["trained"]["steps"] == 300
    rows = read_metrics_log(summary["trained"]["metrics_log"])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])
    model = from_dict(ModelConfig, summary["model"])
    assert model.preset == "mini" and model.backbone_path.startswith(str(run_dir / "pretrain" / "model"))
    trained, vocab = build_backbone(model)
    random_init, _ = build_backbone(ModelConfig(preset="mini"))
    moved = [
        name
        for (name, a), (_, b) in zip(trained.state_dict().items(), random_init.state_dict().items())
        if not torch.equal(a, b)
    ]
    assert len(moved) > 0.9 * len(trained.state_dict())  # the whole backbone trained, not an adapter
    assert 0.0 <= summary["base_content_accuracy"] <= 1.0
    world = json.loads((run_dir / "pretrain" / "model" / "world.json").read_text())
    assert world["vqgan"]["latent_side"] == 8
    # SFT rows for the next stage: style prompts with the model's 16 placeholders, the target image.
    table = pq.read_table(summary["sft_tokens"])
    assert table.num_rows == 1000 and set(table.column_names) >= {"prompt_ids", "image_tokens", "image"}
    placeholder = vocab.style_placeholder
    assert all(ids.count(placeholder) == 16 for ids in table.column("prompt_ids").to_pylist())
    tokenizer = build_prompt_tokenizer(model, vocab)
    assert tokenizer.decode(table.column("prompt_ids")[0].as_py()).startswith("Generate an image")
    # The stage again into a fresh stage dir, same cache: it trains nothing, the world and base are reused.
    # Then forced over that dir's complete manifest: it runs again (not skipped), still reusing them.
    again_argv = [*cut_down_world.pretrain_argv, f"output_dir={run_dir}/pretrain-again"]
    for again in (pretrain.main(again_argv), pretrain.main([*again_argv, "force=true"])):
        assert "status" not in again, again  # run, not skipped
        assert again["trained"] == "reused" and again["base"] == summary["base"]
        assert again["base_content_accuracy"] == summary["base_content_accuracy"]


def test_classmate_rows_join_the_pretraining_pairs_and_only_then_change_the_base_key(tmp_path):
    from dataclasses import asdict

    from stylear_core.miniature.data import TRAIN_STYLES, scenes
    from stylear_core.miniature.pretrain import PretrainDataConfig, mini_model_config, write_world_shards
    from stylear_core.miniature.subjects import classmate_scenes

    # Without class-mates the base's key is what it was before the field existed: cached bases stay valid.
    plain = PretrainDataConfig()
    assert plain.key() == {k: v for k, v in asdict(plain).items() if k != "classmate_share"}
    assert PretrainDataConfig(classmate_share=0.25).key() != plain.key()

    kin = classmate_scenes(0, 3, "test")
    items = scenes(0, 3, TRAIN_STYLES, "test") + kin
    model = mini_model_config()
    table = pq.read_table(write_world_shards(tmp_path, model, items, 0, "t"))
    prompts = table.column("prompt").to_pylist()
    assert prompts[:3] == [content.prompt for content, _ in items[:3]]
    # Class-mates are named by their class noun alone ("a robot at the left"): no identifier token.
    assert prompts[3:] == [scene.prompt for scene in kin]
    assert all(p.startswith(f"a {scene.subject} ") for p, scene in zip(prompts[3:], kin))
    tokens = table.column("image_tokens").to_pylist()
    assert len({tuple(t) for t in tokens}) == 6 and len({len(t) for t in tokens}) == 1


def test_classmates_are_interleaved_with_the_world_scenes_in_training_order():
    from stylear_core.miniature.data import TRAIN_STYLES, scenes
    from stylear_core.miniature.pretrain import PretrainDataConfig, pretraining_items
    from stylear_core.miniature.subjects import SubjectScene

    # The training loop reads rows in the order written: every quarter of an epoch must hold class-mates
    # (appended as a block, the last quarter was all class-mates and the base forgot the world scenes).
    items = pretraining_items(PretrainDataConfig(rows=400, classmate_share=0.25))
    assert items == pretraining_items(PretrainDataConfig(rows=400, classmate_share=0.25))
    is_kin = [isinstance(item, SubjectScene) for item in items]
    assert sum(is_kin) == 100
    assert all(10 <= sum(is_kin[q : q + 100]) <= 40 for q in range(0, 400, 100)), is_kin
    # Without class-mates the rows are the scenes in their own order, as cached bases were trained.
    assert pretraining_items(PretrainDataConfig(rows=50)) == scenes(0, 50, TRAIN_STYLES, "pretrain")
    assert PretrainDataConfig(classmate_share=0.25).key()["order"] == "interleaved"
