"""The HTTP ingress: a FastAPI app in a Ray Serve deployment that validates requests and calls the model.

Endpoints:

* ``POST /v1/generate/style``: prompt + style reference (``multipart/form-data`` with an ``image``
  file, or JSON with ``image`` as base64) and options; answers ``image/png`` (seed in ``X-Seed``)
  or, with ``response_format=base64``, JSON ``{"image", "seed", "width", "height", "adapter"}``.
* ``POST /v1/generate/subject``: a prompt naming the subject's identifier and its ``adapter``.
* ``GET /v1/adapters``, ``GET /v1/stats`` (the model replica's counters), ``GET /healthz``.

Everything a client gets wrong is a 4xx ``{"error", "field"}`` decided here or by the model
deployment; a model that does not answer in time is a 504 (the call is cancelled), an overloaded
or unavailable one a 503; anything unexpected a 500 without internals.
"""

# No `from __future__ import annotations`: FastAPI under serve.ingress must see real annotation objects.
import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from serving.config import ServingConfig
from serving.schemas import (
    ApiError,
    GenerationJob,
    GenerationOptions,
    JobOutcome,
    StyleOptions,
    SubjectOptions,
    parse_options,
)
from stylear_core.config import from_dict
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

api = FastAPI(title="StyleAR generation", version="1")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body())


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes, wrong methods: the same error shape as everything else.
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "field": None})


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in the ingress", exc_info=exc)
    return JSONResponse(status_code=500, content={"error": "internal error", "field": None})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one whose declared or actual size exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length", "content-length") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds {limit}", "body")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


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
        else:
            raise ApiError(
                415, f"content type {content_type or '(none)'!r}: send application/json or multipart/form-data",
                "content-type",
            )  # fmt: skip
        options = parse_options(model, data)
        if len(options.prompt) > self.cfg.max_prompt_chars:
            raise ApiError(422, f"prompt: longer than {self.cfg.max_prompt_chars} characters", "prompt")
        for name in ("height", "width"):
            value = getattr(options, name)
            if value is not None and value > self.cfg.max_side:
                raise ApiError(422, f"{name}: {value} exceeds the {self.cfg.max_side}-pixel limit", name)
        return options, reference

    async def _read_json(self, request: Request, limit: int) -> tuple[dict[str, Any], bytes | None]:
        body = await read_body(request, limit)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body: invalid JSON ({e})", "body") from None
        if not isinstance(data, dict):
            raise ApiError(422, "body: expected a JSON object", "body")
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
        body = await read_body(request, limit)  # the size limit holds before anything is parsed

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


@serve.deployment(name="StyleARIngress", max_ongoing_requests=64)
@serve.ingress(api)
class StyleARIngress:
    """The HTTP front of the service; takes the model deployment's handle and the :class:`ServingConfig` dict."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any]) -> None:
        self.model = model
        self.cfg = from_dict(ServingConfig, config)
        self.reader = RequestReader(self.cfg)

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

    @api.post("/v1/generate/style", response_model=None)
    async def generate_style(self, request: Request) -> Response:
        """Style-aligned generation: prompt + reference image -> PNG (or base64 JSON)."""
        options, reference = await self.reader.read(request, StyleOptions)
        if reference is None:
            raise ApiError(422, "image: a style reference image is required", "image")
        check_reference(reference, self.cfg.max_upload_bytes, self.cfg.max_reference_pixels)
        use_sam = self.cfg.sam_default if options.sam is None else options.sam
        if use_sam and not self.cfg.sam_enabled:
            raise ApiError(422, "sam: SAM cleaning is not enabled on this server", "sam")
        job = self._job(
            "style", options, reference=reference, noise_strength=options.noise_strength, sam=use_sam
        )
        return await self._generate(job, options)

    @api.post("/v1/generate/subject", response_model=None)
    async def generate_subject(self, request: Request) -> Response:
        """Subject-driven generation: a prompt with the subject's identifier, on the subject's adapter."""
        options, reference = await self.reader.read(request, SubjectOptions)
        if reference is not None:
            raise ApiError(422, "image: subject generation takes no reference image", "image")
        return await self._generate(self._job("subject", options), options)

    @api.get("/v1/adapters")
    async def adapters(self) -> dict[str, Any]:
        """The adapters the service can load, with whether the answering replica has each loaded."""
        return {"adapters": await self._call_model("list_adapters", timeout=30.0)}

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """Counters of one model replica (batch sizes seen, requests, failures, adapter loads)."""
        return await self._call_model("stats", timeout=30.0)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """``{"status": "ok"}`` when a model replica answers a ping within 5 s, else 503."""
        await self._call_model("ping", timeout=5.0)
        return {"status": "ok"}
