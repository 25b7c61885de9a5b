"""Reading an HTTP request into validated options: size- and time-bounded bodies, strict JSON and multipart.

A body must arrive within ``body_read_timeout_s`` (408) and stay under the upload limit (413) before
anything is parsed; numbers too long for Python's ``int`` and JSON nested too deeply are 4xx; a style
reference or a condition image is checked from its header only (format, bytes, pixels, sides, aspect
ratio), each error naming its field (``image`` or ``condition``).
"""

# No `from __future__ import annotations`: kept like the ingress, whose FastAPI routes call into here.
import asyncio
import base64
import binascii
import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from serving.config import ServingConfig
from serving.schemas import FILE_FIELDS, ApiError, GenerationOptions, form_values, parse_options
from stylear_core.data.images import (
    WEB_FORMATS,
    ImageDecodeError,
    ImageLimitError,
    UnsupportedImageFormatError,
    probe_image,
)

# Room for the form fields and multipart framing beside the largest allowed upload.
BODY_SLACK_BYTES = 64 * 1024
MAX_FORM_FIELDS = 32
# What an empty upload of each file field is called in its error message.
_UPLOAD_NAMES = {"image": "the style reference", "condition": "the condition image"}


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
    field: str = "image",
) -> bytes:
    """Image bytes whose header shows an accepted image within the limits, else a 4xx naming ``field``.

    ``field`` is ``image`` (the style reference) or ``condition`` (a condition image): both are held to
    the same limits. Only the header is read (a few milliseconds whatever the upload declares), so this
    runs inline on the event loop. The pixels are decoded once, on the model replica's decode thread,
    where data that does not decode (truncated, corrupt) is a 400 naming the field. Statuses: empty
    422; over the byte, pixel or side limit 413; more elongated than the aspect-ratio limit 422; a
    known image format other than PNG, JPEG or WebP 415 (the message lists those); anything else
    unreadable 400.
    """
    if not data:
        raise ApiError(422, f"{field}: {_UPLOAD_NAMES.get(field, 'the image')} is empty", field)
    if len(data) > max_bytes:
        raise ApiError(413, f"{field}: {len(data)} bytes exceeds the {max_bytes}-byte limit", field)
    try:
        probe_image(data, max_pixels, max_side=max_side, max_aspect=max_aspect, formats=WEB_FORMATS)
    except UnsupportedImageFormatError as e:
        raise ApiError(415, f"{field}: {e}", field) from None
    except ImageLimitError as e:
        raise ApiError(422 if e.limit == "aspect" else 413, f"{field}: {e}", field) from None
    except ImageDecodeError as e:
        raise ApiError(400, f"{field}: {e}", field) from None
    return data


class RequestReader:
    """Turns an HTTP request into validated options (+ uploaded image bytes) under the configured limits."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg

    async def read(
        self, request: Request, model: type[GenerationOptions]
    ) -> tuple[GenerationOptions, dict[str, bytes]]:
        """Parse JSON or multipart into ``model``; the uploaded images by field (``image``, ``condition``;
        those sent) as raw bytes, not yet checked (:func:`check_reference`)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # base64 inflates by 4/3; the body may carry a reference and a condition image.
        limit = 2 * self.cfg.max_upload_bytes * 4 // 3 + BODY_SLACK_BYTES
        if content_type == "application/json":
            data, uploads = await self._read_json(request, limit)
        elif content_type == "multipart/form-data":
            data, uploads = await self._read_multipart(request, limit)
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
        return options, uploads

    async def _read_json(self, request: Request, limit: int) -> tuple[dict[str, Any], dict[str, bytes]]:
        data = parse_json_object(await read_body(request, limit, self.cfg.body_read_timeout_s))
        uploads = {}
        for field in FILE_FIELDS:
            encoded = data.pop(field, None)
            if encoded is None:
                continue
            if not isinstance(encoded, str):
                raise ApiError(422, f"{field}: expected a base64 string", field)
            if "," in encoded[:64] and encoded.startswith("data:"):
                encoded = encoded.split(",", 1)[1]  # a data URL
            try:
                uploads[field] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{field}: not valid base64", field) from None
        return data, uploads

    async def _read_multipart(self, request: Request, limit: int) -> tuple[dict[str, Any], dict[str, bytes]]:
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
        uploads: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if key in data or key in uploads:
                raise ApiError(422, f"{key}: given more than once", key)
            if isinstance(value, UploadFile):
                if key not in FILE_FIELDS:
                    raise ApiError(
                        422,
                        f"{key}: unexpected file field (images go in {', '.join(map(repr, FILE_FIELDS))})",
                        key,
                    )
                uploads[key] = await value.read()
            elif key in FILE_FIELDS:  # a text part where a file belongs would be taken for base64 text
                raise ApiError(422, f"{key}: send the image as a file part", key)
            else:
                data[key] = value
        return data, uploads
