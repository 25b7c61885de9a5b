"""What crosses the wire: HTTP request options, the job the ingress hands the model, and its outcome.

Every client error is an :class:`ApiError` answered as ``{"error": <message>, "field": <name>}``
with a 4xx status; ``field`` names the request field at fault (``body`` / ``content-type`` for
the envelope itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stylear_core.inference.adapters import ADAPTER_NAME_PATTERN
from stylear_core.inference.engine import LUMINA_CFG_SCALE, LUMINA_IMAGE_TOP_K


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a message, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": self.message, "field": self.field}


class GenerationOptions(BaseModel):
    """Options common to both endpoints (JSON body fields or multipart form fields)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw")
    height: int | None = Field(None, ge=32, description="image height in pixels, multiple of 32")
    width: int | None = Field(None, ge=32, description="image width in pixels, multiple of 32")
    cfg: float = Field(LUMINA_CFG_SCALE, ge=0.0, le=50.0, description="classifier-free guidance scale")
    top_k: int = Field(
        LUMINA_IMAGE_TOP_K, ge=1, le=1 << 20, description="image top-k (clamped to the codebook)"
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="sampling temperature (0: greedy)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (random if absent)")
    adapter: str | None = Field(None, description="name of a LoRA adapter under the adapters root")
    response_format: Literal["png", "base64"] = Field("png", description="PNG bytes or JSON with base64 PNG")
    timeout_s: float | None = Field(None, gt=0.0, description="give up after this many seconds (504)")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is blank")
        return value

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_32(cls, value: int | None) -> int | None:
        if value is not None and value % 32:
            raise ValueError(f"{value} is not a multiple of 32")
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not ADAPTER_NAME_PATTERN.match(value):
            raise ValueError("an adapter name is 1-64 letters, digits, '.', '_' or '-'")
        return value


class StyleOptions(GenerationOptions):
    """Options of ``POST /v1/generate/style``; the reference comes as the ``image`` field."""

    image: str | None = Field(None, description="base64 reference image (JSON bodies; multipart: a file)")
    noise_strength: float | None = Field(None, ge=0.0, le=2.0, description="style-token noise std")
    sam: bool | None = Field(None, description="strip the reference's content with SAM first")


class SubjectOptions(GenerationOptions):
    """Options of ``POST /v1/generate/subject``: a prompt naming the subject's identifier, and its adapter."""


def parse_options(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """Validate ``data`` against ``model``; the first problem becomes a 422 :class:`ApiError` naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown field {field!r}"
        raise ApiError(422, f"{field}: {message}", field) from None


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
