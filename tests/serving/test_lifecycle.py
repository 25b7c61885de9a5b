"""The service's request lifecycle on a real two-replica Serve app (tiny models, HTTP on 127.0.0.1).

A request whose client gives up stops its decode on the replica; a model replica killed with
``kill -9`` under steady load costs (almost) no request, since the ingress resends a call whose
replica died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from serving.app import serving_config
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.presets import tiny_vqgan_codebook_size

MODEL_REPLICAS = 2
LONG_SIDE = 512  # the tiny config's max_side: the longest decode a request can ask for


@pytest.fixture(scope="module")
def url(serve_on_loopback):

    from serving.ingress import StyleARIngress
    from serving.model import StyleARModelDeployment
    from stylear_core.config import to_dict

    config = to_dict(
        serving_config(
            {
                "config_file": "serving/configs/tiny.yaml",
                "overrides": ["sam_enabled=false", "min_timeout_s=0"],
            }
        )
    )
    model = StyleARModelDeployment.options(num_replicas=MODEL_REPLICAS).bind(config)
    return serve_on_loopback(StyleARIngress.bind(model, config), "stylear-lifecycle")


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def replica_stats(client: httpx.Client, count: int = MODEL_REPLICAS, tries: int = 60) -> dict[str, dict]:
    """``/v1/stats`` of every model replica, by replica id (the router picks a replica at random per call)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        stats = client.get("/v1/stats").json()
        seen[stats["replica"]] = stats
        if len(seen) == count:
            return seen
    raise AssertionError(f"saw {len(seen)} of {count} model replicas in {tries} calls to /v1/stats")


def totals(stats: dict[str, dict]) -> dict[str, int]:
    """Cancellations and decode counters summed over replicas."""
    out = {"cancelled": sum(s["cancelled"] for s in stats.values())}
    for key in ("steps", "steps_skipped", "batches_stopped", "requests_dropped"):
        out[key] = sum(s["decode"][key] for s in stats.values())
    return out


def small_request(client: httpx.Client, seed: int) -> httpx.Response:
    return client.post(
        "/v1/generate/subject", json={"prompt": "a kite", "height": 32, "width": 32, "seed": seed}
    )


def test_a_request_that_times_out_stops_its_decode_and_frees_the_replica(client):
    vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    full_steps = ImageTokenLayout.for_resolution(LONG_SIDE, LONG_SIDE, vocab).num_tokens - 4
    assert small_request(client, 0).status_code == 200  # warm: both replicas built, routes known
    before = totals(replica_stats(client))

    body = {"prompt": "a long road", "height": LONG_SIDE, "width": LONG_SIDE, "seed": 1, "timeout_s": 0.5}
    started = time.monotonic()
    r = client.post("/v1/generate/subject", json=body)
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 10

    # The replica learns of the cancellation and stops the decode between steps (bounded wait).
    deadline = time.monotonic() + 30
    while True:
        after = totals(replica_stats(client))
        if after["batches_stopped"] > before["batches_stopped"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["cancelled"] == 1, delta
    assert delta["batches_stopped"] == 1, delta
    assert delta["requests_dropped"] == 1, delta
    # Far fewer steps ran than the image needs; the rest were skipped.
    assert delta["steps"] < full_steps // 2, (delta, full_steps)
    assert delta["steps"] + delta["steps_skipped"] == full_steps, (delta, full_steps)

    r = small_request(client, 2)
    assert r.status_code == 200, r.text


async def load_with_a_kill(url: str, total: int, concurrency: int, kill_after: int, pid: int) -> list[int]:
    """``total`` cheap requests from ``concurrency`` clients, ``kill -9`` of ``pid`` once ``kill_after`` are
    answered; the status of each request."""
    statuses: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    midway = asyncio.Event()

    async def worker(c: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"prompt": f"a kite {i}", "height": 64, "width": 64, "seed": i, "timeout_s": 60}
            r = await c.post("/v1/generate/subject", json=body)
            statuses.append(r.status_code)
            if len(statuses) >= kill_after:
                midway.set()

    async def killer() -> None:
        await midway.wait()
        # Not on the heels of an answer (the replica may just have emptied its batch): let the clients'
        # next requests reach the replicas, so the killed one dies with accepted work in flight.
        await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    async with httpx.AsyncClient(base_url=url, timeout=90) as c:
        kill = asyncio.create_task(killer())
        await asyncio.wait_for(asyncio.gather(*(worker(c) for _ in range(concurrency))), timeout=180)
        assert kill.done(), "the load ended before the replica was killed"
    return statuses


def test_killing_a_model_replica_under_load_loses_at_most_one_percent(client, url):
    victim = next(iter(replica_stats(client).values()))
    total = 150
    statuses = asyncio.run(
        load_with_a_kill(url, total, concurrency=8, kill_after=total // 3, pid=victim["pid"])
    )
    assert len(statuses) == total
    ok = statuses.count(200)
    failed = [s for s in statuses if s != 200]
    assert ok >= 0.99 * total, f"{ok}/{total} succeeded; failures {failed}"
    assert all(s == 503 for s in failed), failed  # a lost replica is "unavailable", never a 500
    # The victim is gone: every stats answer now comes from another replica (or its replacement).
    pids = {client.get("/v1/stats").json()["pid"] for _ in range(6)}
    assert victim["pid"] not in pids
