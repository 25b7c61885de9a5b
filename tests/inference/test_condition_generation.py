"""Condition images through the generator and the serving model: bytes -> FlexAR tokens in the prompt -> engine.

What reaches the engine is recorded around :meth:`StyleARGenerator.generate` (offline) and the serving
model's continuous-batching loop (``submit``, the tokens once done; the real engines run) and compared with an independent composition: the tiny VQGAN's ``encode_images`` laid out by
``ImageTokenLayout``, put where the condition wording's ``<image>`` id stands.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from serving.config import ServingConfig
from serving.model import StyleARModelDeployment
from serving.schemas import GenerationJob
from stylear_core.config import load_config, to_dict
from stylear_core.data.images import encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.tokenizer import style_prompt_ids
from stylear_core.inference.continuous import ContinuousBatchingEngine
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.generator import StyleARGenerator
from stylear_core.models.vqgan import encode_images, tiny_vqgan
from stylear_core.testing.fixtures import tiny_model_cfg
from stylear_core.testing.tiny_depth import build_tiny_depth_estimator

TINY = tiny_model_cfg()
GREEDY = SamplingConfig(cfg_scale=10.0, top_k=64, temperature=0.0, noise_strength=0.0)


def depth_like(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A grey image with a bright (near) box, like a depth map."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (40, 40, 40))
    x, y = (int(v) for v in rng.integers(0, 32, 2))
    ImageDraw.Draw(image).rectangle((x, y, x + 28, y + 28), fill=(230, 230, 230))
    return image


def expected_prompt(generator: StyleARGenerator, prompt: str, condition: Image.Image, size: int) -> list[int]:
    """The condition wording with the condition's tokens at ``<image>``, composed without the generator."""
    vocab = generator.vocab
    ids = style_prompt_ids(generator.tokenizer, prompt, TINY.num_style_tokens, size, size, condition=True)
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    tokens = layout.encode(encode_images(tiny_vqgan(seed=TINY.seed), [condition], size))[0].tolist()
    k = ids.index(vocab.image_placeholder)
    return ids[:k] + tokens + ids[k + 1 :]


@pytest.fixture(scope="module")
def serving_model():
    """The serving model class itself (outside Serve) on the tiny preset, SAM off."""
    cfg = load_config(ServingConfig, "serving/configs/tiny.yaml")
    cfg.model = TINY
    cfg.sam_enabled = cfg.sam_default = False
    model = StyleARModelDeployment.func_or_class(to_dict(cfg))
    yield model
    model.close()


@pytest.fixture
def drawn(monkeypatch) -> list[tuple[list[int], torch.Tensor]]:
    """(prompt ids, image tokens) of every image the engines draw during the test, in the order they end."""
    seen = []
    generate, submit = StyleARGenerator.generate, ContinuousBatchingEngine.submit

    def recording(self, requests):
        results = generate(self, requests)
        seen.extend((list(q.prompt_ids), r.tokens) for q, r in zip(requests, results))
        return results

    def recording_submit(self, request, adapter=0, on_progress=None):
        def progress(handle):
            if on_progress is not None:
                on_progress(handle)
            if handle.status == "done":  # called once more after the last token, result set
                seen.append((list(request.prompt_ids), handle.result.tokens))

        return submit(self, request, adapter, progress)

    monkeypatch.setattr(StyleARGenerator, "generate", recording)
    monkeypatch.setattr(ContinuousBatchingEngine, "submit", recording_submit)
    return seen


def run_job(model, **fields):
    """One style job (greedy, strong guidance) through the serving model's served path (``generate``)."""
    job = {
        "kind": "style", "prompt": "a lighthouse", "height": 64, "width": 64, "cfg": 10.0, "top_k": 64,
        "temperature": 0.0, "seed": 3, "reference": encode_png(depth_like(9)), "noise_strength": 0.0,
    }  # fmt: skip
    return asyncio.run(model.generate(GenerationJob(**{**job, **fields})))


def test_condition_bytes_reach_the_engine_as_tokens_in_the_prompt(serving_model, drawn):
    condition = depth_like(1)
    outcome = run_job(serving_model, condition=encode_png(condition))
    assert outcome.status == 200 and outcome.png, outcome
    ((prompt_ids, tokens),) = drawn
    assert prompt_ids == expected_prompt(serving_model.generator, "a lighthouse", condition, 64)

    # The offline front-end composes the same request from the image: same prompt, same tokens.
    generator = serving_model.generator
    reference = depth_like(9)
    offline = generator.style(["a lighthouse"], [reference], [3], GREEDY, conditions=[condition])
    assert drawn[1][0] == prompt_ids and torch.equal(offline.tokens[0], tokens)
    # The condition steers the image: another condition, or none, draws other tokens.
    other = generator.style(["a lighthouse"], [reference], [3], GREEDY, conditions=[depth_like(2)])
    plain = generator.style(["a lighthouse"], [reference], [3], GREEDY)
    assert not torch.equal(other.tokens[0], tokens) and not torch.equal(plain.tokens[0], tokens)


def test_a_photo_becomes_a_depth_condition_through_the_estimator(serving_model, drawn):
    estimator = build_tiny_depth_estimator(seed=0)
    generator = serving_model.generator
    generator.conditions.depth_estimator = estimator
    try:
        photo = Image.new("RGB", (80, 64), (30, 120, 200))
        ImageDraw.Draw(photo).ellipse((10, 10, 50, 50), fill=(250, 220, 0))
        generator.style(["a lighthouse"], [photo], [5], GREEDY, conditions=[photo], depth=True)
    finally:
        generator.conditions.depth_estimator = None
    (depth_map,) = estimator([photo])
    assert drawn[0][0] == expected_prompt(generator, "a lighthouse", depth_map, 64)


def test_bad_condition_images_fail_their_request_naming_the_field(serving_model):
    png = encode_png(Image.effect_noise((64, 64), 60).convert("RGB"))
    outcome = run_job(serving_model, condition=png[: len(png) // 2])  # the header passes, the data ends
    assert (outcome.status, outcome.field) == (400, "condition") and "condition" in outcome.error
    outcome = run_job(serving_model, condition=b"\x89PNG\r\n\x1a\n not an image")
    assert (outcome.status, outcome.field) == (400, "condition")
    assert run_job(serving_model, condition=encode_png(depth_like(1)), prompt="x <image>").field == "prompt"
    # A size the vocabulary cannot lay out names the size, as without a condition.
    outcome = run_job(serving_model, condition=encode_png(depth_like(1)), height=1024)
    assert (outcome.status, outcome.field) == (422, "height")
    # A prompt too long for the model only because of its condition's tokens names the condition.
    positions, serving_model.engine.max_positions = serving_model.engine.max_positions, 150  # a shorter model
    try:
        assert run_job(serving_model).status == 200  # 24 image tokens fit beside the prompt alone
        outcome = run_job(serving_model, condition=encode_png(depth_like(1)))
    finally:
        serving_model.engine.max_positions = positions
    assert (outcome.status, outcome.field) == (
        422,
        "condition",
    ) and "condition image's 24 tokens" in outcome.error
