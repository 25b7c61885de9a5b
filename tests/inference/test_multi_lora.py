"""Mixed-adapter batches: rows with different LoRA adapters (or none) in one forward give what each adapter
gives alone under peft, across ranks, through LRU eviction, and from the project's adapter directories."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

from stylear_core.adapters.format import AdapterError
from stylear_core.adapters.io import read_adapter_dir, write_adapter_dir
from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine
from stylear_core.inference.multi_lora import (
    BASE_SLOT,
    LORA_MODES,
    MultiLoraLinear,
    MultiLoraPool,
    PoolFullError,
)
from stylear_core.inference.reference import reference_generate
from stylear_core.models.backbone import tiny_backbone, tiny_vocab
from stylear_core.models.lora import lora_state_dict
from stylear_core.models.presets import build_backbone, build_stylear_model
from stylear_core.testing.fixtures import lora_copy, tiny_adapter, tiny_model_cfg

VOCAB = tiny_vocab()
IDS = torch.randint(300, 1024, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_backbone(VOCAB).eval()


def tuned(base, rank: int, alpha: float, seed: int):
    """A copy of ``base`` with one peft LoRA of random (as if trained) factors."""
    return lora_copy(base, rank, alpha, seed)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=LORA_MODES)
def mode(request):
    return request.param


def pooled(base, capacity: int, max_rank: int, mode: str = "gather"):
    served = copy.deepcopy(base)
    return served, MultiLoraPool(served, capacity=capacity, max_rank=max_rank, mode=mode)


def assert_rows_match(got, per_row_models, ids=IDS):
    """Row ``i`` of ``got`` equals row ``i`` of ``per_row_models[i]``'s logits on the same batch."""
    for i, model in enumerate(per_row_models):
        want = logits(model, ids)[i]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_rows_with_different_adapters_and_the_base_match_each_adapter_alone(base, mode):
    one, two = tuned(base, 4, 8.0, seed=1), tuned(base, 4, 4.0, seed=2)
    served, pool = pooled(base, capacity=2, max_rank=4, mode=mode)
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

    # Another assignment of the same rows, without reloading anything, written into the same storage
    # (what a captured graph reads), also after a step with another row count.
    storage = pool.rows.index.data_ptr()
    pool.set_rows([slot_one, slot_two])
    pool.set_rows([slot_two, BASE_SLOT, slot_one])
    assert pool.rows.index.data_ptr() == storage
    assert_rows_match(logits(served, IDS), [two, base, one])
    # One token per row, as a decode step feeds it, and a 2-D input as the engine's lm_head call gets.
    step = IDS[:, :1]
    assert_rows_match(logits(served, step), [two, base, one], ids=step)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    head = served.lm_head(hidden)
    for i, model in enumerate([two, base, one]):
        with torch.no_grad():
            torch.testing.assert_close(head[i], model.lm_head(hidden)[i], atol=1e-5, rtol=1e-5)

    pool.set_row_adapters(["one"])  # one index: every row, whatever the row count
    torch.testing.assert_close(logits(served, IDS), logits(one, IDS), atol=1e-5, rtol=1e-5)
    pool.set_rows([slot_two, BASE_SLOT, slot_one])
    with pytest.raises(ValueError, match="4 rows but 3"):
        logits(served, IDS[:1].repeat(4, 1))
    with pytest.raises(ValueError, match=r"must be in 0\.\.2"):
        pool.set_rows([0, 1, 3])
    pool.set_rows([BASE_SLOT])
    pool.evict("two")
    with pytest.raises(ValueError, match="hold no adapter"):
        pool.set_rows([0, slot_one, slot_two])


def test_adapters_of_different_ranks_coexist(base, mode, tmp_path):
    low, high = tuned(base, 4, 4.0, seed=4), tuned(base, 8, 16.0, seed=5)
    served, pool = pooled(base, capacity=3, max_rank=8, mode=mode)
    # One from a directory (scaling folded into B), one from the state dict with peft's alpha / r.
    write_adapter_dir(tmp_path / "low", low, kind="style")
    pool.load_dir(tmp_path / "low")
    pool.load("high", lora_state_dict(high), scaling=16.0 / 8)
    pool.set_row_adapters(["high", "low", None])
    assert_rows_match(logits(served, IDS), [high, low, base])
    with pytest.raises(AdapterError, match="rank 8; the pool holds at most 4"):
        pooled(base, capacity=1, max_rank=4)[1].load("high", lora_state_dict(high))


def test_lru_eviction_at_capacity_and_a_reloaded_adapter_gives_the_same_outputs(base, mode):
    models = {name: tuned(base, 4, 4.0, seed=10 + i) for i, name in enumerate("abc")}
    states = {name: lora_state_dict(m) for name, m in models.items()}
    served, pool = pooled(base, capacity=2, max_rank=4, mode=mode)
    pool.load("a", states["a"])
    pool.load("b", states["b"])
    pool.set_row_adapters(["a", "b", None])
    first = logits(served, IDS)
    pool.touch("a")  # b is now the least recently used
    pool.set_row_adapters([None, None, None])  # nothing pinned
    slot_b = pool.slot_of("b")
    assert pool.load("c", states["c"]) == slot_b
    assert pool.slots == {"a": 1, "c": slot_b} and pool.slot_of("b") is None
    pool.set_row_adapters(["c", "a", None])  # a is now the most recently used
    assert_rows_match(logits(served, IDS), [models["c"], models["a"], base])
    # Slots the current rows use are pinned: with a and c both in use, nothing can be evicted.
    with pytest.raises(PoolFullError):
        pool.load("b", states["b"])
    assert pool.slots == {"a": 1, "c": slot_b}
    with pytest.raises(PoolFullError, match="used by the current rows"):
        pool.evict("a")
    pool.set_rows([pool.slot_of("c"), BASE_SLOT, BASE_SLOT])  # indices count as use: c is now the MRU
    pool.set_rows([BASE_SLOT])  # nothing pinned
    pool.load("b", states["b"])
    assert set(pool.slots) == {"c", "b"}
    pool.set_row_adapters(["b", "b", "c"])
    assert_rows_match(logits(served, IDS), [models["b"], models["b"], models["c"]])
    # The reloaded b gives row 1 what it gave before b was evicted.
    pool.set_row_adapters(["c", "b", None])
    torch.testing.assert_close(logits(served, IDS)[1], first[1], atol=1e-6, rtol=1e-6)


def test_the_projects_exported_adapter_directory_loads_into_a_pool(mode, tmp_path):
    cfg = tiny_model_cfg(lora_alpha=8.0)
    trained = build_stylear_model(cfg)
    directory = tiny_adapter(tmp_path / "ink", cfg, model=trained, perturb=("lora",), seed=3)
    weights = read_adapter_dir(directory)
    assert weights.manifest["kind"] == "style" and weights.rank == cfg.lora_rank
    served, _ = build_backbone(cfg)
    plain = copy.deepcopy(served).eval()
    served.eval()
    pool = MultiLoraPool(served, capacity=2, max_rank=8, mode=mode)
    assert pool.load_dir(directory) == 1 and pool.slots == {"ink": 1}
    pool.set_row_adapters(["ink", None, None])
    trained.backbone.eval()
    assert_rows_match(logits(served, IDS), [trained.backbone, plain, plain])
    # A peft backbone can be pooled too: its LoRA layers are replaced by the linears they wrap.
    stripped = copy.deepcopy(trained.backbone)
    MultiLoraPool(stripped, capacity=1).set_rows([0, 0, 0])
    torch.testing.assert_close(logits(stripped, IDS), logits(plain, IDS), atol=0, rtol=0)


def test_the_engine_decodes_through_a_pool_as_through_peft(base, tmp_path):
    """Today's batch-at-a-time engine (static KV cache, prefill then one token per step) on a pooled
    backbone: one index set for every row gives the tokens of the peft model with that adapter alone."""
    tuned_model = tuned(base, 4, 4.0, seed=7)
    write_adapter_dir(tmp_path / "s", tuned_model, kind="style")
    served, pool = pooled(base, capacity=2, max_rank=4)
    pool.load_dir(tmp_path / "s")
    request = GenerationRequest([VOCAB.bos, 400, 401, 402], 64, 64, top_k=1, seed=0)
    engine = ImageGenerationEngine(served, VOCAB)
    pool.set_row_adapters(["s"])
    (adapted,) = engine.generate([request])
    assert torch.equal(adapted.tokens, reference_generate(tuned_model, VOCAB, request))
    pool.set_row_adapters([None])
    (plain,) = engine.generate([request])
    assert torch.equal(plain.tokens, reference_generate(base, VOCAB, request))
    assert not torch.equal(adapted.tokens, plain.tokens)


def _mean_seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def test_batched_forward_against_adapter_groups_one_after_another(base, capsys):
    """A micro-benchmark (printed, not asserted on speed): 8 rows over 4 adapters and the base, one token
    per row, both batched modes against the adapter groups run one after another on the same rows."""
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

    want = grouped()
    times = {"groups one after another": _mean_seconds(grouped, 20)}
    for mode in LORA_MODES:
        pool.mode = mode
        torch.testing.assert_close(batched(), want, atol=1e-5, rtol=1e-5)
        times[f"batched ({mode})"] = _mean_seconds(batched, 20)
    # One 1024 x 1024 layer at rank 16, 16 rows over 8 adapters: where gathering copies start to cost.
    layer = MultiLoraPool(nn.Sequential(OrderedDict(q_proj=nn.Linear(1024, 1024))), capacity=8, max_rank=16)
    gen = torch.Generator().manual_seed(4)
    for i in range(8):
        a, b = torch.randn(16, 1024, generator=gen), torch.randn(1024, 16, generator=gen)
        layer.load(f"s{i}", {"q_proj.lora_A.weight": a, "q_proj.lora_B.weight": b})
    layer.set_rows([i % 9 for i in range(16)])
    x = torch.randn(16, 1, 1024, generator=gen)
    with torch.no_grad():
        results = {}
        for mode in LORA_MODES:
            layer.mode = mode
            results[mode] = layer.backbone(x)
            times[f"1024-wide layer, 16 rows, {mode}"] = _mean_seconds(lambda: layer.backbone(x), 50)
        torch.testing.assert_close(results["gather"], results["stacked"], atol=1e-3, rtol=1e-4)
    with capsys.disabled():
        print(
            "\nmixed-adapter forward, tiny preset, CPU: "
            + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items())
        )
