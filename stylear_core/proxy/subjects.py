"""Subject sets for subject-driven generation: a few instance images, a class noun, a rare identifier.

On disk a subject is a folder (DreamBooth's dataset layout plus a small JSON file)::

    <root>/<subject>/subject.json      {"class_noun": "dog", "identifier": "sks"}
    <root>/<subject>/*.png             3-6 instance images (.jpg / .jpeg / .webp also read)

The identifier is a rare token sequence that the supervisor binds to the subject ("a photo of sks
dog"); the class noun is what the base model already knows ("a photo of dog", the prior-preservation
prompt). :func:`write_synthetic_subjects` writes the procedural subjects of
:mod:`stylear_core.data.synthetic` in this layout for the demo and the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stylear_core.data.images import ImageDecodeError, decode_image, encode_png

SUBJECT_FILE = "subject.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_INSTANCE_IMAGES = 3
MAX_INSTANCE_IMAGES = 6
DEFAULT_INSTANCE_TEMPLATE = "a photo of {identifier} {class_noun}"
DEFAULT_CLASS_TEMPLATE = "a photo of {class_noun}"


class SubjectSetError(ValueError):
    """A subject folder cannot be used (the message names the folder or file and says why)."""


@dataclass(frozen=True)
class SubjectSet:
    """One subject: ``name`` (its folder name), ``class_noun``, ``identifier``, the instance image files
    and the ``folder`` holding them.

    Build it with :meth:`from_folder`; :meth:`images` decodes the instance images as RGB PIL images.
    """

    name: str
    class_noun: str
    identifier: str
    image_paths: tuple[Path, ...]
    folder: Path

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        identifier: str | None = None,
        min_images: int = MIN_INSTANCE_IMAGES,
        max_images: int = MAX_INSTANCE_IMAGES,
    ) -> SubjectSet:
        """Read ``folder/subject.json`` and check the instance images in ``folder``.

        ``identifier`` overrides the one in ``subject.json``. Raises :class:`SubjectSetError` when the
        JSON is missing or malformed, when there are fewer than ``min_images`` or more than
        ``max_images`` images, or when an image cannot be decoded (naming the file).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise SubjectSetError(f"subject folder {folder} does not exist")
        meta_path = folder / SUBJECT_FILE
        if not meta_path.is_file():
            raise SubjectSetError(
                f"{folder}: no {SUBJECT_FILE} (expected {{'class_noun': ..., 'identifier': ...}})"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SubjectSetError(f"{meta_path}: not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise SubjectSetError(f"{meta_path}: expected a JSON object")
        class_noun = meta.get("class_noun")
        identifier = identifier if identifier is not None else meta.get("identifier")
        for key, value in (("class_noun", class_noun), ("identifier", identifier)):
            if not isinstance(value, str) or not value.strip():
                raise SubjectSetError(f"{meta_path}: '{key}' must be a non-empty string, got {value!r}")
        if re.search(r"\s", identifier.strip()):
            raise SubjectSetError(f"{meta_path}: identifier {identifier!r} must be one word")

        paths = tuple(
            sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        )
        if len(paths) < max(min_images, 1):
            raise SubjectSetError(
                f"{folder}: {len(paths)} instance image(s), need at least {min_images} "
                f"({', '.join(IMAGE_SUFFIXES)} files)"
            )
        if len(paths) > max_images:
            raise SubjectSetError(f"{folder}: {len(paths)} instance images, at most {max_images} are used")
        for path in paths:
            try:
                decode_image(path.read_bytes())
            except ImageDecodeError as e:
                raise SubjectSetError(f"{path}: {e}") from None
        return cls(folder.name, class_noun.strip(), identifier.strip(), paths, folder)

    def images(self) -> list[Image.Image]:
        """The instance images as RGB PIL images, in file-name order."""
        return [decode_image(p.read_bytes()) for p in self.image_paths]

    def instance_prompt(self, template: str = DEFAULT_INSTANCE_TEMPLATE) -> str:
        """The prompt naming the subject, e.g. ``"a photo of sks dog"``.

        ``template`` may use ``{identifier}`` and ``{class_noun}``."""
        return template.format(identifier=self.identifier, class_noun=self.class_noun)

    def class_prompt(self, template: str = DEFAULT_CLASS_TEMPLATE) -> str:
        """The prompt naming only the class, e.g. ``"a photo of dog"`` (prior preservation)."""
        return template.format(identifier=self.identifier, class_noun=self.class_noun)

    def without_identifier(self, prompt: str) -> str:
        """``prompt`` with the identifier word removed ("a sks dog on a beach" -> "a dog on a beach"):
        the text a base CLIP understands, for scoring prompt adherence of subject prompts."""
        text = re.sub(rf"\b{re.escape(self.identifier)}\b\s*", "", prompt)
        return re.sub(r"\s{2,}", " ", text).strip()


def load_subject_sets(
    root: str | Path,
    names: Sequence[str] | None = None,
    identifiers: Mapping[str, str] | None = None,
) -> list[SubjectSet]:
    """Every subject folder under ``root`` (those holding ``subject.json``), sorted by name.

    ``names`` selects subjects (each must exist); ``identifiers`` overrides identifiers per subject.
    Raises :class:`SubjectSetError` for a missing root, unknown names, no subjects, a broken subject
    folder, or two subjects sharing an identifier (the supervisor could not tell them apart).
    """
    root = Path(root)
    if not root.is_dir():
        raise SubjectSetError(f"subjects root {root} does not exist")
    found = sorted(p.name for p in root.iterdir() if (p / SUBJECT_FILE).is_file())
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise SubjectSetError(f"{root}: no subject folder(s) {unknown} (found: {found})")
        found = [n for n in found if n in set(names)]
    if not found:
        raise SubjectSetError(f"{root}: no subject folders (a folder with {SUBJECT_FILE} and images)")
    identifiers = identifiers or {}
    subjects = [SubjectSet.from_folder(root / n, identifier=identifiers.get(n)) for n in found]
    seen: dict[str, str] = {}
    for s in subjects:
        if s.identifier in seen:
            raise SubjectSetError(
                f"subjects {seen[s.identifier]!r} and {s.name!r} share identifier {s.identifier!r}"
            )
        seen[s.identifier] = s.name
    return subjects


def write_subject_folder(
    root: str | Path, name: str, images: Sequence[Image.Image | bytes], class_noun: str, identifier: str
) -> SubjectSet:
    """Write one subject (``images`` as PIL images or encoded bytes) under ``root/name`` and read it back."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        data = image if isinstance(image, bytes) else encode_png(image.convert("RGB"))
        (folder / f"{i:02d}.png").write_bytes(data)
    (folder / SUBJECT_FILE).write_text(
        json.dumps({"class_noun": class_noun, "identifier": identifier}, indent=2)
    )
    return SubjectSet.from_folder(folder)


def write_synthetic_subjects(
    root: str | Path, count: int = 2, images_per_subject: int = 4, size: int = 64, seed: int = 0
) -> list[SubjectSet]:
    """Write the first ``count`` procedural subjects
    (:func:`~stylear_core.data.synthetic_subjects.procedural_subjects`, each with its own identifier and
    class noun) under ``root``; returns them as loaded subject sets."""
    from stylear_core.data.synthetic_subjects import procedural_subjects

    subjects = procedural_subjects(count, images_per_subject, size, seed)
    return [write_subject_folder(root, s.name, s.images, s.class_noun, s.token) for s in subjects]
