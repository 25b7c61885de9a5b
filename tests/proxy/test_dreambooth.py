"""DreamBooth LoRA on tiny random SDXL / SD3 supervisors: the Ray job, the saved LoRA, reruns, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs import dreambooth as job
from stylear_core.config import ConfigError, load_config
from stylear_core.proxy.dreambooth import DreamBoothConfig, prepare_training_image, run_dreambooth_subject
from stylear_core.proxy.families import LORA_WEIGHT_NAME, load_supervisor
from stylear_core.proxy.subjects import write_synthetic_subjects
from stylear_core.runs import is_complete, read_manifest
from stylear_core.testing.tiny_pipelines import build_tiny_sd3_dir

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "dreambooth" / "tiny.yaml"


def _generate(pipe, prompt: str) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        prompt=prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images[0]


def _assert_lora_trained(lora_file: Path, untrainable: set[str] = frozenset()) -> None:
    weights = load_file(lora_file)
    assert weights and all("lora" in k for k in weights)
    # peft initialises every B (up) factor to zero: non-zero ones have been trained.
    up = {k: v for k, v in weights.items() if "lora.up" in k or "lora_B" in k}
    assert len(up) > len(untrainable)
    assert {k for k, v in up.items() if v.abs().sum() == 0} == set(untrainable)


def test_job_tunes_each_subject_under_ray_and_the_lora_changes_the_supervisor(ray_session, tmp_path: Path):
    argv = [
        "--config",
        str(TINY_CONFIG),
        f"run_dir={tmp_path}",
        f"output_dir={tmp_path}/dreambooth",
        "train.max_steps=6",
        "identifiers={robot: olis}",
    ]
    summary = job.main(argv)

    out = tmp_path / "dreambooth"
    assert summary["errors"] == {}
    assert {n: r["status"] for n, r in summary["subjects"].items()} == {
        "robot": "trained",
        "mushroom": "trained",
    }
    assert is_complete(out, job.FORMAT)
    for name in ("robot", "mushroom"):
        manifest = read_manifest(out / name)
        assert manifest["status"] == "complete" and manifest["preset"] == "sdxl"
        result = manifest["result"]
        assert len(result["losses"]) == len(result["prior_losses"]) == 6
        assert all(math.isfinite(x) for x in result["losses"])
        # The same noise and timesteps before and after: the LoRA fitted the instance images.
        assert result["eval_loss_after"] < result["eval_loss_before"]
        assert sorted(p.name for p in (out / name / "class_images").glob("*.png")) == [
            "class_0000.png",
            "class_0001.png",
        ]
        _assert_lora_trained(out / name / LORA_WEIGHT_NAME)
    assert read_manifest(out / "robot")["instance_prompt"] == "a photo of olis robot"

    supervisor = tmp_path / "models" / "tiny-sdxl-supervisor"
    pipe = load_supervisor("sdxl", supervisor)
    before = _generate(pipe, "a photo of olis robot")
    pipe.load_lora_weights(str(out / "robot"))
    after = _generate(pipe, "a photo of olis robot")
    assert np.abs(after - before).max() > 1e-2
    other = load_supervisor("sdxl", supervisor, lora_dir=out / "mushroom")
    assert np.abs(_generate(other, "a photo of olis robot") - after).max() > 1e-3
    assert np.array_equal(_generate(load_supervisor("sdxl", supervisor), "a photo of olis robot"), before)

    stamps = {n: (out / n / LORA_WEIGHT_NAME).stat().st_mtime_ns for n in ("robot", "mushroom")}
    rerun = job.main(argv)
    assert {n: r["status"] for n, r in rerun["subjects"].items()} == {
        "robot": "skipped",
        "mushroom": "skipped",
    }
    assert rerun["subjects"]["robot"]["final_loss"] == summary["subjects"]["robot"]["final_loss"]
    assert stamps == {n: (out / n / LORA_WEIGHT_NAME).stat().st_mtime_ns for n in ("robot", "mushroom")}


def test_failed_subjects_are_reported_and_leave_no_complete_manifest(ray_session, tmp_path: Path):
    argv = [
        "--config",
        str(TINY_CONFIG),
        f"run_dir={tmp_path}",
        f"output_dir={tmp_path}/dreambooth",
        "tiny_supervisor=false",
        "subjects=[robot]",
    ]
    with pytest.raises(RuntimeError, match=r"DreamBooth failed for \['robot'\].*no model_index.json"):
        job.main(argv)
    manifest = read_manifest(tmp_path / "dreambooth")
    assert manifest["status"] == "failed" and "robot" in manifest["summary"]["errors"]
    assert not is_complete(tmp_path / "dreambooth" / "robot")


def test_sd3_supervisor_trains_saves_and_reloads(tmp_path: Path):
    supervisor = build_tiny_sd3_dir(tmp_path / "sd3")
    subject = write_synthetic_subjects(tmp_path / "subjects", count=1, images_per_subject=3)[0]
    cfg = DreamBoothConfig(
        preset="sd3",
        pretrained_dir=str(supervisor),
        resolution=64,
        learning_rate=1e-2,
        max_steps=4,
        with_prior_preservation=True,
        num_class_images=1,
        class_inference_steps=2,
    )
    summary = run_dreambooth_subject(subject.folder, cfg, tmp_path / "lora")
    assert summary["status"] == "trained"
    manifest = read_manifest(tmp_path / "lora")
    assert manifest["preset"] == "sd3" and len(manifest["result"]["losses"]) == 4
    assert manifest["result"]["eval_loss_after"] < manifest["result"]["eval_loss_before"]
    # In SD3's last block the context stream's output is dropped, so its query projection gets no gradient.
    _assert_lora_trained(
        tmp_path / "lora" / LORA_WEIGHT_NAME,
        {"transformer.transformer_blocks.1.attn.add_q_proj.lora_B.weight"},
    )
    metadata = json.loads((tmp_path / "lora" / "manifest.json").read_text())["config"]
    assert metadata["preset"] == "sd3"

    pipe = load_supervisor("sd3", supervisor)
    before = _generate(pipe, subject.instance_prompt())
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert np.abs(_generate(pipe, subject.instance_prompt()) - before).max() > 1e-2
    assert run_dreambooth_subject(subject.folder, cfg, tmp_path / "lora")["status"] == "skipped"


def test_training_images_keep_sdxl_size_conditioning():
    image = Image.new("RGB", (80, 64), (10, 200, 30))
    prepared = prepare_training_image(image, 32, center_crop=True, flip=False, generator=torch.Generator())
    assert prepared.pixels.shape == (3, 32, 32)
    assert prepared.original_size == (64, 80) and prepared.crop_top_left == (0, 4)
    assert torch.allclose(prepared.pixels[:, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1, atol=1e-2)


def test_missing_supervisor_dir_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no model_index.json.*never downloaded"):
        load_supervisor("sdxl", tmp_path)
    with pytest.raises(ValueError, match="unknown supervisor preset 'sd2'"):
        load_supervisor("sd2", tmp_path)


def test_untrainable_recipes_are_rejected_when_the_config_loads():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(job.Config, TINY_CONFIG, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.preset: expected one of"):
        load_config(job.Config, TINY_CONFIG, ["train.preset=sd2"])
