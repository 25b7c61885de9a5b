"""Subject tuning (stage 3): two subjects' proxy token shards tuned into one AR LoRA on Ray Train, exported as a
subject adapter whose frozen parts did not move, whose probe reloads exactly, and that reruns skip."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import train_subject as job
from stylear_core.adapters.format import ADAPTER_FORMAT
from stylear_core.adapters.io import load_adapter
from stylear_core.adapters.probe import verify_adapter
from stylear_core.adapters.publish import publish_adapter
from stylear_core.config import load_config
from stylear_core.curation.tokenize import TokenizeActor, TokenizeConfig
from stylear_core.data.images import decode_image
from stylear_core.data.schemas import TOKEN_SHARDS_SCHEMA, conform_table
from stylear_core.models.presets import build_prompt_tokenizer, build_stylear_model
from stylear_core.proxy.proxy_data import PROXY_FORMAT, ProxyPromptConfig, proxy_prompt_rows
from stylear_core.proxy.subject_training import (
    SUBJECT_TRAIN_FORMAT,
    SubjectSFTObjective,
    rows_per_subject,
)
from stylear_core.proxy.subjects import write_synthetic_subjects
from stylear_core.proxy.supervisor import TunedSubject
from stylear_core.runs import read_manifest, write_manifest
from stylear_core.training.batches import TokenBatchCollate
from stylear_core.training.loop import group_digests
from stylear_core.training.metrics import read_metrics_log

# Whole Proxy-Tuning runs under Ray take minutes on 2 cores: `make test-all` runs them.
pytestmark = pytest.mark.slow

TINY_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "train_subject" / "tiny.yaml"
SERVING_AVAILABLE = importlib.util.find_spec("serving.app") is not None


def write_proxy_stage(run_dir: Path, model_cfg) -> list[dict]:
    """Stage-2 output without a supervisor: each subject's instance images as its proxy images, with proxy
    prompts, tokenized by the curation tokenizer; returns the token rows."""
    sets = sorted(
        write_synthetic_subjects(run_dir / "subjects", count=2, images_per_subject=4), key=lambda s: s.name
    )
    subjects = [
        TunedSubject(s.name, s.identifier, s.class_noun, "", tuple(map(str, s.image_paths)), "sdxl", "")
        for s in sets
    ]
    rows = proxy_prompt_rows(subjects, ProxyPromptConfig(images_per_subject=4))
    images = {s.name: [p.read_bytes() for p in s.image_paths] for s in sets}
    batch = pa.table(
        {
            "id": [r["id"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "image": [images[r["subject"]][int(r["id"][-1])] for r in rows],
            "source": ["proxy"] * len(rows),
        }
    )
    tokenized = TokenizeActor(model_cfg, TokenizeConfig(prompt_format="text", device="cpu"))(batch)
    assert tokenized.column("error").null_count == len(rows)
    out = run_dir / "proxy_generate"
    (out / "tokens").mkdir(parents=True)
    pq.write_table(conform_table(tokenized, TOKEN_SHARDS_SCHEMA), out / "tokens" / "part-0.parquet")
    write_manifest(out, PROXY_FORMAT, status="complete", subjects=[s.entry() for s in subjects])
    return tokenized.to_pylist()


def argv(run_dir: Path) -> list[str]:
    return ["--config", str(TINY_CONFIG), f"run_dir={run_dir}", f"output_dir={run_dir}/train_subject"]


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("subject-run")
    cfg = load_config(job.Config, TINY_CONFIG, [f"run_dir={run_dir}"])
    rows = write_proxy_stage(run_dir, cfg.model)
    summary = job.main(argv(run_dir))
    return run_dir, cfg, rows, summary


def text_only_loss(model, cfg, rows) -> float:
    tokenizer = build_prompt_tokenizer(cfg.model, model.vocab)
    batch = TokenBatchCollate(model.vocab, tokenizer, 0)({k: [r[k] for r in rows] for k in rows[0]})
    with torch.no_grad():
        out = model(
            prompt_ids=batch["prompt_ids"],
            image_tokens=batch["image_tokens"],
            prompt_mask=batch["prompt_mask"],
            image_mask=batch["image_mask"],
            style_tokens=torch.zeros(len(rows), 0, model.backbone.config.hidden_size),
        )
    return float(out.loss)


def test_two_subjects_are_tuned_into_one_subject_adapter(trained):
    run_dir, cfg, rows, summary = trained
    assert summary["status"] == "complete" and summary["steps"] == cfg.train.max_steps
    assert summary["rows_per_subject"] == {"mushroom": 4, "robot": 4}
    assert summary["served_parity"] <= cfg.parity_tolerance  # published only after the serving-path check
    adapter = run_dir / "train_subject" / "adapter"
    manifest = read_manifest(adapter)
    assert manifest["format"] == ADAPTER_FORMAT and manifest["status"] == "complete"
    assert manifest["kind"] == "subject"
    assert manifest["subjects"] == [
        {"name": "mushroom", "identifier": "zwx", "class_noun": "mushroom"},
        {"name": "robot", "identifier": "sks", "class_noun": "robot"},
    ]
    assert "adapter_model.safetensors" in manifest["files"] and manifest["lora"]["r"] == cfg.model.lora_rank
    stage = read_manifest(run_dir / "train_subject")
    assert stage["format"] == SUBJECT_TRAIN_FORMAT and stage["status"] == "complete"
    published = run_dir / "adapters" / "subjects"
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in adapter.iterdir())
    assert all(filecmp.cmp(adapter / p.name, p, shallow=False) for p in published.iterdir())
    assert len(read_metrics_log(run_dir / "train_subject" / "metrics.jsonl")) == cfg.train.max_steps


def test_only_the_lora_trained_and_the_loss_on_the_proxy_rows_fell(trained):
    run_dir, cfg, rows, _ = trained
    adapter = run_dir / "train_subject" / "adapter"
    fresh = SubjectSFTObjective(cfg.model)
    fresh.model, fresh.vqgan = fresh.build_model("cpu"), None
    before = group_digests(fresh.parameter_groups(), rank=0)
    after = read_manifest(adapter)["digests"]
    assert {k: after[k] for k in ("base", "resampler", "clip")} == {
        k: before[k] for k in ("base", "resampler", "clip")
    }
    assert after["lora"] != before["lora"]

    base = build_stylear_model(cfg.model)
    tuned = load_adapter(build_stylear_model(cfg.model), adapter)
    base.eval(), tuned.eval()
    assert text_only_loss(tuned, cfg, rows) < text_only_loss(base, cfg, rows) - 0.05
    assert verify_adapter(tuned, adapter) < 1e-4
    assert verify_adapter(base, adapter) > 1e-3  # the probe tells the tuned model from the base


def test_a_finished_stage_is_skipped(trained):
    run_dir, _, _, summary = trained
    weights = run_dir / "train_subject" / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    rerun = job.main(argv(run_dir))
    assert rerun["status"] == "skipped" and rerun["final_loss"] == summary["final_loss"]
    assert weights.stat().st_mtime_ns == stamp


def test_subjects_without_proxy_rows_and_adapter_republishing(tmp_path, trained):
    run_dir = trained[0]
    files = [str(p) for p in (run_dir / "proxy_generate" / "tokens").glob("*.parquet")]
    entries = read_manifest(run_dir / "proxy_generate")["subjects"]
    assert rows_per_subject(files, entries) == {"mushroom": 4, "robot": 4}
    with pytest.raises(ValueError, match=r"no proxy rows name subject\(s\) \['teapot'\]"):
        rows_per_subject(files, [*entries, {"name": "teapot", "identifier": "qvx", "class_noun": "teapot"}])

    first = tmp_path / "a"
    first.mkdir()
    (first / "w.bin").write_bytes(b"1")
    second = tmp_path / "b"
    second.mkdir()
    (second / "v.bin").write_bytes(b"2")
    publish_adapter(first, tmp_path / "root", "subjects")
    target = publish_adapter(second, tmp_path / "root", "subjects")
    assert [p.name for p in target.iterdir()] == ["v.bin"]
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["subjects"]  # no temporary leftovers


@pytest.mark.skipif(not SERVING_AVAILABLE, reason="the serving application is not in this tree")
def test_the_published_adapter_serves_each_subject(trained):
    import httpx
    from ray import serve

    from cluster.local import free_port
    from serving.app import build_app

    run_dir = trained[0]
    overrides = [f"adapters_root={run_dir / 'adapters'}", "sam_enabled=false", "sam_default=false"]
    app = build_app({"config_file": "serving/configs/tiny.yaml", "overrides": overrides})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="proxy-subjects", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:

            def generate(prompt: str, adapter: str | None = "subjects") -> httpx.Response:
                body = {"prompt": prompt, "height": 64, "width": 64, "seed": 7, "top_k": 64}
                return client.post(
                    "/v1/generate/subject", json={**body, **({"adapter": adapter} if adapter else {})}
                )

            for prompt in ("a sks robot on the beach", "a zwx mushroom in the snow"):
                tuned, base = generate(prompt), generate(prompt, adapter=None)
                assert tuned.status_code == 200, tuned.text
                assert tuned.headers["content-type"] == "image/png"
                image = decode_image(tuned.content)
                assert image.size == (64, 64)
                # Same seed, same prompt: the subject LoRA is what changes the image.
                assert np.abs(np.asarray(image, int) - np.asarray(decode_image(base.content), int)).max() > 0
            unnamed = generate("a robot on the beach")
            assert unnamed.status_code == 422 and "sks" in unnamed.text and "zwx" in unnamed.text
    finally:
        serve.delete("proxy-subjects")
        serve.shutdown()
