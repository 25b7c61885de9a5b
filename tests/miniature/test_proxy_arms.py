"""The Proxy-Tuning arms' prompts, data and scoring (the arms themselves need a trained world)."""

from __future__ import annotations

import torch

from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import POSITIONS
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES
from stylear_core.miniature.proxy_arms import (
    augmented_views,
    held_out_prompts,
    proxy_scenes,
    score_subject_images,
)
from stylear_core.miniature.subjects import (
    INSTANCE_PLACES,
    SubjectJudgeConfig,
    instance_scenes,
    render_subject_scene,
    train_subject_judge,
)


def test_held_out_prompts_cover_every_place_in_held_out_styles_half_with_another_object():
    scenes = held_out_prompts(["robot", "cat"], 18, seed=0)
    assert scenes == held_out_prompts(["robot", "cat"], 18, seed=0)
    for name in ("robot", "cat"):
        mine = [s for s in scenes if s.subject == name]
        assert len(mine) == 18 and {s.position for s in mine} == set(POSITIONS)
        assert sum(s.distractor is not None for s in mine) == 9
        assert all(s.distractor is None or s.distractor.position != s.position for s in mine)
    assert all(s.style in HELD_OUT_STYLES and s.classmate is None for s in scenes)
    # Proxy prompts are drawn in the training styles only: the held-out prompts stay unseen.
    assert all(s.style in TRAIN_STYLES for s in proxy_scenes(["robot"], 20, seed=0))


def test_augmented_views_move_the_subject_but_keep_the_caption():
    views = instance_scenes("robot", 3)
    augmented = augmented_views(views, ["robot"], 4, seed=0)
    assert [p for p, _ in augmented] == [p for p, _ in views for _ in range(4)]
    assert len({image.tobytes() for _, image in augmented}) == 12


def test_scores_read_the_subject_and_its_place_and_not_another_prompts():
    # The subject test's cut-down judge (about 10 s). The content judge's "other object" score is the
    # world judges' content_correct, tested with them; a cut-down content judge is too weak to read it.
    subject_judge, _ = train_subject_judge(
        SubjectJudgeConfig(num_images=2000, steps=500, batch_size=32, width=16)
    )
    judges = None
    scenes = held_out_prompts(["robot", "mushroom"], 18, seed=1)
    drawn = to_tensor([render_subject_scene(s) for s in scenes])
    exact = score_subject_images(drawn, scenes, subject_judge, judges, INSTANCE_PLACES[:4])
    # The scenes drawn exactly as prompted: the subject is found, at its place, and the other object too.
    assert exact["fidelity"] > 0.8 and exact["fidelity_at_place"] > 0.8 and exact["at_unseen_place"] > 0.7, (
        exact
    )
    assert exact["other_object"] is None
    # The same images scored against each other's prompts (subjects and places swapped) score low.
    swapped = scenes[18:] + scenes[:18]
    wrong = score_subject_images(drawn, swapped, subject_judge, judges)
    assert wrong["fidelity"] < 0.2 and wrong["fidelity_at_place"] < 0.2, wrong
    # Noise has no subject.
    noise = torch.rand(drawn.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert score_subject_images(noise, scenes, subject_judge, judges)["fidelity"] < 0.2
