"""Subject scenes of the miniature world and the subject judge that reads them."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import POSITIONS, ObjectSpec, StyleSpec, shape_mask
from stylear_core.data.synthetic_subjects import SUBJECT_NAMES
from stylear_core.miniature.data import HELD_OUT_STYLES
from stylear_core.miniature.subjects import (
    DEFAULT_SUBJECT_SCALE,
    INSTANCE_PLACES,
    NO_SUBJECT,
    SCALE_RANGE,
    SubjectScene,
    cell_center,
    classmate_colours,
    instance_scenes,
    render_subject_scene,
    sample_subject_scene,
    subject_judge_accuracy,
    subject_labels,
    subject_parts,
    subject_token,
    train_subject_judge,
)


def test_scenes_are_deterministic_and_prompts_read_right():
    first = [sample_subject_scene(random.Random(f"t/{i}"), no_subject_share=0.2) for i in range(40)]
    again = [sample_subject_scene(random.Random(f"t/{i}"), no_subject_share=0.2) for i in range(40)]
    assert first == again
    assert render_subject_scene(first[0]).tobytes() == render_subject_scene(again[0]).tobytes()
    assert any(s.distractor is not None for s in first) and any(s.distractor is None for s in first)
    assert any(s.subject is None for s in first)
    for scene in first:
        if scene.subject is None:
            assert scene.distractor is not None and scene.prompt == scene.distractor.describe()
        elif scene.distractor is not None:
            assert scene.distractor.position != scene.position

    style = StyleSpec("vivid", "dots", "filled")
    robot = SubjectScene("robot", "top left", style)
    assert robot.prompt == "a sks robot at the top left"
    assert SubjectScene("cat", "center", style).prompt == "a pdj cat in the center"
    box = ObjectSpec("circle", "red", "bottom", "small")
    assert SubjectScene("robot", "top left", style, distractor=box).prompt == (
        "a sks robot at the top left and a small red circle at the bottom"
    )
    assert SubjectScene(None, "bottom", style, distractor=box).prompt == "a small red circle at the bottom"


def test_subject_stays_inside_the_frame_at_every_position():
    size, pad = 64, 32
    for name in SUBJECT_NAMES:
        for position in POSITIONS:
            for scale in (SCALE_RANGE[0], DEFAULT_SUBJECT_SCALE, SCALE_RANGE[1]):
                parts = subject_parts(name, cell_center(position), scale, size)
                # Each part drawn on a canvas padded on every side: none of its pixels may fall in the pad.
                for kind, _, cx, cy, r in parts:
                    mask = np.asarray(shape_mask(kind, cx + pad, cy + pad, r, size + 2 * pad)) > 127
                    assert mask.sum() > 0
                    inside = mask[pad : pad + size, pad : pad + size].sum()
                    assert inside == mask.sum(), (name, position, scale, kind)
                # Drawn on an empty (uniform) background, the subject is there, near its cell's centre.
                blank = np.asarray(render_subject_scene(SubjectScene(None, position, _PLAIN)))
                drawn = np.asarray(render_subject_scene(SubjectScene(name, position, _PLAIN, scale)))
                ys, xs = np.nonzero((drawn != blank).any(axis=-1))
                assert len(xs) > 40
                col, row = POSITIONS[position]
                assert int(xs.mean() // (size / 3)) == col and int(ys.mean() // (size / 3)) == row


_PLAIN = StyleSpec("vivid", "gradient", "filled")


def test_classmates_are_the_class_in_other_colours_and_never_the_subject():
    rng = random.Random("t/kin")
    kin = [sample_subject_scene(rng, classmate_share=1.0) for _ in range(60)]
    assert all(s.subject is not None and s.classmate is not None for s in kin)
    # Named by the class noun alone; labelled "no subject" everywhere (a class-mate is not the subject).
    for scene in kin[:10]:
        assert (
            scene.prompt.startswith(f"a {scene.subject} ")
            and subject_token(scene.subject) not in scene.prompt
        )
        assert subject_labels(scene) == [NO_SUBJECT] * 9
    # Same design, same place; the largest part's colour is far from the subject's own.
    for scene in kin:
        own = subject_parts(scene.subject, cell_center(scene.position), scene.scale, 64)
        other = subject_parts(scene.subject, cell_center(scene.position), scene.scale, 64, scene.classmate)
        assert [(k, x, y, r) for k, _, x, y, r in own] == [(k, x, y, r) for k, _, x, y, r in other]
        largest = max(range(len(own)), key=lambda i: own[i][4])
        assert np.linalg.norm(np.subtract(own[largest][1], other[largest][1])) >= 120
    assert len({classmate_colours("robot", seed) for seed in range(20)}) > 10
    # Without class-mates the stream draws exactly the scenes it drew before they existed.
    plain = [sample_subject_scene(random.Random(f"t/{i}")) for i in range(20)]
    assert plain == [sample_subject_scene(random.Random(f"t/{i}"), classmate_share=0.0) for i in range(20)]
    assert all(s.classmate is None for s in plain)


def test_instance_views_put_the_subject_where_their_prompts_say():
    views = instance_scenes("robot", 4, seed=0)
    assert [p for p, _ in views] == [
        "a sks robot in the center",
        "a sks robot at the top left",
        "a sks robot at the bottom right",
        "a sks robot at the left",
    ]
    assert [v.tobytes() for _, v in views] == [v.tobytes() for _, v in instance_scenes("robot", 4, seed=0)]
    assert len({v.tobytes() for _, v in views}) == 4
    for place, (_, image) in zip(INSTANCE_PLACES, views):
        assert isinstance(image, Image.Image) and image.size == (64, 64)
        pixels = np.asarray(image).astype(int)
        corner = pixels[-1, -1] if place != "bottom right" else pixels[0, 0]
        ys, xs = np.nonzero(np.abs(pixels - corner).sum(-1) > 30)
        col, row = POSITIONS[place]
        assert int(xs.mean() // (64 / 3)) == col and int(ys.mean() // (64 / 3)) == row, place


def test_cut_down_judge_reads_subjects_on_held_out_scenes_and_a_shuffled_one_does_not(
    cut_down_subject_judge, cut_down_subject_judge_config
):
    judge = cut_down_subject_judge
    accuracy = subject_judge_accuracy(judge, seed=1, count=256)
    chance_identity, chance_cell = 1 / len(SUBJECT_NAMES), 1 / 9
    # Chance is 1/6 for the identity and 1/9 for the cell; this config measured 0.97 at the cell (0.88
    # blurred), and took 0.008 of held-out class-mates for their subject.
    assert accuracy["identity"] > 0.7 > 4 * chance_identity, accuracy
    assert accuracy["at_cell"] > 0.7 > 6 * chance_cell, accuracy
    assert accuracy["false_positive"] < 0.2, accuracy
    # Trained with class-mates labelled "no subject", it does not take one for the subject.
    assert accuracy["classmate_false_positive"] < 0.2, accuracy
    assert accuracy["blurred_at_cell"] > 0.5, accuracy

    # subject_at reads the asked cell: the same scenes asked one cell off are (almost) never right.
    rng = random.Random("t/held")
    scenes = [sample_subject_scene(rng, styles=HELD_OUT_STYLES) for _ in range(64)]
    pixels = to_tensor([render_subject_scene(s) for s in scenes])
    names = [s.subject for s in scenes]
    here = judge.subject_at(pixels, names, [s.position for s in scenes]).float().mean()
    order = list(POSITIONS)
    off = [order[(order.index(s.position) + 1) % 9] for s in scenes]
    assert judge.subject_at(pixels, names, off).float().mean() < 0.2 < here

    control, _ = train_subject_judge(cut_down_subject_judge_config, shuffled_labels=True)
    shuffled = subject_judge_accuracy(control, seed=1, count=256)
    assert shuffled["identity"] < 2 * chance_identity, shuffled
    assert shuffled["at_cell"] < 2 * chance_cell, shuffled
