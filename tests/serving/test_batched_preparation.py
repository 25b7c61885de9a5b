"""A replica batches what queues up on its preparation thread: style references go through CLIP and the
resampler together (a request gets its solo style tokens up to float rounding: a batched matmul sums in
another order), finished images are handed over together and VQ-decoded one by one, so a request's PNG
is the same bytes as alone.

The model class is built outside Serve (no HTTP); its served path ``generate`` runs on an event loop while
the decode loop runs on its own thread, as in a replica. To make the queue form deterministically, the
test parks the preparation thread on a gate (an extra work kind) while requests arrive.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from PIL import Image

from serving.batching import BatchingWorker
from serving.config import ServingConfig
from serving.model import StyleARModelDeployment
from serving.schemas import GenerationJob
from stylear_core.config import load_config, to_dict
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.synthetic import SyntheticStyleSet
from stylear_core.inference.engine import GenerationResult
from stylear_core.testing.fixtures import tiny_model_cfg

TINY = tiny_model_cfg()


@pytest.fixture(scope="module")
def model():
    cfg = load_config(ServingConfig, "serving/configs/tiny.yaml")
    cfg.model = TINY
    cfg.sam_enabled = cfg.sam_default = False
    cfg.max_slots = 8
    model = StyleARModelDeployment.func_or_class(to_dict(cfg))
    yield model
    model.close()


def jobs() -> list[GenerationJob]:
    refs = list(SyntheticStyleSet(seed=3).style_references(3).values())
    greedy = dict(cfg=3.0, top_k=1, temperature=1.0)
    return [
        GenerationJob(kind="style", prompt="a red circle", height=32, width=32, seed=1, reference=refs[0], **greedy),
        GenerationJob(kind="style", prompt="a blue square", height=32, width=32, seed=2, reference=refs[1],
                      noise_strength=0.5, **greedy),
        GenerationJob(kind="subject", prompt="a green star", height=32, width=32, seed=3, **greedy),
        GenerationJob(kind="style", prompt="a circle on the left", height=64, width=64, seed=4,
                      reference=refs[2], **greedy),
    ]  # fmt: skip


def queued(worker: BatchingWorker, kind: str) -> int:
    with worker._cond:
        return sum(1 for entry in worker._queue if entry[0] == kind)


async def until(condition, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def test_queued_requests_are_prepared_and_decoded_in_batches(model):
    worker = model._worker
    gates = [threading.Event(), threading.Event()]
    worker.handlers["hold"] = lambda items: [gates[item].wait(120) for item in items]

    async def scenario():
        first: Future = worker.submit("hold", 0)  # parks the thread while the four requests arrive
        tasks = [asyncio.create_task(model.generate(job)) for job in jobs()]
        await until(lambda: queued(worker, "prepare") == 4, "four preparations queue")
        worker.submit("hold", 1)  # parks it again once they are prepared, while they decode
        gates[0].set()
        await asyncio.wrap_future(first)
        await until(lambda: queued(worker, "decode") == 4, "four finished images queue for decoding")
        gates[1].set()
        return await asyncio.gather(*tasks)

    before = dict(worker.batch_sizes)
    together = asyncio.run(scenario())
    batches = {k: v - before.get(k, 0) for k, v in worker.batch_sizes.items() if v != before.get(k, 0)}
    assert batches == {("hold", 1): 2, ("prepare", 4): 1, ("decode", 4): 1}
    assert [o.status for o in together] == [200] * 4, together
    assert [o.seed for o in together] == [1, 2, 3, 4]
    assert [Image.open(io.BytesIO(o.png)).size for o in together] == [(32, 32)] * 3 + [(64, 64)]


def test_a_batch_gives_each_request_its_solo_style_tokens_and_pixels(model):
    alone = [model._prepare_batch([(job, None)])[0] for job in jobs()]
    together = model._prepare_batch([(job, None) for job in jobs()])
    for solo, batched in zip(alone, together):
        assert batched.prompt_ids == solo.prompt_ids and batched.seed == solo.seed
        if solo.style_embeds is None:
            assert batched.style_embeds is None
        else:  # noise 0.5 on request 2: its own seed's noise, whatever the neighbours
            torch.testing.assert_close(batched.style_embeds, solo.style_embeds, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0].style_embeds, together[1].style_embeds)

    gen = torch.Generator().manual_seed(0)
    results = []
    # 16 images: batched convolutions would move some pixel of about 4 in 10 of them by a grey level.
    for seed, side in enumerate([32, 64] + [32] * 14, start=1):
        layout = ImageTokenLayout.for_resolution(side, side, model.generator.vocab)
        codes = torch.randint(
            0, layout.vocab.codebook_size, (layout.h_latent, layout.w_latent), generator=gen
        )
        results.append(GenerationResult(tokens=layout.encode(codes), layout=layout, seed=seed))
    solo = [model._decode_batch([r])[0] for r in results]
    batched = model._decode_batch(results)
    assert [o.seed for o in batched] == list(range(1, 17))
    assert [o.png for o in batched] == [o.png for o in solo]
    assert np.asarray(Image.open(io.BytesIO(batched[0].png))).std() > 0


def test_a_failing_reference_fails_only_its_own_request_in_a_batch(model):
    good, bad = jobs()[0], jobs()[1]
    bad.reference = b"not an image"
    worker = model._worker
    gate = threading.Event()
    worker.handlers["hold"] = lambda items: [gate.wait(120) for _ in items]

    async def scenario():
        worker.submit("hold", None)
        tasks = [asyncio.create_task(model.generate(job)) for job in (good, bad)]
        await until(lambda: queued(worker, "prepare") == 2, "both preparations queue")
        gate.set()
        return await asyncio.gather(*tasks)

    ok, refused = asyncio.run(scenario())
    assert ok.status == 200 and ok.png
    assert (refused.status, refused.field) == (400, "image")


def test_the_worker_runs_the_oldest_kind_first_and_caps_batches():
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Event()
    worker = BatchingWorker(
        {
            "hold": lambda items: [gate.wait(30) for _ in items],
            "a": lambda items: seen.append(("a", items)) or items,
            "b": lambda items: seen.append(("b", items)) or [-i for i in items],
        },
        max_batch=2,
    )
    try:
        worker.submit("hold", None)
        futures = [worker.submit(kind, i) for i, kind in enumerate("abaab")]
        cancelled = worker.submit("a", 99)
        assert cancelled.cancel()  # still queued: dropped, never handed to the handler
        gate.set()
        assert [f.result(30) for f in futures] == [0, -1, 2, 3, -4]
        assert seen == [("a", [0, 2]), ("b", [1, 4]), ("a", [3])]
        with pytest.raises(KeyError):
            worker.submit("c", 0)
    finally:
        worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit("a", 0)
