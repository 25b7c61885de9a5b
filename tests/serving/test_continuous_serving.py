"""The model replica's continuous-batching loop over real HTTP (tiny preset, one replica, 127.0.0.1).

A request that arrives while another decodes joins the running batch at the next step, with its own
adapter (or none) in the same forward; a request whose adapter finds every pool slot in use waits for
one instead of failing.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serving.app import build_app
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.presets import build_backbone, tiny_vqgan_codebook_size
from stylear_core.testing.fixtures import lora_copy, tiny_model_cfg, write_subject_adapters

TINY = tiny_model_cfg()
LONG, SHORT = 128, 32  # the long request decodes while the short one arrives


def tuned_copy(seed: int):
    """The served tiny base with a LoRA whose factors are random, as if trained."""
    return lora_copy(build_backbone(TINY)[0], rank=4, alpha=4.0, seed=seed, scale=0.3)


@pytest.fixture(scope="module")
def url(serve_on_loopback, tmp_path_factory):
    root = write_subject_adapters(tmp_path_factory.mktemp("adapters"), TINY)
    overrides = [
        f"adapters_root={root}",
        "sam_enabled=false",
        "max_adapters_per_replica=1",  # one pool slot: a second adapter must wait for it
        "max_slots=8",
    ]
    app = build_app({"config_file": "serving/configs/tiny.yaml", "overrides": overrides})
    return serve_on_loopback(app, "stylear-continuous")


def full_steps(side: int) -> int:
    """Decode steps a whole ``side`` x ``side`` image takes (its tokens minus the prompt's header and end)."""
    vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    return ImageTokenLayout.for_resolution(side, side, vocab).num_tokens - 4


async def long_then_short(
    url: str, long_body: dict, short_body: dict, short_first: bool
) -> tuple[httpx.Response, ...]:
    """Send ``long_body``; once the replica reports it decoding, send ``short_body``; both answers.

    Checks that the short answer came before the long one (``short_first``) or after it.
    """
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        first = asyncio.create_task(c.post("/v1/generate/subject", json=long_body))
        deadline = time.monotonic() + 60
        while (await c.get("/v1/stats")).json()["decode"]["live_requests"] == 0:
            assert not first.done(), "the long request ended before the replica reported it decoding"
            assert time.monotonic() < deadline, "the long request never started decoding"
            await asyncio.sleep(0.02)
        second = await c.post("/v1/generate/subject", json=short_body)
        assert first.done() != short_first, "the answers came in the other order"
        return await first, second


def test_a_request_joins_a_running_decode_with_another_adapter(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        before = c.get("/v1/stats").json()["decode"]
    dog = {"prompt": "a photo of sks dog", "adapter": "dog", "height": LONG, "width": LONG, "seed": 1}
    plain = {"prompt": "a kite", "height": SHORT, "width": SHORT, "seed": 2}
    long_answer, short_answer = asyncio.run(long_then_short(url, dog, plain, short_first=True))
    assert long_answer.status_code == 200, long_answer.text
    assert short_answer.status_code == 200, short_answer.text
    with httpx.Client(base_url=url, timeout=120) as c:
        after = c.get("/v1/stats").json()["decode"]
    steps = after["steps"] - before["steps"]
    # Decoded one after the other they would take every step of both; together, the short one's steps
    # were the long one's.
    assert steps == full_steps(LONG), (steps, full_steps(LONG), full_steps(SHORT))
    assert after["max_live_rows"] >= 4  # both guided requests' rows (two each) in one step
    assert after["prefills"] - before["prefills"] == 2


def test_an_adapter_waits_for_the_pool_slot_another_adapter_uses(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        waits = c.get("/v1/stats").json()["pool_waits"]
    dog = {"prompt": "a photo of sks dog", "adapter": "dog", "height": LONG, "width": LONG, "seed": 3}
    cat = {"prompt": "a photo of zwx cat", "adapter": "cat", "height": SHORT, "width": SHORT, "seed": 4}
    long_answer, short_answer = asyncio.run(long_then_short(url, dog, cat, short_first=False))
    assert (long_answer.status_code, short_answer.status_code) == (200, 200), short_answer.text
    with httpx.Client(base_url=url, timeout=120) as c:
        stats = c.get("/v1/stats").json()
    assert stats["pool_waits"] == waits + 1  # cat waited for dog's slot instead of failing
    assert stats["pool_adapters"] == {"cat": 1}
