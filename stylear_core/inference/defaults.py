"""Plain values the HTTP layer validates against without loading torch: sampling defaults, adapter names."""

from __future__ import annotations

# The adapter name rule lives with the adapter format; the HTTP layer reads it from here.
from stylear_core.adapters.format import ADAPTER_NAME_PATTERN

# Lumina-mGPT's published sampling defaults (its inference_solver): CFG scale and image top-k.
LUMINA_CFG_SCALE = 4.0
LUMINA_IMAGE_TOP_K = 2000

__all__ = ["ADAPTER_NAME_PATTERN", "LUMINA_CFG_SCALE", "LUMINA_IMAGE_TOP_K"]
