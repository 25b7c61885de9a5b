"""The HTTP ingress loads no model stack: each ingress replica would pay seconds and over a GB for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "open_clip", "segment_anything", "peft", "diffusers")


def test_importing_the_ingress_loads_no_model_library():
    code = f"import sys, serving.ingress; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
