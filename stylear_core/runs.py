"""Run directories and manifests: every stage writes ``manifest.json`` next to its outputs.

A manifest says what a directory holds (``format``, versioned), which config made it and when,
so a stage can be rerun or resumed alone and its outputs inspected without the code that wrote them.
A stage is finished exactly when its manifest has ``"status": "complete"``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PUBLISHED_MODEL = "model"  # under the pretrain stage's output dir: the world's parts and the base it trained


def published_model_dir(pretrain_dir: str | Path) -> Path:
    """Where the pretrain stage whose output dir is ``pretrain_dir`` published the world's parts (VQGAN,
    style CLIP, judges, ``world.json``) and the base model: what later stages and reports read."""
    return Path(pretrain_dir) / PUBLISHED_MODEL


def write_manifest(directory: str | Path, fmt: str, **fields: Any) -> Path:
    """Atomically write ``directory/manifest.json`` with ``format`` = ``fmt`` and the given fields."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": fmt, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when there is none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_complete(directory: str | Path, fmt: str | None = None) -> bool:
    """True when ``directory`` holds a finished stage's output (of format ``fmt`` when given)."""
    m = read_manifest(directory)
    return bool(m and m.get("status") == "complete" and (fmt is None or m.get("format") == fmt))
