"""A rerun skips every complete stage: each ``jobs/<stage>.py`` and the pipeline, before attaching to Ray.

Every stage's real ``main`` runs (through :func:`~stylear_core.stages.run_stage`) with its tiny config
against an output directory prepared by hand, and with ``ray_address`` set to a port nobody listens on:

* a complete manifest of the stage's format: ``main`` returns the stored summary marked ``skipped``,
  leaves the directory as it was, and never attaches to Ray (the process stays without a Ray session);
* the same manifest saying ``running`` (an interrupted stage): ``main`` goes on to attach, and fails
  naming the dead address: it did not skip.

All stages run in one fresh Python process, so no Ray session of another test can hide a connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import free_port, project_env

REPO = Path(__file__).resolve().parents[2]
STAGES = (
    "curate", "train_style", "make_preferences", "train_dpo", "evaluate", "export",
    "dreambooth", "proxy_generate", "train_subject", "evaluate_subject", "pretrain", "evaluate_world",
)  # fmt: skip

# Runs in the child: every stage on a complete, then an interrupted, output dir; prints one JSON line.
CHILD = r"""
import importlib, json, sys
from pathlib import Path
import ray
from stylear_core.runs import write_manifest

root, dead, stages = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")

def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

results = {}
for name in stages:
    job = importlib.import_module(f"jobs.{name}")
    out = root / name
    preset = "mini" if name in ("pretrain", "evaluate_world") else "tiny"  # the miniature world's stages
    argv = ["--config", f"jobs/configs/{name}/{preset}.yaml", f"run_dir={root}", f"output_dir={out}",
            f"ray_address={dead}"]
    write_manifest(out, job.FORMAT, status="complete", summary={"marker": name, "status": "complete"})
    before = snapshot(out)
    try:
        r = {"summary": job.main(argv)}
    except Exception as e:
        r = {"summary": {"raised": f"{type(e).__name__}: {e}"}}
    r.update(unchanged=snapshot(out) == before, ray_after_skip=ray.is_initialized())
    write_manifest(out, job.FORMAT, status="running", summary={"marker": name})
    try:
        r["rerun"] = {"returned": job.main(argv)}
    except Exception as e:
        r["rerun"] = {"raised": type(e).__name__, "message": str(e)}
    results[name] = r

# The pipeline over stages that are all complete: every stage's stored summary, no Ray.
run_dir = root / "pipeline_run"
for name in ("curate", "train_style"):
    write_manifest(run_dir / name, "any/1", status="complete", summary={"marker": name})
pipeline = importlib.import_module("jobs.pipeline")
config = root / "pipeline.yaml"
config.write_text(json.dumps({"run_dir": str(run_dir), "ray_address": dead, "stages": {
    n: {"job": n, "config": f"jobs/configs/{n}/tiny.yaml"} for n in ("curate", "train_style")}}))
try:
    results["pipeline"] = {"returned": pipeline.main(["--config", str(config)]), "ray": ray.is_initialized()}
except Exception as e:
    results["pipeline"] = {"returned": f"{type(e).__name__}: {e}", "ray": ray.is_initialized()}
print("RESULTS " + json.dumps(results, default=str))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    dead = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), dead, ",".join(STAGES)],
        cwd=REPO, env={**project_env(), "PATH": "/usr/bin:/bin", "TMPDIR": str(root)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS "))
    return {**json.loads(line[len("RESULTS ") :]), "dead": dead}


@pytest.mark.parametrize("stage", STAGES)
def test_a_complete_stage_is_skipped_without_ray(results: dict, stage: str):
    r = results[stage]
    assert r["summary"].get("marker") == stage and r["summary"]["status"] == "skipped", r["summary"]
    assert r["unchanged"], "a skipped stage wrote to its output dir"
    assert not r["ray_after_skip"], "a skipped stage attached to Ray"


@pytest.mark.parametrize("stage", STAGES)
def test_an_unfinished_stage_is_not_skipped(results: dict, stage: str):
    rerun = results[stage]["rerun"]
    assert rerun.get("raised") == "RayConnectionError", rerun
    assert results["dead"] in rerun["message"]


def test_a_pipeline_rerun_skips_every_complete_stage_without_ray(results: dict):
    assert results["pipeline"]["returned"] == {
        "curate": {"marker": "curate"},
        "train_style": {"marker": "train_style"},
    }
    assert not results["pipeline"]["ray"]
