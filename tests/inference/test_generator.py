"""One generator front-end: the same seed gives the same image tokens on every path that generates.

The paths are style evaluation (``evaluate_variant``), preference pairs (``PreferencePairSampler``), the
serving model (its served path, ``generate``, on the class built outside Serve: no HTTP; it decodes in the
replica's continuous-batching loop), the export parity gate's serving
setup (``served_generator``) and, for text prompts, the subject student and the serving model's subject
path. Each is driven through its own entry point with one tuned adapter (LoRA with ``alpha != r``, its
own resampler), so a path that composed the sequence differently -- other style tokens, noise stream,
prompt, sampling settings, unconditional row or adapter mapping -- would draw other tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from serving.config import ServingConfig
from serving.model import StyleARModelDeployment
from serving.schemas import GenerationJob
from stylear_core.adapters.format import ADAPTER_FORMAT, base_model_id
from stylear_core.config import load_config, to_dict
from stylear_core.data.images import decode_image, encode_png
from stylear_core.evaluation.adapter_parity import served_generator
from stylear_core.evaluation.style_eval import (
    EvalSamplingConfig,
    HeldPairsConfig,
    code_map_image,
    evaluate_variant,
    held_pairs,
)
from stylear_core.evaluation.subject_eval import StudentGenerator, StudentSamplingConfig
from stylear_core.inference.continuous import ContinuousBatchingEngine
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.generator import StyleARGenerator
from stylear_core.models.presets import build_stylear_model
from stylear_core.preferences.pairs import PreferencePairSampler, PreferenceSamplingConfig
from stylear_core.runs import write_manifest
from stylear_core.testing.fixtures import tiny_model_cfg
from stylear_core.training.export import export_adapter

TINY = tiny_model_cfg(lora_rank=4, lora_alpha=8.0, noise_strength_infer=0.3)
SAMPLING = SamplingConfig(cfg_scale=3.0, top_k=64, temperature=1.0, noise_strength=0.3)
SEED = 1234
SLOT_RANK = 8
ADAPTER = "ink"
# The two offline paths derive per-sample seeds from a base seed (base * 1_000_003 + offset, mod 2**62);
# 1_000_003 is odd, so a base that makes their first sample's seed SEED exists and is found by inversion.
SEED_MULTIPLIER_INVERSE = pow(1_000_003, -1, 2**62)


def base_seed_for(first_seed: int, offset: int) -> int:
    """The base seed whose first derived sample seed (``base * 1_000_003 + offset``) is ``first_seed``."""
    return (first_seed - offset) * SEED_MULTIPLIER_INVERSE % 2**62


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory) -> Path:
    """One tuned style adapter as training exports it: perturbed LoRA (alpha / r = 2) and resampler."""
    model = build_stylear_model(TINY).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.lora_parameters(), *model.resampler.parameters()]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    root = tmp_path_factory.mktemp("adapters")
    export_adapter(model, root / ADAPTER)
    write_manifest(
        root / ADAPTER,
        ADAPTER_FORMAT,
        status="complete",
        model_config=to_dict(TINY),
        kind="style",
        lora={"r": TINY.lora_rank, "lora_alpha": TINY.lora_alpha},
        base_model=base_model_id(TINY),
    )
    return root


@pytest.fixture(scope="module")
def pair() -> dict:
    return held_pairs(HeldPairsConfig(count=2, num_styles=2), TINY.image_size)[0]


@pytest.fixture(scope="module")
def serving_model(adapters_root):
    """The serving model class itself (outside Serve), on the tiny preset with the adapter root."""
    cfg = load_config(ServingConfig, "serving/configs/tiny.yaml")
    cfg.model = TINY
    cfg.adapters_root = str(adapters_root)
    cfg.adapter_slot_rank = SLOT_RANK
    cfg.sam_enabled = cfg.sam_default = False
    model = StyleARModelDeployment.func_or_class(to_dict(cfg))
    yield model
    model.close()


@dataclass
class Drawn:
    """What one path handed the engine for one image, and the tokens it got back."""

    prompt_ids: list[int]
    style_embeds: torch.Tensor | None
    sampling: tuple[float, int, float]
    uncond_prefix: list[int]
    tokens: torch.Tensor


@pytest.fixture
def drawn(monkeypatch) -> dict[int, list[Drawn]]:
    """Every image any generator draws during the test, by seed: the real engine runs, and what went into
    it (prompt ids, style tokens, sampling settings, the unconditional row's prefix) is kept beside the
    tokens, so paths that answer only with images or scores can be compared too. Offline paths are seen
    at ``StyleARGenerator.generate``; the serving model's at its loop's ``submit``, the tokens once the
    request is done (through the loop's own progress callback)."""
    seen: dict[int, list[Drawn]] = {}
    generate, submit = StyleARGenerator.generate, ContinuousBatchingEngine.submit

    def record(engine, request, seed, tokens):
        sampling = (request.cfg_scale, request.top_k, request.temperature)
        draw = Drawn(
            list(request.prompt_ids), request.style_embeds, sampling, list(engine.uncond_prefix), tokens
        )
        seen.setdefault(seed, []).append(draw)

    def recording(self, requests):
        results = generate(self, requests)
        for request, result in zip(requests, results):
            record(self.engine, request, result.seed, result.tokens)
        return results

    def recording_submit(self, request, adapter=0, on_progress=None):
        def progress(handle):
            if on_progress is not None:
                on_progress(handle)
            if handle.status == "done":  # called once more after the last token, result set
                record(self.engine, request, handle.seed, handle.result.tokens)

        return submit(self, request, adapter, progress)

    monkeypatch.setattr(StyleARGenerator, "generate", recording)
    monkeypatch.setattr(ContinuousBatchingEngine, "submit", recording_submit)
    return seen


def assert_same_draw(got: Drawn, want: Drawn) -> None:
    """The same inputs to the engine (style tokens up to the CLIP batch's rounding) and the same tokens."""
    assert got.prompt_ids == want.prompt_ids
    assert got.sampling == want.sampling and got.uncond_prefix == want.uncond_prefix
    if want.style_embeds is None:
        assert got.style_embeds is None
    else:
        torch.testing.assert_close(got.style_embeds, want.style_embeds, rtol=0, atol=1e-5)
    assert torch.equal(got.tokens, want.tokens)


def serve(model, job: GenerationJob) -> None:
    """One job through the serving model's served path: ``generate``, decoded in its continuous loop."""
    outcome = asyncio.run(model.generate(job))
    assert outcome.status == 200 and outcome.seed == job.seed and outcome.png, outcome


def test_style_tokens_are_the_same_on_every_path(adapters_root, pair, serving_model, drawn):
    adapter = str(adapters_root / ADAPTER)
    prompt, reference = str(pair["prompt"]), decode_image(pair["style_image"])

    # The export parity gate's setup: the serving replica's generator, the adapter in its LoRA slot.
    parity_generator, served = served_generator(TINY, adapter, SLOT_RANK)
    generated = parity_generator.style([prompt], [reference], [SEED], SAMPLING, resampler=served.resampler)
    (want,) = drawn.pop(SEED)
    tokens, layout = generated.tokens[0], generated.layout
    assert torch.equal(want.tokens, tokens)

    # Style evaluation: the first pair's first sample, its seed made SEED.
    eval_sampling = EvalSamplingConfig(**vars(SAMPLING), samples_per_pair=1, seed=base_seed_for(SEED, 0))
    pairs = held_pairs(HeldPairsConfig(count=2, num_styles=2), TINY.image_size)
    (row, *_) = evaluate_variant("tuned", adapter, TINY, pairs, eval_sampling, device="cpu")
    assert row["seed"] == SEED and row["pair_id"] == pair["id"]
    (got,) = drawn.pop(SEED)
    assert_same_draw(got, want)
    codebook = parity_generator.vocab.codebook_size
    assert row["codes_png"] == encode_png(code_map_image(layout.decode(tokens[None])[0], codebook))

    # Preference pairs: the row's first sample is drawn with SEED; chosen or rejected, its tokens are kept.
    row_id = "held-0"
    pref_sampling = PreferenceSamplingConfig(
        **vars(SAMPLING),
        num_samples=2,
        min_margin=-1.0,
        seed=base_seed_for(SEED, zlib.crc32(f"{row_id}/0".encode())),
    )
    sampler = PreferencePairSampler(TINY, adapter, pref_sampling, device="cpu")
    picked = sampler.pair_for_row(row_id, prompt, bytes(pair["style_image"]))
    (got,) = drawn.pop(SEED)
    assert_same_draw(got, want)
    kept = {
        picked["chosen_seed"]: picked["chosen_tokens"],
        picked["rejected_seed"]: picked["rejected_tokens"],
    }
    assert kept[SEED] == tokens.tolist()

    # The serving model, with the adapter as a request naming it gets it.
    job = GenerationJob(
        kind="style",
        prompt=prompt,
        height=TINY.image_size,
        width=TINY.image_size,
        cfg=SAMPLING.cfg_scale,
        top_k=SAMPLING.top_k,
        temperature=SAMPLING.temperature,
        seed=SEED,
        adapter=ADAPTER,
        reference=bytes(pair["style_image"]),
        noise_strength=SAMPLING.noise_strength,
    )
    serve(serving_model, job)
    (got,) = drawn.pop(SEED)
    assert_same_draw(got, want)

    # Without the adapter both the style tokens (base resampler) and the image tokens change, so the
    # comparisons above can tell a path that lost the adapter from one that kept it.
    serve(serving_model, dataclasses.replace(job, adapter=None))
    (base,) = drawn.pop(SEED)
    assert not torch.equal(base.tokens, tokens)
    assert (base.style_embeds - want.style_embeds).abs().max() > 1e-2


def test_text_tokens_are_the_same_for_the_student_and_the_serving_model(adapters_root, serving_model, drawn):
    prompt = "a small house on a hill"
    student = StudentGenerator(adapters_root / ADAPTER, StudentSamplingConfig(**vars(SAMPLING), device="cpu"))
    (image,) = student.generate([prompt], [SEED])
    assert image.size == (TINY.image_size, TINY.image_size)
    (want,) = drawn.pop(SEED)
    job = GenerationJob(
        kind="subject",
        prompt=prompt,
        height=TINY.image_size,
        width=TINY.image_size,
        cfg=SAMPLING.cfg_scale,
        top_k=SAMPLING.top_k,
        temperature=SAMPLING.temperature,
        seed=SEED,
        adapter=ADAPTER,
    )
    serve(serving_model, job)
    (got,) = drawn.pop(SEED)
    assert_same_draw(got, want)
    serve(serving_model, dataclasses.replace(job, adapter=None))
    (base,) = drawn.pop(SEED)
    assert not torch.equal(base.tokens, want.tokens)  # the adapter matters, so the comparison can fail
