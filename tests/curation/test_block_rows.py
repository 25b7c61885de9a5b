"""Input blocks of the curation passes: whole batches, few enough to amortise a task, enough to feed a pool."""

from __future__ import annotations

from stylear_core.curation.pipeline import block_rows
from stylear_core.data.passes import ActorPoolConfig


def test_blocks_hold_several_batches_when_one_actor_does_the_pass():
    pool = ActorPoolConfig(min_actors=1, max_actors=1, batch_size=8)
    # 256 rows, one actor, four blocks per actor: 64 rows (8 batches) a block, not 8.
    assert block_rows(pool, rows=256, max_rows=1024) == 64
    assert block_rows(pool, rows=256, max_rows=32) == 32  # capped, in whole batches


def test_blocks_leave_every_actor_of_a_large_pool_work():
    pool = ActorPoolConfig(min_actors=1, max_actors=16, batch_size=4)
    rows = 10_000
    size = block_rows(pool, rows, max_rows=1024)
    assert size % 4 == 0 and -(-rows // size) >= 4 * 16


def test_a_pass_smaller_than_a_batch_is_one_batch_block():
    pool = ActorPoolConfig(min_actors=1, max_actors=4, batch_size=32)
    assert block_rows(pool, rows=5, max_rows=1024) == 32
    assert block_rows(pool, rows=5, max_rows=16) == 32  # never less than one batch
