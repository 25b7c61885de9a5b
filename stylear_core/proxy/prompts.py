"""DreamBench's object prompts: what subject evaluation draws, and what proxy data is drawn under.

Every template writes the subject as ``{identifier} {class_noun}`` ("a olis robot on the beach").
:data:`DREAMBENCH_OBJECT_PROMPTS` is DreamBench's list of 25 object prompts (Ruiz et al., 2023,
arXiv:2208.12242); subject evaluation uses all of them. Proxy data (stage 2) draws from three lists:
the recontextualisation prompts :data:`CONTEXT_TEMPLATES` (16 of the 25, chosen by
:data:`PROXY_CONTEXT_INDICES`), :data:`STYLE_TEMPLATES` (art styles and property changes) and
:data:`ACTION_TEMPLATES`. Three of those also are DreamBench prompts ("a red", "a shiny" and
"floating in an ocean of milk"), so 19 of the 25 evaluation prompts are among the training prompts.
"""

from __future__ import annotations

DREAMBENCH_OBJECT_PROMPTS = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} with a wheat field in the background",
    "a {identifier} {class_noun} with a tree and autumn leaves in the background",
    "a {identifier} {class_noun} with the Eiffel Tower in the background",
    "a {identifier} {class_noun} floating on top of water",
    "a {identifier} {class_noun} floating in an ocean of milk",
    "a {identifier} {class_noun} on top of green grass with sunflowers around it",
    "a {identifier} {class_noun} on top of a mirror",
    "a {identifier} {class_noun} on top of the sidewalk in a crowded street",
    "a {identifier} {class_noun} on top of a dirt road",
    "a {identifier} {class_noun} on top of a white rug",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)
"""DreamBench's 25 prompts for object subjects (Ruiz et al., 2023), with the subject as placeholders."""

PROXY_CONTEXT_INDICES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 16, 18)
"""The DreamBench prompts proxy data uses as context templates (the scenes, without the Eiffel Tower,
the ocean of milk, the crowded sidewalk and the white rug)."""

_RED, _SHINY, _OCEAN_OF_MILK = (DREAMBENCH_OBJECT_PROMPTS[i] for i in (20, 22, 14))

CONTEXT_TEMPLATES = tuple(DREAMBENCH_OBJECT_PROMPTS[i] for i in PROXY_CONTEXT_INDICES)
"""Proxy data's recontextualisation templates (DreamBench prompts)."""

STYLE_TEMPLATES = (
    "a watercolor painting of a {identifier} {class_noun}",
    "an oil painting of a {identifier} {class_noun}",
    "a pencil sketch of a {identifier} {class_noun}",
    "a cartoon drawing of a {identifier} {class_noun}",
    "a pixel art image of a {identifier} {class_noun}",
    "a 3d render of a {identifier} {class_noun}",
    _RED,
    _SHINY,
)
"""Proxy data's art-style and property templates."""

ACTION_TEMPLATES = (
    _OCEAN_OF_MILK,
    "a {identifier} {class_noun} held in a hand",
    "a {identifier} {class_noun} sinking into water",
    "a {identifier} {class_noun} falling through the air",
    "a {identifier} {class_noun} being lit by a spotlight",
    "a {identifier} {class_noun} half buried in sand",
)
"""Proxy data's action templates."""

__all__ = [
    "ACTION_TEMPLATES",
    "CONTEXT_TEMPLATES",
    "DREAMBENCH_OBJECT_PROMPTS",
    "PROXY_CONTEXT_INDICES",
    "STYLE_TEMPLATES",
]
