"""Lumina-mGPT ("FlexAR") token layout of an image, and the special ids it uses.

One image is written as::

    <racm3:break> <reserved{8800+h_grids}> <reserved{8800+w_grids}>
    (w VQ tokens, <reserved08799>) x h   <eoss>

A grid is 32 px, so a VQ latent (downsample 16) has ``2 * grids`` rows and columns. A 768x768
image is 48x48 latents: 48 * 49 + 4 = 2356 tokens. VQ codebook index ``i`` maps to a text-vocab
id through the checkpoint's vocabulary map (names ``IMGIMG<digits as A-J>Z``), so the map is a
lookup table, not an offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LATENTS_PER_GRID = 2  # 32 px per grid / downsample 16
PIXELS_PER_LATENT = 16

# How a StyleAR prompt is worded, and so which token stands for a style token:
# "lumina": Lumina-mGPT's resolution template with <reserved08896> placeholders (this project's own);
# "stylear_release": the wording StyleAR's released weights were trained on, with "S*" placeholders.
PROMPT_TEMPLATES = ("lumina", "stylear_release")
# The real Chameleon vocabulary's id of each template's placeholder (<reserved08896>, "S*").
REAL_STYLE_PLACEHOLDER_IDS = {"lumina": 8900, "stylear_release": 16393}


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name for VQ code ``code``: digits written as letters A-J, ``IMGIMG...Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_from_image_token_name(name: str) -> int:
    """Inverse of :func:`image_token_name`."""
    if not (name.startswith("IMGIMG") and name.endswith("Z")):
        raise ValueError(f"{name!r} is not an image-token name")
    return int("".join(str(ord(c) - ord("A")) for c in name[6:-1]))


class LayoutError(ValueError):
    """A token sequence is not a well-formed image in the Lumina-mGPT layout; the message says where."""


@dataclass(frozen=True)
class TokenVocab:
    """The special token ids of a Chameleon / Lumina-mGPT vocabulary and its VQ code <-> id map.

    The defaults are the real Lumina-mGPT-7B ids (``<reserved{N:05d}>`` has id ``N + 4``).
    ``image_code_ids[i]`` is the vocab id of VQ code ``i``. ``prompt_template`` (one of
    :data:`PROMPT_TEMPLATES`) says how style prompts are worded and so which vocabulary entry the
    ``style_placeholder`` id is; :meth:`for_prompt_template` gives the real vocab of either template.
    """

    vocab_size: int = 65536
    codebook_size: int = 8192
    bos: int = 0
    pad: int = 1
    eos: int = 8710  # <reserved08706>
    image_end: int = 8196  # <eoss>
    image_start: int = 8197  # <racm3:break>
    image_placeholder: int = 8711  # <image>
    new_line: int = 8803  # <reserved08799>
    grid_base: int = 8804  # <reserved08800>; grid token id = grid_base + grids
    max_grids: int = 64
    style_placeholder: int = 8900  # <reserved08896> (lumina) or "S*" (stylear_release): one style token
    image_code_ids: tuple[int, ...] = field(default=(), repr=False)
    prompt_template: str = "lumina"
    # Pixels per VQ code along a side: Chameleon's VQGAN downsamples 16x; the miniature world's 8x.
    # A grid token stays two codes, so a grid is 32 px for Chameleon and 16 px in the miniature world.
    pixels_per_latent: int = PIXELS_PER_LATENT

    def __post_init__(self) -> None:
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template {self.prompt_template!r} is not one of {PROMPT_TEMPLATES}")
        if not self.image_code_ids:
            object.__setattr__(self, "image_code_ids", tuple(range(4, 4 + self.codebook_size)))
        if len(self.image_code_ids) != self.codebook_size:
            raise ValueError(
                f"image_code_ids has {len(self.image_code_ids)} ids, codebook_size is {self.codebook_size}"
            )
        top = max(self.grid_base + self.max_grids, max(self.image_code_ids), self.style_placeholder, self.eos)
        if top >= self.vocab_size:
            raise ValueError(f"special id {top} does not fit vocab_size {self.vocab_size}")

    @classmethod
    def for_prompt_template(cls, prompt_template: str = "lumina", **kwargs) -> TokenVocab:
        """The real Lumina-mGPT vocab with ``prompt_template``'s placeholder id (8900, or 16393 for ``S*``)."""
        if prompt_template not in REAL_STYLE_PLACEHOLDER_IDS:
            raise ValueError(f"prompt_template {prompt_template!r} is not one of {PROMPT_TEMPLATES}")
        kwargs.setdefault("style_placeholder", REAL_STYLE_PLACEHOLDER_IDS[prompt_template])
        return cls(prompt_template=prompt_template, **kwargs)

    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: dict[str, int], **kwargs) -> TokenVocab:
        """Build from a tokenizer's name->id map: image codes from the ``IMGIMG...Z`` names."""
        codes = sorted(
            (code_from_image_token_name(name), idx)
            for name, idx in vocabulary_map.items()
            if name.startswith("IMGIMG")
        )
        if [c for c, _ in codes] != list(range(len(codes))):
            raise ValueError("vocabulary map's IMGIMG names do not cover codes 0..N-1")
        return cls(codebook_size=len(codes), image_code_ids=tuple(i for _, i in codes), **kwargs)

    def vocabulary_map(self) -> dict[str, int]:
        """The name->id map the transformers Chameleon config expects (image names and ``<image>``)."""
        names = {image_token_name(c): i for c, i in enumerate(self.image_code_ids)}
        names["<image>"] = self.image_placeholder
        names["<racm3:break>"] = self.image_start
        names["<eoss>"] = self.image_end
        return names

    @property
    def code_to_id(self) -> torch.Tensor:
        return torch.tensor(self.image_code_ids, dtype=torch.long)

    @property
    def id_to_code(self) -> torch.Tensor:
        """A ``vocab_size`` table: the VQ code of an image-token id, -1 for every other id."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)
        table[self.code_to_id] = torch.arange(self.codebook_size)
        return table

    def image_id_mask(self) -> torch.Tensor:
        """Boolean ``vocab_size`` mask, True on the ids of VQ codes."""
        return self.id_to_code >= 0


@dataclass(frozen=True)
class ImageTokenLayout:
    """Where every token of one image goes, for an image of ``h_latent x w_latent`` VQ codes."""

    h_latent: int
    w_latent: int
    vocab: TokenVocab = field(default_factory=TokenVocab)

    def __post_init__(self) -> None:
        for name in ("h_latent", "w_latent"):
            v = getattr(self, name)
            if v <= 0 or v % LATENTS_PER_GRID:
                raise LayoutError(f"{name}={v} must be a positive multiple of {LATENTS_PER_GRID}")
            if v // LATENTS_PER_GRID > self.vocab.max_grids:
                raise LayoutError(f"{name}={v} exceeds {self.vocab.max_grids} grids")

    @classmethod
    def for_resolution(cls, height: int, width: int, vocab: TokenVocab | None = None) -> ImageTokenLayout:
        """The layout of an image of ``height x width`` pixels (multiples of one grid: 32 px at 16 px per code)."""
        vocab = vocab or TokenVocab()
        grid = vocab.pixels_per_latent * LATENTS_PER_GRID
        for name, v in (("height", height), ("width", width)):
            if v % grid:
                raise LayoutError(f"{name}={v} px is not a multiple of {grid}")
        return cls(height // vocab.pixels_per_latent, width // vocab.pixels_per_latent, vocab)

    @property
    def h_grids(self) -> int:
        return self.h_latent // LATENTS_PER_GRID

    @property
    def w_grids(self) -> int:
        return self.w_latent // LATENTS_PER_GRID

    @property
    def num_tokens(self) -> int:
        """Length of the image's sequence: start, two grid tokens, rows with new-line, end."""
        return 3 + self.h_latent * (self.w_latent + 1) + 1

    @property
    def decode_steps(self) -> int:
        """Decode steps a whole image takes after its header is prefilled: positions 3..num_tokens-1 are
        chosen one per step and all but the last are fed back, so ``num_tokens - 4`` forwards (and cache
        columns) follow the prefill."""
        return self.num_tokens - 4

    @property
    def header(self) -> list[int]:
        """The three tokens that open an image: start and the two grid-size tokens."""
        v = self.vocab
        return [v.image_start, v.grid_base + self.h_grids, v.grid_base + self.w_grids]

    def forced_tokens(self) -> dict[int, int]:
        """Positions (from the image start) whose token is fixed by the layout -> that token."""
        forced = {i: t for i, t in enumerate(self.header)}
        row = self.w_latent + 1
        for r in range(self.h_latent):
            forced[3 + r * row + self.w_latent] = self.vocab.new_line
        forced[self.num_tokens - 1] = self.vocab.image_end
        return forced

    def code_positions(self) -> torch.Tensor:
        """Positions (from the image start) that hold VQ tokens, in raster order."""
        row = self.w_latent + 1
        r = torch.arange(self.h_latent).unsqueeze(1)
        c = torch.arange(self.w_latent).unsqueeze(0)
        return (3 + r * row + c).reshape(-1)

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes ``(..., h, w)`` -> token ids ``(..., num_tokens)``."""
        if codes.shape[-2:] != (self.h_latent, self.w_latent):
            raise LayoutError(
                f"codes have grid {tuple(codes.shape[-2:])}, layout is {(self.h_latent, self.w_latent)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab.codebook_size):
            raise LayoutError(f"codes out of range [0, {self.vocab.codebook_size})")
        batch = codes.shape[:-2]
        out = torch.empty(*batch, self.num_tokens, dtype=torch.long, device=codes.device)
        for pos, tok in self.forced_tokens().items():
            out[..., pos] = tok
        ids = self.vocab.code_to_id.to(codes.device)[codes.long()].reshape(*batch, -1)
        out[..., self.code_positions().to(codes.device)] = ids
        return out

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(..., num_tokens)`` -> VQ codes ``(..., h, w)``; raises :class:`LayoutError` naming the fault."""
        if tokens.shape[-1] != self.num_tokens:
            raise LayoutError(f"sequence has {tokens.shape[-1]} tokens, layout needs {self.num_tokens}")
        flat = tokens.reshape(-1, self.num_tokens)
        for pos, tok in self.forced_tokens().items():
            bad = (flat[:, pos] != tok).nonzero()
            if len(bad):
                b = int(bad[0, 0])
                raise LayoutError(
                    f"sequence {b}, position {pos}: expected {self._describe(pos)} id {tok}, found {int(flat[b, pos])}"
                )
        id_to_code = self.vocab.id_to_code.to(tokens.device)
        ids = flat[:, self.code_positions().to(tokens.device)]
        codes = id_to_code[ids.clamp(0, self.vocab.vocab_size - 1)]
        bad = ((codes < 0) | (ids >= self.vocab.vocab_size) | (ids < 0)).nonzero()
        if len(bad):
            b, j = int(bad[0, 0]), int(bad[0, 1])
            pos = int(self.code_positions()[j])
            raise LayoutError(f"sequence {b}, position {pos}: id {int(ids[b, j])} is not an image-code token")
        return codes.reshape(*tokens.shape[:-1], self.h_latent, self.w_latent)

    def _describe(self, pos: int) -> str:
        if pos == 0:
            return "image-start"
        if pos in (1, 2):
            return "height-grid" if pos == 1 else "width-grid"
        if pos == self.num_tokens - 1:
            return "image-end"
        return "new-line"

    @classmethod
    def parse(cls, tokens: torch.Tensor, vocab: TokenVocab | None = None) -> ImageTokenLayout:
        """Read the layout from a 1-D sequence's header (start token and grid tokens)."""
        vocab = vocab or TokenVocab()
        if tokens.ndim != 1 or tokens.numel() < 3:
            raise LayoutError("an image sequence is 1-D and starts with three header tokens")
        if int(tokens[0]) != vocab.image_start:
            raise LayoutError(
                f"position 0: expected image-start id {vocab.image_start}, found {int(tokens[0])}"
            )
        grids = []
        for pos in (1, 2):
            g = int(tokens[pos]) - vocab.grid_base
            if not 0 < g <= vocab.max_grids:
                raise LayoutError(f"position {pos}: id {int(tokens[pos])} is not a grid-size token")
            grids.append(g)
        return cls(grids[0] * LATENTS_PER_GRID, grids[1] * LATENTS_PER_GRID, vocab)


def prompt_text(prompt: str, height: int, width: int) -> str:
    """Lumina-mGPT's generation template."""
    return f"Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
