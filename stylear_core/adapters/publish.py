"""Publish an adapter under an adapters root in one step, after its parity check where the caller runs one.

A serving replica lists and reads ``<adapters_root>/<name>`` at any time, so :func:`publish_adapter` never
lets it see a half-written adapter: the copy (and its manifest) goes to a hidden temporary directory
beside the target, is flushed to disk, and replaces the older adapter by renames. A copy that fails
leaves the older adapter as it was and removes its temporary directory. Hidden names (``.<name>...``)
do not match :data:`~stylear_core.adapters.format.ADAPTER_NAME_PATTERN`, so a listing skips them.

:func:`check_parity` is the publish gate: the served adapter's probe difference
(:func:`stylear_core.evaluation.adapter_parity.served_adapter_parity`, run on a Ray task by
:func:`served_parity_on_ray`) must be within a tolerance. The export job and subject training both
gate before they publish.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stylear_core.adapters.format import check_adapter_name
from stylear_core.runs import write_manifest


def check_parity(parity: float, tolerance: float, source: str | Path) -> float:
    """``parity`` when it is within ``tolerance``; else a ``RuntimeError`` naming the adapter ``source``
    (a NaN difference fails too)."""
    if not parity <= tolerance:
        raise RuntimeError(
            f"{source}: served adapter differs from the trained one by {parity:.3g} > {tolerance}"
        )
    return parity


def served_parity_on_ray(
    model_cfg: Any, adapter_dir: str | Path, slot_rank: int, cpus: float = 1.0, gpus: float = 0.0
) -> float:
    """:func:`~stylear_core.evaluation.adapter_parity.served_adapter_parity` of ``adapter_dir`` on a Ray
    task of ``cpus`` / ``gpus`` (the driver need not fit a second base model); ``ray.init`` first."""
    import ray

    from stylear_core.evaluation.adapter_parity import served_adapter_parity

    device = "cuda" if gpus else "cpu"
    check = ray.remote(served_adapter_parity).options(num_cpus=cpus, num_gpus=gpus)
    return float(ray.get(check.remote(model_cfg, str(adapter_dir), slot_rank, device)))


def _fsync_tree(directory: Path) -> None:
    # A rename is only as durable as the data it points at: flush every file, then the directories.
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_adapter(
    adapter_dir: str | Path,
    adapters_root: str | Path,
    name: str,
    manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Copy an adapter directory to ``<adapters_root>/<name>``, replacing an older one, so a server
    watching the root never sees a half-copied adapter. Returns the published directory.

    With ``manifest`` (a full manifest: ``format`` plus fields; ``written_at`` is renewed) the published
    copy's ``manifest.json`` is rewritten before it becomes visible.
    """
    check_adapter_name(name)
    root = Path(adapters_root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        shutil.copytree(adapter_dir, tmp)
        if manifest is not None:
            fields = {k: v for k, v in manifest.items() if k not in ("format", "written_at")}
            write_manifest(tmp, manifest["format"], **fields)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = root / f".{name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
