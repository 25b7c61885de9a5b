"""Hostile style references against the running service (tiny preset, 127.0.0.1, default image limits).

A huge reference with SAM must not stall the model replica (its health checks keep answering), and
files shaped or encoded to break the decoder must get a 4xx naming ``image``, never a 5xx.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from serving.app import build_app
from stylear_core.data.images import encode_png
from stylear_core.data.synthetic import corrupt_bytes


@pytest.fixture(scope="module")
def url(serve_on_loopback):

    app = build_app({"config_file": "serving/configs/tiny.yaml"})  # 8 MiB, 4096^2 px, 8192 px side, 4:1
    return serve_on_loopback(app, "stylear-hostile")


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def encoded(image: Image.Image, format: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


def reference(side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), (30, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(250, 220, 0))  # the "object"
    for x in range(0, side, side // 32):
        draw.line((x, 0, x, side), fill=(10, 10, 10), width=max(1, side // 256))  # the "style"
    return image


def dds_with_unknown_pixel_flags() -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "DDS"))
    struct.pack_into("<I", data, 80, 0x80000000)  # DDS_PIXELFORMAT.dwFlags: no flag Pillow knows
    return bytes(data)


def style_request(client: httpx.Client, data: bytes, **form: str) -> httpx.Response:
    fields = {"prompt": "a lighthouse", "height": "32", "width": "32", "seed": "3", **form}
    return client.post(
        "/v1/generate/style", data=fields, files={"image": ("ref", data, "application/octet-stream")}
    )


def test_a_4096px_reference_with_sam_answers_while_health_checks_keep_answering(url):
    data = encode_png(reference(4096))
    assert len(data) < 8 * 2**20  # within the upload limit: only its pixel count is large

    async def scenario() -> tuple[httpx.Response | None, float, list[tuple[int | None, float]]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            started = time.perf_counter()
            fields = {"prompt": "a lighthouse", "sam": "true", "height": "32", "width": "32", "seed": "3"}
            generate = asyncio.create_task(
                c.post("/v1/generate/style", data=fields, files={"image": ("big.png", data, "image/png")})
            )
            probes: list[tuple[int | None, float]] = []
            while not generate.done() and time.perf_counter() - started < 60:  # bounded in time
                sent = time.perf_counter()
                try:
                    status = (await c.get("/healthz", timeout=10)).status_code
                except httpx.TimeoutException:
                    status = None
                probes.append((status, time.perf_counter() - sent))
                await asyncio.sleep(0.1)
            if not generate.done():
                generate.cancel()
                return None, time.perf_counter() - started, probes
            return await generate, time.perf_counter() - started, probes

    response, seconds, probes = asyncio.run(scenario())
    assert response is not None, f"no answer within {seconds:.0f} s; health probes: {probes}"
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    assert seconds < 30
    assert probes and all(status == 200 and latency < 2.0 for status, latency in probes), probes


HOSTILE = {
    # Within 4096^2 pixels, but CLIP's resize of the 1-px side to 224 needs ~275 GB.
    "1x16777216 PNG": (lambda: encode_png(Image.new("L", (1, 16_777_216))), 413),
    "100000x1 PNG": (lambda: encode_png(Image.new("L", (100_000, 1))), 413),
    "8000x1 PNG": (lambda: encode_png(Image.new("L", (8000, 1))), 422),  # sides fine, aspect 8000:1
    "truncated QOI": (lambda: encoded(reference(64), "QOI")[:200], 415),
    "truncated DDS": (lambda: encoded(reference(64), "DDS")[:4000], 415),
    "DDS with unknown pixel flags": (dds_with_unknown_pixel_flags, 415),
    "GIF": (lambda: encoded(reference(64), "GIF"), 415),
    "truncated PNG": (lambda: corrupt_bytes("truncated"), 400),  # header fine: fails on the replica
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_references_get_a_4xx_naming_the_image(client, name):
    build, status = HOSTILE[name]
    r = style_request(client, build(), sam="true")
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["field"] == "image"
    assert body["error"] and "Traceback" not in body["error"]


def test_the_accepted_formats_still_work_and_nothing_failed_with_a_5xx(client):
    for format in ("JPEG", "WEBP"):
        r = style_request(client, encoded(reference(2000), format))
        assert r.status_code == 200, (format, r.text)
    failures = client.get("/v1/stats").json()["failures"]
    assert not [status for status in failures if int(status) >= 500], failures
