"""Mixed-adapter batches: rows with different LoRA adapters (or none) in one forward give what each adapter
gives alone under peft, across ranks, through LRU eviction, and from the project's adapter directories."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from stylear_core.adapters.format import AdapterError
from stylear_core.adapters.io import read_adapter_dir, write_adapter_dir
from stylear_core.inference.multi_lora import BASE_SLOT, MultiLoraLinear, MultiLoraPool, PoolFullError
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.lora import add_lora, lora_state_dict
from stylear_core.models.presets import build_backbone, build_stylear_model
from stylear_core.testing.fixtures import tiny_adapter, tiny_model_cfg

VOCAB = tiny_vocab()
IDS = torch.randint(300, 1024, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_backbone(VOCAB).eval()


def tuned(base, rank: int, alpha: float, seed: int):
    """A copy of ``base`` with one peft LoRA of random (as if trained) factors."""
    model = copy.deepcopy(base)
    add_lora(model, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def pooled(base, capacity: int, max_rank: int):
    served = copy.deepcopy(base)
    return served, MultiLoraPool(served, capacity=capacity, max_rank=max_rank)


def assert_rows_match(got, per_row_models, ids=IDS):
    """Row ``i`` of ``got`` equals row ``i`` of ``per_row_models[i]``'s logits on the same batch."""
    for i, model in enumerate(per_row_models):
        want = logits(model, ids)[i]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_rows_with_different_adapters_and_the_base_match_each_adapter_alone(base):
    one, two = tuned(base, 4, 8.0, seed=1), tuned(base, 4, 4.0, seed=2)
    served, pool = pooled(base, capacity=2, max_rank=4)
    assert all(isinstance(served.get_submodule(n), MultiLoraLinear) for n in pool.layers)
    assert len(pool.layers) == 2 * 5 + 1  # q/k/v/o and down_proj of both layers, and lm_head
    # The base weights are the same parameters, under the same state-dict keys as before.
    assert served.state_dict().keys() == base.state_dict().keys()
    slot_one = pool.load("one", lora_state_dict(one), scaling=8.0 / 4)
    slot_two = pool.load("two", lora_state_dict(two), scaling=1.0)
    assert pool.slots == {"one": slot_one, "two": slot_two} and BASE_SLOT not in (slot_one, slot_two)

    pool.set_row_adapters(["one", "two", None])
    mixed = logits(served, IDS)
    assert_rows_match(mixed, [one, two, base])
    assert torch.equal(mixed[2], logits(base, IDS)[2])  # the base row adds exact zeros
    # The adapters do change the output, and differently, so the parity above is not vacuous.
    assert not torch.allclose(mixed[0], logits(base, IDS)[0], atol=1e-3)
    assert not torch.allclose(logits(one, IDS), logits(two, IDS), atol=1e-3)

    # Another assignment of the same rows, without reloading anything.
    pool.set_rows([slot_two, BASE_SLOT, slot_one])
    assert_rows_match(logits(served, IDS), [two, base, one])
    # One token per row, as a decode step feeds it, and a 2-D input as the engine's lm_head call gets.
    step = IDS[:, :1]
    assert_rows_match(logits(served, step), [two, base, one], ids=step)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    head = served.lm_head(hidden)
    for i, model in enumerate([two, base, one]):
        with torch.no_grad():
            torch.testing.assert_close(head[i], model.lm_head(hidden)[i], atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="4 rows but 3"):
        logits(served, IDS[:1].repeat(4, 1))
    with pytest.raises(ValueError, match=r"must be in 0\.\.2"):
        pool.set_rows([0, 1, 3])
    pool.evict("two")
    with pytest.raises(ValueError, match="hold no adapter"):
        pool.set_rows([0, slot_one, slot_two])


def test_adapters_of_different_ranks_coexist(base, tmp_path):
    low, high = tuned(base, 4, 4.0, seed=4), tuned(base, 8, 16.0, seed=5)
    served, pool = pooled(base, capacity=3, max_rank=8)
    # One from a directory (scaling folded into B), one from the state dict with peft's alpha / r.
    write_adapter_dir(tmp_path / "low", low, kind="style")
    pool.load_dir(tmp_path / "low")
    pool.load("high", lora_state_dict(high), scaling=16.0 / 8)
    pool.set_row_adapters(["high", "low", None])
    assert_rows_match(logits(served, IDS), [high, low, base])
    with pytest.raises(AdapterError, match="rank 8; the pool holds at most 4"):
        pooled(base, capacity=1, max_rank=4)[1].load("high", lora_state_dict(high))


def test_lru_eviction_at_capacity_and_a_reloaded_adapter_gives_the_same_outputs(base):
    models = {name: tuned(base, 4, 4.0, seed=10 + i) for i, name in enumerate("abc")}
    states = {name: lora_state_dict(m) for name, m in models.items()}
    served, pool = pooled(base, capacity=2, max_rank=4)
    pool.load("a", states["a"])
    pool.load("b", states["b"])
    pool.set_row_adapters(["a", "b", None])
    first = logits(served, IDS)
    pool.touch("a")  # b is now the least recently used
    pool.set_row_adapters([None, None, None])  # nothing pinned
    slot_b = pool.slot_of("b")
    assert pool.load("c", states["c"]) == slot_b
    assert pool.slots == {"a": 1, "c": slot_b} and pool.slot_of("b") is None
    pool.set_row_adapters(["a", "c", None])
    assert_rows_match(logits(served, IDS), [models["a"], models["c"], base])
    # Slots the current rows use are pinned: with a and c both in use, nothing can be evicted.
    with pytest.raises(PoolFullError):
        pool.load("b", states["b"])
    assert pool.slots == {"a": 1, "c": slot_b}
    pool.set_row_adapters(["c", None, None])  # now a is both unused and least recently used
    pool.load("b", states["b"])
    assert set(pool.slots) == {"c", "b"}
    pool.set_row_adapters(["b", "b", "c"])
    assert_rows_match(logits(served, IDS), [models["b"], models["b"], models["c"]])
    # The reloaded b gives row 1 what it gave before b was evicted.
    pool.set_row_adapters(["c", "b", None])
    torch.testing.assert_close(logits(served, IDS)[1], first[1], atol=1e-6, rtol=1e-6)


def test_the_projects_exported_adapter_directory_loads_into_a_pool(tmp_path):
    cfg = tiny_model_cfg(lora_alpha=8.0)
    trained = build_stylear_model(cfg)
    directory = tiny_adapter(tmp_path / "ink", cfg, model=trained, perturb=("lora",), seed=3)
    weights = read_adapter_dir(directory)
    assert weights.manifest["kind"] == "style" and weights.rank == cfg.lora_rank
    served, _ = build_backbone(cfg)
    plain = copy.deepcopy(served).eval()
    served.eval()
    pool = MultiLoraPool(served, capacity=2, max_rank=8)
    assert pool.load_dir(directory) == 1 and pool.slots == {"ink": 1}
    pool.set_row_adapters(["ink", None, None])
    trained.backbone.eval()
    assert_rows_match(logits(served, IDS), [trained.backbone, plain, plain])
    # A peft backbone can be pooled too: its LoRA layers are replaced by the linears they wrap.
    stripped = copy.deepcopy(trained.backbone)
    MultiLoraPool(stripped, capacity=1).set_rows([0, 0, 0])
    torch.testing.assert_close(logits(stripped, IDS), logits(plain, IDS), atol=0, rtol=0)


def test_batched_forward_against_adapter_groups_one_after_another(base, capsys):
    """A micro-benchmark (printed, not asserted on speed): 8 rows over 4 adapters and the base."""
    served, pool = pooled(base, capacity=4, max_rank=8)
    for i, name in enumerate("abcd"):
        pool.load(name, lora_state_dict(tuned(base, 4 + 4 * (i % 2), 4.0, seed=20 + i)))
    names = ["a", "b", "c", "d", None, "a", "b", None]
    ids = torch.randint(300, 1024, (len(names), 1), generator=torch.Generator().manual_seed(2))

    def batched():
        pool.set_row_adapters(names)
        return logits(served, ids)

    def grouped():
        out = torch.empty(len(names), 1, base.config.vocab_size)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            pool.set_row_adapters([name] * len(rows))
            out[rows] = logits(served, ids[rows])
        return out

    torch.testing.assert_close(batched(), grouped(), atol=1e-5, rtol=1e-5)
    timings = {}
    for label, fn in (("batched", batched), ("grouped", grouped)):
        fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        timings[label] = (time.perf_counter() - start) / 20
    with capsys.disabled():
        print(
            f"\nmixed-adapter decode step, 8 rows / 5 groups, tiny preset CPU: batched "
            f"{timings['batched'] * 1e3:.2f} ms, groups one after another {timings['grouped'] * 1e3:.2f} ms "
            f"(x{timings['grouped'] / timings['batched']:.2f})"
        )
