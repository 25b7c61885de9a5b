"""The ``proxy_arms`` stage: Proxy-Tuning's three arms measured in the miniature world, with a report.

Takes the pretrain stage's manifest (the base model) and the world it published under ``<pretrain>/model/``
(a world with subjects: ``jobs/configs/pretrain/proxy.yaml``; its cache is not read), and one or more
subject sets (one subject, and several tuned into one model). Each set runs
:func:`~stylear_core.miniature.proxy_arms.run_arms` in its own Ray task. Gives
``<output_dir>/results.json`` (per set, per arm: fidelity, fidelity at the prompt's place, at places no
instance view showed, over prompts with the subject alone and with another object, the other object;
the proxy images kept, per subject; the gate's verdict on the student and on the noise control, and
whether weak-to-strong holds), ``<output_dir>/<set>.png`` (a row per arm, the first prompts),
``<output_dir>/report.html`` (the table, the judges' held-out accuracies and the images) and the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stylear_core.config import Resources, from_dict, option
from stylear_core.data.images import to_pil
from stylear_core.evaluation.report_html import esc, img, table
from stylear_core.evaluation.run_report import PROXY_ARMS_FORMAT
from stylear_core.miniature.evaluate_stage import write_grid
from stylear_core.miniature.proxy_arms import ProxyArmsConfig, ProxyGate, run_arms, weak_to_strong
from stylear_core.miniature.world import WorldPaths, load_judges, load_subject_judge, load_supervisor
from stylear_core.models.config import ModelConfig
from stylear_core.runs import published_model_dir, read_manifest
from stylear_core.stages import StageConfig

ARM_TITLES = {
    "base": "AR base",
    "supervisor_untuned": "supervisor before DreamBooth",
    "a_supervisor": "(a) DreamBooth supervisor",
    "b_direct": "(b) AR on the instance views",
    "b_augmented": "(b) AR on augmented views",
    "c_proxy": "(c) AR on proxy images",
    "c_random_images": "(c) control: noise images, same prompts",
}
GRID_PROMPTS = 9


@dataclass
class ProxyArmsStageConfig(StageConfig):
    """The world, the subject sets and how the arms are made."""

    output_dir: str = option("{run_dir}/proxy_arms", "stage output directory")
    pretrain: str = option("{run_dir}/pretrain", "the pretrain stage's output (a world with subjects)")
    subject_sets: list[list[str]] = option(
        [["robot"], ["robot", "mushroom", "cat"]], "subjects tuned together; each set is measured on its own"
    )
    arms: ProxyArmsConfig = option(ProxyArmsConfig, "prompts, DreamBooth, proxy data, AR tuning")
    random_proxy_control: bool = option(True, "also tune arm (c) on noise images under the proxy prompts")
    gate: ProxyGate = option(
        ProxyGate, "the quality gate each set's student (and the noise control) is held to"
    )
    resources: Resources = option(Resources(cpus=2.0), "per subject-set task")


def _set_task(
    world_dir: str, model: ModelConfig, arms: ProxyArmsConfig, directory: str, control: bool
) -> dict:
    paths = WorldPaths(Path(world_dir))
    out = run_arms(
        load_supervisor(paths),
        load_subject_judge(paths),
        load_judges(paths),
        model,
        arms,
        Path(directory),
        random_proxy_control=control,
    )
    out["images"] = {arm: to_pil(pixels[:GRID_PROMPTS]) for arm, pixels in out["images"].items()}
    return out


STUDENTS = ("c_proxy", "c_random_images")


# What the arms' page reads of each set's results and of each arm's scores: results.json written by an
# older version of the stage, without some of them, is named in a run's report instead of rendered.
SET_KEYS = (
    "results",
    "prompts",
    "proxy_rows",
    "proxy_kept_share",
    "proxy_rows_per_subject",
    "proxy_rows_with_other",
    "fidelity_per_subject",
    "gate",
    "weak_to_strong",
)
ARM_KEYS = (
    "fidelity",
    "fidelity_at_place",
    "at_unseen_place",
    "fidelity_alone",
    "fidelity_with_other",
    "other_object",
)


def _gate_lines(result: dict) -> list[str]:
    lines = []
    for student, missed in result["gate"].items():
        verdict = "passes" if not missed else "misses: " + "; ".join(missed)
        lines.append(f"<p>Gate, {esc(ARM_TITLES[student])}: {esc(verdict)}.</p>")
    claim = {True: "holds", False: "does not hold", None: "is unmeasured"}[result["weak_to_strong"]]
    lines.append(
        f"<p>Weak-to-strong (the student matches or beats its supervisor on fidelity and on the other"
        f" object): {claim}.</p>"
    )
    return lines


def proxy_arms_html(sets: dict[str, dict], world: dict[str, Any], prefix: str = "", level: int = 1) -> str:
    """The arms' tables, gate verdicts and grids as HTML (headings from ``<h{level}>``); image paths are
    ``prefix`` + ``<set>.png`` (the stage's page has them beside it, a run's report one directory up)."""
    h1, h2 = f"h{level}", f"h{level + 1}"
    subjects = world.get("subjects", {})
    judge = subjects.get("subject_judge", {})
    parts = [
        f"<{h1}>Proxy-Tuning in the miniature world</{h1}>",
        "<p>Subject fidelity: the subject judge finds the prompt's subject (anywhere / at the prompt's place /"
        " at places no instance view showed / anywhere, over the prompts with the subject alone and over"
        " those with another object). Other object: the content judge finds the prompt's other object at its"
        " place. Held-out styles; every place; half the prompts with another object.</p>",
        f"<{h2}>Judges on held-out images</{h2}>",
        table(
            ["judge", "figure"],
            [
                ["subject at its cell (drawn)", judge.get("at_cell", "-")],
                ["subject at its cell (VQ reconstructions)", judge.get("vq_reconstruction_at_cell", "-")],
                ["class-mates taken for the subject", judge.get("classmate_false_positive", "-")],
                ["false positives on subject-free scenes", judge.get("false_positive", "-")],
                ["content judge (drawn)", world.get("judges", {}).get("raw", {}).get("content", "-")],
                [
                    "supervisor content accuracy before DreamBooth",
                    subjects.get("supervisor", {}).get("content", "-"),
                ],
            ],
            3,
        ),
    ]
    for name, result in sets.items():
        rows = [
            [
                ARM_TITLES.get(arm, arm),
                r["fidelity"],
                r["fidelity_at_place"],
                r["at_unseen_place"],
                r["fidelity_alone"],
                r["fidelity_with_other"],
                r["other_object"],
            ]
            for arm, r in result["results"].items()
        ]
        parts += [
            f"<{h2}>{esc(name)}: {len(result['prompts'])} prompts, {result['proxy_rows']} proxy images kept"
            f" ({result['proxy_kept_share']:.2f} of those drawn; per subject"
            f" {', '.join(f'{k} {v}' for k, v in result['proxy_rows_per_subject'].items())}),"
            f" {result['proxy_rows_with_other']} of them beside another object</{h2}>",
            table(
                [
                    "arm",
                    "fidelity",
                    "at place",
                    "at unseen places",
                    "subject alone",
                    "beside another object",
                    "other object",
                ],
                rows,
                2,
            ),
            *_gate_lines(result),
        ]
        per_subject = result["fidelity_per_subject"]
        subjects = list(result["proxy_rows_per_subject"])
        if len(subjects) > 1:
            parts += [
                "<p>Fidelity per subject (the subject judge finds it, over that subject's prompts):</p>",
                table(
                    ["arm", *subjects],
                    [[ARM_TITLES.get(arm, arm), *(f[s] for s in subjects)] for arm, f in per_subject.items()],
                    2,
                ),
            ]
        parts.append(
            img(
                f"{prefix}{name}.png",
                "rows: " + " | ".join(ARM_TITLES.get(a, a) for a in result["results"]),
                9 * 128,
            )
        )
    return "\n".join(parts)


def _report(sets: dict[str, dict], world: dict[str, Any], out: Path) -> str:
    body = proxy_arms_html(sets, world)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>Proxy-Tuning arms</title></head><body>{body}</body></html>"
    (out / "report.html").write_text(page)
    return str(out / "report.html")


def run_proxy_arms(cfg: ProxyArmsStageConfig) -> dict[str, Any]:
    """Every subject set's arms on Ray tasks; write results, grids and the report."""
    import ray

    pretrain_dir = Path(cfg.path(cfg.pretrain))
    pretrain = read_manifest(pretrain_dir)
    if pretrain is None:
        raise ValueError(f"no pretrain manifest in {pretrain_dir}: run jobs.pretrain first")
    summary = pretrain.get("summary", pretrain)
    world_dir = str(published_model_dir(pretrain_dir))
    model = from_dict(ModelConfig, summary["model"])
    world = json.loads(WorldPaths(Path(world_dir)).report.read_text())
    if "subjects" not in world:
        raise ValueError(
            f"the world at {world_dir} has no subjects: pretrain it with world.subject_share > 0"
        )
    out = cfg.stage_dir
    out.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_set_task)
    names = {"+".join(subjects): subjects for subjects in cfg.subject_sets}
    refs = {
        name: task.remote(
            world_dir,
            model,
            replace(cfg.arms, subjects=list(subjects)),
            str(out / f"adapters-{name}"),
            cfg.random_proxy_control,
        )
        for name, subjects in names.items()
    }
    sets = {name: ray.get(ref) for name, ref in refs.items()}
    for name, result in sets.items():
        images = result.pop("images")
        scores = result["results"]
        # The student is always judged: a set whose supervisor kept no proxy image has no student and fails.
        judged = [s for s in STUDENTS if s == "c_proxy" or s in scores]
        result["gate"] = {s: cfg.gate.failures(scores, s) for s in judged}
        result["weak_to_strong"] = weak_to_strong(scores)
        write_grid([images[arm] for arm in result["results"]], out / f"{name}.png")
    (out / "results.json").write_text(json.dumps(sets, indent=2))
    report = _report(sets, world, out)
    return {
        "results": {name: r["results"] for name, r in sets.items()},
        "gate": {name: r["gate"] for name, r in sets.items()},
        "weak_to_strong": {name: r["weak_to_strong"] for name, r in sets.items()},
        "report": report,
        "world": world_dir,
    }


def proxy_arms_section(run_dir: Path, name: str) -> str:
    """A run report's section for the proxy_arms stage ``name`` of ``run_dir``: its tables, gate verdicts
    and grids (empty when the stage wrote no results)."""
    stage = run_dir / name
    results = stage / "results.json"
    if not results.is_file():
        return ""
    world = json.loads(WorldPaths(Path(read_manifest(stage)["summary"]["world"])).report.read_text())
    sets = json.loads(results.read_text())
    missing = sorted({key for result in sets.values() for key in SET_KEYS if key not in result})
    missing += sorted(
        {
            key
            for result in sets.values()
            for scores in result.get("results", {}).values()
            for key in ARM_KEYS
            if key not in scores
        }
    )
    if missing:
        return (
            f"<h2>{esc(name)}</h2><p>{esc(str(results))} was written by an older version of the stage (no"
            f" {esc(', '.join(missing))}): rerun it with force=true to see it here.</p>"
        )
    return proxy_arms_html(sets, world, prefix=f"{name}/", level=2)


__all__ = [
    "PROXY_ARMS_FORMAT",
    "ProxyArmsStageConfig",
    "proxy_arms_html",
    "proxy_arms_section",
    "run_proxy_arms",
]
