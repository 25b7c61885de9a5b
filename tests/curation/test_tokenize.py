"""TokenizeActor: centre-crop/resize, VQGAN codes in the Lumina layout, prompt ids, bad rows isolated."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig, token_vocab
from stylear_core.data.images import center_crop_resize, decode_image, encode_png
from stylear_core.data.layout import ImageTokenLayout, TokenVocab
from stylear_core.data.schemas import TOKEN_SHARDS_SCHEMA, conform_table
from stylear_core.data.synthetic import SyntheticStyleSet, corrupt_bytes
from stylear_core.data.tokenizer import ByteTokenizer, style_prompt_ids, text_prompt_ids
from stylear_core.models.backbone import chameleon_vocabulary_map, tiny_vocab
from stylear_core.models.presets import ModelConfig, build_backbone
from stylear_core.models.vqgan import encode_images, tiny_vqgan
from stylear_core.testing.fixtures import tiny_model_cfg

MODEL = tiny_model_cfg()


@pytest.fixture(scope="module")
def actor() -> TokenizeActor:
    return TokenizeActor(MODEL, TokenizeConfig(encode_batch_size=3, device="cpu"))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rows = SyntheticStyleSet(seed=5, size=64).raw_pairs(7)
    # A wide image: the tokenizer must crop its centre square before resizing to 64 px.
    wide = Image.new("RGB", (128, 64), (250, 0, 0))
    wide.paste((0, 0, 250), (32, 0, 96, 64))
    rows[2]["image"] = encode_png(wide)
    for r in rows:
        r["source"] = "raw"
    return rows


def test_image_tokens_are_the_vqgan_codes_in_the_lumina_layout(actor, rows):
    out = actor(pa.Table.from_pylist(rows))
    assert out.column("error").null_count == len(rows)
    layout = ImageTokenLayout.for_resolution(64, 64, actor.vocab)
    tokens = np.array(out.column("image_tokens").to_pylist())
    assert tokens.shape == (len(rows), layout.num_tokens)
    codes = layout.decode(torch.from_numpy(tokens))
    # Independent path: the seeded tiny VQGAN on the same images (encode_images crops and resizes).
    expected = encode_images(tiny_vqgan(seed=0), [decode_image(r["image"]) for r in rows], 64)
    assert codes.tolist() == expected.tolist()
    # The wide image's tokens are those of its centre square, which is all blue.
    blue = encode_images(tiny_vqgan(seed=0), [Image.new("RGB", (64, 64), (0, 0, 250))], 64)
    assert codes[2].tolist() == blue[0].tolist()
    assert out.column("height").to_pylist() == [64] * len(rows) == out.column("width").to_pylist()
    conform_table(out.drop_columns(["error", "error_stage"]), TOKEN_SHARDS_SCHEMA)


def test_chunked_encoding_matches_one_batch(actor, rows):
    one = TokenizeActor(MODEL, TokenizeConfig(encode_batch_size=64, device="cpu"))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    assert one(batch).column("image_tokens").to_pylist() == actor(batch).column("image_tokens").to_pylist()


@pytest.mark.parametrize("prompt_format", ["style", "text"])
def test_prompt_ids_follow_the_configured_format(rows, prompt_format):
    actor = TokenizeActor(MODEL, TokenizeConfig(prompt_format=prompt_format, device="cpu"))
    out = actor(pa.Table.from_pylist(rows[:2]))
    tokenizer = ByteTokenizer(tiny_vocab(codebook_size=256))
    for prompt, ids in zip(out.column("prompt").to_pylist(), out.column("prompt_ids").to_pylist()):
        if prompt_format == "style":
            assert ids == style_prompt_ids(tokenizer, prompt, 4, 64, 64)
            assert ids.count(actor.vocab.style_placeholder) == 4
        else:
            assert ids == text_prompt_ids(tokenizer, prompt, 64, 64)
            assert actor.vocab.style_placeholder not in ids
        assert ids[0] == actor.vocab.bos and ids[-1] == actor.vocab.eos
        assert prompt in tokenizer.decode(ids)


def test_bad_rows_get_a_reason_and_the_rest_are_tokenized(actor, rows):
    bad = [dict(r) for r in rows[:4]]
    bad[0]["image"] = corrupt_bytes("random")
    bad[2]["prompt"] = ""
    out = actor(pa.Table.from_pylist(bad))
    errors = out.column("error").to_pylist()
    assert "unreadable image" in errors[0] and "empty prompt" in errors[2]
    assert errors[1] is None and errors[3] is None
    assert out.column("error_stage").to_pylist() == ["tokenize", None, "tokenize", None]
    good = out.column("image_tokens").to_pylist()
    assert good[0] == [] and len(good[1]) == ImageTokenLayout.for_resolution(64, 64, actor.vocab).num_tokens


def test_token_vocab_matches_the_backbone_vocab(tmp_path):
    assert token_vocab(MODEL) == build_backbone(MODEL)[1]
    # lumina7b with a checkpoint dir: the vocab comes from its config.json's vocabulary map.
    vocab = tiny_vocab(codebook_size=64, vocab_size=2048)
    config = {"vocab_size": 2048, "vocabulary_map": chameleon_vocabulary_map(vocab)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = token_vocab(ModelConfig(preset="lumina7b", backbone_path=str(tmp_path)))
    assert loaded.image_code_ids == vocab.image_code_ids
    assert (loaded.image_start, loaded.new_line, loaded.grid_base) == (
        vocab.image_start,
        vocab.new_line,
        vocab.grid_base,
    )
    assert token_vocab(ModelConfig(preset="lumina7b")) == TokenVocab()


def test_rows_carry_the_working_size_image_they_encode(actor, rows):
    out = actor(pa.Table.from_pylist(rows[:3] + [{**rows[3], "image": corrupt_bytes("random")}]))
    pngs = out.column("image").to_pylist()
    assert pngs[3] == b""  # the failed row
    images = [decode_image(b) for b in pngs[:3]]
    for image, row in zip(images, rows):
        assert image.size == (64, 64)
        assert image.tobytes() == center_crop_resize(decode_image(row["image"]), 64, 64).tobytes()
    assert images[2].getcolors() == [(64 * 64, (0, 0, 250))]  # the wide image's centre square
    layout = ImageTokenLayout.for_resolution(64, 64, actor.vocab)
    codes = layout.decode(torch.tensor(out.column("image_tokens").to_pylist()[:3]))
    assert codes.tolist() == encode_images(tiny_vqgan(seed=0), images, 64).tolist()
