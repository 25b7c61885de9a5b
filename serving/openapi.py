"""What ``/openapi.json`` says beyond the routes themselves: every error status, the image answers, bearer auth."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from serving.auth import PUBLIC_PATHS
from serving.schemas import ErrorBody, GeneratedImage, JobAccepted, JobState

ERROR_DESCRIPTIONS = {
    400: "Malformed request: body not valid JSON or multipart, an unreadable image, or bad base64.",
    401: "Missing or wrong API token (`Authorization: Bearer <token>`).",
    404: "Unknown adapter, or (jobs) an unknown or expired job id.",
    408: "The request body did not arrive within the server's body_read_timeout_s "
    "(or the proxy's request_timeout_s passed).",
    413: "The body, the reference image or the condition image is over the size limits.",
    415: "Content type other than JSON or multipart, or an image format other than PNG, JPEG or WebP.",
    422: "A field fails validation; `field` names it.",
    429: "Too many requests queued, or (jobs) max_jobs jobs held; retry after `Retry-After` seconds.",
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
# A job is accepted after the same checks as a synchronous request; the model's own 4xx/5xx (and 504)
# come later, in the job's error.
JOB_CREATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": JobAccepted, "description": "Accepted: poll GET /v1/jobs/{id} or stream its events."},
    **error_responses(400, 408, 413, 415, 422, 429, 500, 503),
}
JOB_READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobState, "description": "The job's state (a failed job is a 200 with its `error`)."},
    **error_responses(404, 408, 429, 500, 503),
}
JOB_EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: `progress` while queued or running, then one of `done`, "
        "`failed`, `cancelled`; each `data:` is the job's state as JSON (JobState), each `id:` its version. "
        "With `preview=true`, progress events of a running job may add `preview`: "
        '`{"image": base64 PNG, "tokens_done", "width", "height"}`.',
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(404, 408, 422, 429, 500, 503),
}
# The events route's query parameter (read by the route itself, so its 422 has the service's error body).
PREVIEW_PARAMETER: dict[str, Any] = {
    "name": "preview",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "add low-resolution previews (PNG, 1/4 side) of the image so far to progress events",
}


def document_bearer_auth(app: FastAPI) -> None:
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
