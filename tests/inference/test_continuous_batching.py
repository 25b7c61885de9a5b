"""Continuous batching (a pool of row slots over one KV cache) against each request's solo engine run.

Tiny random backbone on CPU. Under greedy decoding a request's tokens must not depend on when it was
admitted, what shares the pool with it or which slots it got, so every test compares with
``ImageGenerationEngine.generate([request])``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stylear_core.adapters.io import write_adapter_dir
from stylear_core.inference.continuous import ContinuousBatchingEngine, GenerationFailedError
from stylear_core.inference.engine import GenerationRequest, GenerationRequestError, ImageGenerationEngine
from stylear_core.inference.multi_lora import MultiLoraPool
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.testing.fixtures import lora_copy

VOCAB = tiny_vocab()
TEXT_IDS = (VOCAB.style_placeholder + 1, VOCAB.vocab_size)
CACHE_LEN = 120


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return ImageGenerationEngine(tiny_backbone(VOCAB).eval(), VOCAB)


def prompt(length: int, seed: int, style_tokens: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_IDS, (length,), generator=gen).tolist()
    return [VOCAB.bos, *text[: length // 2], *[VOCAB.style_placeholder] * style_tokens, *text[length // 2 :]]


def request(i: int, length: int, cfg: float, size=(64, 64), style: bool = False, top_k: int = 1):
    embeds = torch.randn(4, 64, generator=torch.Generator().manual_seed(50 + i)) * 3 if style else None
    ids = prompt(length, 10 + i, style_tokens=4 if style else 0)
    return GenerationRequest(ids, *size, style_embeds=embeds, cfg_scale=cfg, top_k=top_k, seed=100 + i)


def solo(engine, req: GenerationRequest) -> torch.Tensor:
    (result,) = engine.generate([req])
    return result.tokens


def test_staggered_arrivals_with_mixed_guidance_style_and_sizes_give_the_solo_tokens(engine):
    first = [
        request(0, 3, 4.0),
        request(1, 17, 1.0, style=True),
        request(2, 9, 2.5, size=(32, 96)),
    ]
    later = [
        request(3, 5, 1.0, size=(96, 32)),
        request(4, 12, 4.0, style=True),
        request(5, 7, 3.0, top_k=50),  # sampled: its own generator, advanced only at its code positions
    ]
    pool = ContinuousBatchingEngine(engine, max_slots=10, cache_len=CACHE_LEN)
    handles = [pool.submit(r) for r in first]
    for _ in range(4):
        pool.step()
    handles.append(pool.submit(later[0]))
    for _ in range(3):
        pool.step()
    handles += [pool.submit(r) for r in later[1:]]
    pool.run_until_idle(max_steps=200)
    assert [h.admitted_step for h in handles] == [0, 0, 0, 4, 7, 7]
    # Requests admitted in the same step share one prefill forward (prompts of different lengths and
    # sizes, left-padded to the longest), and still get their solo tokens below.
    assert pool.counters.prefills == 6 and pool.counters.prefill_forwards == 3
    for h, req in zip(handles, first + later):
        assert h.status == "done" and h.tokens_done == h.tokens_total
        assert torch.equal(h.result.tokens, solo(engine, req)), h.admitted_step
        assert h.result.seed == req.seed
    # Different prompts lead somewhere different: the comparison is not between constant outputs.
    assert len({tuple(h.result.tokens.tolist()) for h in handles}) == len(handles)
    assert pool.idle and pool.live_rows == 0


def test_more_requests_than_slots_reuse_freed_slots_and_never_exceed_the_pool(engine):
    reqs = [request(10 + i, 4 + 3 * i, 4.0 if i % 2 else 1.0) for i in range(7)]
    pool = ContinuousBatchingEngine(engine, max_slots=4, cache_len=CACHE_LEN)
    rows_seen: list[int] = []
    progress: dict[int, list[int]] = {}

    def report(handle):
        rows_seen.append(pool.live_rows)
        progress.setdefault(id(handle), []).append(handle.tokens_done)

    handles = [pool.submit(r, on_progress=report) for r in reqs]
    pool.run_until_idle(max_steps=500)
    # Progress is reported once per token, from the first image token after the header to the end token.
    for h in handles:
        assert progress[id(h)] == list(range(4, h.tokens_total + 1))
    assert all(h.status == "done" for h in handles)
    assert max(rows_seen) <= 4 and pool.counters.max_live_rows <= 4
    assert pool.counters.prefills == 7 and pool.counters.finished == 7
    # Later requests were admitted into slots freed mid-run, not all at the start.
    assert sum(h.admitted_step > 0 for h in handles) >= 3
    for h, req in zip(handles, reqs):
        assert torch.equal(h.result.tokens, solo(engine, req))


def test_cancelling_a_running_request_frees_its_slots_for_the_queue(engine):
    long_running, waiting = request(20, 6, 4.0, size=(96, 96)), request(21, 8, 4.0)
    pool = ContinuousBatchingEngine(engine, max_slots=2, cache_len=CACHE_LEN)
    a, b = pool.submit(long_running), pool.submit(waiting)
    for _ in range(3):
        pool.step()
    assert a.status == "running" and b.status == "queued"
    a.cancel()
    pool.step()
    assert a.status == "cancelled" and a.wait(timeout=1) is None and a.result is None
    assert b.status == "running" and b.admitted_step == 3
    pool.run_until_idle(max_steps=200)
    assert a.result is None and pool.counters.cancelled == 1
    assert torch.equal(b.result.tokens, solo(engine, waiting))
    # Without the cancel, b would have waited for all of a's steps.
    assert b.admitted_step < a.tokens_total - 4


def test_batch_policy_admits_only_into_an_empty_pool_and_gives_the_same_tokens(engine):
    reqs = [request(30, 5, 1.0), request(31, 11, 4.0, size=(32, 96)), request(32, 7, 1.0)]
    got = {}
    for policy in ("continuous", "batch"):
        pool = ContinuousBatchingEngine(engine, max_slots=4, cache_len=CACHE_LEN, policy=policy)
        handles = [pool.submit(r) for r in reqs[:2]]
        for _ in range(2):
            pool.step()
        handles.append(pool.submit(reqs[2]))
        pool.run_until_idle(max_steps=300)
        got[policy] = handles
        for h, req in zip(handles, reqs):
            assert torch.equal(h.result.tokens, solo(engine, req))
    assert got["continuous"][2].admitted_step == 2
    first_batch_end = max(h.finished_step for h in got["batch"][:2])
    assert got["batch"][2].admitted_step == first_batch_end > 2


def test_background_loop_and_the_adapter_hook(engine):
    seen: list[list[int]] = []
    pool = ContinuousBatchingEngine(
        engine, max_slots=4, cache_len=CACHE_LEN, row_adapters=lambda rows: seen.append(rows.tolist())
    )
    reqs = [request(40, 5, 4.0), request(41, 6, 1.0)]
    pool.start()
    try:
        handles = [pool.submit(reqs[0], adapter=2), pool.submit(reqs[1], adapter=0)]
        results = [h.wait(timeout=60) for h in handles]
    finally:
        pool.stop()
    for result, req in zip(results, reqs):
        assert torch.equal(result.tokens, solo(engine, req))
    # The prefills see their own rows' indices (in one forward when both were queued before the loop
    # woke); decode steps see every row up to the highest live one.
    assert seen[0] == [2, 2, 0] or seen[:2] == [[2, 2], [0]]
    assert [2, 2, 0] in seen
    with pytest.raises(GenerationRequestError) as e:
        ContinuousBatchingEngine(engine, max_slots=2, cache_len=CACHE_LEN).submit(reqs[0], adapter=1)
    assert e.value.field == "adapter"


def test_requests_that_do_not_fit_the_cache_are_refused(engine):
    pool = ContinuousBatchingEngine(engine, max_slots=2, cache_len=40)
    with pytest.raises(GenerationRequestError) as e:
        pool.submit(request(50, 30, 4.0, size=(96, 96)))
    assert e.value.field == "prompt"
    with pytest.raises(GenerationRequestError):
        pool.submit(GenerationRequest(prompt(3, 1), 64, 64, top_k=0))


def test_rows_with_different_adapters_and_the_base_share_the_pool(engine, tmp_path):
    """Per-row adapter indices through a MultiLoraPool: each request gets the tokens of its adapter's
    peft model run alone, while the base and two adapters decode in the same steps."""
    base = engine.lm
    tuned = {}
    for name, seed in (("one", 1), ("two", 2)):
        model = lora_copy(base, rank=4, alpha=8.0, seed=seed)
        write_adapter_dir(tmp_path / name, model, kind="style")
        tuned[name] = model
    served = copy.deepcopy(base)
    adapters = MultiLoraPool(served, capacity=2, max_rank=4)
    slots = {name: adapters.load_dir(tmp_path / name) for name in tuned}
    pool = ContinuousBatchingEngine(
        ImageGenerationEngine(served, VOCAB), max_slots=6, cache_len=CACHE_LEN, row_adapters=adapters.set_rows
    )
    jobs = [(request(60, 5, 4.0), None), (request(61, 9, 1.0), "one"), (request(62, 7, 4.0), "two")]
    handles = [pool.submit(jobs[0][0], adapter=0), pool.submit(jobs[1][0], adapter=slots["one"])]
    for _ in range(3):
        pool.step()
    handles.append(pool.submit(jobs[2][0], adapter=slots["two"]))
    pool.run_until_idle(max_steps=200)
    assert handles[2].admitted_step == 3
    for h, (req, name) in zip(handles, jobs):
        alone = engine if name is None else ImageGenerationEngine(tuned[name], VOCAB)
        assert torch.equal(h.result.tokens, solo(alone, req)), name
    # The adapters change the outcome: the same request on the base model gives other tokens.
    assert not torch.equal(handles[1].result.tokens, solo(engine, jobs[1][0]))


def test_a_failing_request_frees_its_slots_and_the_others_finish(engine):
    reqs = [request(70, 5, 4.0), request(71, 6, 1.0), request(72, 7, 4.0)]
    pool = ContinuousBatchingEngine(engine, max_slots=4, cache_len=CACHE_LEN)
    good = pool.submit(reqs[0])
    pool.step()
    # A style tensor of the right shape but with no data (meta device) passes validation, fails in its prefill.
    broken = pool.submit(
        GenerationRequest(
            prompt(6, 9, style_tokens=4), 64, 64, style_embeds=torch.empty(4, 64, device="meta")
        )
    )

    def explode(handle):
        if handle.tokens_done == 6:
            raise RuntimeError("progress sink is gone")

    noisy = pool.submit(reqs[1], on_progress=explode)
    late = pool.submit(reqs[2])
    pool.run_until_idle(max_steps=200)
    assert broken.status == "failed" and noisy.status == "failed" and pool.counters.failed == 2
    with pytest.raises(GenerationFailedError):
        broken.wait(timeout=1)
    assert noisy.tokens_done == 6
    for h, req in ((good, reqs[0]), (late, reqs[2])):
        assert h.status == "done" and torch.equal(h.result.tokens, solo(engine, req))
    assert pool.idle and pool.live_rows == 0


def test_a_request_that_would_overrun_the_cache_when_padded_is_prefilled_on_its_own(engine):
    long_prompt, big_image = request(80, 30, 4.0, size=(32, 32)), request(81, 3, 4.0, size=(96, 96))
    tight = ContinuousBatchingEngine(engine, max_slots=4, cache_len=CACHE_LEN)
    cache_len = tight.columns_needed(big_image, engine.validate(big_image))
    pool = ContinuousBatchingEngine(engine, max_slots=4, cache_len=cache_len)
    handles = [pool.submit(long_prompt), pool.submit(big_image)]
    pool.run_until_idle(max_steps=200)
    # Padded to the long prompt, the big image would need more columns than the cache has: two forwards.
    assert [h.admitted_step for h in handles] == [0, 0] and pool.counters.prefill_forwards == 2
    for h, req in zip(handles, (long_prompt, big_image)):
        assert h.status == "done" and torch.equal(h.result.tokens, solo(engine, req))
