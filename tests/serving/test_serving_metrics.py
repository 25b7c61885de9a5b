"""The model replica's ``stylear_`` metrics, read back from Ray's Prometheus export (tiny preset, real Serve).

Requests go over real HTTP on 127.0.0.1; the metrics are read where Prometheus would scrape them: the
node's metrics export port (``ray.nodes()[...]["MetricsExportPort"]``), which Ray's metrics agent
serves. Ray flushes a process's metrics to the agent every few seconds, so the test polls (bounded).
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import build_app
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.models.backbone import tiny_vocab
from stylear_core.models.presets import tiny_vqgan_codebook_size
from stylear_core.testing.fixtures import tiny_model_cfg, write_subject_adapters

TINY = tiny_model_cfg()
APP = "stylear-metrics"
SIDE = 32
MAX_SLOTS = 6
SENT = {"dog": 2, "cat": 1}  # requests per adapter, each answered with an image


@pytest.fixture(scope="module")
def url(serve_on_loopback, tmp_path_factory):
    root = write_subject_adapters(tmp_path_factory.mktemp("adapters"), TINY)
    overrides = [f"adapters_root={root}", "sam_enabled=false", f"max_slots={MAX_SLOTS}"]
    app = build_app({"config_file": "serving/configs/tiny.yaml", "overrides": overrides})
    return serve_on_loopback(app, APP)


def exported(ray) -> dict[tuple[str, str], float]:
    """This application's ``stylear_`` samples on the node's Prometheus endpoint, summed over replicas,
    keyed by (sample name, the value of its own tag: adapter or reason; '' when it has none)."""
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    address = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(address, timeout=10) as answer:
        text = answer.read().decode()
    values: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_stylear_") and sample.labels.get("application") == APP:
                assert sample.labels["deployment"] == "StyleARModel" and sample.labels["replica"]
                tag = (
                    sample.labels.get("adapter") or sample.labels.get("reason") or sample.labels.get("le", "")
                )
                values[sample.name, tag] += sample.value
    return dict(values)


def test_replica_metrics_count_what_was_sent(url, ray_session):
    with httpx.Client(base_url=url, timeout=120) as c:
        for adapter, count in SENT.items():
            word = {"dog": "sks", "cat": "zwx"}[adapter]
            for seed in range(count):
                body = {"prompt": f"a photo of {word} {adapter}", "adapter": adapter, "seed": seed}
                answer = c.post("/v1/generate/subject", json={**body, "height": SIDE, "width": SIDE})
                assert answer.status_code == 200, answer.text
        missing = c.post("/v1/generate/subject", json={"prompt": "a photo", "adapter": "no-such-adapter"})
        assert missing.status_code == 404, missing.text
        steps = c.get("/v1/stats").json()["decode"]["steps"]

    tokens = ImageTokenLayout.for_resolution(
        SIDE, SIDE, tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    ).num_tokens
    answered = sum(SENT.values())
    want = {
        ("ray_stylear_requests_total", "dog"): SENT["dog"],
        ("ray_stylear_requests_total", "cat"): SENT["cat"],
        ("ray_stylear_rejections_total", "bad_input"): 1,
        ("ray_stylear_tokens_generated_total", ""): answered * tokens,
        ("ray_stylear_decode_steps_total", ""): steps,
        ("ray_stylear_request_latency_seconds_count", ""): answered,
        ("ray_stylear_request_latency_seconds_bucket", "+Inf"): answered,
        ("ray_stylear_queue_depth", ""): 0,
        ("ray_stylear_adapter_pool_waiting", ""): 0,
        ("ray_stylear_live_slots", ""): 0,
        ("ray_stylear_max_slots", ""): MAX_SLOTS,
    }
    # Ray exports what a process recorded every few seconds (10 s by default): wait for the last flush.
    deadline = time.monotonic() + 60
    while True:
        got = exported(ray_session)
        seen = {key: got.get(key) for key in want}
        if seen == want or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert seen == want
    # Only the adapters that exist are tags (an unknown name from a request never becomes one).
    assert {tag for name, tag in got if name == "ray_stylear_requests_total"} == {"dog", "cat"}
