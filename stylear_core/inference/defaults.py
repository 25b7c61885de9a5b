"""Plain values the HTTP layer validates against without loading torch: sampling defaults, adapter names."""

from __future__ import annotations

import re

# Lumina-mGPT's published sampling defaults (its inference_solver): CFG scale and image top-k.
LUMINA_CFG_SCALE = 4.0
LUMINA_IMAGE_TOP_K = 2000

# A served adapter's name is one path component under the adapters root.
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
