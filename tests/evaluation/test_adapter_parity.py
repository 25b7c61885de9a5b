"""The served adapter must compute what the trained one did; the export job publishes only such adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file, save_file

from serving.config import ServingConfig
from stylear_core.adapters.format import ADAPTER_FORMAT
from stylear_core.adapters.io import list_adapters
from stylear_core.adapters.probe import make_probe, probe_outputs, write_probe
from stylear_core.config import load_config
from stylear_core.data.images import decode_image
from stylear_core.evaluation.adapter_parity import served_adapter_parity
from stylear_core.models.presets import build_prompt_tokenizer, build_stylear_model
from stylear_core.runs import read_manifest
from stylear_core.testing.fixtures import tiny_adapter, tiny_model_cfg
from stylear_core.training.batches import TokenBatchCollate
from stylear_core.training.synthetic_shards import synthetic_token_rows

REPO = Path(__file__).resolve().parents[2]
TINY = tiny_model_cfg(lora_alpha=8.0)  # alpha != rank: the slot must carry the scaling


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """A tiny artefact as training exports it: perturbed LoRA (alpha != rank) and resampler, a probe, a manifest."""
    model = build_stylear_model(TINY).eval()
    directory = tmp_path_factory.mktemp("trained") / "train_dpo" / "adapter"
    lora = {"r": TINY.lora_rank, "lora_alpha": TINY.lora_alpha}
    tiny_adapter(directory, TINY, model=model, perturb=("lora", "resampler"), seed=0, lora=lora, step=3)
    rows = synthetic_token_rows(TINY, 2, seed=5)
    batch = {k: np.array([r[k] for r in rows]) for k in ("id", "prompt", "height", "width")}
    for k in ("prompt_ids", "image_tokens"):
        batch[k] = np.empty(len(rows), dtype=object)
        batch[k][:] = [np.asarray(r[k], dtype=np.int64) for r in rows]
    batch = TokenBatchCollate(model.vocab, build_prompt_tokenizer(TINY, model.vocab), TINY.num_style_tokens)(
        batch
    )
    features = model.style_features(model.style_encoder.preprocess([decode_image(r["image"]) for r in rows]))
    probe = make_probe(batch, features)
    write_probe(directory, probe, probe_outputs(model, probe))
    return directory


def test_the_serving_path_reproduces_the_trained_model(trained_adapter):
    # alpha / r = 2: the slot must fold the scaling into B, and zero-pad rank 4 into the rank-8 slot.
    assert served_adapter_parity(TINY, trained_adapter, slot_rank=8) < 1e-5


def test_a_damaged_adapter_is_caught(trained_adapter, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(trained_adapter, damaged)
    weights = load_file(str(damaged / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] * 2
    save_file(weights, str(damaged / "adapter_model.safetensors"))
    assert served_adapter_parity(TINY, damaged, slot_rank=8) > 1e-3


def test_export_job_publishes_a_servable_adapter(ray_session, trained_adapter, tmp_path):
    import jobs.export as job

    run_dir = trained_adapter.parents[1]
    out = tmp_path / "export"
    summary = job.main(
        [
            "--config",
            str(REPO / "jobs/configs/export/tiny.yaml"),
            f"run_dir={run_dir}",
            f"output_dir={out}",
            "name=my-style",
        ]
    )
    assert summary["served_parity"] < 1e-5 and read_manifest(out)["status"] == "complete"
    assert [a["name"] for a in list_adapters(out / "adapters")] == ["my-style"]
    published = read_manifest(out / "adapters" / "my-style")
    assert (
        published["format"] == ADAPTER_FORMAT and published["name"] == "my-style" and published["step"] == 3
    )
    serving = load_config(ServingConfig, out / "serving.yaml")
    assert serving.adapters_root == str(out / "adapters") and serving.model == TINY
    app = yaml.safe_load((out / "serve_config.yaml").read_text())["applications"][0]
    assert app["import_path"] == "serving.app:build_app" and app["args"]["config_file"] == str(
        out / "serving.yaml"
    )
