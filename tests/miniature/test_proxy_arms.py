"""The Proxy-Tuning arms' prompts, data and scoring (the arms themselves need a trained world)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from stylear_core.data.images import to_tensor
from stylear_core.data.synthetic import POSITIONS
from stylear_core.miniature.data import HELD_OUT_STYLES, TRAIN_STYLES
from stylear_core.miniature.proxy_arms import (
    ProxyGate,
    augmented_views,
    batch_rows,
    held_out_prompts,
    proxy_data,
    proxy_scenes,
    score_subject_images,
    weak_to_strong,
)
from stylear_core.miniature.subjects import (
    INSTANCE_PLACES,
    SubjectScene,
    instance_scenes,
    render_subject_scene,
    subject_token,
)
from stylear_core.miniature.supervisor import prior_pairs


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


def test_prior_pairs_are_class_mates_and_world_scenes_never_the_subject():
    pairs = prior_pairs(["robot", "cat"], 40, seed=0, streams=("ar-prior", "ar-prior"))
    assert [p for p, _ in pairs] == [
        p for p, _ in prior_pairs(["robot", "cat"], 40, 0, ("ar-prior", "ar-prior"))
    ]
    prompts = [p for p, _ in pairs]
    assert len(pairs) == 40 and all(image.size == (64, 64) for _, image in pairs)
    # Half are class-mates ("a robot at the left"), named by their class noun, never by the identifier.
    kin = prompts[20:]
    assert all(any(f"a {name} " in p for name in ("robot", "cat")) for p in kin)
    assert not any(subject_token(name) in p.split() for p in prompts for name in ("robot", "cat"))
    assert len({image.tobytes() for _, image in pairs}) == 40


def test_a_batch_draws_its_share_from_the_prior_rows_and_none_without_them():
    rng = random.Random(0)
    rows = [batch_rows(rng, 4, 100, 16, 0.25) for _ in range(200)]
    assert all(len(r) == 16 and sum(i >= 4 for i in r) == 4 for r in rows)
    assert {i for r in rows for i in r if i < 4} == set(range(4))
    assert len({i for r in rows for i in r if i >= 4}) > 90  # the prior rows are drawn uniformly
    # Without prior rows every row is a tuning pair, drawn as before prior rows existed.
    old = random.Random(1)
    assert batch_rows(random.Random(1), 4, 0, 16, 0.5) == [old.randrange(4) for _ in range(16)]
    for share in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="prior_share"):
            batch_rows(random.Random(0), 4, 100, 16, share)


def test_scores_read_the_subject_and_its_place_and_not_another_prompts(cut_down_subject_judge):
    subject_judge = cut_down_subject_judge
    # The content judge's "other object" score is the world judges' content_correct, tested with them; a
    # cut-down content judge is too weak to read it.
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
    # Noise in place of the images whose prompts ask for another object: the alone / with-other split
    # reads each half on its own.
    asked = torch.tensor([s.distractor is not None for s in scenes])
    half = score_subject_images(
        torch.where(asked[:, None, None, None], noise, drawn), scenes, subject_judge, judges
    )
    assert half["fidelity_alone"] > 0.8 and half["fidelity_with_other"] < 0.2, half
    assert exact["fidelity_with_other"] > 0.8, exact
    alone = [s for s in scenes if s.distractor is None]
    assert score_subject_images(drawn[~asked], alone, subject_judge, judges)["fidelity_with_other"] is None


class _ExactDrawer:
    """Draws each prompt's scene exactly, as the supervisor's sample() is called, except that for odd seeds
    the subject is moved to the opposite cell (scenes in the center have none): samples the filter must
    reject. Counts what it drew."""

    OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

    def __init__(self, scenes: list[SubjectScene]):
        self.scenes = {s.prompt: s for s in scenes}
        self.drawn: list[str] = []

    def sample(self, prompts, seeds, guidance):
        out = []
        for prompt, seed in zip(prompts, seeds):
            scene = self.scenes[prompt]
            if seed % 2:
                words = scene.position.split()
                scene = replace(scene, position=" ".join(self.OPPOSITE.get(w, w) for w in words))
            out.append(render_subject_scene(scene))
            self.drawn.append(scene.subject)
        return to_tensor(out)


def test_proxy_data_keeps_subjects_at_their_place_and_each_subjects_quota(cut_down_subject_judge):
    subject_judge = cut_down_subject_judge
    scenes = [s for s in proxy_scenes(["robot", "cat"], 48, seed=0) if s.position != "center"]
    drawer = _ExactDrawer(scenes)
    # Without a quota: every scene is drawn, and the moved half is filtered out.
    kept, share = proxy_data(drawer, scenes, subject_judge, seed=0, batch_size=8)
    assert len(drawer.drawn) == len(scenes)
    assert 0.35 < share < 0.6, share
    images = to_tensor([image for _, image in kept])
    assert subject_judge.subject_at(images, [s.subject for s, _ in kept], [s.position for s, _ in kept]).all()
    # With a quota of 6 per subject: each subject's scenes are drawn only until 6 are kept.
    drawer = _ExactDrawer(scenes)
    kept, share = proxy_data(drawer, scenes, subject_judge, seed=0, batch_size=8, keep_per_subject=6)
    assert Counter(s.subject for s, _ in kept) == {"robot": 6, "cat": 6}
    assert Counter(drawer.drawn)["robot"] < len(scenes) / 2 and Counter(drawer.drawn)["cat"] < len(scenes) / 2
    assert share == pytest.approx(12 / len(drawer.drawn))


def _scores(fidelity: float, other: float | None) -> dict:
    return {"fidelity": fidelity, "other_object": other}


def _arms(student: dict, **others: dict) -> dict:
    arms = {"base": _scores(0.03, 0.4), "b_direct": _scores(0.4, 0.2), "a_supervisor": _scores(0.25, 0.3)}
    return {**arms, **others, "c_proxy": student}


def test_the_gate_holds_a_student_to_base_direct_tuning_and_the_supervisor_by_its_margins():
    gate = ProxyGate(over_base=0.15, over_direct=0.08, adherence_margin=0.1)
    assert gate.failures(_arms(_scores(0.5, 0.25))) == []
    # Each condition alone fails it, and says which figures.
    near_direct = gate.failures(_arms(_scores(0.47, 0.3)))
    assert len(near_direct) == 1 and "b_direct" in near_direct[0] and "0.470" in near_direct[0]
    low_base = gate.failures({**_arms(_scores(0.5, 0.3)), "base": _scores(0.4, 0.3)})
    assert len(low_base) == 1 and "base's 0.400" in low_base[0]
    lost_prompt = gate.failures(_arms(_scores(0.6, 0.19)))
    assert len(lost_prompt) == 1 and "supervisor's 0.300" in lost_prompt[0]
    assert gate.failures(_arms(_scores(0.6, None)))  # adherence unmeasured is no pass
    # A student that was never tuned fails; a named other student is judged instead.
    assert gate.failures({k: v for k, v in _arms(_scores(0.5, 0.3)).items() if k != "c_proxy"})
    noise = {**_arms(_scores(0.5, 0.3)), "c_random_images": _scores(0.0, 0.1)}
    assert len(gate.failures(noise, "c_random_images")) == 3


def test_weak_to_strong_needs_the_student_at_or_above_its_supervisor_on_both_figures():
    assert weak_to_strong(_arms(_scores(0.25, 0.3))) is True
    assert weak_to_strong(_arms(_scores(0.6, 0.29))) is False
    assert weak_to_strong(_arms(_scores(0.24, 0.5))) is False
    assert weak_to_strong(_arms(_scores(0.6, None))) is None
