"""Versioned on-disk record formats (pyarrow schemas) of the data stages, and their checks.

Every parquet file a stage writes carries its schema's version in the schema metadata under
``schema_version`` (``b"stylear.<name>/<major>"``), so a reader can tell what it holds with
nothing but pyarrow. The formats, in the order data flows:

* ``RAW_PAIRS_SCHEMA`` (``stylear.raw/1``): text-image pairs as found, image bytes undecoded.
* ``CURATED_SCHEMA`` (``stylear.curated/2``): training records, raw, stylized or proxy (version 2 added
  the ``proxy`` source; ``PROXY_CURATED_SCHEMA`` is it plus proxy data's subject columns).
* ``SAM_MASKS_SCHEMA`` (``stylear.sam_masks/1``): per reference image, the kept-region mask and the
  image with its salient content removed.
* ``STYLIZER_OUTPUT_SCHEMA`` and ``MASKER_OUTPUT_SCHEMA`` (unversioned, never written as is): what the
  stylizer's and the SAM masker's batch callables return, the columns of a stylized curated row or of
  ``SAM_MASKS_SCHEMA``, each with nulls on failed rows and the reason in ``error``.
* ``TOKEN_SHARDS_SCHEMA`` (``stylear.token_shards/2``): tokenised prompts, VQ image tokens and the
  working-size image they encode (version 2 added ``image``; see :data:`TOKEN_SHARDS_SCHEMA`).
* ``ERRORS_SCHEMA`` (``stylear.errors/1``): one row per record a stage skipped, and why.
* ``PREFERENCE_PAIRS_SCHEMA`` (``stylear.preference_pairs/1``): DPO preference pairs.
* ``EVAL_SAMPLES_SCHEMA`` / ``EVAL_METRICS_SCHEMA`` (``stylear.eval_samples/1``, ``stylear.eval_metrics/1``):
  style evaluation's samples with their scores, and each variant's mean scores.

A column may restrict its values with the field metadata key ``choices`` (comma separated),
checked by :func:`validate_table`. A column marked ``optional`` (nullable, added within a major
version) may be missing from files written before it: :func:`validate_table` accepts them and
:func:`conform_table` fills it with nulls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION_KEY = b"schema_version"
CHOICES_KEY = b"choices"
OPTIONAL_KEY = b"optional"


class SchemaError(ValueError):
    """A table does not match the expected record format; the message names the column."""


def _versioned(version: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: version.encode()})


def _choices(*values: str) -> dict[bytes, bytes]:
    return {CHOICES_KEY: ",".join(values).encode()}


def is_optional(field: pa.Field) -> bool:
    """Whether ``field`` is an optional column: files written before it was added may lack it."""
    return (field.metadata or {}).get(OPTIONAL_KEY) == b"true"


RAW_PAIRS_SCHEMA = _versioned(
    "stylear.raw/1",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded image file, not decoded yet
    ],
)

CURATED_SCHEMA = _versioned(
    "stylear.curated/2",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG
        pa.field("source", pa.string(), nullable=False, metadata=_choices("raw", "stylized", "proxy")),
        pa.field("style_ref", pa.string(), nullable=True),  # id of the style reference (stylized rows)
        pa.field("clip_text_score", pa.float32(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=True),  # diffusion seed (stylized rows)
    ],
)

SAM_MASKS_SCHEMA = _versioned(
    "stylear.sam_masks/1",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),  # PNG, mode L: 255 = kept (style) pixel, 0 = removed
        pa.field("kept_fraction", pa.float32(), nullable=False),
        pa.field("cleaned_image", pa.binary(), nullable=False),  # PNG
    ],
)

MASKER_OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("mask", pa.binary()),
        pa.field("kept_fraction", pa.float32()),
        pa.field("cleaned_image", pa.binary()),
        pa.field("used_fallback", pa.bool_()),
        pa.field("error", pa.string()),
    ]
)
"""What the SAM masker returns per batch: the ``SAM_MASKS_SCHEMA`` columns plus diagnostics (nulls on
failed rows)."""

TOKEN_SHARDS_SCHEMA = _versioned(
    "stylear.token_shards/2",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("image_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False, metadata=_choices("raw", "stylized", "proxy")),
        pa.field("image", pa.binary(), nullable=False),  # PNG, height x width: the image the tokens encode
        # A condition image's tokens (e.g. the image's depth map), Lumina layout; null: no condition.
        pa.field("condition_tokens", pa.list_(pa.int32()), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
        # Frozen CLIP features of the row's style image, (tokens, width) flattened, fp16; null: none.
        pa.field("style_features", pa.list_(pa.float16()), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
        # Which encoder and input made them (stylear_core.data.style_features.features_key).
        pa.field("style_features_key", pa.string(), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
    ],
)
"""One training row: prompt ids, the Lumina-layout image tokens, and the curated image centre-cropped and
resized to the working size (``height x width``) as PNG, exactly what the VQGAN encoded. The image is
what SFT's ``style_source: image`` feeds the style encoder, instead of the VQ round trip of the tokens.

Version 2 added ``image``. Its cost per row is one PNG of ``height x width`` RGB pixels, which parquet
cannot compress further, while the token columns compress well. Measured on the tiny preset (96
procedural raw pairs at 64 px): the PNG is 1.05 KB per row on average (0.3 to 5.2 KB), and a shard row
grows from about 0.1 KB to 1.2 KB (about 11x). At 768 px a PNG takes up to about ``3 * height * width``
bytes (1.77 MB for noise); procedural images take 10 KB (stylized) to 79 KB (raw) on average, up to
0.57 MB, and photographs lie in between, against about 9.6 KB of int32 image-token ids before
compression. Readers that need only the tokens read just their columns (``columns=...``) and never
load it. Version-1 shards (no ``image``) still serve every reader but ``style_source: image``, which
names the missing column (:func:`require_parquet_columns`).

``condition_tokens`` (optional, nullable) holds a condition image's tokens in the same layout, e.g. the
depth map curation derived from the row's image; training splices them into the prompt where its
``<image>`` placeholder stands. It was added within version 2: shards written before it lack the
column and still validate and read, as rows without a condition.

``style_features`` and ``style_features_key`` (optional, nullable, also added within version 2) hold the
frozen style encoder's features of the row's style image, computed once by curation
(``tokenize.style_features``) for SFT's ``style_source: features``, and which encoder and input made
them; see :mod:`stylear_core.data.style_features` for their layout and bytes (0.66 MB per row for
ViT-H/14, 2.2 KB for the tiny CLIP).
"""

STYLE_REQUESTS_SCHEMA = _versioned(
    "stylear.style_requests/1",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("style_ref", pa.string(), nullable=True),  # id of the style reference
        pa.field("style_image", pa.binary(), nullable=False),  # encoded reference image
        pa.field("seed", pa.int64(), nullable=True),  # diffusion seed; none = derived from the id
    ],
)
"""(prompt, style reference) rows: the stylizer's input, and the held-out rows DPO samples preferences on."""

STYLIZER_OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("seed", pa.int64()),
        pa.field("style_ref", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
    ]
)
"""What the stylizer returns per batch: the curated columns of a stylized row plus ``error``."""

ERRORS_SCHEMA = _versioned(
    "stylear.errors/1",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("input_ref", pa.string(), nullable=True),  # where the input came from (file, row)
    ],
)

PROXY_CURATED_SCHEMA = pa.schema(
    [
        *CURATED_SCHEMA,
        pa.field("subject", pa.string(), nullable=False),
        pa.field("identifier", pa.string(), nullable=False),
        pa.field("dino_score", pa.float32(), nullable=True),
        pa.field("clip_i_score", pa.float32(), nullable=True),
    ],
    metadata=CURATED_SCHEMA.metadata,
)
"""Proxy data's curated records: :data:`CURATED_SCHEMA` (same version, ``source = "proxy"``) plus the
subject and its similarity scores."""

PREFERENCE_PAIRS_SCHEMA = _versioned(
    "stylear.preference_pairs/1",
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # with the style placeholders
        pa.field("style_ref", pa.string(), nullable=True),
        pa.field("style_image", pa.binary(), nullable=False),  # the reference, PNG
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("chosen_tokens", pa.list_(pa.int32()), nullable=False),  # Lumina layout, start to end
        pa.field("rejected_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("chosen_score", pa.float32(), nullable=False),
        pa.field("rejected_score", pa.float32(), nullable=False),
        pa.field("chosen_style_score", pa.float32(), nullable=False),
        pa.field("chosen_text_score", pa.float32(), nullable=False),
        pa.field("rejected_style_score", pa.float32(), nullable=False),
        pa.field("rejected_text_score", pa.float32(), nullable=False),
        pa.field("chosen_seed", pa.int64(), nullable=False),
        pa.field("rejected_seed", pa.int64(), nullable=False),
        pa.field("num_samples", pa.int32(), nullable=False),
        # The DPO reference's summed image-token log-probs, scored once (optional within version 1).
        pa.field("reference_chosen_logp", pa.float64(), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
        pa.field("reference_rejected_logp", pa.float64(), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
        pa.field("reference_noise_strength", pa.float32(), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
        pa.field("reference_digest", pa.string(), nullable=True, metadata={OPTIONAL_KEY: b"true"}),
    ],
)
"""One preference pair per (prompt, style reference).

The ``reference_*`` columns (optional, nullable; added within version 1, so older pair files still
validate and read, as pairs without them) hold ``log pi_ref`` of the chosen and rejected tokens under
the SFT model, summed over image tokens exactly as the DPO step sums them, the style-noise strength
they were scored with, and ``reference_digest``
(:func:`~stylear_core.preferences.reference.reference_digest`: the SFT adapter's weight files, the
model block's weight-defining fields and that strength). DPO reads them instead of running the
reference model only where the digest is the one its own adapter and strength give.
"""

EVAL_SCORE_COLUMNS = (
    "code_style",
    "code_style_other",
    "code_margin",
    "palette",
    "palette_other",
    "palette_margin",
    "clip_style",
    "clip_text",
)

EVAL_SAMPLES_SCHEMA = _versioned(
    "stylear.eval_samples/1",
    [
        pa.field("variant", pa.string(), nullable=False),
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("style_ref", pa.string(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),  # relative to the output dir
        pa.field("codes_path", pa.string(), nullable=False),  # false-colour code map, relative
        *(pa.field(name, pa.float32(), nullable=False) for name in EVAL_SCORE_COLUMNS),
    ],
)
"""One generated sample and its scores."""

EVAL_METRICS_SCHEMA = _versioned(
    "stylear.eval_metrics/1",
    [
        pa.field("variant", pa.string(), nullable=False),
        pa.field("adapter", pa.string(), nullable=True),  # None for the base model
        pa.field("samples", pa.int32(), nullable=False),
        *(pa.field(name, pa.float32(), nullable=False) for name in EVAL_SCORE_COLUMNS),
    ],
)
"""Mean scores of one variant over all its samples."""

ALL_SCHEMAS: dict[str, pa.Schema] = {
    "raw": RAW_PAIRS_SCHEMA,
    "curated": CURATED_SCHEMA,
    "sam_masks": SAM_MASKS_SCHEMA,
    "token_shards": TOKEN_SHARDS_SCHEMA,
    "style_requests": STYLE_REQUESTS_SCHEMA,
    "errors": ERRORS_SCHEMA,
    "preference_pairs": PREFERENCE_PAIRS_SCHEMA,
    "eval_samples": EVAL_SAMPLES_SCHEMA,
    "eval_metrics": EVAL_METRICS_SCHEMA,
}

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "stylized": CURATED_SCHEMA,
    "curated": CURATED_SCHEMA,
    "masks": SAM_MASKS_SCHEMA,
    "tokens": TOKEN_SHARDS_SCHEMA,
    "preference_requests": STYLE_REQUESTS_SCHEMA,
    "errors": ERRORS_SCHEMA,
}
"""Every table of a curation-layout output directory (``output_dir/<name>/*.parquet``) and its schema
(curation writes them all; proxy data writes ``curated``, ``tokens`` and ``errors``)."""


def schema_version(schema: pa.Schema) -> str | None:
    """The ``schema_version`` metadata of ``schema`` (e.g. ``"stylear.raw/1"``), or None if it has none."""
    meta = schema.metadata or {}
    value = meta.get(SCHEMA_VERSION_KEY)
    return value.decode() if value is not None else None


def _family(tp: pa.DataType) -> str:
    """Types that hold the same values and cast losslessly into each other share a family."""
    if pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp):
        return "string"
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_binary_view(tp):
        return "binary"
    if pa.types.is_integer(tp):
        return "integer"
    if pa.types.is_floating(tp):
        return "float"
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return "list"
    return str(tp)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_null(actual):  # an all-null column (e.g. a batch with no stylized rows)
        return True
    if _family(actual) != _family(expected):
        return False
    if _family(expected) == "list":
        return _compatible(actual.value_type, expected.value_type)
    return True


def validate_table(table: pa.Table, schema: pa.Schema, allow_extra_columns: bool = True) -> None:
    """Check that ``table`` holds records of ``schema``; raise :class:`SchemaError` naming the bad column.

    Checked: every schema column is present with a compatible type (same family: string / large_string,
    any int width, list / large_list of a compatible item type; casting to the exact type is
    :func:`conform_table`'s job), no nulls in non-nullable columns, values of ``choices`` columns
    in their set, and a ``schema_version`` in the table's metadata, if it has one, equal to the schema's.
    Extra columns are allowed unless ``allow_extra_columns`` is False.
    """
    expected_version = schema_version(schema)
    actual_version = schema_version(table.schema)
    if expected_version and actual_version and actual_version != expected_version:
        raise SchemaError(f"table has schema_version {actual_version!r}, expected {expected_version!r}")
    names = set(table.column_names)
    for field in schema:
        if field.name not in names and is_optional(field):
            continue
        if field.name not in names:
            raise SchemaError(
                f"missing column {field.name!r} ({field.type}) for {expected_version or 'schema'}; "
                f"table has {table.column_names}"
            )
        column = table.column(field.name)
        if not _compatible(column.type, field.type):
            raise SchemaError(f"column {field.name!r} has type {column.type}, expected {field.type}")
        if not field.nullable and column.null_count:
            raise SchemaError(f"column {field.name!r} has {column.null_count} null(s) but is not nullable")
        choices = (field.metadata or {}).get(CHOICES_KEY)
        if choices is not None and len(column):
            allowed = set(choices.decode().split(","))
            present = {v for v in column.unique().to_pylist() if v is not None}
            bad = sorted(present - allowed)
            if bad:
                raise SchemaError(
                    f"column {field.name!r} has value(s) {bad}, expected one of {sorted(allowed)}"
                )
    if not allow_extra_columns:
        extra = [n for n in table.column_names if n not in set(schema.names)]
        if extra:
            raise SchemaError(f"unexpected column(s) {extra} for {expected_version or 'schema'}")


def parquet_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The parquet files of ``path`` (a file, a directory searched recursively, or a list of either),
    sorted, hidden and temporary names (``.*``, ``_*``) skipped."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*.parquet")
                    if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
                )
            )
        else:
            files.append(p)
    return files


def require_parquet_columns(
    path: str | Path | Sequence[str | Path], columns: Sequence[str], hints: Mapping[str, str] | None = None
) -> None:
    """Raise :class:`SchemaError` when a local parquet file of ``path`` lacks one of ``columns``.

    The message names the file, its ``schema_version`` and the missing columns, plus ``hints[column]``
    (what to do about that column) where given. Only footers are read. Remote paths (``scheme://``)
    are not checked: their reader reports missing columns itself.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if any("://" in str(p) for p in paths):
        return
    for f in parquet_files(paths):
        if not f.is_file():
            continue  # the reader reports missing files
        schema = pq.read_schema(f)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            version = schema_version(schema) or "no schema_version"
            advice = " ".join((hints or {}).get(c, "") for c in missing).strip()
            raise SchemaError(
                f"{f} ({version}) has no column(s) {missing}; it has {schema.names}"
                + (f". {advice}" if advice else "")
            )


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Validate ``table``, then return exactly ``schema``'s columns, in order, cast, with its metadata.

    Integer narrowing is a checked cast: a value that does not fit raises instead of wrapping.
    """
    validate_table(table, schema)
    columns = []
    for field in schema:
        if field.name not in table.column_names:  # an optional column the table predates
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(f"column {field.name!r} cannot be cast to {field.type}: {e}") from None
    return pa.Table.from_arrays(columns, schema=schema)


def rows_to_table(
    rows: Iterable[Mapping[str, Any]], schema: pa.Schema, allow_extra_keys: bool = False
) -> pa.Table:
    """Python dict rows -> a table of ``schema`` (with its version metadata), validated.

    A nullable column missing from a row is null; a missing non-nullable column or, unless
    ``allow_extra_keys``, a key the schema does not know, raises :class:`SchemaError` naming it.
    """
    rows = list(rows)
    known = set(schema.names)
    required = [f.name for f in schema if not f.nullable]
    for i, row in enumerate(rows):
        for name in required:
            if row.get(name) is None:
                raise SchemaError(f"row {i}: missing value for non-nullable column {name!r}")
        if not allow_extra_keys:
            extra = sorted(set(row) - known)
            if extra:
                raise SchemaError(
                    f"row {i}: unknown column(s) {extra} for {schema_version(schema) or 'schema'}"
                )
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array([row.get(field.name) for row in rows], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise SchemaError(f"column {field.name!r} does not fit {field.type}: {e}") from None
    table = pa.Table.from_arrays(arrays, schema=schema)
    validate_table(table, schema)
    return table
