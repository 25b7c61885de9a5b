"""Shared test fixtures: the tiny model block and tiny adapter artefacts the tests build on.

Like diffusers' ``get_dummy_components``: one place says what "tiny" means, and a test that needs
other values says which with overrides, e.g. ``tiny_model_cfg(lora_alpha=8.0)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stylear_core.adapters.format import ADAPTER_FORMAT
from stylear_core.config import to_dict
from stylear_core.models.config import ModelConfig
from stylear_core.runs import write_manifest

# 64 px images (an 8 x 8 latent grid) and 4 style tokens keep a forward pass of the tiny preset in
# milliseconds on CPU; the LoRA sizes are the preset's defaults (rank 4, alpha 4).
TINY_MODEL = ModelConfig(preset="tiny", image_size=64, num_style_tokens=4)


def tiny_model_cfg(**overrides: Any) -> ModelConfig:
    """The tiny preset's model block the tests share, with ``overrides`` (any :class:`ModelConfig` field)."""
    return dataclasses.replace(TINY_MODEL, **overrides)


def perturb_(params: Any, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to ``params`` in place, in order (a stand-in for training: non-trivial weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def tiny_adapter(
    directory: str | Path,
    cfg: ModelConfig | None = None,
    *,
    model: Any = None,
    perturb: Sequence[str] = ("lora",),
    seed: int = 0,
    kind: str = "style",
    **manifest: Any,
) -> Path:
    """A tiny adapter artefact at ``directory`` as training exports it, with a complete manifest.

    Takes the model block (default :func:`tiny_model_cfg`) or an already built ``model`` of it. The
    parameter groups named in ``perturb`` (``lora``, ``resampler``, in that order) get seeded noise
    first, from one generator seeded ``seed``. ``manifest`` adds fields (e.g. ``lora``, ``step``).
    """
    from stylear_core.models.presets import build_stylear_model
    from stylear_core.training.export import export_adapter

    cfg = cfg or tiny_model_cfg()
    model = model if model is not None else build_stylear_model(cfg)
    groups = {"lora": model.lora_parameters, "resampler": model.resampler.parameters}
    unknown = sorted(set(perturb) - set(groups))
    if unknown:
        raise ValueError(f"perturb: unknown parameter group(s) {unknown}; known: {sorted(groups)}")
    perturb_([p for name in groups if name in perturb for p in groups[name]()], seed)
    directory = Path(directory)
    export_adapter(model, directory)
    write_manifest(
        directory, ADAPTER_FORMAT, status="complete", model_config=to_dict(cfg), kind=kind, **manifest
    )
    return directory


__all__ = ["TINY_MODEL", "perturb_", "tiny_adapter", "tiny_model_cfg"]


def write_release_word_tokenizer(path: str | Path, words: Sequence[str]) -> Path:
    """A Chameleon-like word-level tokenizer dir for prompt-parity tests: the real special ids (``S*`` at
    its release id, 16393, an ordinary entry), then ``words`` in order of first appearance.

    The pre-tokenizer keeps ``S*`` one piece and splits ``S*.`` / ``instruction:`` into word and
    punctuation, as the real BPE does.
    """
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Sequence as PreSequence
    from tokenizers.pre_tokenizers import Split, WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from stylear_core.data.layout import TokenVocab, image_token_name
    from stylear_core.data.tokenizer import special_token_names

    vocab = TokenVocab.for_prompt_template("stylear_release")
    table = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    table.update({image_token_name(c): i for c, i in enumerate(vocab.image_code_ids)})
    table.update(special_token_names(vocab))
    table.update({w: vocab.style_placeholder + 1 + i for i, w in enumerate(dict.fromkeys(words))})
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = PreSequence(
        [WhitespaceSplit(), Split(Regex(r"S\*|[A-Za-z0-9]+|[^A-Za-z0-9\s]"), behavior="isolated")]
    )
    specials = [n for n in special_token_names(vocab) if n not in ("<s>", "<pad>", "S*")]
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials,
    ).save_pretrained(str(path))
    return Path(path)


def numpy_batch(table: Any) -> dict[str, Any]:
    """A pyarrow table as Ray Data's numpy batch format hands it to a collate: one object array per
    column, list cells as numpy arrays."""
    from stylear_core.data.batch_columns import table_to_numpy_batch

    return table_to_numpy_batch(table)


def lora_copy(
    base: torch.nn.Module, rank: int, alpha: float, seed: int, scale: float = 0.2
) -> torch.nn.Module:
    """A copy of the backbone ``base`` with one peft LoRA whose factors are seeded random values (as if
    trained, so both A and B count), in eval mode."""
    import copy

    from stylear_core.models.lora import add_lora

    model = copy.deepcopy(base)
    add_lora(model, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model.eval()


# The serving tests' two subject adapters: name -> (LoRA seed, identifier word).
SUBJECT_ADAPTERS = {"dog": (2, "sks"), "cat": (3, "zwx")}


def write_subject_adapters(root: str | Path, model: ModelConfig) -> Path:
    """One subject adapter dir per :data:`SUBJECT_ADAPTERS` entry under ``root`` (the serving config's
    ``adapters_root``): ``model``'s backbone with a seeded random LoRA (rank 4, scale 0.3), the subject
    ``<word> <name>``. Returns ``root``."""
    from stylear_core.adapters.format import base_model_id
    from stylear_core.adapters.io import write_adapter_dir
    from stylear_core.models.presets import build_backbone

    root = Path(root)
    base, backbone = base_model_id(model), build_backbone(model)[0]
    for name, (seed, word) in SUBJECT_ADAPTERS.items():
        tuned = lora_copy(backbone, rank=4, alpha=4.0, seed=seed, scale=0.3)
        subjects = [{"identifier": word, "class_noun": name}]
        write_adapter_dir(root / name, tuned, kind="subject", subjects=subjects, base_model=base)
    return root
