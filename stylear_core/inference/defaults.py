"""Plain values the HTTP layer validates against without loading torch: sampling settings, adapter names.

:class:`SamplingConfig` is the one set of sampling settings every generation path shares (style
evaluation, preference pairs, the subject student, the serving model's requests); each path's own
config extends it with what only that path has (how many samples, how they are ranked, where they run).
"""

from __future__ import annotations

from dataclasses import dataclass

# The adapter name rule lives with the adapter format; the HTTP layer reads it from here.
from stylear_core.adapters.format import ADAPTER_NAME_PATTERN
from stylear_core.config import option

# Lumina-mGPT's published sampling defaults (its inference_solver): CFG scale and image top-k.
LUMINA_CFG_SCALE = 4.0
LUMINA_IMAGE_TOP_K = 2000


@dataclass
class SamplingConfig:
    """How image tokens are drawn (Lumina-mGPT's defaults) and how much noise the style tokens get.

    ``noise_strength`` applies to prompts with style tokens; a text-only prompt has none to perturb.
    Per-image seeds are not part of it: each caller derives them by its own rule and passes them in.
    """

    cfg_scale: float = option(LUMINA_CFG_SCALE, "classifier-free guidance scale")
    top_k: int = option(LUMINA_IMAGE_TOP_K, "image top-k (clamped to the codebook)")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    noise_strength: float = option(0.3, "style-token noise at sampling time (prompts with style tokens)")


# The defaults as values, for places that need a plain number (the HTTP schema's field defaults).
SAMPLING_DEFAULTS = SamplingConfig()

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "LUMINA_CFG_SCALE",
    "LUMINA_IMAGE_TOP_K",
    "SAMPLING_DEFAULTS",
    "SamplingConfig",
]
