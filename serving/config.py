"""The serving application's settings: which model to serve, adapters, batching, request limits.

The same dataclass is the ``args:`` block of an application in ``serving/serve_config.yaml`` (what
``serve deploy`` reads) and the file ``python -m serving --config`` loads; presets live in
``serving/configs/{tiny,lumina7b}.yaml``. Replica counts, autoscaling, ``max_ongoing_requests`` and
``max_queued_requests`` are Ray Serve deployment options and live in the serve config's
``deployments:`` list instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stylear_core.config import ConfigError, option
from stylear_core.curation.masker_config import MaskerConfig
from stylear_core.models.config import ModelConfig


@dataclass
class ServingConfig:
    """Settings shared by the ingress and the model deployment."""

    model: ModelConfig = option(ModelConfig, "the StyleAR model to serve (preset and local checkpoints)")
    sam: MaskerConfig = option(MaskerConfig, "the SAM masker that strips a style reference's content")
    sam_enabled: bool = option(True, "build SAM so requests can ask for reference cleaning")
    sam_default: bool = option(True, "clean style references with SAM when a request does not say")
    sam_mode_default: Literal["auto", "mask", "subtract"] = option(
        "auto",
        "how SAM strips a reference's content when a request does not say: mask (remove the object "
        "before encoding) or subtract (StyleAR's release: subtract the object's CLIP features); "
        "auto = subtract when the model uses the release's prompt template, else mask",
        choices=("auto", "mask", "subtract"),
    )
    sam_subtract_weight: float = option(0.8, "subtract mode: e0 - w * e1 on the CLIP features (release: 0.8)")
    sam_mix_weight: float = option(
        0.8, "subtract mode: share of the content-free tokens, (1-w)*R(e0) + w*R(e0-...) (release: 0.8)"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "model replica device (auto: cuda if present)")
    cuda_graphs: bool = option(True, "capture the decode step in a CUDA graph (CUDA only)")
    torch_threads: int = option(0, "torch CPU threads in the model replica (0: torch's default)")
    adapters_root: str = option("", "directory with one subdirectory per LoRA adapter (empty: none)")
    adapter_slot_rank: int = option(16, "largest LoRA rank a served adapter may have")
    max_adapters_per_replica: int = option(4, "adapters kept loaded per model replica (LRU beyond)")
    max_batch_size: int = option(
        16, "requests one offline engine batch decodes (the served path decodes in max_slots rows)"
    )
    batch_wait_timeout_s: float = option(
        0.05, "kept for older configs: the served path admits requests between decode steps, no waiting"
    )
    max_slots: int = option(
        16,
        "rows of each model replica's continuous-batching pool (one KV cache); a request takes one row, "
        "two with guidance (cfg != 1), and joins the running decode at the next step when rows are free",
    )
    request_timeout_s: float = option(600.0, "the ingress answers 504 when the model takes longer")
    job_ttl_s: float = option(
        600.0, "async jobs: how long a finished job and its result are kept (GET then answers 404)"
    )
    max_jobs: int = option(
        256,
        "async jobs held at once across all ingress replicas, finished ones included (POST /v1/jobs/* "
        "answers 429 beyond); each finished one holds its PNG until job_ttl_s passes",
    )
    job_progress_interval_s: float = option(
        0.25, "async jobs: the model replica reports a job's progress at most this often"
    )
    job_events_keepalive_s: float = option(
        15.0, "async jobs: an events stream sends a comment line after this long without news"
    )
    job_preview_every_s: float = option(
        1.0,
        "async jobs: with GET /v1/jobs/{id}/events?preview=true, the model replica VQ-decodes the job's "
        "tokens so far into a 1/4-side PNG at most this often (one preview decode at a time per replica)",
    )
    max_upload_bytes: int = option(8 * 2**20, "largest style reference upload, in bytes")
    max_reference_pixels: int = option(4096 * 4096, "largest style reference, in pixels")
    max_reference_side: int = option(8192, "longest side a style reference may have, in pixels")
    max_reference_aspect: float = option(
        4.0, "most elongated style reference accepted (longer side / shorter side)"
    )
    reference_working_side: int = option(
        1024,
        "references are shrunk to this longer side right after decoding, before SAM and CLIP: at least "
        "SAM's input side (1024 for vit_h/l/b); with max_reference_aspect it keeps the shorter side at or "
        "above CLIP's input (224 for ViT-H-14)",
    )
    max_prompt_chars: int = option(2000, "longest prompt, in characters")
    max_side: int = option(1024, "largest height or width a request may ask for, in pixels")
    stats_window: int = option(1000, "how many recent batch sizes the model deployment remembers")
    min_timeout_s: float = option(1.0, "shortest timeout_s a request may ask for (422 below; 0: no floor)")
    body_read_timeout_s: float = option(
        10.0, "a request body must arrive within this many seconds, else 408 (frees the ingress slot)"
    )
    retry_after_s: int = option(
        2, "Retry-After seconds sent with every 429/503 (the ingress's and its queue-full answers)"
    )
    auth_token_env: str = option(
        "STYLEAR_API_TOKEN", "environment variable holding the API bearer token (empty: not read)"
    )
    auth_token_file: str = option("", "file holding the API bearer token, e.g. a mounted secret (wins)")
    auth_required: bool = option(
        False, "refuse to start without an API token (set where the proxy binds beyond 127.0.0.1)"
    )
    cors_origins: list[str] = option(
        [], "browser origins allowed to call the API (CORS), e.g. https://app.example; empty: no CORS"
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable setting."""
        positive = (
            "adapter_slot_rank",
            "max_adapters_per_replica",
            "max_batch_size",
            "max_slots",
            "max_upload_bytes",
            "max_reference_pixels",
            "max_reference_side",
            "reference_working_side",
            "max_prompt_chars",
            "max_side",
            "stats_window",
            "max_jobs",
            "job_ttl_s",
            "job_progress_interval_s",
            "job_events_keepalive_s",
            "job_preview_every_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.batch_wait_timeout_s < 0:
            raise ConfigError("request_timeout_s must be > 0 and batch_wait_timeout_s >= 0")
        if self.max_slots < 2:
            raise ConfigError(
                f"max_slots: must be at least 2 (a guided request takes two rows), got {self.max_slots}"
            )
        if self.max_reference_aspect < 1:
            raise ConfigError(f"max_reference_aspect: must be at least 1, got {self.max_reference_aspect}")
        if self.max_side % 32:
            raise ConfigError(f"max_side: {self.max_side} is not a multiple of 32")
        if self.sam_enabled and self.sam.model_type != "tiny" and not self.sam.checkpoint:
            raise ConfigError("sam.checkpoint: a local SAM checkpoint is needed (or set sam_enabled: false)")
        if self.sam_default and not self.sam_enabled:
            raise ConfigError("sam_default: cannot default to SAM cleaning with sam_enabled: false")
        if not math.isfinite(self.sam_subtract_weight):
            raise ConfigError(f"sam_subtract_weight: must be finite, got {self.sam_subtract_weight}")
        if not 0 <= self.sam_mix_weight <= 1:
            raise ConfigError(f"sam_mix_weight: must be in [0, 1], got {self.sam_mix_weight}")
        self._validate_http()

    @property
    def resolved_sam_mode_default(self) -> str:
        """``sam_mode_default`` with ``auto`` resolved: released weights get the release's subtraction."""
        if self.sam_mode_default == "auto":
            return "subtract" if self.model.resolved_prompt_template == "stylear_release" else "mask"
        return self.sam_mode_default

    def _validate_http(self) -> None:
        if not 0 <= self.min_timeout_s <= self.request_timeout_s:
            raise ConfigError(f"min_timeout_s: must be in [0, request_timeout_s], got {self.min_timeout_s}")
        if self.body_read_timeout_s <= 0:
            raise ConfigError(f"body_read_timeout_s: must be positive, got {self.body_read_timeout_s}")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry_after_s: must be >= 0, got {self.retry_after_s}")
        if self.auth_required and not (self.auth_token_env or self.auth_token_file):
            raise ConfigError("auth_required: set auth_token_env or auth_token_file (where the token is)")
        for origin in self.cors_origins:
            # An origin is scheme://host[:port] with no path; a trailing slash never matches a browser's.
            if origin != "*" and (
                "://" not in origin or origin.endswith("/") or "/" in origin.split("://", 1)[1]
            ):
                raise ConfigError(f"cors_origins: {origin!r} is not an origin like https://app.example")
