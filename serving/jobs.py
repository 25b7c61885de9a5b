"""Async generation jobs: a registry every ingress replica shares, and the model side's progress reports.

A job is one generation run in the background: ``POST /v1/jobs/{style,subject}`` answers 202 with its
id at once, and the job goes ``queued`` -> ``running`` -> ``done`` (or ``failed`` / ``cancelled``).
Its state lives in one :class:`JobRegistry` per Serve application: a named, detached Ray actor
(:func:`open_registry`), so every ingress replica reads and cancels every job, whichever replica runs
it, and the registry outlives any one replica (a redeploy reuses it; it holds no model and no CPU).

* **Who writes what.** The ingress replica that accepted a job runs it: it calls the model deployment's
  ``generate`` (the synchronous endpoints' path) and writes the outcome, or the error, to the registry.
  The model replica reports progress from its decode loop through :class:`JobProgressReporter`,
  throttled to one report per ``job_progress_interval_s``, so the loop never waits on the registry.
* **Previews.** An events stream opened with ``preview=true`` marks its job as wanting previews (for as
  long as the stream keeps asking). The registry's answer to a progress report says so, and the model
  replica then VQ-decodes the job's tokens so far into a small PNG at most every ``job_preview_every_s``
  (:attr:`JobProgressReporter.previewer`), off the decode loop. The registry keeps the latest one and
  such streams get it with the next progress event; nobody else sees it, and it is dropped when the
  job ends.
* **Cancel.** :meth:`JobRegistry.cancel` marks the job cancelled at once; the runner, which waits on
  :meth:`JobRegistry.wait_end`, then cancels its model call, which frees the request's engine rows
  at the next decode step (as when a synchronous client times out).
* **Bounds.** At most ``max_jobs`` jobs are held, finished ones included (:meth:`JobRegistry.create`
  refuses beyond, the ingress answers 429). A finished job's result is dropped ``ttl_s`` after it ends.
  A job whose runner vanished (its ingress replica stopped) fails once its deadline passes, so it
  cannot hold a place for ever.

Being detached, the registry also outlives the application: ``serve.delete`` leaves it (idle, no CPU;
its jobs expire), and ``ray.kill(ray.get_actor("StyleARJobs:<app>", namespace="stylear"))`` removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

log = logging.getLogger("ray.serve")

STATUSES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = frozenset({"done", "failed", "cancelled"})
REGISTRY_NAMESPACE = "stylear"
# Long polls (events streams, runners waiting for a cancel) each hold one call open on the registry.
REGISTRY_MAX_CONCURRENCY = 4096
# A previewing stream's mark outlives its long poll by this much, so its next poll finds it still set.
PREVIEW_WANTED_SLACK_S = 5.0


def registry_name(app_name: str) -> str:
    """The registry actor's name for a Serve application (one registry per application)."""
    return f"StyleARJobs:{app_name}"


@dataclass
class JobRecord:
    """One job in the registry: what it asked for, where it is, and how it ended."""

    id: str
    kind: str
    width: int
    height: int
    adapter: str | None
    deadline: float  # monotonic: a job not ended by then has lost its runner
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    tokens_done: int = 0
    tokens_total: int | None = None
    image: str | None = None  # base64 PNG, once done
    seed: int | None = None
    error: dict[str, Any] | None = None
    ended: float | None = None  # monotonic, when it became terminal (the TTL counts from here)
    finished_at: float | None = None  # wall clock, for clients
    version: int = 0  # bumped on every change; events streams wait for a newer one
    preview: dict[str, Any] | None = None  # the latest {"image", "tokens_done", "width", "height"}
    preview_wanted_until: float = 0.0  # monotonic: a stream with preview=true polled until about then
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        """Record a change and wake everyone waiting on this job."""
        self.version += 1
        woken, self.changed = self.changed, asyncio.Event()
        woken.set()

    def end(self, status: str) -> None:
        """Make the job terminal (``done``, ``failed`` or ``cancelled``)."""
        self.status = status
        self.ended = time.monotonic()
        self.finished_at = time.time()
        self.preview = None  # the result (or error) says it all now
        self.touch()

    def view(self, with_result: bool = True, with_preview: bool = False) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it (:class:`serving.schemas.JobState`); ``with_preview``
        adds the latest preview (``preview``), if there is one, as ``events?preview=true`` streams it."""
        result = None
        if self.status == "done" and with_result:
            result = {
                "image": self.image,
                "seed": self.seed,
                "width": self.width,
                "height": self.height,
                "adapter": self.adapter,
            }
        view = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": {"tokens_done": self.tokens_done, "tokens_total": self.tokens_total},
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "result": result,
            "error": self.error,
            "version": self.version,
        }
        if with_preview and self.preview is not None:
            view["preview"] = self.preview
        return view


class JobRegistry:
    """Every job of one application: status, progress and results, bounded in count and time.

    Runs as an async Ray actor (:func:`open_registry`); every method runs on the actor's one event loop,
    so no locking is needed. ``max_jobs``: jobs held at once, finished ones included; ``ttl_s``: how long
    a finished job (and its result) is kept.
    """

    def __init__(self, max_jobs: int, ttl_s: float) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.configure(max_jobs, ttl_s)

    def configure(self, max_jobs: int, ttl_s: float) -> None:
        """Set the bounds (a redeployed application's config applies to the registry it reuses)."""
        self.max_jobs, self.ttl_s = max_jobs, ttl_s

    def _purge(self) -> None:
        now = time.monotonic()
        for record in list(self.jobs.values()):
            if record.ended is None and now > record.deadline:
                record.error = {"status": 504, "error": "the job stopped without an answer", "field": None}
                record.end("failed")
            if record.ended is not None and now - record.ended > self.ttl_s:
                del self.jobs[record.id]
                record.touch()  # wakes its waiters, who now find it gone

    def _live(self, job_id: str) -> JobRecord | None:
        self._purge()
        return self.jobs.get(job_id)

    async def create(
        self, kind: str, width: int, height: int, adapter: str | None, run_s: float
    ) -> str | None:
        """A new queued job's id, or ``None`` when ``max_jobs`` are held. It must end within ``run_s``."""
        self._purge()
        if len(self.jobs) >= self.max_jobs:
            return None
        job_id = uuid.uuid4().hex
        deadline = time.monotonic() + run_s
        self.jobs[job_id] = JobRecord(job_id, kind, width, height, adapter, deadline)
        return job_id

    async def progress(self, job_id: str, tokens_done: int, tokens_total: int) -> bool:
        """The model's report: ``tokens_done`` of ``tokens_total``; a queued job is running from now.

        Answers whether an events stream wants previews of the job now.
        """
        record = self._live(job_id)
        if record is None or record.status in TERMINAL or tokens_done < record.tokens_done:
            return False  # late reports (after a cancel, or overtaken by a newer one) change nothing
        record.status, record.tokens_done, record.tokens_total = "running", tokens_done, tokens_total
        record.touch()
        return record.preview_wanted_until > time.monotonic()

    async def preview(self, job_id: str, tokens_done: int, image: str, width: int, height: int) -> None:
        """The model's preview of a running job: a base64 PNG of ``width x height`` decoded from its first
        ``tokens_done`` tokens. Kept until a newer one or the job's end; previewing streams get it with the
        next progress event (it bumps no version: other readers see nothing new)."""
        record = self._live(job_id)
        if record is None or record.status in TERMINAL:
            return
        if record.preview is None or tokens_done > record.preview["tokens_done"]:
            record.preview = {"image": image, "tokens_done": tokens_done, "width": width, "height": height}

    async def finish(self, job_id: str, image: str, seed: int, tokens_total: int | None = None) -> None:
        """The job is done: its base64 PNG and seed (ignored if it already ended, e.g. cancelled)."""
        record = self._live(job_id)
        if record is None or record.status in TERMINAL:
            return
        record.image, record.seed = image, seed
        if tokens_total is not None:
            record.tokens_total = tokens_total
        if record.tokens_total is not None:
            record.tokens_done = record.tokens_total
        record.end("done")

    async def fail(self, job_id: str, status: int, message: str, field_name: str | None) -> None:
        """The job failed with an HTTP-style ``status``, a message and the field at fault."""
        record = self._live(job_id)
        if record is None or record.status in TERMINAL:
            return
        record.error = {"status": status, "error": message, "field": field_name}
        record.end("failed")

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job (an ended one stays as it is); its view, ``None`` if unknown."""
        record = self._live(job_id)
        if record is None:
            return None
        if record.status not in TERMINAL:
            record.end("cancelled")
        return record.view(with_result=False)

    async def get(self, job_id: str, with_result: bool = True) -> dict[str, Any] | None:
        """The job's view, or ``None`` for an unknown or expired id."""
        record = self._live(job_id)
        return record.view(with_result) if record is not None else None

    async def wait_change(
        self, job_id: str, version: int, timeout_s: float, preview: bool = False
    ) -> dict[str, Any] | None:
        """The job's view once its version passes ``version`` (or after ``timeout_s``); ``None`` if gone.

        A terminal job's view carries its result. ``preview``: the caller streams previews, so the job
        wants them (until a little past this wait) and a running job's view carries the latest.
        """
        record = self._live(job_id)
        if record is not None and preview:
            wanted = time.monotonic() + timeout_s + PREVIEW_WANTED_SLACK_S
            record.preview_wanted_until = max(record.preview_wanted_until, wanted)
        if record is not None and record.version <= version:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(record.changed.wait(), timeout_s)
            record = self._live(job_id)
        if record is None:
            return None
        return record.view(with_result=record.status in TERMINAL, with_preview=preview)

    async def wait_end(self, job_id: str) -> str | None:
        """Block until the job ends; its final status (``None`` once it is gone)."""
        while (record := self._live(job_id)) is not None and record.status not in TERMINAL:
            remaining = record.deadline - time.monotonic()
            # Wake at the deadline too, when _purge fails a job whose runner vanished.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(record.changed.wait(), max(remaining, 0.0) + 0.01)
        return record.status if record is not None else None

    async def counts(self) -> dict[str, int]:
        """How many jobs are held, by status."""
        self._purge()
        counts = dict.fromkeys(STATUSES, 0)
        for record in self.jobs.values():
            counts[record.status] += 1
        return counts


def open_registry(app_name: str, max_jobs: int, ttl_s: float) -> ray.actor.ActorHandle:
    """The application's :class:`JobRegistry` actor, started if no replica has started it yet.

    Detached: it outlives the replica that started it (replicas come and go with autoscaling), and a
    redeploy of the application reuses it with the new bounds. It reserves no CPU: it only holds state.
    """
    actor = ray.remote(JobRegistry).options(
        name=registry_name(app_name),
        namespace=REGISTRY_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=REGISTRY_MAX_CONCURRENCY,
        max_restarts=-1,  # restarted empty if its process dies; runners then see their jobs gone
    )
    registry = actor.remote(max_jobs, ttl_s)
    registry.configure.remote(max_jobs, ttl_s)
    return registry


class JobProgressReporter:
    """Passed with a job's ``generate`` call; the model's decode loop calls it after each of the job's tokens.

    Sends ``(tokens_done, tokens_total)`` to the registry at most once per ``interval_s`` (the first
    token at once: that is when the job starts running), fire-and-forget: the decode loop never waits
    on the registry, and a report that cannot be sent is logged, never raised (raising would fail the
    request). The last token is not reported: the job's result follows it.

    Previews: the registry answers each report with whether a stream wants previews; the answer is read
    at the next report, without waiting (a report still in flight counts as no). While wanted, and at
    most every ``preview_every_s``, the reporter asks :attr:`previewer` (set by the model replica) for one:
    ``previewer(handle, send)`` takes the tokens so far on the loop's thread, returns at once (``False``
    if it made none, e.g. another preview is being decoded), and calls ``send(tokens_done, png_base64,
    width, height)`` from another thread once decoded.
    """

    def __init__(
        self, registry: ray.actor.ActorHandle, job_id: str, interval_s: float, preview_every_s: float = 1.0
    ) -> None:
        self.registry, self.job_id, self.interval_s = registry, job_id, interval_s
        self.preview_every_s = preview_every_s
        self.previewer: Callable[[Any, Callable[[int, str, int, int], None]], bool] | None = None
        self._last: float | None = None
        self._warned = False
        self._answer: ray.ObjectRef | None = None  # the last report's: does a stream want previews?
        self._wants_preview = False
        self._last_preview: float | None = None

    def __call__(self, handle: Any) -> None:
        """Report ``handle.tokens_done`` of ``handle.tokens_total`` unless one was sent within ``interval_s``."""
        done, total = handle.tokens_done, handle.tokens_total
        now = time.monotonic()
        if done >= total or (self._last is not None and now - self._last < self.interval_s):
            return
        self._last = now
        try:
            self._maybe_preview(handle, now)
        except Exception as e:  # e.g. the last report failed: no preview this time, the report still goes
            self._wants_preview = False
            self._warn("preview", e)
        try:
            self._answer = self.registry.progress.remote(self.job_id, done, total)
        except Exception as e:  # progress is best effort; the job's outcome is written by its runner
            self._warn("progress report", e)

    def _maybe_preview(self, handle: Any, now: float) -> None:
        if self.previewer is None:
            return
        if self._answer is not None and ray.wait([self._answer], timeout=0)[0]:
            answer, self._answer = self._answer, None
            self._wants_preview = bool(ray.get(answer))
        if not self._wants_preview:
            return
        if self._last_preview is not None and now - self._last_preview < self.preview_every_s:
            return
        if self.previewer(handle, self._send_preview):
            self._last_preview = now

    def _send_preview(self, tokens_done: int, image: str, width: int, height: int) -> None:
        try:
            self.registry.preview.remote(self.job_id, tokens_done, image, width, height)
        except Exception as e:
            self._warn("preview", e)

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("job %s: %s failed: %s", self.job_id, what, e)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "job_id": self.job_id,
            "interval_s": self.interval_s,
            "preview_every_s": self.preview_every_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["registry"], state["job_id"], state["interval_s"], state["preview_every_s"])
