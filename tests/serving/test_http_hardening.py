"""Hostile input against the running service, with API-token auth and CORS on (tiny preset, 127.0.0.1).

One Serve app for the module: a token from a secret file, one allowed CORS origin, SAM off and
64-pixel images so every generation is cheap, and queues generous enough to hold the load test's
200 concurrent requests (ingress and model ``max_queued_requests`` 256).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving.app import build_app, serving_config
from serving.auth import load_api_token
from serving.config import ServingConfig
from stylear_core.config import ConfigError
from stylear_core.data.images import encode_png

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "http://allowed.example:8080"
LOAD_REQUESTS = 200


@pytest.fixture(scope="module")
def url(serve_on_loopback, tmp_path_factory):

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")  # secrets often end in a newline
    overrides = [
        f"auth_token_file={token_file}",
        f"cors_origins=[{ORIGIN}]",
        "sam_enabled=false",
        "sam_default=false",
        "max_side=64",
        "max_prompt_chars=200",
        "max_upload_bytes=200000",
        "request_timeout_s=60",
        "batch_wait_timeout_s=0.05",
    ]
    app = build_app(
        {"config_file": "serving/configs/tiny.yaml", "overrides": overrides},
        ingress_options={"max_queued_requests": 256, "ray_actor_options": {"num_cpus": 0.5}},
        model_options={"max_queued_requests": 256, "ray_actor_options": {"num_cpus": 0.5}},
    )
    return serve_on_loopback(app, "stylear-hardened")


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
        yield c


def reference_png() -> bytes:
    return encode_png(Image.new("RGB", (64, 64), (200, 60, 30)))


def assert_error(r: httpx.Response, status: int, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["field"] == field, body
    assert isinstance(body["error"], str) and "Traceback" not in body["error"]


def post_json_text(client: httpx.Client, text: bytes, endpoint: str = "subject") -> httpx.Response:
    return client.post(f"/v1/generate/{endpoint}", content=text, headers={"content-type": "application/json"})


# --- parse failures are 4xx, never 500 ---------------------------------------------------------


def test_a_json_number_with_thousands_of_digits_is_a_422_naming_its_field(client):
    # json.loads raises ValueError past Python's 4300-digit int limit: this was a 500.
    r = post_json_text(client, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}")
    assert_error(r, 422, "seed")
    r = post_json_text(client, b'{"prompt": "x", "cfg": 1e999}')  # overflows to inf
    assert_error(r, 422, "cfg")
    r = post_json_text(client, b'{"prompt": "x", "image": ' + b"7" * 5000 + b"}", "style")
    assert_error(r, 422, "image")


def test_json_nested_a_hundred_thousand_deep_is_a_400(client):
    # RecursionError in json.loads: this was a 500.
    depth = 100_000
    assert_error(post_json_text(client, b"[" * depth + b"]" * depth), 400, "body")
    assert_error(
        post_json_text(client, b'{"prompt": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"), 400, "body"
    )


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_json_constants_are_a_400(client, constant):
    # json.loads accepts them; timeout_s=Infinity was served as a 200.
    assert_error(post_json_text(client, b'{"prompt": "x", "timeout_s": ' + constant + b"}"), 400, "body")


def test_a_multipart_seed_with_thousands_of_digits_is_a_422(client):
    r = client.post(
        "/v1/generate/style",
        data={"prompt": "x", "seed": "9" * 5000},
        files={"image": ("r.png", reference_png(), "image/png")},
    )
    assert_error(r, 422, "seed")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": True}, "seed"),
        ({"seed": False}, "seed"),
        ({"seed": 3.0}, "seed"),
        ({"seed": "3"}, "seed"),
        ({"height": True}, "height"),
        ({"width": 64.0}, "width"),
        ({"top_k": False}, "top_k"),
        ({"cfg": True}, "cfg"),
        ({"temperature": "1"}, "temperature"),
        ({"timeout_s": True}, "timeout_s"),
        ({"prompt": 5}, "prompt"),
        ({"adapter": "dog\n"}, "adapter"),
    ],
)
def test_json_fields_take_their_own_type_only(client, body, field):
    # Pydantic's lax mode turned true into 1 and 3.0 into 3: these were served as 200s.
    r = client.post("/v1/generate/subject", json={"prompt": "a boat", "height": 32, "width": 32, **body})
    assert_error(r, 422, field)


def test_a_prompt_that_is_not_unicode_text_is_a_422(client):
    # JSON can escape a lone surrogate, which no UTF-8 tokenizer takes.
    assert_error(post_json_text(client, b'{"prompt": "a \\ud800 surrogate"}'), 422, "prompt")


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"seed": "3.0"}, "seed"),
        ({"seed": "true"}, "seed"),
        ({"seed": " 3"}, "seed"),
        ({"seed": "1_000"}, "seed"),
        ({"height": "0x40"}, "height"),
        ({"cfg": "nan"}, "cfg"),
        ({"cfg": "inf"}, "cfg"),
        ({"timeout_s": "1e999"}, "timeout_s"),
        ({"sam": "no"}, "sam"),
        ({"sam": "0"}, "sam"),
    ],
)
def test_multipart_fields_are_read_strictly(client, form, field):
    r = client.post(
        "/v1/generate/style",
        data={"prompt": "a boat", **form},
        files={"image": ("r.png", reference_png(), "image/png")},
    )
    assert_error(r, 422, field)


def test_strict_fields_still_take_well_formed_values(client):
    form = {"prompt": "a boat", "height": "32", "width": "32", "seed": "7", "cfg": "2.5", "sam": "FALSE"}
    files = {"image": ("r.png", reference_png(), "image/png")}
    r = client.post("/v1/generate/style", data=form, files=files)
    assert r.status_code == 200, r.text
    assert r.headers["x-seed"] == "7"
    body = {"prompt": "a boat", "height": 32, "width": 32, "seed": 7, "cfg": 3, "timeout_s": 30}
    r = client.post("/v1/generate/subject", json={**body, "response_format": "base64"})
    assert r.status_code == 200, r.text
    assert r.json()["seed"] == 7


@pytest.mark.parametrize("timeout_s", [0.001, 0.5])
def test_a_timeout_below_the_floor_is_a_422_not_a_504(client, timeout_s):
    r = client.post("/v1/generate/subject", json={"prompt": "a tree", "height": 32, "timeout_s": timeout_s})
    assert_error(r, 422, "timeout_s")
    r = client.post(
        "/v1/generate/style",
        data={"prompt": "a tree", "timeout_s": str(timeout_s)},
        files={"image": ("r.png", reference_png(), "image/png")},
    )
    assert_error(r, 422, "timeout_s")


def test_a_wrong_method_answers_405_with_allow(client):
    r = client.put("/v1/generate/subject", json={"prompt": "x"})
    assert_error(r, 405, None)
    assert r.headers["allow"] == "POST"


# --- API-token auth -----------------------------------------------------------------------------


PROTECTED = [
    ("POST", "/v1/generate/subject"),
    ("POST", "/v1/generate/style"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/adapters"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_but_health_needs_the_bearer_token(url, method, path):
    body = {"prompt": "a boat", "height": 32, "width": 32}
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        r = anonymous.request(method, path, json=body)
        assert_error(r, 401, "authorization")
        assert r.headers["www-authenticate"] == "Bearer"
        for wrong in (f"Bearer {TOKEN[:-1]}x", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"):
            r = anonymous.request(method, path, json=body, headers={"Authorization": wrong})
            assert_error(r, 401, "authorization")
            assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_the_right_token_passes_and_health_needs_none(url, client):
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        r = anonymous.get("/v1/stats", headers={"Authorization": f"bearer {TOKEN}"})  # scheme: any case
        assert r.status_code == 200, r.text
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/no-such-route").status_code == 404


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    cfg = ServingConfig()
    assert load_api_token(cfg, environ={}) is None  # no token, not required: no auth
    assert load_api_token(cfg, environ={"STYLEAR_API_TOKEN": f" {TOKEN}\n"}) == TOKEN
    secret = tmp_path / "token"
    secret.write_text("from-the-file-0123456789\n")
    from_file = ServingConfig(auth_token_file=str(secret))
    assert load_api_token(from_file, environ={"STYLEAR_API_TOKEN": TOKEN}) == "from-the-file-0123456789"
    with pytest.raises(ConfigError, match="auth_token_file"):
        load_api_token(ServingConfig(auth_token_file=str(tmp_path / "missing")), environ={})
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_api_token(from_file, environ={})
    with pytest.raises(ConfigError, match="at least 16"):
        load_api_token(cfg, environ={"STYLEAR_API_TOKEN": "short"})
    with pytest.raises(ConfigError, match="at least 16"):
        load_api_token(cfg, environ={"STYLEAR_API_TOKEN": "has spaces in the middle of it"})


def test_the_production_preset_refuses_to_start_without_a_token():
    # serve_config.yaml binds 0.0.0.0 and serves serving/configs/lumina7b.yaml.
    cfg = serving_config({"config_file": "serving/configs/lumina7b.yaml"})
    assert cfg.auth_required
    with pytest.raises(ConfigError, match="STYLEAR_API_TOKEN"):
        load_api_token(cfg, environ={})
    assert load_api_token(cfg, environ={"STYLEAR_API_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(ConfigError, match="auth_required"):
        ServingConfig(sam_enabled=False, sam_default=False, auth_required=True, auth_token_env="").validate()


# --- CORS ---------------------------------------------------------------------------------------


def test_cors_answers_the_allowed_origin_only(url):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        r = anonymous.options("/v1/generate/subject", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = anonymous.options("/v1/generate/subject", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
        r = anonymous.get("/v1/stats", headers={"Origin": ORIGIN})  # a 401 the browser can read
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == ORIGIN
        r = anonymous.get("/v1/stats", headers={"Origin": ORIGIN, **AUTH})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-seed" in r.headers["access-control-expose-headers"].lower()
        r = anonymous.get("/v1/stats", headers={"Origin": "http://evil.example", **AUTH})
        assert "access-control-allow-origin" not in r.headers


# --- the OpenAPI document -----------------------------------------------------------------------


def test_openapi_documents_both_request_bodies_and_every_status(client):
    spec = client.get("/openapi.json").json()
    style = spec["paths"]["/v1/generate/style"]["post"]
    content = style["requestBody"]["content"]
    as_json = content["application/json"]["schema"]
    form = content["multipart/form-data"]["schema"]
    assert {"prompt", "image", "seed", "height", "width", "sam", "timeout_s"} <= set(as_json["properties"])
    assert set(as_json["required"]) == {"prompt", "image"}
    assert as_json["properties"]["image"]["type"] == "string"
    assert form["properties"]["image"] == {
        **form["properties"]["image"],
        "type": "string",
        "format": "binary",
    }
    assert form["properties"]["seed"]["type"] == "integer"
    subject = spec["paths"]["/v1/generate/subject"]["post"]
    assert "image" not in subject["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(subject["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    for operation in (style, subject):
        responses = operation["responses"]
        codes = {"200", "400", "401", "404", "408", "413", "415", "422", "429", "500", "503", "504"}
        assert codes <= set(responses), sorted(responses)
        assert set(responses["200"]["content"]) == {"image/png", "application/json"}
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/GeneratedImage")
        for code in ("429", "503"):
            assert "Retry-After" in responses[code]["headers"]
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert operation["security"] == [{"bearerAuth": []}]
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]


# --- fuzzing against the app's own OpenAPI document ---------------------------------------------


@pytest.fixture(scope="module")
def api_schema(url):
    return schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH, timeout=30)


OPERATIONS = [
    ("POST", "/v1/generate/style"),
    ("POST", "/v1/generate/subject"),
    ("GET", "/v1/adapters"),
    ("GET", "/v1/stats"),
    ("GET", "/healthz"),
    ("POST", "/v1/jobs/style"),
    ("POST", "/v1/jobs/subject"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
]
# POST operations without a body: the fuzzer can vary only their path parameter.
PATH_ONLY_POSTS = {("POST", "/v1/jobs/{job_id}/cancel")}
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]


def test_the_fuzzed_operations_are_all_the_documented_ones(api_schema):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS]
    + [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"],
)
def test_fuzzing_finds_no_server_error_and_no_undocumented_status(api_schema, url, method, path, mode):
    # Schema-valid (positive) and schema-invalid (negative) requests, 25 per operation and mode: the
    # answer is never a 5xx, and its status, content type, headers and body are the documented ones.
    operation = api_schema[path][method]
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call_and_validate(base_url=url, headers=AUTH, timeout=60, checks=FUZZ_CHECKS)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text

    check()
    print(f"{method} {path} {mode.value}: {dict(statuses)}")
    if (method, path) in PATH_ONLY_POSTS and mode == GenerationMode.POSITIVE:
        # Its only input is the id in the path, and a generated id never names a job that exists (ids are
        # random): every valid request gets the same documented 404. (Negative cases also vary the auth
        # header, so they get 401s too and take the general check below.)
        assert sum(statuses.values()) >= 20 and set(statuses) == {404}, statuses
    elif method == "POST":  # the generator ran: bodies of both encodings, answers of several kinds
        assert sum(statuses.values()) >= 20 and len(statuses) >= 2, statuses


# --- load ---------------------------------------------------------------------------------------


def test_two_hundred_concurrent_requests_get_no_server_error(url):
    # The ingress holds 64 and queues 256 at the proxy, the model queues 256 per ingress replica:
    # this load fits the configured bounds, so every request must be served (no 5xx, no 503).
    png = reference_png()

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, float]:
        started = time.monotonic()
        if i % 4:
            body = {"prompt": f"a cat number {i}", "height": 32, "width": 32, "seed": i, "top_k": 64}
            r = await c.post("/v1/generate/subject", json=body)
        else:
            form = {"prompt": f"a hill {i}", "height": "32", "width": "32", "seed": str(i)}
            r = await c.post("/v1/generate/style", data=form, files={"image": ("r.png", png, "image/png")})
        return r.status_code, time.monotonic() - started

    async def load() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=LOAD_REQUESTS, max_keepalive_connections=LOAD_REQUESTS)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=90, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(LOAD_REQUESTS)))

    started = time.monotonic()
    results = asyncio.run(load())
    elapsed = time.monotonic() - started
    statuses = sorted({status for status, _ in results})
    print(
        f"{LOAD_REQUESTS} concurrent requests in {elapsed:.1f} s; slowest {max(t for _, t in results):.1f} s"
    )
    assert statuses == [200], {s: sum(1 for x, _ in results if x == s) for s in statuses}
    assert elapsed < 90
