"""The service's metrics through Ray's metrics API (the model replica's; the ingress's overload rejections).

Every name starts with ``stylear_``; Ray's Prometheus export (each node's metrics export port, also
scraped by the dashboard) prefixes them with ``ray_``. Built inside a Serve replica, each metric carries
Serve's ``deployment``, ``replica`` and ``application`` tags (:mod:`ray.serve.metrics`); built outside
Serve, it has only its own tags.

Counters grow over the replica's life (rates, e.g. decode steps/s or tokens/s, come from Prometheus'
``rate()``); gauges are sampled from the decode loop every :data:`SAMPLE_INTERVAL_S` seconds by a
daemon thread, so the loop itself records nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ray.serve.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from stylear_core.inference.continuous import ContinuousBatchingEngine

# How often the gauges and the decode-step counter are read from the loop (Ray exports every ~10 s).
SAMPLE_INTERVAL_S = 1.0
# Request latency buckets (seconds): a tiny CPU image takes well under a second, a 768 px 7B one minutes.
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
# The ``adapter`` tag of a request without an adapter.
BASE_ADAPTER = "base"


def rejections_counter() -> Counter:
    """``stylear_rejections_total{reason}``: requests answered without an image, by reason.

    The model replicas count ``bad_input``, ``cancelled`` and ``error``; the ingress replicas (other
    processes) count ``overload``. Each builds its own Counter here, so the name, description and tag
    keys that Ray merges into one metric are the same everywhere.
    """
    return Counter(
        "stylear_rejections_total",
        "Requests answered without an image, by reason (bad_input, cancelled, error, overload).",
        tag_keys=("reason",),
    )


class IngressMetrics:
    """The ingress's share of the ``stylear_`` metrics: ``stylear_rejections_total{reason="overload"}``,
    requests it answers 503 because the model deployment's queues are full.

    (Serve's HTTP proxy answers its own 503 when the ingress's queue is full; that never reaches the
    ingress, and Serve's ``serve_num_http_error_requests_total{error_code="503"}`` counts it.)
    """

    def __init__(self) -> None:
        self.rejections = rejections_counter()

    def overloaded(self) -> None:
        """Count one request rejected for overload."""
        self.rejections.inc(1, tags={"reason": "overload"})


class ReplicaMetrics:
    """The ``stylear_`` metrics of one model replica.

    Counters: ``stylear_requests_total{adapter}`` (requests whose adapter was found, ``base`` for none),
    ``stylear_rejections_total{reason}`` (``bad_input``: a 4xx answer; ``cancelled``: the caller gave
    up, i.e. the ingress's timeout or a client disconnect; ``error``: a 5xx answer; ``overload`` is the
    ingress's, :class:`IngressMetrics`),
    ``stylear_tokens_generated_total`` (image tokens each request received, header to end for a whole
    image), ``stylear_decode_steps_total``. Gauges: ``stylear_queue_depth`` (requests waiting for a row
    slot), ``stylear_adapter_pool_waiting`` (requests waiting for an adapter slot),
    ``stylear_live_slots`` (rows decoding), ``stylear_max_slots``. Histogram:
    ``stylear_request_latency_seconds`` (answered requests, arrival to image).
    """

    def __init__(self) -> None:
        self.requests = Counter(
            "stylear_requests_total", "Generation requests, by adapter (base: none).", tag_keys=("adapter",)
        )
        self.rejections = rejections_counter()
        self.tokens = Counter("stylear_tokens_generated_total", "Image tokens generated (header to end).")
        self.decode_steps = Counter("stylear_decode_steps_total", "Decode steps of the replica's loop.")
        self.queue_depth = Gauge("stylear_queue_depth", "Requests waiting for a row slot of the decode loop.")
        self.pool_waiting = Gauge("stylear_adapter_pool_waiting", "Requests waiting for an adapter slot.")
        self.live_slots = Gauge("stylear_live_slots", "Row slots held by decoding requests.")
        self.max_slots = Gauge("stylear_max_slots", "Row slots of the decode loop.")
        self.latency = Histogram(
            "stylear_request_latency_seconds",
            "Seconds from a request's arrival at the replica to its image.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self._steps_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self, adapter: str | None) -> None:
        """Count one request for ``adapter`` (``None``: the base model)."""
        self.requests.inc(1, tags={"adapter": adapter or BASE_ADAPTER})

    def rejected(self, status: int | None) -> None:
        """Count one request answered with ``status`` (4xx, 5xx) or cancelled by its caller (``None``)."""
        reason = "cancelled" if status is None else "bad_input" if status < 500 else "error"
        self.rejections.inc(1, tags={"reason": reason})

    def generated(self, tokens: int) -> None:
        """Count the image tokens a request received (when it ended: done, cancelled or failed)."""
        if tokens > 0:  # a Ray counter takes positive increments only
            self.tokens.inc(tokens)

    def answered(self, seconds: float) -> None:
        """Record the latency of a request answered with an image."""
        self.latency.observe(seconds)

    def sample(self, loop: ContinuousBatchingEngine, pool_waiting: int) -> None:
        """Read the decode loop's queue, rows and step counter into the gauges and the step counter."""
        self.queue_depth.set(len(loop.queue))
        self.live_slots.set(loop.live_rows)
        self.max_slots.set(loop.max_slots)
        self.pool_waiting.set(pool_waiting)
        steps = loop.counters.steps
        if steps > self._steps_seen:
            self.decode_steps.inc(steps - self._steps_seen)
            self._steps_seen = steps

    def watch(self, loop: ContinuousBatchingEngine, pool_waiting: Callable[[], int]) -> None:
        """Sample ``loop`` every :data:`SAMPLE_INTERVAL_S` s on a daemon thread until :meth:`close`."""

        def run() -> None:
            while not self._stop.wait(SAMPLE_INTERVAL_S):
                self.sample(loop, pool_waiting())

        self._thread = threading.Thread(target=run, name="stylear-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()
