"""Prompt tokenizers and the prompt layouts of Lumina-mGPT and StyleAR.

Two tokenizers share one interface (:class:`PromptTokenizer`): ``encode(text)`` gives ids with BOS
first, ``decode(ids)`` gives text, and the special tokens are written by their real Chameleon
names (``<racm3:break>``, ``<reserved08706>``, ...):

* :class:`ChameleonPromptTokenizer` wraps ``transformers.AutoTokenizer`` loaded from a local
  Chameleon / Lumina-mGPT tokenizer dir (no download);
* :class:`ByteTokenizer` is a deterministic byte-level tokenizer over a tiny :class:`TokenVocab`;
* :class:`WordTokenizer` adds whole-word ids for a fixed word list on top of the bytes (the miniature
  world's tokenizer: like a real BPE vocabulary, each common word is one id, so a small model reads
  a prompt in ~25 ids instead of ~95 bytes; any other text still falls back to bytes).

Lumina-mGPT's conversation template is ``<s> {human turn} <reserved08706>`` and the model then writes
the image (``<racm3:break> ...``). For StyleAR the human turn holds ``num_style_tokens`` style
placeholders whose embeddings are replaced by the resampler's style tokens. The unconditional
branch of classifier-free guidance has no prompt at all: it restarts at the image-start token.

The vocab's ``prompt_template`` picks the wording of a style prompt:

* ``lumina`` (this project's): ``Generate an image of WxH according to the following prompt:\n<prompt>
  Given image style is <reserved08896>...`` with one ``<reserved08896>`` per style token;
* ``stylear_release`` (what StyleAR's released weights were trained on, wuyi2020/StyleAR
  ``FlexARInferenceSolver.generate``): ``Instant style Generation. Given image style is S* S* ... S*.
  Please generate an same style image according to my instruction: <prompt>`` with no resolution,
  the style tokens going where the tokenizer wrote ``S*`` (id 16393 in the real vocabulary).

A style prompt may also carry a **condition image** (a depth map, ...; how StyleAR's release controls
layout): ``condition=True`` writes the vocabulary's ``<image>`` placeholder (one id) into the wording --
``stylear_release``: the release's second template, ``... Please generate an image according to the
provided image <image> and according to my instruction: <prompt>``; ``lumina``: ``... Given image style
is ... Given condition image is <image>`` -- and
:func:`~stylear_core.data.condition_tokens.splice_condition_tokens` puts the image's tokens there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from stylear_core.data.layout import REAL_STYLE_PLACEHOLDER_IDS, TokenVocab, image_token_name, prompt_text

STYLE_PHRASE = "Given image style is"
# StyleAR's release wording (its placeholders are space-separated "S*", then a full stop).
RELEASE_PLACEHOLDER_NAME = "S*"
RELEASE_STYLE_TEMPLATE = (
    "Instant style Generation. " + STYLE_PHRASE + " {placeholders}. "
    "Please generate an same style image according to my instruction: {prompt}"
)
# The release's template for a condition image (its <|image|> marker becomes the vocabulary's <image>).
RELEASE_CONDITION_TEMPLATE = (
    "Instant style Generation. " + STYLE_PHRASE + " {placeholders}. "
    "Please generate an image according to the provided image {condition} "
    "and according to my instruction: {prompt}"
)
# This project's own (lumina) wording for a condition image, after the style placeholders.
CONDITION_PHRASE = "Given condition image is"

# Vocabulary names of the special tokens in the Chameleon / Lumina-mGPT tokenizer.
BOS_NAME = "<s>"
PAD_NAME = "<pad>"
IMAGE_START_NAME = "<racm3:break>"
IMAGE_END_NAME = "<eoss>"
IMAGE_PLACEHOLDER_NAME = "<image>"


def reserved_token_name(token_id: int) -> str:
    """Chameleon's name of a reserved token id: ``<reserved{id-4:05d}>`` (e.g. 8710 -> ``<reserved08706>``)."""
    return f"<reserved{token_id - 4:05d}>"


def reserved_token_id(name: str) -> int:
    """Inverse of :func:`reserved_token_name` for the real Chameleon vocabulary."""
    if not (name.startswith("<reserved") and name.endswith(">")):
        raise ValueError(f"{name!r} is not a reserved-token name")
    return int(name[len("<reserved") : -1]) + 4


def style_placeholder_name(vocab: TokenVocab) -> str:
    """The vocabulary entry the style-placeholder id stands for: ``<reserved08896>`` or ``S*`` (release)."""
    if vocab.prompt_template == "stylear_release":
        return RELEASE_PLACEHOLDER_NAME
    return reserved_token_name(REAL_STYLE_PLACEHOLDER_IDS["lumina"])


def special_token_names(vocab: TokenVocab) -> dict[str, int]:
    """Name -> id of every special token the Lumina layout uses, under the real Chameleon names.

    The names are those of the real vocabulary (e.g. the end-of-turn token is ``<reserved08706>``,
    grid tokens ``<reserved08800+g>``) whatever ids ``vocab`` gives them, so the same prompt text
    tokenizes the same way with the real tokenizer and with a tiny one.
    """
    real = TokenVocab()
    names = {
        BOS_NAME: vocab.bos,
        PAD_NAME: vocab.pad,
        IMAGE_START_NAME: vocab.image_start,
        IMAGE_END_NAME: vocab.image_end,
        IMAGE_PLACEHOLDER_NAME: vocab.image_placeholder,
        reserved_token_name(real.eos): vocab.eos,
        reserved_token_name(real.new_line): vocab.new_line,
        style_placeholder_name(vocab): vocab.style_placeholder,
    }
    for g in range(vocab.max_grids + 1):
        names[reserved_token_name(real.grid_base + g)] = vocab.grid_base + g
    return names


class TokenizerMismatchError(ValueError):
    """A tokenizer's special-token ids disagree with the :class:`TokenVocab` the model uses."""


@runtime_checkable
class PromptTokenizer(Protocol):
    """Text <-> ids for prompts. ``encode`` puts BOS first; special tokens are written by name."""

    vocab: TokenVocab

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int: ...

    def id_to_token(self, token_id: int) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer over a tiny vocab: UTF-8 bytes at ``byte_offset .. byte_offset+255``.

    The Chameleon special-token names (see :func:`special_token_names`) are recognised in the text
    and map to ``vocab``'s ids, so prompt text written for the real tokenizer works here unchanged.
    """

    def __init__(self, vocab: TokenVocab, byte_offset: int | None = None):
        self.vocab = vocab
        self.specials = special_token_names(vocab)
        top = max(max(self.specials.values()), max(vocab.image_code_ids))
        self.byte_offset = top + 1 if byte_offset is None else byte_offset
        if self.byte_offset <= top or self.byte_offset + 256 > vocab.vocab_size:
            raise ValueError(
                f"bytes at {self.byte_offset}..{self.byte_offset + 255} collide with special ids (max {top}) "
                f"or exceed vocab_size {vocab.vocab_size}"
            )
        self._names = {i: n for n, i in self.specials.items()}
        self._code_of_id = {i: c for c, i in enumerate(vocab.image_code_ids)}
        self._pattern = re.compile(
            "(" + "|".join(re.escape(n) for n in sorted(self.specials, key=len)[::-1]) + ")"
        )

    def encode(self, text: str) -> list[int]:
        """``text`` -> ``[bos, ...]``: special-token names become their ids, the rest UTF-8 bytes."""
        ids = [self.vocab.bos]
        for piece in self._pattern.split(text):
            if not piece:
                continue
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:
                ids.extend(self._encode_text(piece))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """Ids of text holding no special-token name: its UTF-8 bytes."""
        return [self.byte_offset + b for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; BOS is dropped, specials and image codes are written by name."""
        out: list[str] = []
        pending = bytearray()
        for i in map(int, ids):
            if self.byte_offset <= i < self.byte_offset + 256:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if i != self.vocab.bos:
                out.append(self.id_to_token(i))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        """The id of a special-token name or of a single byte character."""
        if token in self.specials:
            return self.specials[token]
        data = token.encode("utf-8")
        if len(data) == 1:
            return self.byte_offset + data[0]
        raise KeyError(f"{token!r} is not a single token of the byte tokenizer")

    def id_to_token(self, token_id: int) -> str:
        """The name of a special id or image code, the character of a byte id, ``<unused{id}>`` otherwise."""
        if token_id in self._names:
            return self._names[token_id]
        if token_id in self._code_of_id:
            return image_token_name(self._code_of_id[token_id])
        if self.byte_offset <= token_id < self.byte_offset + 256:
            return bytes([token_id - self.byte_offset]).decode("latin-1")
        return f"<unused{token_id}>"


class ChameleonPromptTokenizer:
    """The real Chameleon / Lumina-mGPT text tokenizer (``AutoTokenizer`` from a local dir).

    ``encode`` follows Lumina-mGPT: BOS, then the text tokenized without added special tokens.
    On construction the tokenizer's ids for the layout's special names are checked against
    ``vocab``; a mismatch raises :class:`TokenizerMismatchError` naming the token.
    """

    def __init__(self, tokenizer, vocab: TokenVocab | None = None):
        self.tokenizer = tokenizer
        self.vocab = vocab or TokenVocab()
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.vocab.bos
        if self.bos_id != self.vocab.bos:
            raise TokenizerMismatchError(f"tokenizer BOS id {self.bos_id}, vocab says {self.vocab.bos}")
        token_vocab = tokenizer.get_vocab()
        for name, want in special_token_names(self.vocab).items():
            got = token_vocab.get(name)
            if got is not None and got != want:
                raise TokenizerMismatchError(f"tokenizer maps {name} to {got}, the model's vocab uses {want}")
        for name in (style_placeholder_name(self.vocab), reserved_token_name(TokenVocab().eos)):
            if name not in token_vocab:
                raise TokenizerMismatchError(f"tokenizer has no {name} token")
        if len(tokenizer) > self.vocab.vocab_size:
            raise TokenizerMismatchError(
                f"tokenizer has {len(tokenizer)} ids, model vocab {self.vocab.vocab_size}"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, vocab: TokenVocab | None = None) -> ChameleonPromptTokenizer:
        """Load with ``AutoTokenizer.from_pretrained(path)``; ``path`` must be a local directory."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: tokenizer dir not found (tokenizers are loaded from local dirs only)"
            )
        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True), vocab)

    def encode(self, text: str) -> list[int]:
        """``text`` -> ``[bos, ...]`` (Lumina-mGPT's ``encode(..., add_special_tokens=False)`` after BOS)."""
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, with BOS dropped."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) != self.bos_id])

    def token_to_id(self, token: str) -> int:
        """The id of one vocabulary entry."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (
            token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token
        ):
            raise KeyError(f"{token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id."""
        return self.tokenizer.convert_ids_to_tokens(int(token_id))


class WordTokenizer(ByteTokenizer):
    """:class:`ByteTokenizer` plus one id per word of ``words``, placed above the bytes.

    A word matches with or without one leading space (``" circle"`` and ``"circle"`` are two ids, as
    in a BPE vocabulary); text outside the list is written as bytes, so every string encodes and
    ``decode(encode(text))`` gives it back.
    """

    _WORD = re.compile(r" ?[A-Za-z0-9]+|.", re.S)

    def __init__(self, vocab: TokenVocab, words: Sequence[str]):
        super().__init__(vocab)
        pieces: list[str] = []
        for word in dict.fromkeys(words):  # ordered, without repeats
            if not re.fullmatch(r"[A-Za-z0-9]+", word):
                raise ValueError(f"a word is letters and digits only, got {word!r}")
            pieces += [word, " " + word]
        first = self.byte_offset + 256
        if first + len(pieces) > vocab.vocab_size:
            raise ValueError(
                f"{len(pieces)} word ids do not fit above the bytes (vocab_size {vocab.vocab_size})"
            )
        self._word_ids = {piece: first + i for i, piece in enumerate(pieces)}
        self._word_of_id = {i: piece for piece, i in self._word_ids.items()}

    def _encode_text(self, text: str) -> list[int]:
        """Listed words as one id each, the rest as bytes (specials are split off by ``encode``)."""
        ids: list[int] = []
        for match in self._WORD.finditer(text):
            word = match.group()
            if word in self._word_ids:
                ids.append(self._word_ids[word])
            else:
                ids.extend(super()._encode_text(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; word ids become their words, the rest as :meth:`ByteTokenizer.decode`."""
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._word_of_id:
                out.append(super().decode(run) if run else "")
                out.append(self._word_of_id[i])
                run = []
            else:
                run.append(i)
        out.append(super().decode(run) if run else "")
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        """The id of a listed word (with or without its leading space), else as :class:`ByteTokenizer`."""
        if token in self._word_ids:
            return self._word_ids[token]
        return super().token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """A word id's word, else as :class:`ByteTokenizer`."""
        return self._word_of_id.get(token_id) or super().id_to_token(token_id)


def template_words() -> tuple[str, ...]:
    """Every word of the prompt templates (Lumina's resolution template, the style phrase, the release's)."""
    text = " ".join(
        [prompt_text("", 64, 64), STYLE_PHRASE, RELEASE_STYLE_TEMPLATE.format(placeholders="", prompt="")]
    )
    return tuple(dict.fromkeys(re.findall(r"[A-Za-z0-9]+", text)))


def load_prompt_tokenizer(
    path: str | Path | None, vocab: TokenVocab, words: Sequence[str] = ()
) -> PromptTokenizer:
    """The real tokenizer from a local dir when ``path`` is given, else the byte tokenizer over ``vocab``
    (a :class:`WordTokenizer` when ``words`` are given)."""
    if path:
        return ChameleonPromptTokenizer.from_pretrained(path, vocab)
    return WordTokenizer(vocab, words) if words else ByteTokenizer(vocab)


def style_placeholder_text(tokenizer: PromptTokenizer, num_style_tokens: int) -> str:
    """``num_style_tokens`` copies of the style placeholder's name (one id each).

    Adjacent for ``lumina`` (``<reserved08896><reserved08896>...``); space-separated for
    ``stylear_release`` (``S* S* ... S*``), as the release writes them.
    """
    name = tokenizer.id_to_token(tokenizer.vocab.style_placeholder)
    sep = " " if tokenizer.vocab.prompt_template == "stylear_release" else ""
    return sep.join([name] * num_style_tokens)


def condition_placeholder_text(tokenizer: PromptTokenizer) -> str:
    """The name of the one id a condition image's tokens replace: ``<image>``."""
    return tokenizer.id_to_token(tokenizer.vocab.image_placeholder)


def style_prompt_text(
    prompt: str,
    placeholders: str,
    height: int,
    width: int,
    template: str = "lumina",
    condition: str | None = None,
) -> str:
    """The human turn of a StyleAR prompt in ``template``'s wording (see the module docstring).

    ``lumina``: Lumina's resolution template around ``<prompt> Given image style is <placeholders>``
    (then ``Given condition image is <condition>`` with a condition); ``stylear_release``:
    :data:`RELEASE_STYLE_TEMPLATE`, or :data:`RELEASE_CONDITION_TEMPLATE` with a condition (``height``
    and ``width`` are not written). ``condition`` is the condition placeholder's text, None for none.
    """
    if template == "stylear_release":
        if condition is not None:
            return RELEASE_CONDITION_TEMPLATE.format(
                placeholders=placeholders, condition=condition, prompt=prompt
            )
        return RELEASE_STYLE_TEMPLATE.format(placeholders=placeholders, prompt=prompt)
    if template != "lumina":
        raise ValueError(f"unknown prompt template {template!r}")
    turn = f"{prompt} {STYLE_PHRASE} {placeholders}"
    if condition is not None:
        turn += f" {CONDITION_PHRASE} {condition}"
    return prompt_text(turn, height, width)


def _check_condition_placeholder(tokenizer: PromptTokenizer, ids: list[int], prompt: str) -> None:
    # Exactly one <image> id, or the condition's tokens would have no place (or two).
    found = sum(1 for i in ids if i == tokenizer.vocab.image_placeholder)
    if found != 1:
        raise ValueError(f"prompt has {found} condition-image placeholders, expected 1: {prompt!r}")


def _turn_ids(tokenizer: PromptTokenizer, text: str) -> list[int]:
    # Lumina's conversation template ends the human turn with <reserved08706> (the vocab's eos id).
    return [*tokenizer.encode(text), tokenizer.vocab.eos]


def text_prompt_ids(
    tokenizer: PromptTokenizer, prompt: str, height: int, width: int, condition: bool = False
) -> list[int]:
    """Lumina-mGPT's text-to-image prompt: ``<s> Generate an image of WxH ...\\n<prompt> <reserved08706>``.

    ``condition``: ``<prompt> Given condition image is <image>``, one ``<image>`` id for a condition
    image's tokens (``ValueError`` if the prompt text holds another).
    """
    if not condition:
        return _turn_ids(tokenizer, prompt_text(prompt, height, width))
    text = f"{prompt} {CONDITION_PHRASE} {condition_placeholder_text(tokenizer)}"
    ids = _turn_ids(tokenizer, prompt_text(text, height, width))
    _check_condition_placeholder(tokenizer, ids, prompt)
    return ids


def style_prompt_ids(
    tokenizer: PromptTokenizer,
    prompt: str,
    num_style_tokens: int,
    height: int,
    width: int,
    condition: bool = False,
) -> list[int]:
    """A StyleAR prompt with exactly ``num_style_tokens`` style-placeholder ids, ending the human turn.

    Worded by ``tokenizer.vocab.prompt_template``. For ``stylear_release`` the ids are those of the
    release: ``[<s>] + encode(text + "<reserved08706>")`` (its conversation template appends the
    end-of-turn name to the text before tokenizing). Raises ``ValueError`` if the tokenizer does not
    turn the placeholders into that many ids (or the prompt text itself contains the placeholder).
    ``condition``: the condition-image wording with exactly one ``<image>`` id (module docstring).
    """
    if num_style_tokens <= 0:
        raise ValueError(f"num_style_tokens must be positive, got {num_style_tokens}")
    template = tokenizer.vocab.prompt_template
    placeholders = style_placeholder_text(tokenizer, num_style_tokens)
    marker = condition_placeholder_text(tokenizer) if condition else None
    text = style_prompt_text(prompt, placeholders, height, width, template, marker)
    if template == "stylear_release":
        ids = tokenizer.encode(text + tokenizer.id_to_token(tokenizer.vocab.eos))
        if ids[-1] != tokenizer.vocab.eos:
            raise ValueError(f"the tokenizer did not end the turn with the end-of-turn id: {prompt!r}")
    else:
        ids = _turn_ids(tokenizer, text)
    found = sum(1 for i in ids if i == tokenizer.vocab.style_placeholder)
    if found != num_style_tokens:
        raise ValueError(f"prompt has {found} style-placeholder ids, expected {num_style_tokens}: {prompt!r}")
    if condition:
        _check_condition_placeholder(tokenizer, ids, prompt)
    return ids


def unconditional_prompt_ids(tokenizer: PromptTokenizer) -> list[int]:
    """The unconditional CFG branch's prompt: empty.

    Lumina-mGPT's guidance processor feeds the unconditional branch only the tokens from the
    image-start token on (no BOS, no text, no style), so the caller starts it with the image header.
    """
    return []
