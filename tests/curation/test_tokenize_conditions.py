"""Token shards with condition images: depth maps derived by the estimator, or a row's own condition image."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stylear_core.config import ConfigError
from stylear_core.curation.config import CurationConfig, InputConfig
from stylear_core.curation.pipeline import CurationRun
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.images import decode_image, encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.schemas import TOKEN_SHARDS_SCHEMA, conform_table, validate_table
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.data.tokenizer import style_prompt_ids
from stylear_core.models.depth import build_depth_estimator
from stylear_core.models.vqgan import encode_images, tiny_vqgan
from stylear_core.testing.fixtures import tiny_model_cfg
from stylear_core.testing.tiny_depth import save_tiny_depth_estimator

MODEL = tiny_model_cfg()


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return save_tiny_depth_estimator(tmp_path_factory.mktemp("depth") / "dpt", seed=0)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [{**r, "source": "raw"} for r in SyntheticStyleSet(seed=5, size=64).raw_pairs(4)]


def expected_tokens(actor: TokenizeActor, images) -> list[list[int]]:
    layout = ImageTokenLayout.for_resolution(64, 64, actor.vocab)
    return layout.encode(encode_images(tiny_vqgan(seed=0), images, 64)).tolist()


def test_depth_conditions_are_the_estimators_maps_vq_encoded_and_rows_may_bring_their_own(depth_dir, rows):
    actor = TokenizeActor(MODEL, TokenizeConfig(condition="depth", depth_estimator_path=str(depth_dir)))
    own = encode_png(decode_image(rows[3]["image"]).rotate(90))
    batch = [{**r, "condition": None} for r in rows[:3]] + [{**rows[3], "condition": own}]
    batch.append({**rows[0], "id": "bad", "condition": b"\x89PNG broken"})
    out = actor(pa.Table.from_pylist(batch))

    errors = out.column("error").to_pylist()
    assert errors[:4] == [None] * 4 and "condition" in errors[4]
    good = conform_table(out.slice(0, 4).drop_columns(["error", "error_stage"]), TOKEN_SHARDS_SCHEMA)
    images = [decode_image(b) for b in good.column("image").to_pylist()]
    depth_maps = build_depth_estimator(depth_dir)(images[:3])
    conditions = good.column("condition_tokens").to_pylist()
    assert conditions == expected_tokens(actor, [*depth_maps, decode_image(own)])
    assert conditions[0] != good.column("image_tokens").to_pylist()[0]  # the depth map, not the image
    for prompt, ids in zip(good.column("prompt").to_pylist(), good.column("prompt_ids").to_pylist()):
        assert ids == style_prompt_ids(actor.tokenizer, prompt, 4, 64, 64, condition=True)


def test_without_conditions_the_column_is_null_and_old_shards_still_validate(rows):
    actor = TokenizeActor(MODEL, TokenizeConfig())
    out = conform_table(
        actor(pa.Table.from_pylist(rows)).drop_columns(["error", "error_stage"]), TOKEN_SHARDS_SCHEMA
    )
    assert out.column("condition_tokens").null_count == len(rows)
    assert all(actor.vocab.image_placeholder not in ids for ids in out.column("prompt_ids").to_pylist())
    old = out.drop_columns(["condition_tokens"])  # written before the column existed
    validate_table(old, TOKEN_SHARDS_SCHEMA, allow_extra_columns=False)
    assert conform_table(old, TOKEN_SHARDS_SCHEMA).column("condition_tokens").null_count == len(rows)


def test_curation_builds_the_tiny_depth_estimator_only_where_it_may(tmp_path):
    def run(**tokenize) -> CurationRun:
        return CurationRun(
            CurationConfig(
                output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), model=MODEL,
                inputs=InputConfig(synthetic_raw=2), tokenize=TokenizeConfig(**tokenize), stylize=False,
            )
        )  # fmt: skip

    built = run(condition="depth").tokenize_config().depth_estimator_path
    assert build_depth_estimator(built).model.config.model_type == "dpt"
    assert run().tokenize_config().depth_estimator_path == ""
    with pytest.raises(ConfigError, match="depth_estimator_path"):
        TokenizeActor(MODEL, TokenizeConfig(condition="depth"))
    lumina = run(condition="depth")
    lumina.cfg.model = tiny_model_cfg(preset="lumina7b")
    with pytest.raises(ValueError, match="depth_estimator_path"):
        lumina.tokenize_config()
