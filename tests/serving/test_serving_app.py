"""The Ray Serve application end to end on 127.0.0.1: tiny models, real HTTP, real batching and adapters."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image, ImageDraw

from serving.app import build_app
from serving.config import ServingConfig
from stylear_core.adapters.format import base_model_id
from stylear_core.adapters.io import write_adapter_dir
from stylear_core.config import ConfigError
from stylear_core.data.images import encode_png
from stylear_core.models.presets import ModelConfig, build_backbone, build_resampler, build_style_encoder
from stylear_core.testing.fixtures import lora_copy, tiny_model_cfg

TINY = tiny_model_cfg()
MAX_UPLOAD = 200_000
MAX_PIXELS = 512 * 512


def tuned_copy(seed: int):
    """The served tiny base with a LoRA whose factors are random, as if trained."""
    return lora_copy(build_backbone(TINY)[0], rank=4, alpha=4.0, seed=seed, scale=0.3)


def write_adapters(root) -> None:
    encoder = build_style_encoder(TINY)
    resampler = build_resampler(ModelConfig(preset="tiny", num_style_tokens=4, seed=11), encoder.width, 64)
    base = base_model_id(TINY)
    write_adapter_dir(root / "ink", tuned_copy(1), kind="style", resampler=resampler, base_model=base)
    dog, cat = [{"identifier": "sks", "class_noun": "dog"}], [{"identifier": "zwx", "class_noun": "cat"}]
    write_adapter_dir(root / "dog", tuned_copy(2), kind="subject", subjects=dog, base_model=base)
    write_adapter_dir(root / "cat", tuned_copy(3), kind="subject", subjects=cat, base_model=base)
    write_adapter_dir(root / "other-base", tuned_copy(4), kind="style", base_model="random:lumina7b:seed0")


@pytest.fixture(scope="module")
def url(serve_on_loopback, tmp_path_factory):

    root = tmp_path_factory.mktemp("adapters")
    write_adapters(root)
    overrides = [
        f"adapters_root={root}",
        f"max_upload_bytes={MAX_UPLOAD}",
        f"max_reference_pixels={MAX_PIXELS}",
        "max_prompt_chars=200",
        "max_adapters_per_replica=1",
        "batch_wait_timeout_s=0.2",
        "min_timeout_s=0",  # lets a test time a request out within one tiny decode
    ]
    app = build_app({"config_file": "serving/configs/tiny.yaml", "overrides": overrides})
    return serve_on_loopback(app, "stylear-test")


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def reference_png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), (30, 120, 200))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, size // 2, size // 2), fill=(250, 220, 0))
    return encode_png(image)


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image.size


def good_subject_request(client: httpx.Client) -> None:
    r = client.post(
        "/v1/generate/subject", json={"prompt": "a small house", "height": 32, "width": 32, "seed": 1}
    )
    assert r.status_code == 200, r.text
    assert png_size(r.content) == (32, 32)


def test_style_multipart_upload_returns_a_png_of_the_requested_size(client):
    form = {
        "prompt": "a lighthouse",
        "height": "64",
        "width": "96",
        "seed": "4",
        "cfg": "3.0",
        "top_k": "100",
    }
    r = client.post(
        "/v1/generate/style", data=form, files={"image": ("ref.png", reference_png(), "image/png")}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "4"
    assert png_size(r.content) == (96, 64)


def test_style_base64_json_with_sam_and_a_style_adapter(client):
    body = {
        "prompt": "a teapot",
        "image": base64.b64encode(reference_png(80)).decode(),
        "height": 64,
        "width": 64,
        "seed": 9,
        "sam": True,
        "noise_strength": 0.2,
        "adapter": "ink",
        "response_format": "base64",
    }
    r = client.post("/v1/generate/style", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["seed"], out["width"], out["height"], out["adapter"]) == (9, 64, 64, "ink")
    assert png_size(base64.b64decode(out["image"])) == (64, 64)


def test_subject_endpoint_returns_a_png_and_adapters_switch_exactly(client):
    def subject(adapter: str | None, prompt: str) -> bytes:
        body = {"prompt": prompt, "height": 32, "width": 64, "seed": 5, "adapter": adapter}
        r = client.post("/v1/generate/subject", json=body)
        assert r.status_code == 200, r.text
        assert png_size(r.content) == (64, 32)
        return r.content

    before = client.get("/v1/stats").json()
    dog = subject("dog", "a photo of sks dog on a beach")
    cat = subject("cat", "a photo of zwx cat on a beach")  # evicts dog: one adapter per replica here
    dog_again = subject("dog", "a photo of sks dog on a beach")
    base = subject(None, "a photo of sks dog on a beach")
    after = client.get("/v1/stats").json()
    assert dog_again == dog  # reloaded into the slot, bit for bit the same image
    assert len({dog, cat, base}) == 3  # each adapter changes the model
    assert after["adapter_loads"]["dog"] - before["adapter_loads"].get("dog", 0) == 2
    assert after["base_builds"] == 1  # switching never rebuilt the base model


def test_subject_prompt_must_name_the_adapters_subject(client):
    r = client.post(
        "/v1/generate/subject", json={"prompt": "a photo of a dog", "adapter": "dog", "height": 32}
    )
    assert r.status_code == 422
    assert r.json()["field"] == "prompt"


def test_adapters_are_listed_and_health_is_reported(client):
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert sorted(listed) == ["cat", "dog", "ink", "other-base"]
    assert listed["dog"]["kind"] == "subject" and listed["ink"]["kind"] == "style"
    assert listed["dog"]["subjects"] == [{"identifier": "sks", "class_noun": "dog"}]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_sixteen_concurrent_requests_succeed_and_are_batched(client, url):
    solo = {"prompt": "a red bicycle", "height": 32, "width": 32, "seed": 77, "top_k": 50}
    alone = client.post("/v1/generate/subject", json=solo)
    assert alone.status_code == 200
    before = len(client.get("/v1/stats").json()["batch_sizes"])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            calls = []
            for i in range(16):
                if i == 7:
                    calls.append(c.post("/v1/generate/subject", json=solo))
                elif i % 2:
                    body = {"prompt": f"a cat number {i}", "height": 32, "width": 32, "seed": i}
                    calls.append(c.post("/v1/generate/subject", json=body))
                else:
                    form = {"prompt": f"a hill {i}", "height": "32", "width": "32", "seed": str(i)}
                    files = {"image": ("r.png", reference_png(), "image/png")}
                    calls.append(c.post("/v1/generate/style", data=form, files=files))
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    assert all(png_size(r.content) == (32, 32) for r in responses)
    assert responses[7].content == alone.content  # same seed, same image, whatever its batch neighbours
    sizes = client.get("/v1/stats").json()["batch_sizes"][before:]
    assert sum(sizes) == 16
    assert max(sizes) > 1


def test_sam_subtract_mode_gives_a_different_image_than_masking(client):
    def style(sam_mode: str) -> bytes:
        body = {
            "prompt": "a teapot",
            "image": base64.b64encode(reference_png(80)).decode(),
            "height": 64,
            "width": 64,
            "seed": 12,
            # The tiny random model barely reacts to its style tokens: greedy decoding under strong
            # guidance turns their difference into different codes (sampling at 32 px gives the same).
            "cfg": 10.0,
            "temperature": 0.0,
            "sam": True,
            "sam_mode": sam_mode,
            "noise_strength": 0.0,
        }
        r = client.post("/v1/generate/style", json=body)
        assert r.status_code == 200, r.text
        png_size(r.content)
        return r.content

    subtracted = style("subtract")
    assert subtracted != style("mask")  # same seed: only the style tokens differ


def test_sam_mode_default_follows_the_prompt_template():
    cfg = ServingConfig()
    assert cfg.resolved_sam_mode_default == "mask"
    cfg.model.prompt_template = "stylear_release"
    assert cfg.resolved_sam_mode_default == "subtract"
    cfg.sam_mode_default = "mask"
    assert cfg.resolved_sam_mode_default == "mask"
    with pytest.raises(ConfigError, match="sam_mix_weight"):
        ServingConfig(sam_enabled=False, sam_default=False, sam_mix_weight=1.5).validate()


def depth_png(corner: int) -> bytes:
    """A depth-map-like condition image: grey, with a bright (near) square at ``corner`` px."""
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(image).rectangle((corner, corner, corner + 24, corner + 24), fill=(230, 230, 230))
    return encode_png(image)


def test_generation_with_a_condition_image_works_over_http_and_follows_it(client):
    # Greedy under strong guidance: the same seed and style, so only the condition tells images apart.
    form = {
        "prompt": "a lighthouse",
        "height": "64",
        "width": "64",
        "seed": "7",
        "cfg": "10",
        "temperature": "0",
    }
    reference = ("ref.png", reference_png(), "image/png")

    def style(condition: bytes | None) -> bytes:
        files = {
            "image": reference,
            **({"condition": ("depth.png", condition, "image/png")} if condition else {}),
        }
        r = client.post("/v1/generate/style", data=form, files=files)
        assert r.status_code == 200, r.text
        assert png_size(r.content) == (64, 64)
        return r.content

    near, far = style(depth_png(4)), style(depth_png(36))
    assert near != far and near != style(None)
    body = {
        "prompt": "a small house",
        "height": 64,
        "width": 64,
        "seed": 7,
        "condition": base64.b64encode(depth_png(4)).decode(),
    }
    r = client.post("/v1/generate/subject", json=body)
    assert r.status_code == 200, r.text
    assert png_size(r.content) == (64, 64)


BIG_PIXELS = encode_png(Image.new("RGB", (1024, 1024), (5, 5, 5)))  # small file, too many pixels
NOISE_PNG = encode_png(Image.effect_noise((64, 64), 60).convert("RGB"))
GIF = io.BytesIO()
Image.new("RGB", (8, 8)).save(GIF, format="GIF")
STYLE_FILES = {"image": ("r.png", reference_png(), "image/png")}


def _condition_file(data: bytes) -> dict:
    return {"data": {"prompt": "x"}, "files": {**STYLE_FILES, "condition": ("c.png", data, "image/png")}}


@pytest.mark.parametrize(
    ("endpoint", "request_kwargs", "status", "field"),
    [
        ("style", {"data": {"prompt": "x"}, "files": {"image": ("r.png", b"\x89PNG garbage", "image/png")}}, 400, "image"),
        ("style", {"data": {"prompt": "x"}, "files": {"image": ("r.png", b"\0" * (MAX_UPLOAD + 1), "image/png")}}, 413, "image"),
        ("style", {"data": {"prompt": "x"}, "files": {"image": ("r.png", BIG_PIXELS, "image/png")}}, 413, "image"),
        ("style", {"data": {"prompt": "x"}, "files": {"image": ("r.png", b"", "image/png")}}, 422, "image"),
        ("style", {"json": {"prompt": "x", "image": "@@not base64@@"}}, 400, "image"),
        ("style", {"json": {"prompt": "x"}}, 422, "image"),
        ("style", {"json": {"prompt": "x", "image": "A" * (MAX_UPLOAD * 3)}}, 413, "body"),  # room for 2 images
        ("style", {"data": {"prompt": "x", "noise_strength": "9"}, "files": {"image": ("r.png", reference_png(), "image/png")}}, 422, "noise_strength"),
        ("style", {"data": {"prompt": "x", "sam": "maybe"}, "files": {"image": ("r.png", reference_png(), "image/png")}}, 422, "sam"),
        ("style", {"data": {"prompt": "x", "sam": "true", "sam_mode": "bogus"}, "files": {"image": ("r.png", reference_png(), "image/png")}}, 422, "sam_mode"),
        ("style", {"json": {"prompt": "x", "sam": True, "sam_mode": "bogus", "image": base64.b64encode(reference_png()).decode()}}, 422, "sam_mode"),
        ("style", {"data": {"prompt": "x"}, "files": {"image": ("r.png", reference_png(), "image/png"), "mask": ("m.png", reference_png(), "image/png")}}, 422, "mask"),
        ("style", _condition_file(b"\x89PNG garbage"), 400, "condition"),
        ("style", _condition_file(NOISE_PNG[: len(NOISE_PNG) // 2]), 400, "condition"),  # decoded on the replica
        ("style", _condition_file(b"\0" * (MAX_UPLOAD + 1)), 413, "condition"),
        ("style", _condition_file(BIG_PIXELS), 413, "condition"),
        ("style", _condition_file(b""), 422, "condition"),
        ("style", _condition_file(GIF.getvalue()), 415, "condition"),
        ("style", {"data": {"prompt": "x", "condition": "aGk="}, "files": STYLE_FILES}, 422, "condition"),
        ("style", {"json": {"prompt": "x", "image": base64.b64encode(reference_png()).decode(), "condition": "@@"}}, 400, "condition"),
        ("subject", {"json": {"prompt": "x", "condition": 5}}, 422, "condition"),
        ("subject", {"json": {"prompt": "x", "condition": base64.b64encode(b"not an image").decode()}}, 400, "condition"),
        ("subject", {"json": {"prompt": ""}}, 422, "prompt"),
        ("subject", {"json": {"prompt": "   "}}, 422, "prompt"),
        ("subject", {"json": {"prompt": "x" * 201}}, 422, "prompt"),
        ("subject", {"json": {"height": 32}}, 422, "prompt"),
        ("subject", {"json": {"prompt": "x", "cfg": -1}}, 422, "cfg"),
        ("subject", {"json": {"prompt": "x", "top_k": 0}}, 422, "top_k"),
        ("subject", {"json": {"prompt": "x", "temperature": 99}}, 422, "temperature"),
        ("subject", {"json": {"prompt": "x", "seed": -3}}, 422, "seed"),
        ("subject", {"json": {"prompt": "x", "height": 50}}, 422, "height"),
        ("subject", {"json": {"prompt": "x", "width": 2048}}, 422, "width"),
        ("subject", {"json": {"prompt": "x", "response_format": "gif"}}, 422, "response_format"),
        ("subject", {"json": {"prompt": "x", "colour": "red"}}, 422, "colour"),
        ("subject", {"json": {"prompt": "x", "image": base64.b64encode(reference_png()).decode()}}, 422, "image"),
        ("subject", {"json": {"prompt": "x", "adapter": "nope"}}, 404, "adapter"),
        ("subject", {"json": {"prompt": "x", "adapter": "../dog"}}, 422, "adapter"),
        ("subject", {"json": {"prompt": "x", "adapter": "other-base"}}, 422, "adapter"),
        ("subject", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
        ("subject", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
        ("subject", {"json": ["prompt", "x"]}, 422, "body"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_keeps_serving(
    client, endpoint, request_kwargs, status, field
):
    r = client.post(f"/v1/generate/{endpoint}", **request_kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["field"] == field
    assert isinstance(body["error"], str) and "Traceback" not in body["error"]
    good_subject_request(client)


def test_a_request_that_times_out_gets_504_and_the_next_one_succeeds(client):
    r = client.post("/v1/generate/subject", json={"prompt": "a slow tree", "height": 64, "timeout_s": 0.001})
    assert r.status_code == 504
    assert r.json()["field"] is None
    good_subject_request(client)


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    r = client.get("/v1/generate/style")
    assert r.status_code == 405
    assert r.json()["field"] is None and r.json()["error"]
    assert client.get("/v1/nothing-here").status_code == 404
