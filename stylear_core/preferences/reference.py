"""The DPO reference's log-probabilities of each preference pair, scored once instead of every step.

DPO's reference (the frozen SFT model) never changes, so ``log pi_ref(chosen)`` and ``log pi_ref(rejected)``
can be computed once and stored with the pairs (the ``precompute_ref_log_probs`` idea of TRL's
``DPOTrainer``). Here they are scored exactly as :class:`~stylear_core.training.objectives.StyleDPOObjective`
would: the same :class:`~stylear_core.training.batches.PreferenceBatchCollate` (prompt ids, left / right
padding, the style reference through the style encoder's preprocessing), the same style tokens and the
same summed image-token log-probs (:meth:`StyleARModel.log_probs`), in eval mode.

* :func:`reference_digest` says for which reference the values hold: the SFT adapter's weight files, the
  model block's weight-defining fields and the style-noise strength. DPO uses stored values only where
  this digest is its own.
* Style noise: with a strength above 0 the reference depends on the noise draw. Stored values use one
  fixed draw per pair (:func:`pair_style_tokens`, seeded by the pair id), and DPO's cached path gives the
  policy that same draw, so policy and reference still see the same style tokens (a reward of exactly 0
  where they agree); the live path draws fresh noise every step instead.
* :class:`PreferencePairSampler` writes the columns as it makes the pairs (the SFT model is in its actors
  already); :func:`precompute_reference_log_probs` scores pair files that lack them (older files, or made
  for another adapter or strength) as a Ray Data map, into a cache keyed by the digest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stylear_core.adapters.format import BACKBONE_WEIGHTS_NAME, RESAMPLER_WEIGHTS_NAME
from stylear_core.data.batch_columns import table_to_numpy_batch
from stylear_core.data.schemas import PREFERENCE_PAIRS_SCHEMA, conform_table, parquet_files
from stylear_core.models.config import ModelConfig
from stylear_core.models.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from stylear_core.training.batches import PreferenceBatchCollate, preference_sequences

REFERENCE_LOGP_FORMAT = "stylear.reference_logp/1"
REFERENCE_COLUMNS = (
    "reference_chosen_logp",
    "reference_rejected_logp",
    "reference_noise_strength",
    "reference_digest",
)
# The model-block fields that decide the reference's weights, tokenisation or layout; the others
# (noise defaults, gradient checkpointing, trainable, LoRA dropout) do not change its log-probs.
_WEIGHT_FIELDS = (
    "preset",
    "backbone_path",
    "tokenizer_path",
    "clip_checkpoint",
    "stylear_release",
    "prompt_template",
    "lora_rank",
    "lora_alpha",
    "num_style_tokens",
    "image_size",
    "dtype",
    "seed",
)
_ADAPTER_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, RESAMPLER_WEIGHTS_NAME, BACKBONE_WEIGHTS_NAME)
# Leading underscore: parquet readers (pyarrow, parquet_files) skip it in the directory of parquet files.
COMPLETE_NAME = "_reference_logps.json"


def reference_digest(adapter_dir: str | Path, model: ModelConfig, noise_strength: float) -> str:
    """The key of stored reference log-probs: SHA-256 (32 hex digits) over the SFT adapter's weight files
    (bytes), the model block's weight-defining fields and the style-noise strength.

    Base weights count by their paths (a 7B checkpoint is not hashed on every run): replacing the files
    behind ``backbone_path`` in place is not seen.
    """
    h = hashlib.sha256(REFERENCE_LOGP_FORMAT.encode())
    fields = {name: getattr(model, name) for name in _WEIGHT_FIELDS}
    h.update(json.dumps({"model": fields, "noise_strength": float(noise_strength)}, sort_keys=True).encode())
    directory = Path(adapter_dir)
    for name in _ADAPTER_FILES:
        path = directory / name
        if not path.is_file():
            continue
        h.update(name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def pair_noise_seed(id_hash: int) -> int:
    """The seed of a pair's fixed style-noise draw, from its id's CRC32 (:func:`~stylear_core.training.
    batches.id_hash`): the same on every worker, run and device."""
    return (int(id_hash) * 1_000_003 + 0x5EED) % 2**62


def pair_style_tokens(tokens: torch.Tensor, id_hashes: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise-free style tokens ``(B, N, hidden)`` plus ``strength`` times each pair's fixed draw.

    The draw is made on the CPU in float32 from :func:`pair_noise_seed` and then moved, so stored values
    and the training step agree across devices. A strength of 0 returns ``tokens``.
    """
    if strength == 0:
        return tokens
    shape = tuple(tokens.shape[1:])
    draws = [
        torch.randn(shape, generator=torch.Generator().manual_seed(pair_noise_seed(h)))
        for h in id_hashes.tolist()
    ]
    noise = torch.stack(draws).to(device=tokens.device, dtype=tokens.dtype)
    return tokens + noise * strength


@torch.no_grad()
def reference_log_probs(
    model: Any, batch: dict[str, torch.Tensor], noise_strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed image-token log-probs ``(B,)`` of the chosen and of the rejected rows of a
    :class:`PreferenceBatchCollate` batch under ``model`` (a :class:`StyleARModel`, used as is: put it in
    eval mode), with the pairs' fixed style-noise draws at ``noise_strength``."""
    device = model.backbone.device
    batch = {k: v.to(device) for k, v in batch.items()}
    features = model.style_features(batch["style_pixels"])
    tokens = pair_style_tokens(
        model.style_tokens(style_features=features, noise_strength=0.0), batch["id_hash"], noise_strength
    )
    seq = preference_sequences(batch)
    logp = model.log_probs(style_tokens=torch.cat([tokens, tokens]), **seq).double().cpu()
    n = batch["prompt_ids"].shape[0]
    return logp[:n], logp[n:]


def score_reference_columns(
    model: Any,
    collate: PreferenceBatchCollate,
    rows: dict[str, np.ndarray],
    noise_strength: float,
    digest: str,
    batch_size: int = 1,
) -> dict[str, list]:
    """The :data:`REFERENCE_COLUMNS` values of preference rows (a numpy batch as Ray Data gives it), scored
    ``batch_size`` pairs per forward (padding changes no value beyond float rounding: masked positions,
    positions counted from each row's first real token)."""
    n = len(rows["id"])
    chosen: list[float] = []
    rejected: list[float] = []
    for start in range(0, n, max(1, batch_size)):
        part = {k: v[start : start + batch_size] for k, v in rows.items()}
        c, r = reference_log_probs(model, collate(part), noise_strength)
        chosen += c.tolist()
        rejected += r.tolist()
    return {
        "reference_chosen_logp": chosen,
        "reference_rejected_logp": rejected,
        "reference_noise_strength": [float(noise_strength)] * n,
        "reference_digest": [digest] * n,
    }


class ReferenceLogProbScorer:
    """Ray Data actor: preference-pair tables -> the same tables with :data:`REFERENCE_COLUMNS` (re)scored.

    Takes the model block, the SFT artefact directory (the reference), the style-noise strength, the pairs
    per forward (``score_batch_size``) and the device (``"auto"``: CUDA when the actor has a GPU). Builds
    the SFT model once per actor.
    """

    def __init__(
        self,
        model: ModelConfig,
        adapter_dir: str,
        noise_strength: float = 0.0,
        score_batch_size: int = 1,
        device: str = "auto",
    ):
        from stylear_core.adapters.io import load_adapter
        from stylear_core.devices import resolve_device
        from stylear_core.models.presets import build_prompt_tokenizer, build_stylear_model

        self.device = resolve_device(device)
        self.model = load_adapter(build_stylear_model(model, self.device), adapter_dir).eval()
        self.noise_strength = noise_strength
        self.score_batch_size = score_batch_size
        self.digest = reference_digest(adapter_dir, model, noise_strength)
        m = self.model
        tokenizer = build_prompt_tokenizer(model, m.vocab)
        self.collate = PreferenceBatchCollate(
            m.vocab, tokenizer, m.num_style_tokens, m.style_encoder.preprocess
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        """A pyarrow batch of pairs -> a ``stylear.preference_pairs/1`` table with the reference columns."""
        needed = ("id", "prompt", "prompt_ids", "style_image", "height", "width")
        rows = table_to_numpy_batch(table, (*needed, "chosen_tokens", "rejected_tokens"))
        scored = score_reference_columns(
            self.model, self.collate, rows, self.noise_strength, self.digest, self.score_batch_size
        )
        table = table.drop_columns([c for c in REFERENCE_COLUMNS if c in table.column_names])
        for name, values in scored.items():
            table = table.append_column(name, pa.array(values, PREFERENCE_PAIRS_SCHEMA.field(name).type))
        return conform_table(table, PREFERENCE_PAIRS_SCHEMA)


def reference_logps_state(pairs: str | Path | Sequence[str | Path], digest: str) -> tuple[str, str]:
    """Whether the pair files of ``pairs`` hold reference log-probs for ``digest``: ``("valid", "")``,
    ``("missing", why)`` (a file lacks the columns or has nulls; remote paths are not read and count as
    missing) or ``("stale", why)`` (scored for another reference or noise strength). Reads only the
    reference columns."""
    paths = [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    if any("://" in str(p) for p in paths):
        return "missing", "remote pair files are not inspected"
    files = [f for f in parquet_files(paths) if f.is_file()]
    if not files:
        return "missing", f"no parquet files under {pairs}"
    for f in files:
        names = pq.read_schema(f).names
        absent = [c for c in REFERENCE_COLUMNS if c not in names]
        if absent:
            return "missing", f"{f} has no column(s) {absent}"
        table = pq.read_table(f, columns=list(REFERENCE_COLUMNS))
        if any(table.column(c).null_count for c in REFERENCE_COLUMNS):
            return "missing", f"{f} has rows without reference log-probs"
        found = set(table.column("reference_digest").to_pylist())
        if found - {digest}:
            strengths = sorted(set(table.column("reference_noise_strength").to_pylist()))
            return "stale", (
                f"{f} was scored for reference digest(s) {sorted(found)} at noise strength(s) {strengths}; "
                f"this run's SFT adapter and noise strength give {digest}"
            )
    return "valid", ""


def precompute_reference_log_probs(
    pairs: str | Path,
    model: ModelConfig,
    adapter_dir: str | Path,
    noise_strength: float,
    cache_root: str | Path,
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 16,
    score_batch_size: int = 1,
) -> Path:
    """Score the pairs of ``pairs`` under the SFT model of ``adapter_dir`` as a Ray Data map (up to
    ``actors`` :class:`ReferenceLogProbScorer` actors) and write them, reference columns included and in
    the input's row order, to ``<cache_root>/<digest>/``; returns that directory.

    A directory completed before for the same digest (a resumed or rerun stage) is returned as is.
    """
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    digest = reference_digest(adapter_dir, model, noise_strength)
    target = Path(cache_root) / digest
    if (target / COMPLETE_NAME).is_file() and reference_logps_state(target, digest)[0] == "valid":
        return target
    shutil.rmtree(target, ignore_errors=True)
    ctx = DataContext.get_current()
    kept = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # same rows in the same order: resumes and parity hold
    try:
        ds = ray.data.read_parquet(str(pairs), file_extensions=["parquet"])
        scored = ds.map_batches(
            ReferenceLogProbScorer,
            fn_constructor_kwargs={
                "model": model,
                "adapter_dir": str(adapter_dir),
                "noise_strength": noise_strength,
                "score_batch_size": score_batch_size,
            },
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
            batch_size=batch_size,
            batch_format="pyarrow",
        )
        scored.write_parquet(str(target))
    finally:
        ctx.execution_options.preserve_order = kept
    rows = sum(pq.read_metadata(f).num_rows for f in parquet_files(target))
    info = {"format": REFERENCE_LOGP_FORMAT, "digest": digest, "source": str(pairs), "rows": rows}
    (target / COMPLETE_NAME).write_text(json.dumps(info, indent=1))
    return target


__all__ = [
    "REFERENCE_COLUMNS",
    "REFERENCE_LOGP_FORMAT",
    "ReferenceLogProbScorer",
    "pair_style_tokens",
    "precompute_reference_log_probs",
    "reference_digest",
    "reference_log_probs",
    "reference_logps_state",
    "score_reference_columns",
]
