"""The end-to-end demo: a private local Ray cluster, the pipeline as a Ray job, the Serve app, HTTP, a report.

1. Starts a loopback Ray head (own ports and temp dir, :class:`~cluster.local.LocalRayCluster`).
2. Submits ``python -m jobs.pipeline --config jobs/configs/pipeline/demo.yaml`` with ``ray job submit``
   exactly as a user would against a real cluster, and follows its logs to its end. The default is the
   miniature world, cut down to train fresh in minutes (pretrain -> train_style -> evaluate_world ->
   export): a VQGAN, style CLIP, judges and base model trained on procedural images, then StyleAR SFT.
   ``--config jobs/configs/pipeline/tiny.yaml`` runs the random tiny plumbing pipeline instead (curate ->
   train_style -> make_preferences -> train_dpo -> evaluate -> export).
3. Connects to the same cluster, deploys the Ray Serve app (:mod:`serving.app`) with the serving
   config the export stage wrote (the exported adapter under its adapters root), and sends real HTTP
   requests: health, adapters, and style-aligned generation for held-out references (the world's
   held-out styles; the tiny run's held synthetic pairs), each with the tuned adapter and with the base
   model, concurrently (so requests batch). The PNGs and a ``responses.json`` land in
   ``<run_dir>/served/``.
4. Rewrites ``<run_dir>/report.html`` with the served images, shuts Serve down, stops the cluster and
   prints where the report is.

    python -m cluster.demo [--config FILE] [--run-dir runs/demo] [key=value pipeline overrides ...]
    python -m cluster.demo --attach 127.0.0.1:6379 --skip-pipeline --run-dir R   # steps 3-4 only
    python -m cluster.demo --config jobs/configs/pipeline/proxy_world.yaml --run-dir runs/proxy --no-serve
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cluster.local import REPO_ROOT, LocalRayCluster, apply_project_env, free_port, project_env

AGENT_WAIT_S = 600  # the head answers HTTP before its job agent registers: minutes on a loaded 2-core machine
WORLD_STAGE = "evaluate_world"  # the stage a miniature-world run has and the tiny run does not


def start_local_cluster(num_cpus: int, attempts: int = 3) -> LocalRayCluster:
    """A started :class:`LocalRayCluster`; a start that fails (its ports, picked free, were taken or
    clashed by the time Ray bound them) is retried with fresh ports up to ``attempts`` times."""
    for attempt in range(1, attempts + 1):
        try:
            return LocalRayCluster(num_cpus=num_cpus).start()
        except RuntimeError as e:
            if attempt == attempts:
                raise
            print(f"[demo] Ray head did not start ({e}); retrying with new ports", flush=True)
    raise AssertionError("unreachable")


def _ray_cli_env() -> dict[str, str]:
    env = {**os.environ, **project_env()}
    env.pop("RAY_ADDRESS", None)  # the CLI gets --address; a stray RAY_ADDRESS must not redirect it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def submit_job(
    cluster: LocalRayCluster,
    entrypoint: list[str],
    submission_id: str,
    timeout_s: float = AGENT_WAIT_S,
    entrypoint_cpus: int = 0,
) -> None:
    """``ray job submit --no-wait`` the entrypoint with the repo as working dir and the project's runtime env.

    ``entrypoint_cpus`` (``--entrypoint-num-cpus``) reserves CPUs for the entrypoint's own process, and
    Ray then starts it with ``OMP_NUM_THREADS`` set to that number; without it the entrypoint reserves
    nothing and runs torch on one thread, which is slow for stages that compute in their own process
    (the miniature world's training, evaluation). Retries while the head's job agent is still starting
    ("No available agent"); raises ``RuntimeError`` with the CLI's output on any other failure or once
    ``timeout_s`` has passed.
    """
    reserve = [f"--entrypoint-num-cpus={entrypoint_cpus}"] if entrypoint_cpus else []
    cmd = [
        _ray_bin(), "job", "submit",
        f"--address={cluster.dashboard_url}", f"--submission-id={submission_id}", "--no-wait",
        "--working-dir=.", "--runtime-env=cluster/runtime_env.yaml", *reserve,
        "--", *entrypoint,
    ]  # fmt: skip
    deadline = time.time() + timeout_s
    while True:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=_ray_cli_env(), capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "No available agent" not in done.stderr or time.time() > deadline:
            raise RuntimeError(f"ray job submit failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        time.sleep(5.0)


def wait_for_job(cluster: LocalRayCluster, submission_id: str, timeout_s: float, follow: bool = False) -> str:
    """Wait until the job ends (streaming its logs with ``follow``); its final status name (SUCCEEDED,
    FAILED, STOPPED), or TIMEOUT after stopping it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.time() + timeout_s
    if follow:
        logs = [_ray_bin(), "job", "logs", "--follow", f"--address={cluster.dashboard_url}", submission_id]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(logs, cwd=REPO_ROOT, env=_ray_cli_env(), timeout=timeout_s)
    while time.time() < deadline:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(2.0)
    client.stop_job(submission_id)
    return "TIMEOUT"


def http_call(
    url: str, body: dict[str, Any] | None = None, timeout: float = 120.0
) -> tuple[int, bytes, dict]:
    """GET (``body`` None) or POST JSON to ``url``; returns ``(status, body bytes, headers with lower-case
    names)``, HTTP errors included."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def _tiny_requests(run_dir: Path, count: int) -> list[dict[str, Any]]:
    from stylear_core.config import from_dict
    from stylear_core.evaluation.style_eval import HeldPairsConfig, held_pairs
    from stylear_core.runs import read_manifest

    export = read_manifest(run_dir / "export")
    evaluate = read_manifest(run_dir / "evaluate") or {}
    pairs_cfg = from_dict(HeldPairsConfig, (evaluate.get("config") or {}).get("pairs", {}))
    size = int(read_manifest(export["summary"]["adapter"])["model_config"]["image_size"])
    return [
        {"prompt": p["prompt"], "style_ref": p["style_ref"], "reference": p["style_image"], "sampling": {}}
        for p in held_pairs(pairs_cfg, size)[:count]
    ]


def _world_requests(run_dir: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` held-out pairs of the run's evaluate_world stage (its config), sampled as it
    samples them: pair ``i`` is the one in column ``i`` of its grid."""
    from stylear_core.config import from_dict
    from stylear_core.data.images import encode_png
    from stylear_core.miniature.evaluate import WorldEvalConfig, held_out_pairs
    from stylear_core.runs import read_manifest

    evaluate = read_manifest(run_dir / WORLD_STAGE) or {}
    cfg = from_dict(WorldEvalConfig, (evaluate.get("config") or {}).get("eval", {}))
    sampling = {
        "cfg": cfg.sampling.cfg_scale,
        "top_k": cfg.sampling.top_k,
        "temperature": cfg.sampling.temperature,
        "noise_strength": cfg.sampling.noise_strength,
    }
    return [
        {
            "prompt": p.content.prompt,
            "style_ref": p.style.style_id,
            "reference": encode_png(p.reference),
            "sampling": sampling,
        }
        for p in held_out_pairs(cfg)[:count]
    ]


def is_world_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a miniature-world run (it has an evaluate_world stage)."""
    return (Path(run_dir) / WORLD_STAGE / "manifest.json").is_file()


def default_request_count(run_dir: Path) -> int:
    """Held references the demo sends: each held-out style of the world once; 3 of the tiny run's pairs."""
    if is_world_run(run_dir):
        from stylear_core.miniature.data import HELD_OUT_STYLES

        return len(HELD_OUT_STYLES)
    return 3


def served_requests(run_dir: Path, count: int) -> list[dict[str, Any]]:
    """Style requests for the demo: the first ``count`` held pairs of the run's evaluation stage (the
    world's held-out pairs for a world run; else the evaluate stage's pairs, its defaults when the run
    has none), each with and without the exported adapter."""
    from stylear_core.runs import read_manifest

    name = read_manifest(run_dir / "export")["summary"]["name"]
    pairs = _world_requests(run_dir, count) if is_world_run(run_dir) else _tiny_requests(run_dir, count)
    jobs = []
    for i, pair in enumerate(pairs):
        for adapter in (name, None):
            jobs.append({"index": i, "pair": pair, "adapter": adapter, "seed": 1000 + i})
    return jobs


def serve_and_query(
    address: str, run_dir: Path, count: int | None = None, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Deploy the Serve app for the run's export on the cluster at ``address``, send the demo's HTTP
    requests, write ``<run_dir>/served/`` and return what was written to its ``responses.json``."""
    import ray
    from ray import serve

    from serving.app import build_app
    from stylear_core.evaluation.run_report import SERVED_DIR, SERVED_FORMAT
    from stylear_core.runs import read_manifest

    export = read_manifest(run_dir / "export")
    if not export or export.get("status") != "complete":
        raise FileNotFoundError(f"{run_dir / 'export'}: no complete export stage to serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = run_dir / SERVED_DIR
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address=address, namespace="stylear-demo", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.time()
        app = build_app({"config_file": export["summary"]["serving_config"]})
        serve.run(app, name="stylear", route_prefix="/")
        print(f"[demo] Serve app up at {url} in {time.time() - t0:.0f}s", flush=True)
        health = http_call(f"{url}/healthz", timeout=60)
        adapters = json.loads(http_call(f"{url}/v1/adapters", timeout=60)[1] or b"{}")

        def one(job: dict[str, Any]) -> dict[str, Any]:
            body = {"prompt": job["pair"]["prompt"], "seed": job["seed"], "cfg": 4.0, "timeout_s": timeout_s}
            body.update(job["pair"]["sampling"])
            body["image"] = base64.b64encode(job["pair"]["reference"]).decode()
            if job["adapter"]:
                body["adapter"] = job["adapter"]
            started = time.time()
            status, content, headers = http_call(f"{url}/v1/generate/style", body, timeout=timeout_s)
            record = {
                "endpoint": "/v1/generate/style",
                "adapter": job["adapter"],
                "prompt": job["pair"]["prompt"],
                "style_ref": job["pair"]["style_ref"],
                "status": status,
                "seconds": round(time.time() - started, 2),
                "seed": job["seed"],
                "reference": f"{job['index']}_reference.png",
            }
            (out / record["reference"]).write_bytes(job["pair"]["reference"])
            if status == 200 and headers.get("content-type", "").startswith("image/png"):
                record["image"] = f"{job['index']}_{job['adapter'] or 'base'}.png"
                (out / record["image"]).write_bytes(content)
            else:
                record["error"] = content.decode(errors="replace")[:500]
            return record

        jobs = served_requests(run_dir, default_request_count(run_dir) if count is None else count)
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            records = list(pool.map(one, jobs))
        stats = json.loads(http_call(f"{url}/v1/stats", timeout=60)[1] or b"{}")
        result = {
            "format": SERVED_FORMAT,
            "url": url,
            "health": health[0],
            "adapters": [a.get("name") for a in adapters.get("adapters", [])],
            "requests": records,
            "stats": stats,
        }
        (out / "responses.json").write_text(json.dumps(result, indent=2))
        ok = sum(r["status"] == 200 for r in records)
        print(
            f"[demo] {ok}/{len(records)} style requests answered 200; batch sizes {stats.get('batch_sizes')}"
        )
        return result
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def print_world_verdict(run_dir: Path) -> None:
    """One line per judged variant of a world run: style, palette, content accuracy and leakage."""
    metrics = run_dir / WORLD_STAGE / "metrics.json"
    if not metrics.is_file():
        return
    for name, m in json.loads(metrics.read_text()).items():
        print(
            f"[demo] {name}: style {m['style_accuracy']:.3f} (chance {m['chance_style']:.3f}), palette "
            f"{m['palette_accuracy']:.3f} (colour judge {m.get('palette_colour_accuracy', float('nan')):.3f}), "
            f"content {m['content_accuracy']:.3f}, leakage {m['leakage']:.3f} on {m['pairs']} held-out pairs",
            flush=True,
        )


def print_verdict(run_dir: Path) -> None:
    """The evaluation's headline: per variant for a world run; else one line, base vs tuned style score."""
    if is_world_run(run_dir):
        print_world_verdict(run_dir)
        return
    metrics = run_dir / "evaluate" / "metrics.json"
    if not metrics.is_file():
        return
    summary = json.loads(metrics.read_text())
    key, tuned = summary["headline"], summary["tuned"]
    verdict = "above" if summary["style_improved"] else "NOT above"
    print(
        f"[demo] style score {key}: base {summary['metrics']['base'][key]:.4f}, "
        f"{tuned} {summary['metrics'][tuned][key]:.4f} ({verdict} the base)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see the module docstring); returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default="jobs/configs/pipeline/demo.yaml",
        help="pipeline config (default: the miniature world; jobs/configs/pipeline/tiny.yaml: random tiny models)",
    )
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "demo"))
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=6,
        help="CPUs the local cluster offers (may exceed cores: the pipeline's process, a Train worker and "
        "Ray Data's reads hold 2 each while only the worker computes)",
    )
    parser.add_argument(
        "--driver-cpus",
        type=int,
        default=2,
        help="CPUs reserved for the pipeline job's own process (--entrypoint-num-cpus): its torch threads",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the pipeline job may take")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="held references sent to the style endpoint (default: each held-out style of a world run; 3)",
    )
    parser.add_argument("--attach", default=None, help="GCS address of a running cluster: start none")
    parser.add_argument("--skip-pipeline", action="store_true", help="serve an existing run dir's export")
    parser.add_argument(
        "--no-serve",
        action="store_true",
        help="run the pipeline and write the report only (a pipeline without an export stage, such as "
        "jobs/configs/pipeline/proxy_world.yaml)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for jobs.pipeline")
    args = parser.parse_args(argv)
    if args.attach and not args.skip_pipeline:
        parser.error("--attach only serves an existing run: add --skip-pipeline")
    if args.no_serve and args.skip_pipeline:
        parser.error("--no-serve with --skip-pipeline leaves nothing to do")
    apply_project_env()
    run_dir = Path(args.run_dir).resolve()
    t0 = time.time()
    cluster = None if args.attach else start_local_cluster(args.num_cpus)
    try:
        if cluster is not None:
            print(f"[demo] Ray head at {cluster.address}, dashboard {cluster.dashboard_url}", flush=True)
        if not args.skip_pipeline:
            entrypoint = ["python", "-m", "jobs.pipeline", "--config", args.config, f"run_dir={run_dir}"]
            submission_id = f"stylear-demo-{int(time.time())}"
            submit_job(
                cluster, [*entrypoint, *args.overrides], submission_id, entrypoint_cpus=args.driver_cpus
            )
            status = wait_for_job(cluster, submission_id, args.timeout, follow=True)
            print(f"[demo] pipeline job {submission_id}: {status} after {time.time() - t0:.0f}s", flush=True)
            if status != "SUCCEEDED":
                return 1
        served = (
            None if args.no_serve else serve_and_query(args.attach or cluster.address, run_dir, args.requests)
        )
    finally:
        if cluster is not None:
            cluster.stop()
    from stylear_core.evaluation.run_report import write_report

    report = write_report(run_dir)
    print_verdict(run_dir)
    failed = [r for r in served["requests"] if r["status"] != 200] if served else []
    print(f"[demo] done in {time.time() - t0:.0f}s; report: {report}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
