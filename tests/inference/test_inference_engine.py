"""The static-cache, batched-CFG engine against the plain no-cache reference decode, on a tiny random backbone."""

from __future__ import annotations

import threading

import pytest
import torch

from stylear_core.data.layout import ImageTokenLayout
from stylear_core.inference.engine import (
    GenerationRequest,
    GenerationRequestError,
    ImageGenerationEngine,
    decode_images,
)
from stylear_core.inference.reference import reference_generate
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.vqgan import tiny_vqgan

VOCAB = tiny_vocab()
TEXT_IDS = (VOCAB.style_placeholder + 1, VOCAB.vocab_size)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return tiny_backbone(VOCAB).eval()


@pytest.fixture(scope="module")
def engine(lm):
    return ImageGenerationEngine(lm, VOCAB)


def prompt(length: int, seed: int, style_tokens: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_IDS, (length,), generator=gen).tolist()
    return [VOCAB.bos, *text[: length // 2], *[VOCAB.style_placeholder] * style_tokens, *text[length // 2 :]]


def test_greedy_batch_of_one_matches_reference(lm, engine):
    request = GenerationRequest(prompt(11, 1), height=64, width=96, top_k=1, cfg_scale=4.0, seed=0)
    (result,) = engine.generate([request])
    expected = reference_generate(lm, VOCAB, request)
    assert result.tokens.shape == (ImageTokenLayout.for_resolution(64, 96, VOCAB).num_tokens,)
    assert torch.equal(result.tokens, expected)


def test_greedy_batch_of_four_mixed_lengths_matches_reference(lm, engine):
    requests = [
        GenerationRequest(prompt(n, 10 + i), height=64, width=64, top_k=1, cfg_scale=scale, seed=i)
        for i, (n, scale) in enumerate([(3, 4.0), (29, 4.0), (12, 2.5), (7, 4.0)])
    ]
    results = engine.generate(requests)
    expected = [reference_generate(lm, VOCAB, r) for r in requests]
    for got, want in zip(results, expected):
        assert torch.equal(got.tokens, want)
    # Different prompts lead somewhere different: the comparison is not between constant outputs.
    assert len({tuple(t.tolist()) for t in expected}) == 4


def test_sampled_tokens_match_reference_and_do_not_depend_on_batch_neighbours(lm, engine):
    requests = [
        GenerationRequest(prompt(n, 20 + i), height=64, width=64, top_k=k, temperature=t, seed=100 + i)
        for i, (n, k, t) in enumerate([(5, 50, 1.0), (19, 2000, 0.7), (9, 8, 1.3)])
    ]
    batched = engine.generate(requests)
    for request, got in zip(requests, batched):
        assert torch.equal(got.tokens, reference_generate(lm, VOCAB, request))
    (alone,) = engine.generate([requests[1]])
    assert torch.equal(alone.tokens, batched[1].tokens)
    reseeded = engine.generate([GenerationRequest(**{**requests[1].__dict__, "seed": 7})])[0]
    assert not torch.equal(reseeded.tokens, batched[1].tokens)


def test_cfg_scale_one_equals_conditional_only(lm, engine):
    base = dict(prompt_ids=prompt(9, 3), height=64, width=64, top_k=1, seed=0)
    # Alone, scale 1 runs no unconditional rows; beside a guided request the batch carries them.
    (alone,) = engine.generate([GenerationRequest(**base, cfg_scale=1.0)])
    beside_guided = engine.generate(
        [
            GenerationRequest(**base, cfg_scale=1.0),
            GenerationRequest(prompt(4, 5), 64, 64, cfg_scale=4.0, top_k=1),
        ]
    )[0]
    (guided,) = engine.generate([GenerationRequest(**base, cfg_scale=4.0)])
    assert torch.equal(alone.tokens, beside_guided.tokens)
    assert torch.equal(alone.tokens, reference_generate(lm, VOCAB, GenerationRequest(**base, cfg_scale=1.0)))
    assert not torch.equal(alone.tokens, guided.tokens)


def test_style_embeddings_replace_placeholders(lm, engine):
    gen = torch.Generator().manual_seed(4)
    style_a = torch.randn(4, 64, generator=gen) * 3
    style_b = torch.randn(4, 64, generator=gen) * 3
    ids = prompt(8, 6, style_tokens=4)
    with_a = GenerationRequest(ids, 64, 64, style_embeds=style_a, top_k=1, seed=0)
    with_b = GenerationRequest(ids, 64, 64, style_embeds=style_b, top_k=1, seed=0)
    got_a, got_b = engine.generate([with_a, with_b])
    assert torch.equal(got_a.tokens, reference_generate(lm, VOCAB, with_a))
    assert torch.equal(got_b.tokens, reference_generate(lm, VOCAB, with_b))
    assert not torch.equal(got_a.tokens, got_b.tokens)


def test_every_output_decodes_to_an_image_of_the_requested_size(engine):
    sizes = [(64, 64), (32, 96), (64, 64), (96, 32)]
    requests = [GenerationRequest(prompt(6, i), h, w, top_k=2000, seed=i) for i, (h, w) in enumerate(sizes)]
    results = engine.generate(requests)
    vq = tiny_vqgan()
    for (h, w), result in zip(sizes, results):
        assert result.layout == ImageTokenLayout.for_resolution(h, w, VOCAB)
        result.layout.decode(result.tokens)  # raises LayoutError on any misplaced token
        (image,) = decode_images(vq, result.layout, result.tokens.unsqueeze(0))
        assert image.size == (w, h)


def test_repeated_calls_reuse_the_cache_and_give_the_same_tokens(engine):
    requests = [GenerationRequest(prompt(n, 30 + n), 64, 64, top_k=40, seed=n) for n in (4, 10)]
    first = engine.generate(requests)
    engine.generate([GenerationRequest(prompt(25, 2), 64, 64, seed=1)])  # another shape in between
    second = engine.generate(requests)
    for a, b in zip(first, second):
        assert torch.equal(a.tokens, b.tokens)
    assert len(engine._decoders) <= engine.max_cached_decoders


def test_batches_padded_to_a_power_of_two_give_the_same_tokens(lm):
    requests = [GenerationRequest(prompt(4 + 3 * i, 40 + i), 64, 64, top_k=30, seed=i) for i in range(3)]
    plain = ImageGenerationEngine(lm, VOCAB).generate(requests)
    padded_engine = ImageGenerationEngine(lm, VOCAB)
    padded_engine.bucket_rows = True  # what CUDA-graph engines do: 3 requests run as 4 (8 rows with CFG)
    padded = padded_engine.generate(requests)
    assert [key[0] for key in padded_engine._decoders] == [8]
    for a, b in zip(plain, padded):
        assert torch.equal(a.tokens, b.tokens)


def test_random_seed_is_reported_and_reproduces(engine):
    (result,) = engine.generate([GenerationRequest(prompt(5, 8), 32, 32, top_k=100)])
    (again,) = engine.generate([GenerationRequest(prompt(5, 8), 32, 32, top_k=100, seed=result.seed)])
    assert torch.equal(result.tokens, again.tokens)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"height": 50}, "height"),
        ({"width": 0}, "width"),
        ({"width": 32 * 40}, "width"),  # more grids than the tiny vocab has grid tokens
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -0.5}, "temperature"),
        ({"prompt_ids": []}, "prompt"),
        ({"prompt_ids": [0] * 4090}, "prompt"),
        ({"prompt_ids": [0, VOCAB.vocab_size]}, "prompt"),
        ({"prompt_ids": [0, VOCAB.style_placeholder]}, "style"),
        ({"prompt_ids": [0, VOCAB.style_placeholder], "style_embeds": torch.zeros(2, 64)}, "style"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_requests_name_the_field(engine, change, field):
    request = GenerationRequest(**{**dict(prompt_ids=prompt(4, 0), height=64, width=64), **change})
    with pytest.raises(GenerationRequestError) as info:
        engine.generate([request])
    assert info.value.field == field


class CancelAfterSteps(threading.Event):
    """A cancel flag that also turns on by itself once ``engine`` has run ``steps`` decode steps in total."""

    def __init__(self, engine: ImageGenerationEngine, steps: int) -> None:
        super().__init__()
        self.engine, self.steps = engine, steps

    def is_set(self) -> bool:
        return super().is_set() or self.engine.counters.steps >= self.steps


def test_a_batch_whose_every_request_is_cancelled_stops_between_steps(lm):
    engine = ImageGenerationEngine(lm, VOCAB)
    full = ImageTokenLayout.for_resolution(256, 256, VOCAB).num_tokens - 4
    requests = [
        GenerationRequest(
            prompt(6, i), 256, 256, top_k=50, seed=i, cancel=CancelAfterSteps(engine, 40 + 10 * i)
        )
        for i in range(2)
    ]
    assert engine.generate(requests) == [None, None]
    counters = engine.counters
    assert counters.steps == 50  # stopped as soon as the last of the two was cancelled
    assert counters.steps + counters.steps_skipped == full
    assert (counters.batches_stopped, counters.requests_dropped) == (1, 2)
    # The engine serves the next request normally after a stop.
    (after,) = engine.generate([GenerationRequest(prompt(6, 0), 64, 64, top_k=1, seed=0)])
    assert torch.equal(
        after.tokens, reference_generate(lm, VOCAB, GenerationRequest(prompt(6, 0), 64, 64, top_k=1, seed=0))
    )


def test_a_cancelled_row_is_dropped_and_its_neighbour_is_unchanged(lm):
    engine = ImageGenerationEngine(lm, VOCAB)
    keep = GenerationRequest(prompt(9, 1), 64, 64, top_k=1, seed=3)
    drop = GenerationRequest(prompt(5, 2), 64, 64, top_k=1, seed=4, cancel=CancelAfterSteps(engine, 5))
    kept, dropped = engine.generate([keep, drop])
    assert dropped is None
    assert torch.equal(kept.tokens, reference_generate(lm, VOCAB, keep))
    assert engine.counters.steps == ImageTokenLayout.for_resolution(64, 64, VOCAB).num_tokens - 4
    assert (engine.counters.batches_stopped, engine.counters.requests_dropped) == (0, 1)


def test_requests_cancelled_before_their_batch_take_no_row_and_no_step(lm):
    engine = ImageGenerationEngine(lm, VOCAB)
    gone = threading.Event()
    gone.set()
    results = engine.generate(
        [
            GenerationRequest(prompt(4, 1), 32, 32, seed=1, cancel=gone),
            GenerationRequest(prompt(4, 2), 64, 64, seed=2, cancel=gone),
            GenerationRequest(prompt(4, 3), 64, 64, top_k=1, seed=3),
        ]
    )
    assert results[:2] == [None, None]
    assert torch.equal(
        results[2].tokens,
        reference_generate(lm, VOCAB, GenerationRequest(prompt(4, 3), 64, 64, top_k=1, seed=3)),
    )
    assert [key[0] for key in engine._decoders] == [2]  # one request (with its CFG row), not two
    assert engine.counters.requests_dropped == 2
