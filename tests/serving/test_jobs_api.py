"""The async job API over real HTTP (tiny preset, one model replica, 127.0.0.1) and its registry actor.

A job runs the synchronous endpoints' path in the background: its progress comes from the model's decode
loop, its events stream as server-sent events, cancelling it frees its decode rows for a queued request,
and a finished job is dropped after the configured TTL.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time

import httpx
import pytest
from PIL import Image

from serving.app import build_app
from serving.jobs import REGISTRY_NAMESPACE, open_registry, registry_name
from stylear_core.data.images import encode_png

APP = "stylear-jobs"
TTL_S = 4.0
# Pixels: a long image decodes for a second or more while the test looks at it; a short one ends at once.
HUGE, LONG, SHORT = 512, 128, 32
PREVIEWED = 256  # about a second of decoding: several preview intervals
MODEL_ONGOING, MODEL_QUEUED = 4, 1
PREVIEW_EVERY_S = 0.2


@pytest.fixture(scope="module")
def registry_cleanup(ray_session):
    """Kills the application's job registry once Serve is shut down: it is detached (outlives replicas)."""
    yield
    with contextlib.suppress(ValueError):  # ValueError: never started
        ray_session.kill(ray_session.get_actor(registry_name(APP), namespace=REGISTRY_NAMESPACE))


@pytest.fixture(scope="module")
def url(registry_cleanup, serve_on_loopback):
    overrides = [
        "sam_enabled=false",
        "sam_default=false",
        "max_slots=4",  # two guided requests fill the pool: a third one queues
        f"job_ttl_s={TTL_S}",
        "job_progress_interval_s=0.05",
        f"job_preview_every_s={PREVIEW_EVERY_S}",
        "min_timeout_s=0",
    ]
    # Small model queues: a burst of jobs overflows them (the cancel test's three calls and a stats call fit).
    model_options = {"max_ongoing_requests": MODEL_ONGOING, "max_queued_requests": MODEL_QUEUED}
    app = build_app(
        {"config_file": "serving/configs/tiny.yaml", "overrides": overrides}, model_options=model_options
    )
    return serve_on_loopback(app, APP)


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def subject_body(side: int, seed: int, **extra) -> dict:
    return {"prompt": "a red kite", "height": side, "width": side, "seed": seed, **extra}


def reference_png() -> bytes:
    return encode_png(Image.new("RGB", (64, 64), (30, 120, 200)))


def submit(client: httpx.Client, kind: str, **kwargs) -> str:
    answer = client.post(f"/v1/jobs/{kind}", **kwargs)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    return answer.json()["id"]


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 60) -> dict:
    """Poll the job until its status is one of ``statuses``; its state then."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.get(f"/v1/jobs/{job_id}").json()
        if state["status"] in statuses:
            return state
        assert time.monotonic() < deadline, f"job stayed {state['status']}, wanted {statuses}"
        time.sleep(0.02)


def decode_stats(client: httpx.Client) -> dict:
    return client.get("/v1/stats").json()["decode"]


def test_progress_increases_over_polls_and_the_image_is_the_synchronous_one(client, ray_session):
    body = subject_body(LONG, seed=7)
    job_id = submit(client, "subject", json=body)
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 60
    while True:
        state = client.get(f"/v1/jobs/{job_id}").json()
        seen.append((state["status"], state["progress"]["tokens_done"]))
        if state["status"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.02)
    assert state["status"] == "done", state["error"]
    done = [tokens for _, tokens in seen]
    assert done == sorted(done), "progress went backwards"
    running = {tokens for status, tokens in seen if status == "running"}
    assert len(running) >= 3, f"too few progress reports reached the registry: {seen}"
    total = state["progress"]["tokens_total"]
    assert state["progress"]["tokens_done"] == total and max(running) < total
    result = state["result"]
    assert (result["seed"], result["width"], result["height"]) == (7, LONG, LONG)

    sync = client.post("/v1/generate/subject", json=body)
    assert sync.status_code == 200, sync.text
    assert base64.b64decode(result["image"]) == sync.content  # the same path, the same image
    assert sync.headers["X-Seed"] == "7"
    # The state lives in the application's named registry actor, which every ingress replica reads.
    registry = ray_session.get_actor(registry_name(APP), namespace=REGISTRY_NAMESPACE)
    assert ray_session.get(registry.get.remote(job_id))["result"] == result


def test_openapi_documents_the_job_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for kind in ("style", "subject"):
        create = paths[f"/v1/jobs/{kind}"]["post"]
        assert create["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/JobAccepted"
        )
        assert {"422", "429", "503"} <= set(create["responses"])
        assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    for path, method in (("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/cancel", "post")):
        responses = paths[path][method]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobState")
        assert responses["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert set(events["200"]["content"]) == {"text/event-stream"} and "404" in events


def read_events(client: httpx.Client, path: str, timeout_s: float = 60) -> tuple[str, list[tuple[str, dict]]]:
    """The server-sent events of ``path`` until the server ends the stream: (content type, [(event, data)])."""
    events: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", path) as answer:
        assert answer.status_code == 200
        name = None
        for line in answer.iter_lines():
            assert time.monotonic() < deadline, "the events stream did not end"
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
        return answer.headers["content-type"], events


def test_events_stream_progress_then_done(client):
    # A style job in a multipart form: the synchronous endpoint's body, its reference as a file part.
    files = {"image": ("ref.png", reference_png(), "image/png")}
    # 256 px (276 tokens) decodes for about a second: many progress intervals, where a 128 px image can
    # finish within two of them on a quiet machine.
    side = str(PREVIEWED)
    data = {"prompt": "a kite in this style", "height": side, "width": side, "seed": "3"}
    job_id = submit(client, "style", data=data, files=files)
    content_type, events = read_events(client, f"/v1/jobs/{job_id}/events")
    assert content_type.startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}, names
    progress = [d["progress"]["tokens_done"] for name, d in events if d["status"] == "running"]
    assert len(progress) >= 3 and progress == sorted(set(progress)), progress  # strictly increasing
    final = events[-1][1]
    assert final["id"] == job_id and final["status"] == "done"
    assert final["result"]["seed"] == 3 and base64.b64decode(final["result"]["image"])[:4] == b"\x89PNG"
    # An ended job's stream gives its last state at once.
    _, again = read_events(client, f"/v1/jobs/{job_id}/events")
    assert [name for name, _ in again] == ["done"]
    assert not any("preview" in d for _, d in events)  # previews only when asked for


def test_events_with_preview_carry_low_resolution_pngs_of_the_image_so_far(client):
    body = subject_body(PREVIEWED, seed=11)
    previews_before = client.get("/v1/stats").json()["previews"]
    job_id = submit(client, "subject", json=body)
    _, events = read_events(client, f"/v1/jobs/{job_id}/events?preview=true")
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}, names
    final = events[-1][1]
    total = final["progress"]["tokens_total"]
    previews = [d["preview"] for _, d in events[:-1] if d.get("preview")]
    assert previews, f"no progress event carried a preview: {[d['progress'] for _, d in events]}"
    for preview in previews:
        image = Image.open(io.BytesIO(base64.b64decode(preview["image"])))
        image.load()
        assert image.format == "PNG" and image.size == (PREVIEWED // 4, PREVIEWED // 4), image.size
        assert (preview["width"], preview["height"]) == image.size
        assert 3 < preview["tokens_done"] < total, preview["tokens_done"]  # a part of the image
    done = [p["tokens_done"] for p in previews]
    print(f"{len(events) - 1} progress events, {len(previews)} with a preview, at tokens {done} of {total}")
    assert done == sorted(set(done)), done  # each preview once, newer ones later
    # The previews were made for this stream only, and the job's result is still the synchronous image.
    assert client.get("/v1/stats").json()["previews"] > previews_before
    assert "preview" not in final and "preview" not in client.get(f"/v1/jobs/{job_id}").json()
    sync = client.post("/v1/generate/subject", json=body)
    assert sync.status_code == 200, sync.text
    assert base64.b64decode(final["result"]["image"]) == sync.content
    bad = client.get(f"/v1/jobs/{job_id}/events?preview=maybe")
    assert bad.status_code == 422 and bad.json()["field"] == "preview", bad.text


def test_cancel_frees_the_rows_for_a_queued_job(client):
    before = decode_stats(client)
    # Two guided long jobs take all four rows; a third waits in the engine's queue.
    first = submit(client, "subject", json=subject_body(HUGE, seed=1))
    second = submit(client, "subject", json=subject_body(HUGE, seed=2))
    wait_for(client, first, {"running"})
    wait_for(client, second, {"running"})
    queued = submit(client, "subject", json=subject_body(SHORT, seed=3))
    deadline = time.monotonic() + 30
    while decode_stats(client)["queued"] == 0:
        assert time.monotonic() < deadline, "the third job never reached the engine's queue"
        time.sleep(0.02)
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"

    cancelled = client.post(f"/v1/jobs/{first}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # The freed rows go to the queued job while the second long one is far from done (without the cancel
    # the first one, as long, would hold its rows until about when the second ends).
    state = wait_for(client, queued, {"running", "done"})
    other = client.get(f"/v1/jobs/{second}").json()
    assert other["status"] == "running", "the rows were not freed by the cancel"
    assert other["progress"]["tokens_done"] < 0.75 * other["progress"]["tokens_total"], other["progress"]
    assert state["status"] in ("running", "done")
    assert client.get(f"/v1/jobs/{first}").json()["status"] == "cancelled"
    _, events = read_events(client, f"/v1/jobs/{first}/events")
    assert [name for name, _ in events] == ["cancelled"]

    assert client.post(f"/v1/jobs/{second}/cancel").json()["status"] == "cancelled"
    assert wait_for(client, queued, {"done"})["result"]["seed"] == 3
    deadline = time.monotonic() + 30
    while (stats := decode_stats(client))["live_rows"] or stats["queued"]:
        assert time.monotonic() < deadline, f"rows still held after the cancels: {stats}"
        time.sleep(0.05)
    assert stats["cancelled"] - before["cancelled"] == 2  # both cancels reached the engine
    assert stats["finished"] - before["finished"] == 1
    # Cancelling an ended job changes nothing.
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "done"


def test_more_jobs_than_the_model_queues_hold_all_finish(client):
    # The model deployment takes 4 calls and queues 1 more: the rest are refused (503) and their jobs wait.
    ids = [submit(client, "subject", json=subject_body(LONG, seed=20 + i)) for i in range(7)]
    states = [wait_for(client, job_id, {"done", "failed", "cancelled"}) for job_id in ids]
    assert [s["status"] for s in states] == ["done"] * 7, [s["error"] for s in states]
    assert [s["result"]["seed"] for s in states] == list(range(20, 27))


def test_unknown_ids_are_404_and_bad_bodies_are_the_synchronous_4xx(client):
    for answer in (
        client.get("/v1/jobs/0123456789abcdef"),
        client.get("/v1/jobs/0123456789abcdef/events"),
        client.post("/v1/jobs/0123456789abcdef/cancel"),
        client.get("/v1/jobs/" + "x" * 500),
    ):
        assert answer.status_code == 404, answer.text
        assert answer.json() == {"error": "job: unknown or expired id", "field": "id"}
    for kind, body in (
        ("subject", subject_body(33, seed=1)),  # not a multiple of 32
        ("subject", {"prompt": "a kite", "cfg": True}),  # strict types
        ("style", {"prompt": "a kite"}),  # no reference
    ):
        job = client.post(f"/v1/jobs/{kind}", json=body)
        sync = client.post(f"/v1/generate/{kind}", json=body)
        assert 400 <= job.status_code < 500 and job.status_code == sync.status_code, job.text
        assert job.json() == sync.json() and job.json()["field"] in ("height", "cfg", "image")


def test_an_error_of_the_model_ends_the_job_failed_with_its_status_and_field(client):
    job_id = submit(client, "subject", json=subject_body(SHORT, seed=1, adapter="missing"))
    state = wait_for(client, job_id, {"done", "failed", "cancelled"})
    sync = client.post("/v1/generate/subject", json=subject_body(SHORT, seed=1, adapter="missing"))
    assert state["status"] == "failed" and state["result"] is None
    assert state["error"] == {"status": sync.status_code, **sync.json()}
    assert state["error"]["field"] == "adapter"
    _, events = read_events(client, f"/v1/jobs/{job_id}/events")
    assert [name for name, _ in events] == ["failed"] and events[0][1]["error"] == state["error"]


def test_a_finished_job_expires_after_the_ttl(client):
    job_id = submit(client, "subject", json=subject_body(SHORT, seed=4))
    state = wait_for(client, job_id, {"done"})
    ended = time.monotonic()
    assert state["result"] is not None
    deadline = ended + TTL_S + 15
    while (answer := client.get(f"/v1/jobs/{job_id}")).status_code == 200:
        assert time.monotonic() < deadline, "the result outlived its TTL"
        time.sleep(0.1)
    assert time.monotonic() - ended >= TTL_S / 2  # kept for about the TTL (not dropped at once), then gone
    assert answer.status_code == 404 and answer.json()["field"] == "id"


def test_the_registry_bounds_jobs_and_fails_those_whose_runner_vanished(ray_session):
    import ray

    registry = open_registry("bounds-test", max_jobs=2, ttl_s=0.3)
    try:
        kept = ray.get(registry.create.remote("subject", 32, 32, None, 60.0))
        orphan = ray.get(registry.create.remote("subject", 32, 32, None, 0.2))  # its runner never reports
        assert kept and orphan
        assert ray.get(registry.create.remote("subject", 32, 32, None, 60.0)) is None  # full
        time.sleep(0.3)
        failed = ray.get(registry.get.remote(orphan))
        assert failed["status"] == "failed" and failed["error"]["status"] == 504
        assert ray.get(registry.wait_end.remote(orphan)) == "failed"
        ray.get(registry.progress.remote(kept, 10, 40))
        ray.get(registry.progress.remote(kept, 5, 40))  # a late, older report does not go back
        assert ray.get(registry.get.remote(kept))["progress"] == {"tokens_done": 10, "tokens_total": 40}
        time.sleep(0.4)  # past the orphan's TTL: its place is free again
        assert ray.get(registry.get.remote(orphan)) is None
        assert ray.get(registry.create.remote("subject", 32, 32, None, 60.0)) is not None
    finally:
        ray.kill(registry)
