"""What crosses the wire: HTTP request options, the job the ingress hands the model, and its outcome.

Every client error is an :class:`ApiError` answered as ``{"error": <message>, "field": <name>}``
(:class:`ErrorBody`) with a 4xx status; ``field`` names the request field at fault (``body`` /
``content-type`` / ``authorization`` for the envelope itself).

Request options are validated strictly, the same way for both encodings: an integer field takes
an integer (not ``true``, not ``3.0``), a number field a finite number, a boolean ``true``/``false``.
JSON bodies are checked in pydantic's strict mode; multipart form fields, which are all text, are
first read by :func:`form_values` (decimal digits for integers, a decimal number for numbers,
``true``/``false`` for booleans) and then checked the same way.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stylear_core.inference.defaults import ADAPTER_NAME_PATTERN, SAMPLING_DEFAULTS

# Longest integer / number text a form field may hold: far beyond every field's range, far below
# Python's 4300-digit limit on int() (which raises ValueError, not a validation error).
MAX_NUMBER_CHARS = 40
_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a message, the field at fault, extra headers.

    The ingress's handler adds ``Retry-After`` to every 429/503 that does not carry one.
    """

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": self.message, "field": self.field}


class ErrorBody(BaseModel):
    """Every error the service answers (4xx/5xx) has this JSON body."""

    error: str = Field(description="what went wrong, for a person to read")
    field: str | None = Field(
        description="the request field at fault (body, content-type, authorization for the envelope)"
    )


class GeneratedImage(BaseModel):
    """The answer to a generation with ``response_format=base64``."""

    image: str = Field(description="the PNG, base64-encoded")
    seed: int = Field(description="the sampling seed used (send it back to get the same image)")
    width: int
    height: int
    adapter: str | None = Field(description="the LoRA adapter used, if any")


class JobAccepted(BaseModel):
    """The answer to ``POST /v1/jobs/{style,subject}`` (202): the new job's id and its first status."""

    id: str = Field(description="the job's id: GET /v1/jobs/{id}, GET /v1/jobs/{id}/events, POST .../cancel")
    status: Literal["queued"] = "queued"


class JobProgress(BaseModel):
    """How far a job's image is: tokens sampled so far of the image's tokens."""

    tokens_done: int = Field(description="image tokens sampled so far")
    tokens_total: int | None = Field(description="the image's tokens (known once it runs)")


class JobError(BaseModel):
    """Why a job failed: the status and body its synchronous request would have answered."""

    status: int = Field(description="the HTTP status the synchronous endpoint would answer")
    error: str = Field(description="what went wrong, for a person to read")
    field: str | None = Field(description="the request field at fault, if one is")


class JobState(BaseModel):
    """``GET /v1/jobs/{id}``: a job's status, progress, and its result or error once it ends."""

    id: str
    kind: Literal["style", "subject"]
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: JobProgress
    created_at: float = Field(description="when it was accepted (Unix time, seconds)")
    finished_at: float | None = Field(description="when it ended (Unix time, seconds)")
    result: GeneratedImage | None = Field(
        description="the image, once done (kept for the server's job_ttl_s)"
    )
    error: JobError | None = Field(description="why it failed, if it did")
    version: int = Field(description="bumped on every change (events carry it too)")


class GenerationOptions(BaseModel):
    """Options common to both endpoints (JSON body fields or multipart form fields)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw")
    height: int | None = Field(
        None, ge=32, multiple_of=32, description="image height in pixels, multiple of 32"
    )
    width: int | None = Field(
        None, ge=32, multiple_of=32, description="image width in pixels, multiple of 32"
    )
    # Defaults: the shared SamplingConfig's (Lumina-mGPT's), as every offline path samples.
    cfg: float = Field(
        SAMPLING_DEFAULTS.cfg_scale,
        ge=0.0,
        le=50.0,
        allow_inf_nan=False,
        description="classifier-free guidance scale",
    )
    top_k: int = Field(
        SAMPLING_DEFAULTS.top_k, ge=1, le=1 << 20, description="image top-k (clamped to the codebook)"
    )
    temperature: float = Field(
        SAMPLING_DEFAULTS.temperature,
        ge=0.0,
        le=5.0,
        allow_inf_nan=False,
        description="sampling temperature (0: greedy)",
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (random if absent)")
    adapter: str | None = Field(
        None, max_length=64, description="name of a LoRA adapter under the adapters root (GET /v1/adapters)"
    )
    response_format: Literal["png", "base64"] = Field("png", description="PNG bytes or JSON with base64 PNG")
    timeout_s: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="give up after this many seconds (504); at least the server's min_timeout_s (422 below)",
    )
    condition: str | None = Field(
        None,
        description="base64 condition image, e.g. a depth map, that the image follows (JSON bodies; "
        "multipart: a file). It is VQ-tokenized into the prompt at the requested size, as StyleAR's "
        "release does for depth control; checked like the style reference",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is blank")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800" in JSON) reach no tokenizer
            raise ValueError("the prompt is not valid Unicode text") from None
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not ADAPTER_NAME_PATTERN.fullmatch(value):  # fullmatch: "$" alone lets a trailing newline in
            raise ValueError("an adapter name is 1-64 letters, digits, '.', '_' or '-'")
        return value


class StyleOptions(GenerationOptions):
    """Options of ``POST /v1/generate/style``; the reference comes as the ``image`` field."""

    image: str | None = Field(None, description="base64 reference image (JSON bodies; multipart: a file)")
    noise_strength: float | None = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False, description="style-token noise std"
    )
    sam: bool | None = Field(None, description="strip the reference's content with SAM first")
    sam_mode: Literal["mask", "subtract"] | None = Field(
        None,
        description="how SAM strips the content (with sam): mask = remove the object from the reference "
        "before encoding; subtract = subtract the object's CLIP features from the reference's, as "
        "StyleAR's release does (absent: the server's sam_mode_default)",
    )


class SubjectOptions(GenerationOptions):
    """Options of ``POST /v1/generate/subject``: a prompt naming the subject's identifier, and its adapter."""


def _scalar_kind(annotation: Any) -> type | None:
    """``int``, ``float`` or ``bool`` when a field holds one of those (or None), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (int, float, bool) else None


def form_values(model: type[BaseModel], data: dict[str, str]) -> dict[str, Any]:
    """Multipart text fields read as the types ``model`` declares, strictly; a 422 names a field that is not.

    Integers are decimal digits (``-?[0-9]+``; no ``3.0``, ``1_000``, ``+3`` or spaces), numbers are
    finite decimals, booleans ``true``/``false`` (any case). Other fields stay text.
    """
    values: dict[str, Any] = {}
    for name, text in data.items():
        field = model.model_fields.get(name)
        kind = _scalar_kind(field.annotation) if field is not None else None
        if kind is None:
            values[name] = text
        elif kind is bool:
            if text.lower() not in ("true", "false"):
                raise ApiError(422, f"{name}: expected true or false", name)
            values[name] = text.lower() == "true"
        elif len(text) > MAX_NUMBER_CHARS:
            raise ApiError(422, f"{name}: a number of more than {MAX_NUMBER_CHARS} characters", name)
        elif kind is int:
            if not _INT_TEXT.fullmatch(text):
                raise ApiError(422, f"{name}: expected an integer (decimal digits)", name)
            values[name] = int(text)
        else:
            number = float(text) if _FLOAT_TEXT.fullmatch(text) else None
            if number is None or number in (float("inf"), float("-inf")):
                raise ApiError(422, f"{name}: expected a finite decimal number", name)
            values[name] = number
    return values


def parse_options(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """Validate ``data`` strictly against ``model``; the first problem becomes a 422 :class:`ApiError` naming its field."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown field {field!r}"
        raise ApiError(422, f"{field}: {message}", field) from None


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A property schema with its ``anyOf [X, null]`` folded to X: an absent form field is the null."""
    branches = schema.get("anyOf")
    if not branches:
        return schema
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) != 1:
        return schema
    folded = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**kept[0], **folded}


# Fields that are base64 text in JSON bodies and file parts in multipart forms, with their form description.
FILE_FIELDS = {
    "image": "the reference image file (PNG, JPEG or WebP)",
    "condition": "the condition image file (PNG, JPEG or WebP), e.g. a depth map",
}


def request_body_openapi(model: type[BaseModel], *, file_field: str | None = None) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an endpoint taking ``model`` as JSON or as a multipart form.

    ``file_field`` names the field that is base64 text in JSON and a file part in a form; it is
    required in both (the endpoint answers 422 without it). Other fields of :data:`FILE_FIELDS` the
    model has are optional file parts of the form.
    """
    json_schema = model.model_json_schema()
    form_schema = {
        "type": "object",
        "properties": {name: _without_null(prop) for name, prop in json_schema["properties"].items()},
        "required": list(json_schema.get("required", [])),
        "additionalProperties": False,
    }
    content: dict[str, Any] = {"application/json": {"schema": json_schema}}
    if file_field is not None:
        json_schema["required"] = [*json_schema.get("required", []), file_field]
        json_schema["properties"][file_field] = _without_null(json_schema["properties"][file_field])
        form_schema["required"].append(file_field)
    for name, description in FILE_FIELDS.items():
        if name in form_schema["properties"]:
            form_schema["properties"][name] = {
                "type": "string",
                "format": "binary",
                "description": description,
            }
    content["multipart/form-data"] = {"schema": form_schema}
    return {"required": True, "content": content}


@dataclass
class GenerationJob:
    """One image request as the ingress hands it to the model deployment (already validated for shape)."""

    kind: Literal["style", "subject"]
    prompt: str
    height: int
    width: int
    cfg: float
    top_k: int
    temperature: float
    seed: int | None
    adapter: str | None = None
    reference: bytes | None = None
    noise_strength: float | None = None
    sam: bool = False
    sam_mode: Literal["mask", "subtract"] = "mask"
    condition: bytes | None = None  # a condition image (e.g. a depth map), encoded


@dataclass
class JobOutcome:
    """The model deployment's answer: a PNG and the seed used, or an HTTP status, message and field."""

    png: bytes | None = None
    seed: int | None = None
    status: int = 200
    error: str | None = None
    field: str | None = None

    @classmethod
    def failure(cls, status: int, message: str, field: str | None) -> JobOutcome:
        """An outcome that carries an error instead of an image."""
        return cls(status=status, error=message, field=field)
