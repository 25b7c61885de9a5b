"""Style features computed once: curation's tokenize step writes the frozen CLIP features of each row's
style image (``tokenize.style_features``), and SFT with ``style_source: features`` trains on them to the
same loss and resampler gradients as the on-the-fly ``vq_decode`` and ``image`` paths, on the same rows
and seed, without building CLIP or the VQGAN; features another encoder made are refused.

Real Ray Data (the curation pipeline, ``read_parquet_dataset`` + ``iter_torch_batches``) and the tiny
random models; no mocks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import verify_adapter
from stylear_core.config import load_config
from stylear_core.curation.config import CurationConfig
from stylear_core.curation.pipeline import run_curation
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.images import decode_image
from stylear_core.data.passes import read_table, table_files
from stylear_core.data.schemas import (
    RAW_PAIRS_SCHEMA,
    TOKEN_SHARDS_SCHEMA,
    SchemaError,
    conform_table,
    rows_to_table,
    validate_table,
)
from stylear_core.data.style_features import (
    FEATURES_COLUMN,
    KEY_COLUMN,
    features_key,
    style_encoder_digest,
    vq_decoded_images,
)
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.models.presets import build_style_encoder, build_vqgan
from stylear_core.testing.fixtures import perturb_
from stylear_core.training.batches import TOKEN_SHARD_COLUMNS, read_parquet_dataset
from stylear_core.training.objectives import StyleSFTObjective
from stylear_core.training.stages import StyleTrainConfig, run_style_training

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
NUM_RAW = 8
FEATURE_COLUMNS = [*TOKEN_SHARD_COLUMNS, FEATURES_COLUMN, KEY_COLUMN]


@pytest.fixture(scope="module")
def raw_rows() -> list[dict]:
    return SyntheticStyleSet(seed=11, size=64).raw_pairs(NUM_RAW)


@pytest.fixture(scope="module")
def vq_shards(tmp_path_factory, raw_rows) -> dict:
    """A raw-only curation run (the real pipeline) with ``tokenize.style_features=vq_decode``."""
    root = tmp_path_factory.mktemp("features-curate")
    pq.write_table(rows_to_table(raw_rows, RAW_PAIRS_SCHEMA), root / "raw.parquet")
    out = root / "run" / "curate"
    cfg = load_config(
        CurationConfig,
        REPO / "jobs" / "configs" / "curate" / "tiny.yaml",
        [
            f"output_dir={out}",
            f"run_dir={out.parent}",
            f"cache_dir={root / 'cache'}",
            "progress_bars=false",
            f"inputs.raw_path={root / 'raw.parquet'}",
            "stylize=false",
            "tokenize.style_features=vq_decode",
        ],
    )
    summary = run_curation(cfg)
    assert summary["tokens_written"] == NUM_RAW
    return {"path": out / "tokens", "model": cfg.model}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory, raw_rows, vq_shards) -> Path:
    """The same raw rows through the tokenize actor with ``style_features=image``, one shard file."""
    actor = TokenizeActor(vq_shards["model"], TokenizeConfig(device="cpu", style_features="image"))
    table = actor(pa.Table.from_pylist([{**r, "source": "raw"} for r in raw_rows]))
    assert table.column("error").null_count == NUM_RAW
    path = tmp_path_factory.mktemp("features-image")
    pq.write_table(conform_table(table, TOKEN_SHARDS_SCHEMA), path / "part-0.parquet")
    return path


def first_batch(path: Path, objective: StyleSFTObjective, columns: list[str], rows: int = 4) -> dict:
    """The first collated batch of ``rows`` rows, read as the SFT stage reads them."""
    dataset = read_parquet_dataset(str(path), columns)
    batches = dataset.iter_torch_batches(batch_size=rows, collate_fn=objective.collate_fn())
    return next(iter(batches))


def stored_features(path: Path) -> tuple[list[str], torch.Tensor, list[str]]:
    table = read_table(path)
    values = table.column(FEATURES_COLUMN).to_numpy(zero_copy_only=False)
    return (
        table.column("id").to_pylist(),
        torch.from_numpy(np.stack(values)),
        table.column(KEY_COLUMN).to_pylist(),
    )


def test_curation_writes_fp16_features_of_the_vq_round_trip(vq_shards):
    model = vq_shards["model"]
    for f in table_files(vq_shards["path"]):
        schema = pq.read_schema(f)
        assert schema.field(FEATURES_COLUMN).type == pa.list_(pa.float16())
        validate_table(pq.read_table(f), TOKEN_SHARDS_SCHEMA, allow_extra_columns=False)
    ids, stored, keys = stored_features(vq_shards["path"])
    assert stored.dtype == torch.float16 and stored.shape == (NUM_RAW, 17 * 64)  # tiny CLIP: 17 x 64
    assert set(keys) == {features_key(style_encoder_digest(model), "vq_decode")}

    # Recomputed independently: tokens -> tiny VQGAN -> PIL -> CLIP preprocessing -> CLIP penultimate.
    tokens = read_table(vq_shards["path"]).column("image_tokens").to_pylist()
    vocab = TokenizeActor(model, TokenizeConfig(device="cpu")).vocab
    images = vq_decoded_images(build_vqgan(model, vocab), torch.tensor(tokens), [(64, 64)] * NUM_RAW, vocab)
    encoder = build_style_encoder(model)
    expected = encoder(encoder.preprocess(images)).reshape(NUM_RAW, -1)
    assert torch.allclose(stored.float(), expected, rtol=2e-3, atol=2e-3)  # fp16 rounding


def test_tokenize_image_features_are_those_of_the_stored_png(image_shards, vq_shards):
    model = vq_shards["model"]
    ids, stored, keys = stored_features(image_shards)
    assert set(keys) == {features_key(style_encoder_digest(model), "image")}
    encoder = build_style_encoder(model)
    pngs = read_table(image_shards).column("image").to_pylist()
    expected = encoder(encoder.preprocess([decode_image(p) for p in pngs])).reshape(len(ids), -1)
    assert torch.allclose(stored.float(), expected, rtol=2e-3, atol=2e-3)
    # Not the VQ round trip's features: the two sources are different inputs.
    _, from_tokens, _ = stored_features(vq_shards["path"])
    assert not torch.allclose(stored.float(), from_tokens.float(), rtol=2e-3, atol=2e-3)


def test_old_shards_without_features_validate_and_fail_early_for_features(vq_shards, tmp_path):
    old = read_table(vq_shards["path"]).drop_columns([FEATURES_COLUMN, KEY_COLUMN])
    validate_table(old, TOKEN_SHARDS_SCHEMA)  # optional columns: older shards still validate
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(SchemaError, match="tokenize.style_features"):
        read_parquet_dataset(str(tmp_path), FEATURE_COLUMNS)


@pytest.mark.parametrize("source", ["vq_decode", "image"])
def test_sft_loss_on_precomputed_features_equals_the_on_the_fly_path(source, vq_shards, image_shards):
    path = vq_shards["path"] if source == "vq_decode" else image_shards
    model = vq_shards["model"]
    assert model.noise_strength_train > 0  # the style-token noise runs in the step, from the same seed

    live = StyleSFTObjective(model, style_source=source)
    live_module = live.setup(CPU, "fp32").train()
    cached = StyleSFTObjective(model, style_source="features")
    cached_module = cached.setup(CPU, "fp32").train()
    assert cached.vqgan is None and not list(cached.model.style_encoder.parameters())  # nothing frozen built
    for objective in (live, cached):  # same trained-looking LoRA and resampler: the style tokens matter
        perturb_(objective.model.trainable_parameters(), seed=3, scale=0.1)

    live_batch = first_batch(path, live, [*TOKEN_SHARD_COLUMNS, *(["image"] if source == "image" else [])])
    cached_batch = first_batch(path, cached, FEATURE_COLUMNS)
    assert torch.equal(live_batch["id_hash"], cached_batch["id_hash"])
    assert cached_batch["style_features"].dtype == torch.float16
    assert "style_pixels" not in cached_batch
    # The stored features are the on-the-fly ones (same input, same frozen encoder) rounded to fp16.
    on_the_fly = live.style_features(live_batch)
    assert torch.allclose(
        cached_batch["style_features"].float(), on_the_fly.half().float(), rtol=0, atol=2e-3
    )

    torch.manual_seed(5)
    live_loss = live.compute(live_module, live_batch).loss
    torch.manual_seed(5)
    cached_loss = cached.compute(cached_module, cached_batch).loss
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)
    live_loss.backward()
    cached_loss.backward()
    live_grad, cached_grad = live.model.resampler.latents.grad, cached.model.resampler.latents.grad
    drift = ((cached_grad - live_grad).norm() / live_grad.norm()).item()
    print(
        f"{source}: loss {live_loss.item():.6f} vs {cached_loss.item():.6f}, resampler grad drift {drift:.2e}"
    )
    assert drift < 2e-3  # fp16 rounding of the stored features

    # The comparison can fail: other features (each row given another row's) give other gradients.
    shifted = {**cached_batch, "style_features": cached_batch["style_features"].roll(1, dims=0)}
    torch.manual_seed(5)
    other = cached.compute(cached_module, shifted).loss
    cached.model.resampler.latents.grad = None
    other.backward()
    other_drift = ((cached.model.resampler.latents.grad - live_grad).norm() / live_grad.norm()).item()
    print(f"{source}: shifted features: loss {other.item():.6f}, resampler grad drift {other_drift:.2e}")
    assert other_drift > 10 * drift


def test_features_of_another_encoder_are_refused(vq_shards, image_shards, tmp_path):
    other = dataclasses.replace(vq_shards["model"], seed=1)  # another random CLIP (and backbone)
    assert style_encoder_digest(other) != style_encoder_digest(vq_shards["model"])
    cfg = load_config(
        StyleTrainConfig,
        REPO / "jobs" / "configs" / "train_style" / "tiny.yaml",
        [f"run_dir={tmp_path}", f"output_dir={tmp_path / 'sft'}", f"data.token_shards={vq_shards['path']}"],
    )
    cfg.data.style_source = "features"
    cfg.model = other
    with pytest.raises(SchemaError, match="another encoder.*tokenize.style_features"):
        run_style_training(cfg)  # refused on the driver, before any worker starts

    # The per-batch check (remote shards are not listed on the driver) refuses them too.
    objective = StyleSFTObjective(other, style_source="features")
    objective.setup(CPU, "fp32")
    with pytest.raises(SchemaError, match="another encoder"):
        first_batch(image_shards, objective, FEATURE_COLUMNS)


def test_train_style_job_trains_on_precomputed_features(vq_shards, tmp_path, job_runner):
    summary = job_runner(
        "train_style",
        tmp_path,
        f"data.token_shards={vq_shards['path']}",
        "data.style_source=features",
        "data.synthetic_rows=0",
        "train.max_steps=2",
        "train.grad_accum_steps=1",
        "train.checkpoint_every=2",
        "ray.num_workers=1",
    )
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    # The exported adapter reloads onto a model with the real CLIP and reproduces the probe logits.
    adapter = Path(summary["adapter"])
    model = StyleSFTObjective(vq_shards["model"]).build_model()
    assert verify_adapter(load_adapter(model, adapter), adapter) < 1e-5
