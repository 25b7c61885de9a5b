"""Subject sets: folder layout, identifier overrides, and clear errors for unusable folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from stylear_core.data.synthetic import corrupt_bytes
from stylear_core.proxy.subjects import (
    SUBJECT_FILE,
    SubjectSet,
    SubjectSetError,
    load_subject_sets,
    write_subject_folder,
    write_synthetic_subjects,
)


def _drawn(i: int, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (230, 230, 230))
    ImageDraw.Draw(img).ellipse((4 + i, 4, 20 + i, 20), fill=(200, 30 * i, 40))
    return img


def _folder(root: Path, name: str = "dog", count: int = 4, meta: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        _drawn(i).save(folder / f"{i}.png")
    meta = {"class_noun": "dog", "identifier": "sks"} if meta is None else meta
    (folder / SUBJECT_FILE).write_text(json.dumps(meta))
    return folder


def test_folder_loads_with_prompts_and_images(tmp_path: Path):
    folder = _folder(tmp_path)
    (folder / "notes.txt").write_text("not an image")
    subject = SubjectSet.from_folder(folder)
    assert (subject.name, subject.class_noun, subject.identifier) == ("dog", "dog", "sks")
    assert [p.name for p in subject.image_paths] == ["0.png", "1.png", "2.png", "3.png"]
    assert subject.folder == folder
    images = subject.images()
    assert len(images) == 4 and images[2].mode == "RGB" and images[2].getpixel((14, 12)) == (200, 60, 40)
    assert subject.instance_prompt() == "a photo of sks dog"
    assert subject.class_prompt() == "a photo of dog"
    assert subject.instance_prompt("a {identifier} {class_noun} on a beach") == "a sks dog on a beach"
    assert subject.without_identifier("a sks dog on a beach, sks style") == "a dog on a beach, style"
    assert SubjectSet.from_folder(folder, identifier="olis").instance_prompt() == "a photo of olis dog"


@pytest.mark.parametrize(
    ("count", "meta", "match"),
    [
        (2, None, r"2 instance image\(s\), need at least 3"),
        (7, None, "7 instance images, at most 6"),
        (4, {"identifier": "sks"}, "'class_noun' must be a non-empty string"),
        (4, {"class_noun": "dog", "identifier": ""}, "'identifier' must be a non-empty string"),
        (4, {"class_noun": "dog", "identifier": "two words"}, "must be one word"),
        (4, ["dog"], "expected a JSON object"),
    ],
)
def test_unusable_folders_are_named(tmp_path: Path, count: int, meta, match: str):
    folder = _folder(tmp_path, count=count, meta=meta)
    with pytest.raises(SubjectSetError, match=match) as err:
        SubjectSet.from_folder(folder)
    assert str(folder) in str(err.value)


def test_unreadable_image_and_missing_json_are_named(tmp_path: Path):
    folder = _folder(tmp_path)
    (folder / "9.png").write_bytes(corrupt_bytes("truncated"))
    with pytest.raises(SubjectSetError, match=r"9\.png: unreadable image"):
        SubjectSet.from_folder(folder)
    (folder / "9.png").unlink()
    (folder / SUBJECT_FILE).write_text("{not json")
    with pytest.raises(SubjectSetError, match="not JSON"):
        SubjectSet.from_folder(folder)
    (folder / SUBJECT_FILE).unlink()
    with pytest.raises(SubjectSetError, match=f"no {SUBJECT_FILE}"):
        SubjectSet.from_folder(folder)
    with pytest.raises(SubjectSetError, match="does not exist"):
        SubjectSet.from_folder(tmp_path / "absent")


def test_root_selection_overrides_and_shared_identifiers(tmp_path: Path):
    _folder(tmp_path, "dog")
    write_subject_folder(tmp_path, "cat", [_drawn(i) for i in range(3)], "cat", "olis")
    (tmp_path / "stray").mkdir()  # a folder without subject.json is not a subject
    assert [s.name for s in load_subject_sets(tmp_path)] == ["cat", "dog"]
    assert [s.name for s in load_subject_sets(tmp_path, ["dog"])] == ["dog"]
    overridden = load_subject_sets(tmp_path, identifiers={"dog": "zwq"})
    assert [s.identifier for s in overridden] == ["olis", "zwq"]
    with pytest.raises(SubjectSetError, match=r"no subject folder\(s\) \['horse'\]"):
        load_subject_sets(tmp_path, ["horse"])
    with pytest.raises(SubjectSetError, match="share identifier 'olis'"):
        load_subject_sets(tmp_path, identifiers={"dog": "olis"})
    with pytest.raises(SubjectSetError, match="no subject folders"):
        load_subject_sets(tmp_path / "stray")


def test_synthetic_subjects_are_written_in_the_folder_layout(tmp_path: Path):
    subjects = write_synthetic_subjects(tmp_path, count=2, images_per_subject=3, size=32)
    assert [s.name for s in subjects] == ["robot", "mushroom"]
    assert len({s.identifier for s in subjects}) == 2
    reloaded = load_subject_sets(tmp_path)
    assert [(s.name, s.identifier, s.class_noun) for s in reloaded] == [
        (s.name, s.identifier, s.class_noun) for s in sorted(subjects, key=lambda s: s.name)
    ]
    images = reloaded[0].images()
    assert len(images) == 3 and images[0].size == (32, 32)
    assert images[0].tobytes() != images[1].tobytes()  # views differ
