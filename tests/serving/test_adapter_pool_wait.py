"""A request whose adapter finds every pool slot in use is woken by the release, not by polling.

The model class is built outside Serve (no HTTP) with one adapter slot; its served path ``generate`` runs
on an event loop while the decode loop runs on its own thread, as in a replica.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.config import ServingConfig
from serving.model import StyleARModelDeployment
from serving.schemas import GenerationJob
from stylear_core.config import load_config, to_dict
from stylear_core.testing.fixtures import tiny_model_cfg, write_subject_adapters

TINY = tiny_model_cfg()
LONG, SHORT = 128, 32  # the long request holds the only adapter slot while the short one waits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = write_subject_adapters(tmp_path_factory.mktemp("adapters"), TINY)
    cfg = load_config(ServingConfig, "serving/configs/tiny.yaml")
    cfg.model = TINY
    cfg.adapters_root = str(root)
    cfg.sam_enabled = cfg.sam_default = False
    cfg.max_adapters_per_replica = 1
    model = StyleARModelDeployment.func_or_class(to_dict(cfg))
    yield model
    model.close()


def subject_job(adapter: str, word: str, side: int, seed: int) -> GenerationJob:
    return GenerationJob(
        kind="subject", prompt=f"a photo of {word} {adapter}", height=side, width=side, cfg=3.0, top_k=64,
        temperature=1.0, seed=seed, adapter=adapter,
    )  # fmt: skip


async def until(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def test_a_waiting_adapter_starts_as_soon_as_the_slot_is_released(model, monkeypatch):
    released: list[float] = []  # when a request gave its adapter slot back
    submitted: dict[str, float] = {}  # when a request of each adapter reached the decode loop
    tries: list[str] = []  # every attempt to take a pool slot, by adapter
    release, acquire, submit = model._release, model._acquire, model.loop.submit

    def releasing(name):
        release(name)
        released.append(time.perf_counter())

    def acquiring(adapter, wake=None):
        tries.append(adapter.name)
        return acquire(adapter, wake)

    def submitting(request, adapter=0, on_progress=None):
        submitted[{slot: name for name, slot in model.pool.slots.items()}[adapter]] = time.perf_counter()
        return submit(request, adapter, on_progress)

    monkeypatch.setattr(model, "_release", releasing)
    monkeypatch.setattr(model, "_acquire", acquiring)
    monkeypatch.setattr(model.loop, "submit", submitting)

    async def scenario():
        dog = asyncio.create_task(model.generate(subject_job("dog", "sks", LONG, 1)))
        await until(lambda: model.loop.running, "the dog request decodes")
        cat = asyncio.create_task(model.generate(subject_job("cat", "zwx", SHORT, 2)))
        await until(lambda: model._pool_waiting == 1, "the cat request waits for the slot")
        return await dog, await cat

    waits = model._pool_waits
    dog, cat = asyncio.run(scenario())
    assert (dog.status, cat.status) == (200, 200), (dog, cat)
    assert model._pool_waits == waits + 1 and model._pool_waiting == 0
    # One refused try while dog decoded (a poll would have retried every few ms), one after the release.
    assert tries.count("cat") == 2, tries
    woke_after = submitted["cat"] - released[0]
    print(f"cat reached the decode loop {woke_after * 1000:.1f} ms after dog's release")
    assert 0 <= woke_after < 0.25, woke_after
