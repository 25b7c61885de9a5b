"""Prompt tokenizers: the byte tokenizer, the AutoTokenizer wrapper (on a local tiny tokenizer dir), prompt layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from stylear_core.data.layout import TokenVocab, image_token_name
from stylear_core.data.tokenizer import (
    ByteTokenizer,
    ChameleonPromptTokenizer,
    TokenizerMismatchError,
    load_prompt_tokenizer,
    special_token_names,
    style_prompt_ids,
    text_prompt_ids,
    unconditional_prompt_ids,
)
from stylear_core.models.backbone import tiny_vocab

WORDS = [
    "Generate",
    "an",
    "image",
    "of",
    "64x64",
    "according",
    "to",
    "the",
    "following",
    "prompt",
    ":",
    "a",
    "red",
    "cat",
    "Given",
    "style",
    "is",
]


def write_word_tokenizer(path: Path, vocab: TokenVocab, overrides: dict[str, int] | None = None) -> Path:
    """A Chameleon-like tokenizer dir (special names at the vocab's ids, a few words) saved by transformers."""
    table = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    table.update({image_token_name(c): i for c, i in enumerate(vocab.image_code_ids)})
    table.update(special_token_names(vocab))
    table.update(overrides or {})
    first_word = max(table.values()) + 1
    table.update({w: first_word + i for i, w in enumerate(dict.fromkeys(WORDS))})
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    specials = [n for n in special_token_names(vocab) if n not in ("<s>", "<pad>")]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials,
    )
    fast.save_pretrained(str(path))
    return path


@pytest.fixture
def vocab() -> TokenVocab:
    return tiny_vocab()


def test_byte_tokenizer_round_trips_text_and_special_names(vocab):
    tok = ByteTokenizer(vocab)
    text = "a café <racm3:break><reserved08896> ok"
    ids = tok.encode(text)
    assert ids[0] == vocab.bos
    assert vocab.image_start in ids and vocab.style_placeholder in ids
    assert all(i < vocab.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("abc") == tok.encode("abc")  # deterministic
    assert tok.id_to_token(vocab.image_code_ids[12]) == image_token_name(12)
    assert tok.token_to_id("<eoss>") == vocab.image_end


def test_style_prompt_has_one_placeholder_per_style_token(vocab):
    tok = ByteTokenizer(vocab)
    ids = style_prompt_ids(tok, "a red cat", num_style_tokens=4, height=64, width=64)
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos  # Lumina's turn ends with <reserved08706>
    assert ids.count(vocab.style_placeholder) == 4
    text = tok.decode(ids)
    assert text.startswith(
        "Generate an image of 64x64 according to the following prompt:\na red cat Given image style"
    )
    plain = text_prompt_ids(tok, "a red cat", 64, 64)
    assert vocab.style_placeholder not in plain and plain[-1] == vocab.eos
    assert unconditional_prompt_ids(tok) == []
    with pytest.raises(ValueError, match="expected 4"):
        style_prompt_ids(tok, "sneaky <reserved08896>", num_style_tokens=4, height=64, width=64)


def test_autotokenizer_wrapper_matches_the_layout(tmp_path, vocab):
    path = write_word_tokenizer(tmp_path / "tok", vocab)
    tok = load_prompt_tokenizer(path, vocab)
    assert isinstance(tok, ChameleonPromptTokenizer)
    ids = style_prompt_ids(tok, "a red cat", num_style_tokens=3, height=64, width=64)
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos
    assert ids.count(vocab.style_placeholder) == 3
    words = [tok.id_to_token(i) for i in ids[1:5]]
    assert words == ["Generate", "an", "image", "of"]
    assert tok.token_to_id("<racm3:break>") == vocab.image_start
    assert "red cat" in tok.decode(ids)


def test_autotokenizer_with_other_special_ids_is_rejected(tmp_path, vocab):
    path = write_word_tokenizer(tmp_path / "tok", vocab, overrides={"<racm3:break>": 900})
    with pytest.raises(TokenizerMismatchError, match="<racm3:break>"):
        load_prompt_tokenizer(path, vocab)


def test_missing_tokenizer_dir_is_an_error(tmp_path, vocab):
    with pytest.raises(FileNotFoundError):
        load_prompt_tokenizer(tmp_path / "nope", vocab)
    assert isinstance(load_prompt_tokenizer(None, vocab), ByteTokenizer)


def test_word_tokenizer_gives_listed_words_one_id_and_round_trips_everything_else():
    from stylear_core.data.layout import prompt_text
    from stylear_core.data.synthetic import caption_words
    from stylear_core.data.tokenizer import WordTokenizer, template_words
    from stylear_core.models.backbone import mini_vocab

    vocab = mini_vocab()
    words = WordTokenizer(vocab, (*template_words(), *caption_words()))
    plain = ByteTokenizer(vocab)
    caption = "a large red circle at the top left and a small blue star in the center"
    text = prompt_text(caption, 64, 64)
    ids = words.encode(text)
    assert words.decode(ids) == text
    # Each word of the template and caption is one id ("64x64", ":" and "\n" included as written).
    assert len(ids) == 1 + len(re.findall(r"[A-Za-z0-9]+|[:\n]", text))
    assert len(ids) < len(plain.encode(text)) / 3
    assert words.token_to_id(" circle") != words.token_to_id("circle")
    # Text outside the list, specials and non-ASCII fall back to what the byte tokenizer writes.
    other = "zebra ñ <reserved08706>"
    assert words.encode(other) == plain.encode(other)
    assert words.decode(words.encode(other)) == other
    with pytest.raises(ValueError, match="do not fit"):
        WordTokenizer(vocab, [f"w{i}" for i in range(200)])
