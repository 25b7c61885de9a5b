"""Condition images in the prompt: the release's condition template, the ``<image>`` placeholder, the splice.

The expected side of the parity test follows wuyi2020/StyleAR ``FlexARInferenceSolver.generate`` with
``images=[condition]``: the second question text written out here, Lumina-mGPT's
``MMConvItemProcessor`` (``<|image|>`` added to the tokenizer, the conversation encoded with it, then
that token replaced by the image's ``input_ids``) and ``FlexARItemProcessor.process_image``'s token list
(image start, the two grid tokens, rows of codes each closed by ``<reserved08799>``, image end).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from stylear_core.data.condition_tokens import splice_condition_tokens
from stylear_core.data.layout import ImageTokenLayout, LayoutError
from stylear_core.data.tokenizer import (
    ByteTokenizer,
    ChameleonPromptTokenizer,
    style_prompt_ids,
    text_prompt_ids,
)
from stylear_core.models.backbone import tiny_vocab, vocab_from_vocabulary_map
from stylear_core.testing.fixtures import write_release_word_tokenizer

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
    "according",
    "to",
    "the",
    "provided",
    "and",
    "my",
    "instruction",
    ":",
    "a",
    "red",
    "cat",
    "on",
    "beach",
]


def write_release_tokenizer(path: Path) -> Path:
    """The shared Chameleon-like word-level tokenizer dir, holding this test's words."""
    return write_release_word_tokenizer(path, WORDS)


def reference_condition_prompt(tokenizer_dir: Path, test_prompt: str, image_ids: list[int]) -> list[int]:
    """``FlexARInferenceSolver.generate`` with one condition image: the flattened prompt ids."""
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.add_tokens(["<|image|>"])  # MMConvItemProcessor.__init__ registers its media symbol
    media_token = hf.convert_tokens_to_ids("<|image|>")
    special_tokens = "S* " * 15 + "S*"
    q1 = (
        f"Instant style Generation. Given image style is {special_tokens}. Please generate an image "
        "according to the provided image <|image|> and according to my instruction: "
    )
    conv = q1 + test_prompt + "<reserved08706>"  # Conversation.process: the human turn + its sep
    tokens = [hf.bos_token_id] + hf.encode(conv, add_special_tokens=False)
    assert tokens.count(media_token) == 1
    prompt: list[int] = []
    for t in tokens:  # replace_media_token_with_media, then process_item's flattening
        prompt += image_ids if t == media_token else [t]
    return prompt


def test_release_condition_prompt_matches_the_reference(tmp_path):
    tokenizer_dir = write_release_tokenizer(tmp_path / "tokenizer")
    vocab = vocab_from_vocabulary_map(
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).get_vocab(), 65536, "stylear_release"
    )
    tokenizer = ChameleonPromptTokenizer.from_pretrained(tokenizer_dir, vocab)
    layout = ImageTokenLayout.for_resolution(96, 64, vocab)  # 6 x 4 codes: a small non-square condition
    codes = torch.randint(0, vocab.codebook_size, (layout.h_latent, layout.w_latent))
    image_ids = layout.encode(codes).tolist()

    ids = splice_condition_tokens(
        style_prompt_ids(tokenizer, PROMPT, 16, 96, 64, condition=True), image_ids, vocab
    )
    want = reference_condition_prompt(tokenizer_dir, PROMPT, image_ids)
    assert tokenizer.tokenizer.unk_token_id not in want  # every word is in the test vocabulary
    assert ids == want
    assert ids.count(vocab.style_placeholder) == 16 and vocab.image_placeholder not in ids
    # Without a condition the release's first template is unchanged: no <image>, no image tokens.
    plain = style_prompt_ids(tokenizer, PROMPT, 16, 96, 64)
    assert vocab.image_placeholder not in plain and vocab.image_start not in plain


def test_lumina_condition_wording_holds_one_placeholder_that_the_splice_fills():
    vocab = tiny_vocab()
    tok = ByteTokenizer(vocab)
    ids = style_prompt_ids(tok, PROMPT, 4, 64, 64, condition=True)
    assert ids.count(vocab.image_placeholder) == 1 and ids.count(vocab.style_placeholder) == 4
    assert tok.decode(ids).endswith(
        f"{PROMPT} Given image style is {'<reserved08896>' * 4} Given condition image is <image><reserved08706>"
    )
    layout = ImageTokenLayout.for_resolution(64, 64, vocab)
    image_ids = layout.encode(torch.zeros(layout.h_latent, layout.w_latent, dtype=torch.long)).tolist()
    spliced = splice_condition_tokens(ids, image_ids, vocab)
    k = ids.index(vocab.image_placeholder)
    assert spliced == ids[:k] + image_ids + ids[k + 1 :]
    text_ids = text_prompt_ids(tok, PROMPT, 64, 64, condition=True)
    assert text_ids.count(vocab.image_placeholder) == 1 and vocab.style_placeholder not in text_ids


def test_condition_prompts_and_splices_refuse_what_they_cannot_place():
    vocab = tiny_vocab()
    tok = ByteTokenizer(vocab)
    with pytest.raises(ValueError, match="2 condition-image placeholders"):
        style_prompt_ids(tok, "a cat <image>", 4, 64, 64, condition=True)
    layout = ImageTokenLayout.for_resolution(64, 64, vocab)
    image_ids = layout.encode(torch.zeros(layout.h_latent, layout.w_latent, dtype=torch.long)).tolist()
    with pytest.raises(ValueError, match="0 condition-image placeholders"):
        splice_condition_tokens(style_prompt_ids(tok, PROMPT, 4, 64, 64), image_ids, vocab)
    broken = image_ids[:-1] + [vocab.eos]  # the image-end token is missing
    with pytest.raises(LayoutError, match="image-end"):
        splice_condition_tokens(style_prompt_ids(tok, PROMPT, 4, 64, 64, condition=True), broken, vocab)
