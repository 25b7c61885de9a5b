"""The HTTP ingress: a FastAPI app in a Ray Serve deployment that validates requests and calls the model.

Endpoints:

* ``POST /v1/generate/style``: prompt + style reference (``multipart/form-data`` with an ``image``
  file, or JSON with ``image`` as base64) and options; answers ``image/png`` (seed in ``X-Seed``)
  or, with ``response_format=base64``, JSON ``{"image", "seed", "width", "height", "adapter"}``.
* ``POST /v1/generate/subject``: a prompt naming the subject's identifier and its ``adapter``.
* ``GET /v1/adapters``, ``GET /v1/stats`` (the model replica's counters), ``GET /healthz``.

Everything a client gets wrong is a 4xx ``{"error", "field"}`` decided here or by the model
deployment; a model that does not answer in time is a 504 (the call is cancelled), an overloaded
or unavailable one a 503; anything unexpected a 500 without internals. Every 429/503 carries
``Retry-After``. ``/openapi.json`` documents both request encodings and every status.

Hostile input and overload: a body must arrive within ``body_read_timeout_s`` (408; a slow
sender cannot hold an ingress slot longer), numbers too long for Python's ``int`` and JSON nested
too deeply are 4xx, integer fields take integers only (no ``true``, no ``3.0``), and ``timeout_s``
has a floor (``min_timeout_s``). Queues are bounded: past ``max_queued_requests`` waiting at an
HTTP proxy, Serve's proxy answers 503 + ``Retry-After`` at once (the ingress's
``backpressure_config``); past the model deployment's bound, this ingress does (the handle raises
``BackPressureError``).

Auth and CORS: with a token configured (``auth_token_env`` / ``auth_token_file``), every route but
``/healthz`` needs ``Authorization: Bearer <token>`` (401 + ``WWW-Authenticate: Bearer`` otherwise,
``/docs`` and ``/openapi.json`` included); ``cors_origins`` turns on Starlette's CORS middleware.
"""

# No `from __future__ import annotations`: FastAPI under serve.ingress must see real annotation objects.
import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import ServingConfig
from serving.schemas import (
    ApiError,
    ErrorBody,
    GeneratedImage,
    GenerationJob,
    GenerationOptions,
    JobOutcome,
    StyleOptions,
    SubjectOptions,
    form_values,
    parse_options,
    request_body_openapi,
)
from stylear_core.config import ConfigError, from_dict
from stylear_core.data.images import (
    WEB_FORMATS,
    ImageDecodeError,
    ImageLimitError,
    UnsupportedImageFormatError,
    probe_image,
)

log = logging.getLogger("ray.serve")

# Room for the form fields and multipart framing beside the largest allowed upload.
BODY_SLACK_BYTES = 64 * 1024
MAX_FORM_FIELDS = 32
# Requests waiting at each HTTP proxy for an ingress slot; past it the proxy answers 503 at once.
INGRESS_MAX_QUEUED_REQUESTS = 64
# Paths answered without the API token: load balancers and orchestrators probe them.
PUBLIC_PATHS = frozenset({"/healthz"})
# RFC 6750 token characters; a short token is guessable.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_CHARS = 16

api = FastAPI(
    title="StyleAR generation",
    version="1",
    description="Style-aligned and subject-driven image generation. Errors are JSON "
    '`{"error", "field"}`; 429/503 carry `Retry-After`.',
)


def _with_retry_after(request: Request, status: int, headers: dict[str, str]) -> dict[str, str]:
    if status in (429, 503) and not any(k.lower() == "retry-after" for k in headers):
        seconds = getattr(request.app.state, "retry_after_s", ServingConfig.retry_after_s)
        headers = {**headers, "Retry-After": str(seconds)}
    return headers


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = _with_retry_after(request, exc.status, exc.headers)
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes, wrong methods: the same error shape as everything else (405 keeps its Allow).
    headers = _with_retry_after(request, exc.status_code, dict(exc.headers or {}))
    content = {"error": str(exc.detail), "field": None}
    return JSONResponse(status_code=exc.status_code, content=content, headers=headers)


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in the ingress", exc_info=exc)
    return JSONResponse(status_code=500, content={"error": "internal error", "field": None})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) one whose declared or actual size exceeds ``limit``.

    The whole body must arrive within ``timeout_s`` (408 otherwise): a client trickling bytes holds
    an ingress slot, and enough of them would hold every slot (``/healthz`` included).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length", "content-length")
        size = int(declared[:20])  # more digits than that is over any limit anyway
        if size > limit or len(declared) > 20:
            raise ApiError(413, f"request body of {declared[:20]} bytes exceeds {limit}", "body")

    async def collect() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"body: not received within {timeout_s:g} s", "body") from None
    except ClientDisconnect:
        raise ApiError(400, "body: the client disconnected before sending it", "body") from None


MAX_JSON_NUMBER_CHARS = 40


class _UnparsedNumber:
    """A JSON number too long or too large to be a value of any field (every field refuses it)."""

    def __init__(self, text: str) -> None:
        self.text = text[:20]

    def __repr__(self) -> str:
        return f"{self.text}..."


def _parse_json_int(text: str) -> Any:
    # Python's int() refuses more than 4300 digits with a ValueError; leave such a number unparsed so
    # validation names its field (a 422), as for any other value of the wrong type.
    return int(text) if len(text) <= MAX_JSON_NUMBER_CHARS else _UnparsedNumber(text)


def _parse_json_float(text: str) -> Any:
    number = float(text)
    return number if abs(number) != float("inf") else _UnparsedNumber(text)  # 1e999 overflows to inf


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON body as a dict: malformed, non-standard (NaN) or too deeply nested JSON is a 400 naming ``body``."""
    try:
        data = json.loads(
            body,
            parse_int=_parse_json_int,
            parse_float=_parse_json_float,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        raise ApiError(400, "body: JSON nested too deeply", "body") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"body: invalid JSON ({e})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "body: expected a JSON object", "body")
    return data


def check_reference(
    data: bytes,
    max_bytes: int,
    max_pixels: int,
    max_side: int = ServingConfig.max_reference_side,
    max_aspect: float = ServingConfig.max_reference_aspect,
) -> bytes:
    """Reference bytes whose header shows an accepted image within the limits, else a 4xx naming ``image``.

    Only the header is read (a few milliseconds whatever the upload declares), so this runs inline on
    the event loop. The pixels are decoded once, on the model replica's decode thread, where data
    that does not decode (truncated, corrupt) is a 400 naming ``image``. Statuses: empty 422; over
    the byte, pixel or side limit 413; more elongated than the aspect-ratio limit 422; a known image
    format other than PNG, JPEG or WebP 415 (the message lists those); anything else unreadable 400.
    """
    if not data:
        raise ApiError(422, "image: the style reference is empty", "image")
    if len(data) > max_bytes:
        raise ApiError(413, f"image: {len(data)} bytes exceeds the {max_bytes}-byte limit", "image")
    try:
        probe_image(data, max_pixels, max_side=max_side, max_aspect=max_aspect, formats=WEB_FORMATS)
    except UnsupportedImageFormatError as e:
        raise ApiError(415, f"image: {e}", "image") from None
    except ImageLimitError as e:
        raise ApiError(422 if e.limit == "aspect" else 413, f"image: {e}", "image") from None
    except ImageDecodeError as e:
        raise ApiError(400, f"image: {e}", "image") from None
    return data


class RequestReader:
    """Turns an HTTP request into validated options (+ reference bytes) under the configured limits."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg

    async def read(
        self, request: Request, model: type[GenerationOptions]
    ) -> tuple[GenerationOptions, bytes | None]:
        """Parse JSON or multipart into ``model``; the reference image (if any) as raw bytes."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.cfg.max_upload_bytes * 4 // 3 + BODY_SLACK_BYTES  # base64 inflates by 4/3
        if content_type == "application/json":
            data, reference = await self._read_json(request, limit)
        elif content_type == "multipart/form-data":
            data, reference = await self._read_multipart(request, limit)
            data = form_values(model, data)
        else:
            raise ApiError(
                415, f"content type {content_type or '(none)'!r}: send application/json or multipart/form-data",
                "content-type",
            )  # fmt: skip
        options = parse_options(model, data)
        if options.timeout_s is not None and options.timeout_s < self.cfg.min_timeout_s:
            raise ApiError(422, f"timeout_s: below the {self.cfg.min_timeout_s:g} s minimum", "timeout_s")
        if len(options.prompt) > self.cfg.max_prompt_chars:
            raise ApiError(422, f"prompt: longer than {self.cfg.max_prompt_chars} characters", "prompt")
        for name in ("height", "width"):
            value = getattr(options, name)
            if value is not None and value > self.cfg.max_side:
                raise ApiError(422, f"{name}: {value} exceeds the {self.cfg.max_side}-pixel limit", name)
        return options, reference

    async def _read_json(self, request: Request, limit: int) -> tuple[dict[str, Any], bytes | None]:
        data = parse_json_object(await read_body(request, limit, self.cfg.body_read_timeout_s))
        reference = None
        encoded = data.get("image")
        if encoded is not None:
            if not isinstance(encoded, str):
                raise ApiError(422, "image: expected a base64 string", "image")
            if "," in encoded[:64] and encoded.startswith("data:"):
                encoded = encoded.split(",", 1)[1]  # a data URL
            try:
                reference = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "image: not valid base64", "image") from None
            data = {k: v for k, v in data.items() if k != "image"}
        return data, reference

    async def _read_multipart(self, request: Request, limit: int) -> tuple[dict[str, Any], bytes | None]:
        # The size limit and the read timeout hold before anything is parsed.
        body = await read_body(request, limit, self.cfg.body_read_timeout_s)

        async def chunks():
            yield body

        parser = MultiPartParser(request.headers, chunks(), max_files=2, max_fields=MAX_FORM_FIELDS)
        try:
            form = await parser.parse()
        except Exception as e:  # starlette raises several parser error types for malformed bodies
            raise ApiError(400, f"body: malformed multipart form ({e})", "body") from None
        data: dict[str, Any] = {}
        reference = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ApiError(422, f"{key}: unexpected file field (the reference goes in 'image')", key)
                reference = await value.read()
            elif key in data:
                raise ApiError(422, f"{key}: given more than once", key)
            else:
                data[key] = value
        return data, reference


def load_api_token(cfg: ServingConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token every request must carry, or None when the service runs without auth.

    Read from ``auth_token_file`` when set (a missing or empty file is an error), else from the
    ``auth_token_env`` variable. Raises :class:`ConfigError` when ``auth_required`` and there is no
    token, or when the token is shorter than 16 characters or not RFC 6750 token characters.
    """
    if cfg.auth_token_file:
        try:
            token = Path(cfg.auth_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"auth_token_file: cannot read {cfg.auth_token_file} ({e.strerror})") from None
        if not token:
            raise ConfigError(f"auth_token_file: {cfg.auth_token_file} is empty")
    else:
        token = environ.get(cfg.auth_token_env, "").strip() if cfg.auth_token_env else ""
    if not token:
        if cfg.auth_required:
            where = (
                f"the {cfg.auth_token_env} environment variable" if cfg.auth_token_env else "auth_token_file"
            )
            raise ConfigError(
                f"auth_required: no API token; set {where} (or auth_token_file) on the cluster, "
                "or auth_required: false to serve without auth"
            )
        return None
    if len(token) < MIN_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            f"API token: need at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 . _ ~ + / - (then = padding)"
        )
    return token


class BearerTokenAuth:
    """ASGI middleware: every HTTP request but ``public_paths`` needs ``Authorization: Bearer <token>``.

    Anything else gets a 401 ``{"error", "field": "authorization"}`` with ``WWW-Authenticate: Bearer``
    before the body is read. Tokens are compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str, public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in self.public_paths:
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        # Same-length compare of the whole header value; the scheme is case-insensitive (RFC 7235).
        value = given[0] if len(given) == 1 else b""
        if value[:7].lower() == b"bearer ":
            value = b"Bearer " + value[7:]
        if hmac.compare_digest(value, self.expected):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        challenge = 'Bearer error="invalid_token"' if given else "Bearer"
        message = "invalid API token" if given else "missing API token: send Authorization: Bearer <token>"
        response = JSONResponse(
            {"error": message, "field": "authorization"},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )
        await response(scope, receive, send)


def _document_bearer_auth(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI say that every operation but the public ones needs the bearer token (or 401)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path in PUBLIC_PATHS:
                        operation["security"] = []
                        continue
                    operation["security"] = [{"bearerAuth": []}]
                    operation["responses"]["401"] = {
                        "description": ERROR_DESCRIPTIONS[401],
                        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                        },
                    }
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


ERROR_DESCRIPTIONS = {
    400: "Malformed request: body not valid JSON or multipart, an unreadable image, or bad base64.",
    401: "Missing or wrong API token (`Authorization: Bearer <token>`).",
    404: "Unknown adapter.",
    408: "The request body did not arrive within the server's body_read_timeout_s "
    "(or the proxy's request_timeout_s passed).",
    413: "The body or the reference image is over the size limits.",
    415: "Content type other than JSON or multipart, or an image format other than PNG, JPEG or WebP.",
    422: "A field fails validation; `field` names it.",
    429: "Too many requests queued; retry after `Retry-After` seconds.",
    500: "Unexpected server error (no internals are shown).",
    503: "Overloaded (queues full) or no model replica available; retry after `Retry-After` seconds.",
    504: "The model did not answer within timeout_s (or the server's request_timeout_s).",
}
_RETRY_AFTER = {"schema": {"type": "integer", "minimum": 0}, "description": "seconds to wait before retrying"}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}  # what Serve's HTTP proxy answers itself


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, each with the :class:`ErrorBody` model."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": _RETRY_AFTER}
        if status in (408, 429, 503):  # also answered by the proxy, in plain text
            entry["content"] = _TEXT
        responses[status] = entry
    return responses


GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": GeneratedImage,
        "description": "The image: PNG bytes (seed in `X-Seed`), or JSON with `response_format=base64`.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {"X-Seed": {"schema": {"type": "string"}, "description": "the seed used (PNG answers)"}},
    },
    **error_responses(400, 404, 408, 413, 415, 422, 429, 500, 503, 504),
}
READ_RESPONSES = error_responses(408, 429, 500, 503, 504)


@serve.deployment(
    name="StyleARIngress",
    max_ongoing_requests=64,
    max_queued_requests=INGRESS_MAX_QUEUED_REQUESTS,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=ServingConfig.retry_after_s),
)
@serve.ingress(api)
class StyleARIngress:
    """The HTTP front of the service; takes the model deployment's handle and the :class:`ServingConfig` dict.

    Refuses to start (:class:`ConfigError`) when ``auth_required`` is set and no API token is found.
    """

    def __init__(self, model: DeploymentHandle, config: dict[str, Any]) -> None:
        self.model = model
        self.cfg = from_dict(ServingConfig, config)
        self.reader = RequestReader(self.cfg)
        self.token = load_api_token(self.cfg)
        log.info(
            "ingress: API token %s; CORS origins %s",
            "required" if self.token else "not configured (no auth)",
            self.cfg.cors_origins or "none",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after ``__init__``: the app with this config's auth, CORS and Retry-After."""
        app: FastAPI = self.app  # serve.ingress's own copy of `api`, not yet started
        app.state.retry_after_s = self.cfg.retry_after_s
        if self.token:
            app.add_middleware(BearerTokenAuth, token=self.token)
            _document_bearer_auth(app)
        if self.cfg.cors_origins:  # added last, so outermost: preflights and 401s get CORS headers
            app.add_middleware(
                CORSMiddleware,
                allow_origins=self.cfg.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["X-Seed", "Retry-After"],
                max_age=600,
            )
        return app

    async def _call_model(
        self, method: str, *args: Any, adapter: str | None = None, timeout: float | None = None
    ):
        """Call ``method`` on a model replica within ``timeout`` (capped by ``request_timeout_s``).

        A call whose replica died under it (process killed, node lost) is sent once more: the router
        has dropped the dead replica by then, and every model method may run twice (a generation
        gives the same image for the same seed). Timeouts (504, the call is cancelled on the replica),
        back-pressure (503) and errors the model raised (500) are never retried.
        """
        timeout = min(timeout or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        handle = self.model.options(multiplexed_model_id=adapter) if adapter else self.model
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in (1, 2):
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(response, timeout=max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"the model did not answer within {timeout:g} s", None) from None
            except BackPressureError:
                raise ApiError(503, "the model is at capacity; retry later", None) from None
            except RayTaskError:
                log.exception("the model deployment raised")
                raise ApiError(500, "internal error", None) from None
            except RayActorError as e:  # the replica's process died or cannot be reached
                if attempt == 1:
                    log.warning("model replica lost during %s (%s); retrying once", method, type(e).__name__)
                    continue
                log.warning("model call failed again after a lost replica: %s", e)
                raise ApiError(503, "the model is unavailable; retry later", None) from None
            except (RayServeException, RayError) as e:  # deployment unavailable, ...
                log.warning("model call failed: %s", e)
                raise ApiError(503, "the model is unavailable; retry later", None) from None

    async def _generate(self, job: GenerationJob, options: GenerationOptions) -> Response:
        outcome: JobOutcome = await self._call_model(
            "generate", job, adapter=job.adapter, timeout=options.timeout_s
        )
        if outcome.status != 200 or outcome.png is None:
            raise ApiError(outcome.status, outcome.error or "generation failed", outcome.field)
        if options.response_format == "base64":
            return JSONResponse(
                {
                    "image": base64.b64encode(outcome.png).decode(),
                    "seed": outcome.seed,
                    "width": job.width,
                    "height": job.height,
                    "adapter": job.adapter,
                }
            )
        return Response(outcome.png, media_type="image/png", headers={"X-Seed": str(outcome.seed)})

    def _job(self, kind: str, options: GenerationOptions, **extra: Any) -> GenerationJob:
        side = self.cfg.model.image_size
        return GenerationJob(
            kind=kind,  # type: ignore[arg-type]
            prompt=options.prompt,
            height=options.height or side,
            width=options.width or side,
            cfg=options.cfg,
            top_k=options.top_k,
            temperature=options.temperature,
            seed=options.seed,
            adapter=options.adapter,
            **extra,
        )

    @api.post(
        "/v1/generate/style",
        response_model=None,
        responses=GENERATION_RESPONSES,
        openapi_extra={"requestBody": request_body_openapi(StyleOptions, file_field="image")},
    )
    async def generate_style(self, request: Request) -> Response:
        """Style-aligned generation: prompt + reference image -> PNG (or base64 JSON)."""
        options, reference = await self.reader.read(request, StyleOptions)
        if reference is None:
            raise ApiError(422, "image: a style reference image is required", "image")
        check_reference(
            reference,
            self.cfg.max_upload_bytes,
            self.cfg.max_reference_pixels,
            self.cfg.max_reference_side,
            self.cfg.max_reference_aspect,
        )
        use_sam = self.cfg.sam_default if options.sam is None else options.sam
        if use_sam and not self.cfg.sam_enabled:
            raise ApiError(422, "sam: SAM cleaning is not enabled on this server", "sam")
        job = self._job(
            "style", options, reference=reference, noise_strength=options.noise_strength, sam=use_sam
        )
        return await self._generate(job, options)

    @api.post(
        "/v1/generate/subject",
        response_model=None,
        responses=GENERATION_RESPONSES,
        openapi_extra={"requestBody": request_body_openapi(SubjectOptions)},
    )
    async def generate_subject(self, request: Request) -> Response:
        """Subject-driven generation: a prompt with the subject's identifier, on the subject's adapter."""
        options, reference = await self.reader.read(request, SubjectOptions)
        if reference is not None:
            raise ApiError(422, "image: subject generation takes no reference image", "image")
        return await self._generate(self._job("subject", options), options)

    @api.get("/v1/adapters", responses=READ_RESPONSES)
    async def adapters(self) -> dict[str, Any]:
        """The adapters the service can load, with whether the answering replica has each loaded."""
        return {"adapters": await self._call_model("list_adapters", timeout=30.0)}

    @api.get("/v1/stats", responses=READ_RESPONSES)
    async def stats(self) -> dict[str, Any]:
        """Counters of one model replica (batch sizes seen, requests, failures, adapter loads)."""
        return await self._call_model("stats", timeout=30.0)

    @api.get("/healthz", responses=error_responses(408, 500, 503))
    async def healthz(self) -> dict[str, str]:
        """``{"status": "ok"}`` when a model replica answers a ping within 5 s, else 503."""
        await self._call_model("ping", timeout=5.0)
        return {"status": "ok"}
