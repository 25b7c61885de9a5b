"""Record formats: versions in the metadata, errors naming the bad column, round trips through parquet."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stylear_core.data.schemas import (
    ALL_SCHEMAS,
    CURATED_SCHEMA,
    ERRORS_SCHEMA,
    PROXY_CURATED_SCHEMA,
    RAW_PAIRS_SCHEMA,
    SAM_MASKS_SCHEMA,
    TOKEN_SHARDS_SCHEMA,
    SchemaError,
    conform_table,
    rows_to_table,
    schema_version,
    validate_table,
)


def curated_row(**overrides):
    row = {
        "id": "a",
        "prompt": "a red circle",
        "image": b"\x89PNG...",
        "source": "stylized",
        "style_ref": "vivid.dots.filled",
        "clip_text_score": 0.31,
        "width": 64,
        "height": 64,
        "seed": 7,
    }
    row.update(overrides)
    return row


def test_every_schema_is_versioned_and_distinct():
    versions = {name: schema_version(schema) for name, schema in ALL_SCHEMAS.items()}
    assert versions["raw"] == "stylear.raw/1"
    assert versions["curated"] == "stylear.curated/2"  # version 2: the proxy source
    assert versions["token_shards"] == "stylear.token_shards/2"  # version 2: the working-size image
    second = {"curated", "token_shards"}
    assert all(
        v and v.startswith("stylear.") and v.endswith("/2" if name in second else "/1")
        for name, v in versions.items()
    )
    assert len(set(versions.values())) == len(versions)


def test_curated_records_may_come_from_proxy_data():
    table = rows_to_table([curated_row(source="proxy", style_ref="robot")], CURATED_SCHEMA)
    validate_table(table, CURATED_SCHEMA)
    assert table.column("source").to_pylist() == ["proxy"]
    # Proxy data's curated table is the curated format (same version) plus its subject columns.
    assert schema_version(PROXY_CURATED_SCHEMA) == schema_version(CURATED_SCHEMA)
    assert PROXY_CURATED_SCHEMA.names[: len(CURATED_SCHEMA.names)] == CURATED_SCHEMA.names
    proxy = rows_to_table(
        [curated_row(source="proxy", subject="robot", identifier="olis", dino_score=0.7, clip_i_score=None)],
        PROXY_CURATED_SCHEMA,
    )
    validate_table(proxy, CURATED_SCHEMA)


def test_expected_column_types():
    assert CURATED_SCHEMA.field("clip_text_score").type == pa.float32()
    assert CURATED_SCHEMA.field("width").type == pa.int32()
    assert CURATED_SCHEMA.field("seed").type == pa.int64() and CURATED_SCHEMA.field("seed").nullable
    assert CURATED_SCHEMA.field("style_ref").nullable and not CURATED_SCHEMA.field("id").nullable
    assert TOKEN_SHARDS_SCHEMA.field("image_tokens").type == pa.list_(pa.int32())
    assert TOKEN_SHARDS_SCHEMA.field("image").type == pa.binary()
    assert not TOKEN_SHARDS_SCHEMA.field("image").nullable
    assert SAM_MASKS_SCHEMA.field("kept_fraction").type == pa.float32()
    assert ERRORS_SCHEMA.names == ["id", "stage", "reason", "input_ref"]
    assert RAW_PAIRS_SCHEMA.names == ["id", "prompt", "image"]


def test_rows_to_table_keeps_version_and_fills_nullable_columns():
    raw = curated_row(source="raw")
    for key in ("style_ref", "clip_text_score", "seed"):
        del raw[key]
    table = rows_to_table([curated_row(), raw], CURATED_SCHEMA)
    assert table.schema.equals(CURATED_SCHEMA, check_metadata=True)
    assert table.column("seed").to_pylist() == [7, None]
    assert table.column("style_ref").to_pylist() == ["vivid.dots.filled", None]


def test_rows_to_table_names_the_bad_column():
    with pytest.raises(SchemaError, match="'width'"):
        rows_to_table([curated_row(width="wide")], CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="'prompt'"):
        rows_to_table([{k: v for k, v in curated_row().items() if k != "prompt"}], CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="extra"):
        rows_to_table([curated_row(extra=1)], CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="'source'.*'synthetic'"):
        rows_to_table([curated_row(source="synthetic")], CURATED_SCHEMA)
    assert rows_to_table([curated_row(extra=1)], CURATED_SCHEMA, allow_extra_keys=True).num_rows == 1


def test_validate_table_missing_and_mistyped_columns():
    table = rows_to_table([curated_row()], CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="missing column 'clip_text_score'"):
        validate_table(table.drop_columns(["clip_text_score"]), CURATED_SCHEMA)
    bad = table.set_column(table.schema.get_field_index("height"), "height", pa.array(["64"]))
    with pytest.raises(SchemaError, match="column 'height' has type string, expected int32"):
        validate_table(bad, CURATED_SCHEMA)
    nulls = table.set_column(0, "id", pa.array([None], type=pa.string()))
    with pytest.raises(SchemaError, match="'id' has 1 null"):
        validate_table(nulls, CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="stylear.raw/1"):
        validate_table(table.replace_schema_metadata({b"schema_version": b"stylear.raw/1"}), CURATED_SCHEMA)
    with pytest.raises(SchemaError, match="unexpected"):
        validate_table(table.append_column("x", pa.array([1])), CURATED_SCHEMA, allow_extra_columns=False)


def test_conform_table_casts_compatible_types_and_checks_overflow():
    # What Ray Data / pandas often write: large strings, int64 sizes, extra columns, no metadata.
    loose = pa.table(
        {
            "id": pa.array(["t0"], pa.large_string()),
            "prompt": pa.array(["p"], pa.large_string()),
            "prompt_ids": pa.array([[1, 2]], pa.large_list(pa.int64())),
            "image_tokens": pa.array([[5, 6, 7]], pa.list_(pa.int64())),
            "height": pa.array([32], pa.int64()),
            "width": pa.array([32], pa.int64()),
            "source": pa.array(["raw"]),
            "image": pa.array([b"\x89PNG"], pa.large_binary()),
            "error": pa.array([None], pa.string()),
        }
    )
    table = conform_table(loose, TOKEN_SHARDS_SCHEMA)
    assert table.schema.equals(TOKEN_SHARDS_SCHEMA, check_metadata=True)
    assert table.column("image_tokens").to_pylist() == [[5, 6, 7]]
    overflow = loose.set_column(4, "height", pa.array([2**40], pa.int64()))
    with pytest.raises(SchemaError, match="'height' cannot be cast"):
        conform_table(overflow, TOKEN_SHARDS_SCHEMA)


def test_parquet_round_trip_keeps_version(tmp_path):
    table = rows_to_table(
        [{"id": "e", "stage": "decode", "reason": "truncated", "input_ref": None}], ERRORS_SCHEMA
    )
    pq.write_table(table, tmp_path / "errors.parquet")
    back = pq.read_table(tmp_path / "errors.parquet")
    assert schema_version(back.schema) == "stylear.errors/1"
    validate_table(back, ERRORS_SCHEMA)
    assert back.to_pylist() == table.to_pylist()
