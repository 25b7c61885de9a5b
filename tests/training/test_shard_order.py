"""The order the training stages read shard files in: seeded and shuffled, the same in every execution."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data import DataContext

from stylear_core.training.batches import read_parquet_dataset

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(autouse=True)
def _preserve_order():
    """Datasets made in these tests keep their blocks in order, as the training loops read them."""
    context = DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield
    context.execution_options.preserve_order = before


def _rows_in_order(dataset) -> list[str]:
    return [str(row["group"]) + str(row["i"]) for row in dataset.iter_rows()]


@pytest.fixture
def grouped_shards(tmp_path):
    """Eight files as curation writes them: the raw pairs' four files, then the stylized pairs' four."""
    for f in range(8):
        group = "raw" if f < 4 else "sty"
        table = pa.table({"group": [group] * 4, "i": list(range(4 * f, 4 * f + 4))})
        pq.write_table(table, tmp_path / f"part-{f:05d}.parquet")
    return tmp_path


def test_path_order_trains_on_one_group_then_the_other(grouped_shards):
    rows = _rows_in_order(read_parquet_dataset(str(grouped_shards)))
    assert all(r.startswith("raw") for r in rows[:16]) and all(r.startswith("sty") for r in rows[16:])


def test_a_shuffle_seed_mixes_the_groups_and_repeats_its_order_in_every_execution(grouped_shards):
    dataset = read_parquet_dataset(str(grouped_shards), shuffle_seed=0)
    first = _rows_in_order(dataset)
    assert sorted(first) == sorted(_rows_in_order(read_parquet_dataset(str(grouped_shards))))
    # Both groups in each half of the epoch, where path order had one group per half.
    for half in (first[:16], first[16:]):
        assert {r[:3] for r in half} == {"raw", "sty"}, first
    # A second epoch, and a new read in a resumed attempt, see the same order; another seed, another one.
    assert _rows_in_order(dataset) == first
    assert _rows_in_order(read_parquet_dataset(str(grouped_shards), shuffle_seed=0)) == first
    assert _rows_in_order(read_parquet_dataset(str(grouped_shards), shuffle_seed=1)) != first
