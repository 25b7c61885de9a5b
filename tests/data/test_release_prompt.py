"""StyleAR's release prompt: ids, placeholder positions and style-token injection match the reference.

The expected side follows wuyi2020/StyleAR ``lumina_mgpt/inference_solver.py``
(``FlexARInferenceSolver.generate``) step by step, with the release's wording written out here:
the question text, the conversation template (``Conversation.process``: human turn + ``<reserved08706>``),
``Tokenizer.encode(conv, bos=True, eos=False)``, ``index_list`` = positions of id 16393, and
``ChameleonModel.forward``'s loop writing ``input_tokens[i, j]`` at ``index_list[j]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from stylear_core.data.layout import TokenVocab
from stylear_core.data.tokenizer import (
    ByteTokenizer,
    ChameleonPromptTokenizer,
    style_prompt_ids,
)
from stylear_core.models.backbone import tiny_backbone, tiny_vocab, vocab_from_vocabulary_map
from stylear_core.models.presets import ModelConfig, build_backbone, build_prompt_tokenizer
from stylear_core.models.style_tokens import inject_style_tokens, style_placeholder_mask
from stylear_core.testing.fixtures import write_release_word_tokenizer

S_STAR_ID = 16393  # the Chameleon tokenizer's id of "S*"
PROMPT = "a red cat on the beach"
WORDS = [
    "Instant",
    "style",
    "Generation",
    ".",
    "Given",
    "image",
    "is",
    "Please",
    "generate",
    "an",
    "same",
    "according",
    "to",
    "my",
    "instruction",
    ":",
    "a",
    "red",
    "cat",
    "on",
    "the",
    "beach",
]


def write_release_tokenizer(path: Path) -> Path:
    """The shared Chameleon-like word-level tokenizer dir, holding this test's words."""
    return write_release_word_tokenizer(path, WORDS)


def reference_prompt_and_index_list(tokenizer_dir: Path, test_prompt: str) -> tuple[list[int], list[int]]:
    """``FlexARInferenceSolver.generate`` without images: its prompt ids and ``index_list``."""
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.add_tokens(["<|image|>"])  # MMConvItemProcessor.__init__ registers its media symbol
    special_tokens = "S* " * 15 + "S*"
    q1 = (
        f"Instant style Generation. Given image style is {special_tokens}. "
        "Please generate an same style image according to my instruction: "
    )
    qas = [[q1 + test_prompt, None]]
    # Conversation.process: each non-None message + sep_token; the trailing None answer adds nothing.
    conv = ""
    for q, a in qas:
        for message in (q, a):
            if message is not None:
                conv += message + "<reserved08706>"
    # xllmx Tokenizer.encode(conv, bos=True, eos=False)
    prompt = [hf.bos_token_id] + hf.encode(conv, truncation=False, add_special_tokens=False)
    index_list = [index for index, value in enumerate(prompt) if value == 16393]
    return prompt, index_list


def reference_inject(inputs_embeds: torch.Tensor, index_list: list[int], input_tokens: torch.Tensor):
    """``ChameleonModel.forward``'s write of ``set_input_tokens_and_embeds([index_list], input_embeds)``."""
    inputs_embeds = inputs_embeds.clone()
    for i, input_token_index in enumerate([index_list]):
        for j, index in enumerate(input_token_index):
            inputs_embeds[i, index : index + 1, :] = input_tokens[i, j, :].unsqueeze(0).unsqueeze(0)
    return inputs_embeds


@pytest.fixture(scope="module")
def release_tokenizer_dir(tmp_path_factory) -> Path:
    return write_release_tokenizer(tmp_path_factory.mktemp("release_tokenizer"))


def test_release_prompt_ids_positions_and_injection_match_the_reference(release_tokenizer_dir):
    hf_vocab = AutoTokenizer.from_pretrained(str(release_tokenizer_dir)).get_vocab()
    vocab = vocab_from_vocabulary_map(hf_vocab, 65536, "stylear_release")
    assert vocab.style_placeholder == S_STAR_ID
    tokenizer = ChameleonPromptTokenizer.from_pretrained(release_tokenizer_dir, vocab)

    ids = style_prompt_ids(tokenizer, PROMPT, 16, 768, 768)
    want_ids, index_list = reference_prompt_and_index_list(release_tokenizer_dir, PROMPT)
    assert tokenizer.tokenizer.unk_token_id not in want_ids  # every word is in the test vocabulary
    assert ids == want_ids
    assert len(index_list) == 16
    mask = style_placeholder_mask(torch.tensor([ids]), vocab.style_placeholder, 16)
    assert mask[0].nonzero().flatten().tolist() == index_list
    # A word-level tokenizer decodes with spaces between pieces; the wording is checked exactly below.
    assert tokenizer.decode(ids).startswith("Instant style Generation . Given image style is S* S*")

    torch.manual_seed(0)
    backbone = tiny_backbone(vocab, hidden=16, heads=2, kv_heads=2, ffn=32, layers=1)
    prompt = torch.tensor([ids])
    embeds = backbone.get_input_embeddings()(prompt).detach()
    style = torch.randn(1, 16, 16)
    got = inject_style_tokens(embeds, prompt, style, vocab.style_placeholder)
    assert torch.equal(got, reference_inject(embeds, index_list, style))
    assert not torch.equal(got, embeds)


def test_lumina_template_is_unchanged_and_differs_from_the_release(release_tokenizer_dir):
    lumina = tiny_vocab()
    release = tiny_vocab(prompt_template="stylear_release")
    assert lumina.style_placeholder == release.style_placeholder  # same slot, another name
    lumina_ids = style_prompt_ids(ByteTokenizer(lumina), PROMPT, 4, 64, 64)
    release_ids = style_prompt_ids(ByteTokenizer(release), PROMPT, 4, 64, 64)
    assert ByteTokenizer(lumina).decode(lumina_ids).startswith("Generate an image of 64x64")
    text = ByteTokenizer(release).decode(release_ids)
    assert text == (
        "Instant style Generation. Given image style is S* S* S* S*. Please generate an same style "
        f"image according to my instruction: {PROMPT}<reserved08706>"
    )


def test_release_prompt_rejects_a_prompt_holding_the_placeholder():
    tok = ByteTokenizer(tiny_vocab(prompt_template="stylear_release"))
    with pytest.raises(ValueError, match="17 style-placeholder ids"):
        style_prompt_ids(tok, "a cat S*", 16, 64, 64)


def test_model_config_selects_the_release_template():
    assert ModelConfig().resolved_prompt_template == "lumina"
    assert ModelConfig(stylear_release="/models/StyleAR").resolved_prompt_template == "stylear_release"
    assert ModelConfig(stylear_release="/x", prompt_template="lumina").resolved_prompt_template == "lumina"
    cfg = ModelConfig(preset="tiny", prompt_template="stylear_release")
    _, vocab = build_backbone(cfg)
    assert vocab.prompt_template == "stylear_release"
    ids = style_prompt_ids(build_prompt_tokenizer(cfg, vocab), PROMPT, 16, 64, 64)
    assert sum(i == vocab.style_placeholder for i in ids) == 16
    assert TokenVocab.for_prompt_template("stylear_release").style_placeholder == S_STAR_ID
    assert TokenVocab.for_prompt_template("lumina").style_placeholder == 8900
    with pytest.raises(ValueError, match="prompt_template"):
        TokenVocab(prompt_template="other")
