"""The HTTP ingress: a FastAPI app in a Ray Serve deployment that validates requests and calls the model.

Endpoints:

* ``POST /v1/generate/style``: prompt + style reference (``multipart/form-data`` with an ``image``
  file, or JSON with ``image`` as base64) and options; answers ``image/png`` (seed in ``X-Seed``)
  or, with ``response_format=base64``, JSON ``{"image", "seed", "width", "height", "adapter"}``.
* ``POST /v1/generate/subject``: a prompt naming the subject's identifier and its ``adapter``.
* Both take an optional ``condition`` image (a file part, or base64 in JSON), e.g. a depth map: it is
  VQ-tokenized into the prompt at the requested size (StyleAR's depth control) and checked like the
  style reference, its errors naming ``condition``.
* ``GET /v1/adapters``, ``GET /v1/stats`` (the model replica's counters), ``GET /healthz``.
* Async jobs (:mod:`serving.jobs`): ``POST /v1/jobs/style`` and ``POST /v1/jobs/subject`` take the same
  bodies as the synchronous endpoints and answer 202 ``{"id", "status"}`` at once; ``GET /v1/jobs/{id}``
  gives the status, progress (tokens done / total) and, once done, the result (base64 PNG + seed) or
  the error (status, message, field); ``GET /v1/jobs/{id}/events`` streams the same as server-sent
  events until the job ends (with ``preview=true``, progress events also carry a low-resolution PNG of
  the image so far); ``POST /v1/jobs/{id}/cancel`` cancels it (its decode rows are freed).
  An unknown or expired id is a 404; past ``max_jobs`` held jobs, a new one is a 429. A job that finds
  the model deployment's queues full waits for room (within its ``timeout_s``) instead of failing 503.

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
``BackPressureError``), and counts each such 503 as ``stylear_rejections_total{reason="overload"}``
(:mod:`serving.metrics`; a job counts once, if it fails for want of room), as it does each 429 for
``max_jobs`` held jobs.

Auth and CORS: with a token configured (``auth_token_env`` / ``auth_token_file``), every route but
``/healthz`` needs ``Authorization: Bearer <token>`` (401 + ``WWW-Authenticate: Bearer`` otherwise,
``/docs`` and ``/openapi.json`` included); ``cors_origins`` turns on Starlette's CORS middleware.
"""

# No `from __future__ import annotations`: FastAPI under serve.ingress must see real annotation objects.
import asyncio
import base64
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.auth import BearerTokenAuth, load_api_token
from serving.config import ServingConfig
from serving.jobs import TERMINAL, JobProgressReporter, open_registry
from serving.metrics import IngressMetrics
from serving.openapi import (
    GENERATION_RESPONSES,
    JOB_CREATE_RESPONSES,
    JOB_EVENTS_RESPONSES,
    JOB_READ_RESPONSES,
    PREVIEW_PARAMETER,
    READ_RESPONSES,
    document_bearer_auth,
    error_responses,
)
from serving.requests import RequestReader, check_reference
from serving.schemas import (
    ApiError,
    GenerationJob,
    GenerationOptions,
    JobAccepted,
    JobOutcome,
    JobState,
    StyleOptions,
    SubjectOptions,
    request_body_openapi,
)
from stylear_core.config import from_dict

log = logging.getLogger("ray.serve")

# Requests waiting at each HTTP proxy for an ingress slot; past it the proxy answers 503 at once.
INGRESS_MAX_QUEUED_REQUESTS = 64
# A job's runner writes its outcome within this long after the job's own timeout, else the registry
# takes the runner for gone and fails the job.
JOB_DEADLINE_SLACK_S = 30.0
# Registry calls (reads, writes) answer in milliseconds; past this the registry is taken as unavailable.
REGISTRY_TIMEOUT_S = 10.0
MAX_JOB_ID_CHARS = 64


def _app_name() -> str:
    """The Serve application this replica belongs to (each application has its own job registry)."""
    try:
        return serve.get_replica_context().app_name
    except RayServeException:  # built outside Serve
        return "default"


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


def _query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter: ``true``/``false`` (any case) or ``1``/``0``; absent: false; else 422."""
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise ApiError(422, f"{name}: must be true or false, got {value[:20]!r}", name)


def _event(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One server-sent event: ``event:``, optional ``id:``, and the JSON ``data:`` (a single line)."""
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


class ModelAtCapacity(ApiError):
    """503: the model deployment's queues are full (its handle raised ``BackPressureError``)."""

    def __init__(self) -> None:
        super().__init__(503, "the model is at capacity; retry later", None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    metrics: IngressMetrics | None = getattr(request.app.state, "metrics", None)
    if isinstance(exc, ModelAtCapacity) and metrics is not None:
        metrics.overloaded()
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
        self.jobs = open_registry(_app_name(), self.cfg.max_jobs, self.cfg.job_ttl_s)
        self._job_runners: set[asyncio.Task] = set()  # referenced until they end (asyncio keeps weak refs)
        self.metrics = IngressMetrics()
        log.info(
            "ingress: API token %s; CORS origins %s",
            "required" if self.token else "not configured (no auth)",
            self.cfg.cors_origins or "none",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after ``__init__``: the app with this config's auth, CORS and Retry-After."""
        app: FastAPI = self.app  # serve.ingress's own copy of `api`, not yet started
        app.state.retry_after_s = self.cfg.retry_after_s
        app.state.metrics = self.metrics  # the error handler counts the overload 503s it answers
        if self.token:
            app.add_middleware(BearerTokenAuth, token=self.token)
            document_bearer_auth(app)
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
            except asyncio.CancelledError:  # e.g. an async job cancelled: stop the work on the replica too
                response.cancel()
                raise
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"the model did not answer within {timeout:g} s", None) from None
            except BackPressureError:
                raise ModelAtCapacity() from None
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

    def _check_image(self, data: bytes, field: str) -> bytes:
        cfg = self.cfg
        return check_reference(
            data, cfg.max_upload_bytes, cfg.max_reference_pixels, cfg.max_reference_side,
            cfg.max_reference_aspect, field=field,
        )  # fmt: skip

    def _job(
        self, kind: str, options: GenerationOptions, uploads: dict[str, bytes], **extra: Any
    ) -> GenerationJob:
        side = self.cfg.model.image_size
        condition = uploads.get("condition")
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
            condition=self._check_image(condition, "condition") if condition is not None else None,
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
        return await self._generate(*await self._style_job(request))

    async def _style_job(self, request: Request) -> tuple[GenerationJob, GenerationOptions]:
        """A style request's body read, checked and turned into the model's job (4xx on a bad field)."""
        options, uploads = await self.reader.read(request, StyleOptions)
        reference = uploads.get("image")
        if reference is None:
            raise ApiError(422, "image: a style reference image is required", "image")
        self._check_image(reference, "image")
        use_sam = self.cfg.sam_default if options.sam is None else options.sam
        if use_sam and not self.cfg.sam_enabled:
            raise ApiError(422, "sam: SAM cleaning is not enabled on this server", "sam")
        sam_mode = options.sam_mode or self.cfg.resolved_sam_mode_default
        job = self._job(
            "style",
            options,
            uploads,
            reference=reference,
            noise_strength=options.noise_strength,
            sam=use_sam,
            sam_mode=sam_mode,
        )
        return job, options

    @api.post(
        "/v1/generate/subject",
        response_model=None,
        responses=GENERATION_RESPONSES,
        openapi_extra={"requestBody": request_body_openapi(SubjectOptions)},
    )
    async def generate_subject(self, request: Request) -> Response:
        """Subject-driven generation: a prompt with the subject's identifier, on the subject's adapter."""
        return await self._generate(*await self._subject_job(request))

    async def _subject_job(self, request: Request) -> tuple[GenerationJob, GenerationOptions]:
        """A subject request's body read, checked and turned into the model's job (4xx on a bad field)."""
        options, uploads = await self.reader.read(request, SubjectOptions)
        if "image" in uploads:
            raise ApiError(422, "image: subject generation takes no reference image", "image")
        return self._job("subject", options, uploads), options

    # --- async jobs ----------------------------------------------------------------------------------

    @api.post(
        "/v1/jobs/style",
        status_code=202,
        response_model=JobAccepted,
        responses=JOB_CREATE_RESPONSES,
        openapi_extra={"requestBody": request_body_openapi(StyleOptions, file_field="image")},
    )
    async def create_style_job(self, request: Request) -> JSONResponse:
        """``POST /v1/generate/style`` as a background job: 202 ``{"id", "status"}`` at once.

        The body is the synchronous endpoint's, checked the same way (a bad field is the same 4xx now,
        not a failed job); ``response_format`` does not apply (the result is base64 JSON) and
        ``timeout_s`` bounds the job's run.
        """
        return await self._submit_job(*await self._style_job(request))

    @api.post(
        "/v1/jobs/subject",
        status_code=202,
        response_model=JobAccepted,
        responses=JOB_CREATE_RESPONSES,
        openapi_extra={"requestBody": request_body_openapi(SubjectOptions)},
    )
    async def create_subject_job(self, request: Request) -> JSONResponse:
        """``POST /v1/generate/subject`` as a background job: 202 ``{"id", "status"}`` at once."""
        return await self._submit_job(*await self._subject_job(request))

    @api.get("/v1/jobs/{job_id}", response_model=JobState, responses=JOB_READ_RESPONSES)
    async def job_state(self, job_id: str) -> JSONResponse:
        """A job's status, progress (tokens done / total), and its result (base64 PNG, seed) or error."""
        return JSONResponse(await self._job_state(job_id))

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobState, responses=JOB_READ_RESPONSES)
    async def cancel_job(self, job_id: str) -> JSONResponse:
        """Cancel a queued or running job: it is ``cancelled`` at once and its decode rows are freed at the
        model's next step. A job that already ended stays as it is. Answers the job's state."""
        state = await self._registry("cancel", job_id) if len(job_id) <= MAX_JOB_ID_CHARS else None
        if state is None:
            raise ApiError(404, "job: unknown or expired id", "id")
        return JSONResponse(state)

    @api.get(
        "/v1/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses=JOB_EVENTS_RESPONSES,
        openapi_extra={"parameters": [PREVIEW_PARAMETER]},
    )
    async def job_events(self, job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events of a job until it ends: ``progress`` (queued, running) then one of ``done``
        (with the result), ``failed`` (with the error) or ``cancelled``; each ``data:`` is the job's state
        as ``GET /v1/jobs/{id}`` gives it, each ``id:`` its version. A comment line keeps a quiet stream
        open. With ``preview=true``, a running job's progress event also carries ``preview`` when a new one
        is ready: a low-resolution PNG (base64, 1/4 side) decoded from its tokens so far, made at most every
        ``job_preview_every_s`` and only while such a stream is open; ``done`` carries none."""
        preview = _query_flag(request, "preview")
        state = await self._job_state(job_id)  # an unknown id is a 404 before the stream starts
        return StreamingResponse(
            self._job_event_stream(job_id, state, preview),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _registry(self, method: str, *args: Any, timeout: float = REGISTRY_TIMEOUT_S) -> Any:
        """Call the job registry; a 503 when it does not answer within ``timeout``."""
        try:
            return await asyncio.wait_for(getattr(self.jobs, method).remote(*args), timeout)
        except (asyncio.TimeoutError, RayError) as e:
            log.warning("job registry: %s failed: %r", method, e)
            raise ApiError(503, "the job registry is unavailable; retry later", None) from None

    async def _job_state(self, job_id: str) -> dict[str, Any]:
        state = await self._registry("get", job_id) if len(job_id) <= MAX_JOB_ID_CHARS else None
        if state is None:
            raise ApiError(404, "job: unknown or expired id", "id")
        return state

    async def _submit_job(self, job: GenerationJob, options: GenerationOptions) -> JSONResponse:
        """Register ``job`` and start its runner on this replica; 202 with its id (429 when full)."""
        timeout = min(options.timeout_s or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        run_s = timeout + JOB_DEADLINE_SLACK_S
        job_id = await self._registry("create", job.kind, job.width, job.height, job.adapter, run_s)
        if job_id is None:
            self.metrics.overloaded()  # refused for want of room, like a 503 from the model's bound
            raise ApiError(429, f"{self.cfg.max_jobs} jobs are held; retry once some end or expire", None)
        # A fresh context: the runner is not part of this HTTP request (which ends now), so nothing Serve
        # ties to the request (e.g. cancelling its child calls) reaches the job.
        runner = asyncio.create_task(self._run_job(job_id, job, timeout), context=contextvars.Context())
        self._job_runners.add(runner)
        runner.add_done_callback(self._job_runners.discard)
        return JSONResponse({"id": job_id, "status": "queued"}, status_code=202)

    async def _run_job(self, job_id: str, job: GenerationJob, timeout: float) -> None:
        """Run one job through the model (the synchronous endpoints' call) and write how it ended.

        Every ending reaches the registry: the image, the model's 4xx/5xx, a timeout (504), an unavailable
        model (503), anything unexpected (500). A job cancelled through the registry (from any replica)
        ends the wait on ``wait_end``; the model call is then cancelled, which frees its decode rows.
        """
        reporter = JobProgressReporter(
            self.jobs, job_id, self.cfg.job_progress_interval_s, self.cfg.job_preview_every_s
        )
        call = asyncio.ensure_future(self._job_outcome(job, reporter, timeout))
        ended = asyncio.ensure_future(self.jobs.wait_end.remote(job_id))
        ended.add_done_callback(lambda f: f.cancelled() or f.exception())  # a lost registry is logged below
        try:
            await asyncio.wait({call, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done() and ended.done() and ended.exception() is not None:
                log.warning("job %s: lost sight of the registry: %r", job_id, ended.exception())
                await asyncio.wait({call})  # the outcome is still written, should the registry be back
            if not call.done():  # cancelled, or failed for want of its runner: nobody wants the image now
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return
            outcome: JobOutcome = call.result()
            if outcome.status == 200 and outcome.png is not None:
                image = base64.b64encode(outcome.png).decode()
                await self._registry("finish", job_id, image, outcome.seed)
            else:
                await self._record_failure(
                    job_id, outcome.status, outcome.error or "generation failed", outcome.field
                )
        except ApiError as e:
            if isinstance(e, ModelAtCapacity):  # the job waited for room until its timeout and found none
                self.metrics.overloaded()
            await self._record_failure(job_id, e.status, e.message, e.field)
        except asyncio.CancelledError:  # the replica is shutting down: stop the model's work, say why
            call.cancel()
            self.jobs.fail.remote(job_id, 503, "the server stopped before the job ended; resubmit it", None)
            raise
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            await self._record_failure(job_id, 500, "internal error", None)

    async def _job_outcome(
        self, job: GenerationJob, reporter: JobProgressReporter, timeout: float
    ) -> JobOutcome:
        """The model's answer to a job; while the model is at capacity or unavailable (503), asked again.

        A synchronous client is told 503 and retries itself; a job waits instead (0.1 s, doubling up to
        ``retry_after_s``), so more jobs than the model deployment's queues hold can be submitted at once.
        The job's ``timeout`` bounds the whole wait; past it, the last 503 is the job's error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = 0.1
        while True:
            try:
                remaining = max(deadline - loop.time(), 0.001)
                return await self._call_model(
                    "generate", job, reporter, adapter=job.adapter, timeout=remaining
                )
            except ApiError as e:
                pause = min(backoff, deadline - loop.time())
                if e.status != 503 or pause <= 0:
                    raise
                await asyncio.sleep(pause)
                backoff = min(2 * backoff, max(self.cfg.retry_after_s, 0.1))

    async def _record_failure(self, job_id: str, status: int, message: str, field: str | None) -> None:
        try:
            await self._registry("fail", job_id, status, message, field)
        except ApiError:  # the registry is gone: the log is the only place left for the error
            log.error("job %s failed (%s %s) and the registry could not be told", job_id, status, message)

    async def _job_event_stream(
        self, job_id: str, state: dict[str, Any] | None, preview: bool = False
    ) -> AsyncIterator[str]:
        """The events of :meth:`job_events`, bounded by the longest a job can run."""
        keepalive = self.cfg.job_events_keepalive_s
        stop_at = time.monotonic() + self.cfg.request_timeout_s + JOB_DEADLINE_SLACK_S + keepalive
        sent = -1
        previewed = -1  # tokens_done of the last preview sent: each preview goes out once
        while True:
            if state is None:
                yield _event("gone", {"error": "job: unknown or expired id", "field": "id"})
                return
            if state["version"] != sent:
                sent = state["version"]
                if "preview" in state and state["preview"]["tokens_done"] == previewed:
                    del state["preview"]
                elif "preview" in state:
                    previewed = state["preview"]["tokens_done"]
                name = state["status"] if state["status"] in TERMINAL else "progress"
                yield _event(name, state, event_id=sent)
            elif time.monotonic() < stop_at:
                yield ": keep-alive\n\n"
            if state["status"] in TERMINAL or time.monotonic() >= stop_at:
                return
            try:
                state = await self._registry(
                    "wait_change", job_id, sent, keepalive, preview, timeout=keepalive + 10
                )
            except ApiError as e:  # the status line is sent: the error can only be an event now
                yield _event("error", e.body())
                return

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
