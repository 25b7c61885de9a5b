"""The model deployment: one base model per replica, one continuous-batching loop, LoRA adapters per row.

A replica builds the backbone, VQGAN, prompt tokenizer, CLIP style encoder, resampler and optionally
SAM once, as a :class:`~stylear_core.inference.generator.StyleARGenerator` (the front-end every
generation path shares), and runs one :class:`~stylear_core.inference.continuous.ContinuousBatchingEngine`
over ``max_slots`` rows of one KV cache. Requests arrive through :meth:`StyleARModelDeployment.generate`:
each is prepared (prompt, style tokens from its adapter's own resampler, condition image, validation)
on a worker thread and submitted to the loop, which admits it into free rows at the next decode step,
so a request arriving mid-decode joins the running batch instead of waiting for it to finish. The worker
thread (:class:`~serving.batching.BatchingWorker`) takes what has queued up as one batch: style references
go through CLIP and the resampler together; finished images are VQ-decoded one by one, so a subject
request's PNG is the same bytes for a seed whatever its batch neighbours (a style request's style tokens
match its solo ones up to float rounding).

Adapters: ``serve.multiplexed`` reads them (an LRU of ``max_adapters_per_replica``; Serve also uses the
multiplexed id to route a request to a replica that holds its adapter), and their LoRA factors live in
one :class:`~stylear_core.inference.multi_lora.MultiLoraPool` of the same capacity, so rows with
different adapters (or none) decode in the same step. An adapter is evicted from the pool only when no
submitted request uses it; a request whose adapter finds every slot in use waits (a bounded time: its
caller's timeout) until one frees.

Metrics: :class:`~serving.metrics.ReplicaMetrics` exports the loop's queue depth, live slots and steps,
tokens, per-adapter requests, rejections and latency through Ray's metrics API (``stylear_*``).

Per-request problems come back as :class:`JobOutcome` errors, never as exceptions. A caller that gives
up (the ingress cancels the call when its client times out) cancels :meth:`StyleARModelDeployment.generate`;
that cancels the request's handle, and the loop frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from ray import serve
from ray.serve.exceptions import RayServeException
from torch import nn

from serving.batching import BatchingWorker
from serving.config import ServingConfig
from serving.jobs import JobProgressReporter
from serving.metrics import ReplicaMetrics
from serving.schemas import GenerationJob, JobOutcome
from stylear_core.adapters.format import AdapterError, AdapterNotFoundError, base_model_id
from stylear_core.adapters.io import adapter_path, list_adapters
from stylear_core.config import from_dict
from stylear_core.data.images import ImageDecodeError, encode_png
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.devices import resolve_device
from stylear_core.inference.condition_request import ConditionImageError
from stylear_core.inference.continuous import (
    ContinuousBatchingEngine,
    GenerationFailedError,
    GenerationHandle,
)
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.engine import GenerationRequest, GenerationRequestError, GenerationResult
from stylear_core.inference.generator import ServedAdapter, StyleARGenerator
from stylear_core.inference.multi_lora import MultiLoraPool, PoolFullError
from stylear_core.inference.style_request import PreparedReference, StyleRequestError

log = logging.getLogger("ray.serve")

# The name of the replica's preparation and VQ-decode worker thread.
PREPARE_THREAD_NAME = "stylear-prepare"


def _replica_id() -> str | None:
    """This Serve replica's id (``None`` when the class is built outside Ray Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


# Engine field names -> the HTTP API's.
API_FIELDS = {"cfg_scale": "cfg", "style": "image"}

# Job previews: the side divisor of the PNG, and the VQ code that stands in for tokens not chosen yet.
PREVIEW_DOWNSCALE = 4
PREVIEW_FILL_CODE = 0

# What a cancelled request's wait returns; its caller is gone, so no one receives it.
CANCELLED = JobOutcome.failure(499, "cancelled by the caller", None)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # its waiter may have been cancelled meanwhile
        future.set_result(None)


@dataclass(eq=False)
class LoadedAdapter(ServedAdapter):
    """An adapter resident on a replica: its LoRA factors (on the model's device) and its own resampler, if any.

    ``serve.multiplexed`` calls ``__del__`` when it evicts the adapter; ``on_unload`` is then told once.
    """

    on_unload: Callable[[str], None] | None = None

    @property
    def name(self) -> str:
        return self.weights.name

    def __del__(self) -> None:
        callback, self.on_unload = self.on_unload, None
        if callback is not None:
            callback(self.name)


@dataclass
class _CancelTally:
    """What cancelled requests left undone, for ``stats()["decode"]`` (the keys the batch path reported).

    ``requests_dropped``: requests cancelled in the engine (queued or decoding); ``batches_stopped``:
    those whose decode had started and was stopped; ``steps_skipped``: decode steps their images still
    needed when they stopped.
    """

    requests_dropped: int = 0
    batches_stopped: int = 0
    steps_skipped: int = 0


@dataclass
class _Prepared:
    """A request between its per-request preparation and the batched style encoding of its queue."""

    job: GenerationJob
    ids: list[int]
    condition: list[int] | None
    sampling: SamplingConfig
    seed: int
    reference: PreparedReference | None = None  # style requests: the reference ready for CLIP
    resampler: nn.Module | None = None  # whose resampler encodes it (an adapter's, or the base's)
    style: torch.Tensor | None = None  # the style tokens, once encoded


@serve.deployment(name="StyleARModel", max_ongoing_requests=32, health_check_period_s=10)
class StyleARModelDeployment:
    """Ray Serve deployment wrapping the continuous-batching engine and the style path.

    Takes the :class:`ServingConfig` as a plain dict. Methods called through the handle:
    ``generate(job) -> JobOutcome``, ``list_adapters()``, ``stats()``, ``ping()``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = from_dict(ServingConfig, config)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.device = resolve_device(self.cfg.device)
        model_cfg = self.cfg.model
        started = time.perf_counter()
        masker = None
        if self.cfg.sam_enabled:
            from stylear_core.curation.sam import StyleRegionMasker

            masker = StyleRegionMasker.from_config(self.cfg.sam)
        # The base model, tokenizer, engine, VQGAN and style path: one generator front-end, the same one
        # evaluation, preference pairs and the export parity gate build.
        self.generator = StyleARGenerator(
            model_cfg,
            device=self.device,
            adapter_slot_rank=self.cfg.adapter_slot_rank,
            max_batch=self.cfg.max_batch_size,
            cuda_graphs=self.cfg.cuda_graphs,
            masker=masker,
            reference_limits={
                "max_pixels": self.cfg.max_reference_pixels,
                "max_side": self.cfg.max_reference_side,
                "max_aspect": self.cfg.max_reference_aspect,
                "working_side": self.cfg.reference_working_side,
                "subtract_weight": self.cfg.sam_subtract_weight,
                "mix_weight": self.cfg.sam_mix_weight,
            },
        )
        self.engine = self.generator.engine
        # Every adapter's LoRA factors side by side (the pool replaces the generator's single LoRA slot in
        # place): each row of a decode step picks its own.
        self.pool = MultiLoraPool(
            self.generator.model.backbone,
            capacity=self.cfg.max_adapters_per_replica,
            max_rank=self.cfg.adapter_slot_rank,
        )
        # One cache long enough for any request the engine accepts (its length bucket rounds prompts up).
        self.loop = ContinuousBatchingEngine(
            self.engine,
            max_slots=self.cfg.max_slots,
            cache_len=self.engine.max_positions + self.engine.length_bucket,
            row_adapters=self.pool.set_rows,
        )
        self.style = self.generator.references
        self.base_builds = 1  # the base model is built here and only here
        self.replica_id = _replica_id()
        self.base_model = base_model_id(model_cfg)  # what adapter manifests must name as their base
        self.build_seconds = time.perf_counter() - started
        # Preparation (CLIP, SAM, condition images), VQ decoding and previews: one worker thread, off the
        # event loop, that takes whatever of a kind has queued up as one batch (style references through
        # CLIP and the resampler together, finished images of one size through the VQGAN together).
        self._worker = BatchingWorker(
            {"prepare": self._prepare_batch, "decode": self._decode_batch, "preview": self._preview_batch},
            max_batch=max(1, self.cfg.max_slots // 2),
            name=PREPARE_THREAD_NAME,
        )
        # Threads that block on a handle until its request ends (one per request in flight).
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="stylear-wait")
        self._admitted: dict[int, int] = {}  # engine step -> requests admitted at it (recent ones)
        self._adapter_loads: Counter[str] = Counter()
        self._adapter_users: Counter[str] = Counter()  # submitted, unfinished requests per pooled adapter
        self._pool_lock = threading.Lock()
        self._requests = 0
        self._cancelled = 0
        self._pool_waits = 0
        self._failures: Counter[int] = Counter()
        self._resident: set[str] = set()
        self._dropped: list[GenerationHandle] = []  # cancelled handles not yet counted
        self._tally = _CancelTally()
        # Requests waiting for an adapter slot: a future each, resolved (on its own event loop) by the next
        # release, so a waiter retries as soon as a slot may have freed instead of polling.
        self._pool_waiters: list[asyncio.Future[None]] = []
        self._pool_waiting = 0
        # At most one job preview is queued or being decoded on the replica at a time; others are skipped.
        self._preview_slot = threading.Lock()
        self._previews = 0
        self.metrics = ReplicaMetrics()

        async def load_adapter(name: str) -> LoadedAdapter:
            # Reading files is IO: keep it off the event loop and off the decode loop.
            return await asyncio.get_running_loop().run_in_executor(None, self._read_adapter, name)

        if self.replica_id is None:
            # Built outside Serve (offline checks), where serve.multiplexed cannot run: read per request.
            self.get_adapter = load_adapter
        else:
            # Multiplexing is wired per instance (Ray Serve supports this): the LRU bound is the config's.
            self.get_adapter = serve.multiplexed(
                max_num_models_per_replica=self.cfg.max_adapters_per_replica
            )(load_adapter)
        self.loop.start()
        self.metrics.watch(self.loop, lambda: self._pool_waiting)

    def __del__(self) -> None:
        # Serve drops the replica object at shutdown: stop the decode loop's thread with it.
        self.close()

    def close(self) -> None:
        """Stop the decode loop, the preparation worker, the metrics thread and the waiters (idempotent).

        A model built outside Serve (offline checks, tests) is closed by its owner. Its threads must not
        outlive it: an idle thread that once ran torch keeps its OpenMP team, and with more OpenMP threads
        than cores libgomp stops spinning between parallel regions, so every later multi-threaded torch op
        in the process pays a wake-up (``benchmarks/idle_torch_thread.py``: a 2-thread VQGAN training took
        1.8x the time on 2 cores)."""
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop(timeout=5.0)
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.shutdown(timeout=5.0)
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        waiters = getattr(self, "_waiters", None)
        if waiters is not None:
            waiters.shutdown(wait=False, cancel_futures=True)

    # --- adapters -----------------------------------------------------------------------------

    def _read_adapter(self, name: str) -> LoadedAdapter:
        read = self.generator.read_adapter(adapter_path(self.cfg.adapters_root, name), name)
        trained_on = read.weights.manifest.get("base_model")
        if trained_on and trained_on != self.base_model:
            raise AdapterError(f"it was trained on {trained_on!r}; this replica serves {self.base_model!r}")
        self._adapter_loads[name] += 1
        self._resident.add(name)
        return LoadedAdapter(weights=read.weights, resampler=read.resampler, on_unload=self._resident.discard)

    def list_adapters(self) -> list[dict[str, Any]]:
        """Adapters on disk, each with whether this replica has it loaded."""
        return [{**a, "loaded": a["name"] in self._resident} for a in list_adapters(self.cfg.adapters_root)]

    def _acquire(self, adapter: LoadedAdapter, wake: asyncio.Future[None] | None = None) -> int:
        """Put ``adapter``'s factors in the pool (if not there) and count one user; returns its slot.

        Evicts the least recently used adapter no submitted request uses; raises :class:`PoolFullError`
        when every slot is in use (the caller waits and retries), after queueing ``wake`` for the next
        release under the same lock, so a release between the failed try and the wait is not missed.
        """
        name = adapter.name
        with self._pool_lock:
            slot = self.pool.slot_of(name)
            if slot is None:
                if len(self.pool.slots) >= self.pool.capacity:
                    idle = [n for n in self.pool.slots if self._adapter_users[n] == 0]
                    if not idle:
                        if wake is not None:
                            self._pool_waiters.append(wake)
                        raise PoolFullError(f"all {self.pool.capacity} adapter slots are in use")
                    # No submitted request uses it, so no further forward runs its rows: the pool's pin
                    # (the last forward's rows, kept while the loop is idle) is stale.
                    self.pool.evict(idle[0], force=True)
                slot = self.pool.load_weights(adapter.weights)
            else:
                self.pool.touch(name)
            self._adapter_users[name] += 1
            return slot

    def _release(self, name: str) -> None:
        with self._pool_lock:
            self._adapter_users[name] -= 1
            waiters, self._pool_waiters = self._pool_waiters, []
        for wake in waiters:
            # Thread-safe: a waiter may sit on another event loop than the one releasing.
            wake.get_loop().call_soon_threadsafe(_resolve, wake)

    # --- requests -----------------------------------------------------------------------------

    async def generate(
        self, job: GenerationJob, progress: Callable[[GenerationHandle], None] | None = None
    ) -> JobOutcome:
        """Generate one image: prepared here, decoded in the replica's continuous-batching loop.

        Cancelling the call (``DeploymentResponse.cancel()``) stops the request's work on the replica.
        ``progress`` (an async job's :class:`~serving.jobs.JobProgressReporter`) is called from the decode
        loop after each of the request's tokens; it must return at once and never raise. A reporter gets
        this replica's :meth:`_preview` as its previewer.
        """
        self._requests += 1
        arrived = time.perf_counter()
        handle: GenerationHandle | None = None
        if isinstance(progress, JobProgressReporter):
            progress.previewer = self._preview
        try:
            adapter = None
            if job.adapter:
                try:
                    adapter = await self.get_adapter(job.adapter)
                except AdapterNotFoundError as e:
                    return self._fail(404, str(e), "adapter")
                except (AdapterError, ValueError, OSError) as e:
                    log.warning("adapter %s failed to load: %s", job.adapter, e)
                    return self._fail(422, f"adapter {job.adapter!r} cannot be used: {e}", "adapter")
            # Counted once the adapter is found, so the tag takes only the names of adapters on disk.
            self.metrics.request(job.adapter)
            loop = asyncio.get_running_loop()
            prepared = await asyncio.wrap_future(self._worker.submit("prepare", (job, adapter)))
            if isinstance(prepared, JobOutcome):
                return prepared
            slot = 0
            if adapter is not None:
                slot = await self._acquire_waiting(adapter)
                if isinstance(slot, JobOutcome):
                    return slot
            try:
                handle = self.loop.submit(prepared, adapter=slot, on_progress=progress)
            except GenerationRequestError as e:
                self._release_adapter(adapter)
                return self._fail(422, e.message, API_FIELDS.get(e.field, e.field))
            waited = loop.run_in_executor(self._waiters, self._wait, handle)
            if adapter is not None:
                waited.add_done_callback(lambda _: self._release_adapter(adapter))
            # Shielded: a cancelled call still lets the wait finish (and release the adapter) once the
            # engine has dropped the request.
            result = await asyncio.shield(waited)
            if isinstance(result, JobOutcome):
                if result is CANCELLED:  # the handle was cancelled while this call went on
                    self.metrics.rejected(None)
                return result
            self._admitted[handle.admitted_step] = self._admitted.get(handle.admitted_step, 0) + 1
            while len(self._admitted) > self.cfg.stats_window:
                del self._admitted[next(iter(self._admitted))]
            outcome = await asyncio.wrap_future(self._worker.submit("decode", result))
            if outcome.status == 200:
                self.metrics.answered(time.perf_counter() - arrived)
            return outcome
        except asyncio.CancelledError:
            # Ray Serve cancels this coroutine when the caller cancels: drop the request from the loop
            # (its rows are freed at the next step).
            if handle is not None:
                handle.cancel()
                self._dropped.append(handle)
            self._cancelled += 1
            self.metrics.rejected(None)
            raise

    async def _acquire_waiting(self, adapter: LoadedAdapter) -> int | JobOutcome:
        """A pool slot for ``adapter``; while every slot is used by submitted requests, wait for one.

        The wait ends when a slot frees or the caller cancels (its timeout bounds it). It is woken by each
        release (:meth:`_release`), not by polling, so it retries as soon as a slot may be free.
        """
        waited = False
        try:
            while True:
                wake = asyncio.get_running_loop().create_future()
                try:
                    return self._acquire(adapter, wake)
                except PoolFullError:
                    if not waited:
                        self._pool_waits += 1
                        self._pool_waiting += 1
                        waited = True
                    await wake
                except AdapterError as e:  # e.g. a rank above adapter_slot_rank
                    return self._fail(422, f"adapter {adapter.name!r} cannot be used: {e}", "adapter")
        finally:
            if waited:
                self._pool_waiting -= 1

    def _release_adapter(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            self._release(adapter.name)

    def _wait(self, handle: GenerationHandle) -> GenerationResult | JobOutcome:
        try:
            result = handle.wait()
        except GenerationFailedError:
            log.exception("decoding a request failed")
            return self._fail(500, "internal error while generating", None)
        finally:
            self.metrics.generated(handle.tokens_done)
        return CANCELLED if result is None else result

    def _fail(self, status: int, message: str, field: str | None) -> JobOutcome:
        self._failures[status] += 1
        self.metrics.rejected(status)
        return JobOutcome.failure(status, message, field)

    def _outcome_of(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, with a preparation error as the 4xx/500 outcome naming the field."""
        try:
            return step(*args)
        except ConditionImageError as e:
            return self._fail(400, f"condition: {e}", "condition")
        except ImageDecodeError as e:
            return self._fail(400, str(e), "image")
        except (GenerationRequestError, StyleRequestError) as e:
            return self._fail(422, e.message, API_FIELDS.get(e.field, e.field))
        except Exception:  # a bug in one request's preparation fails that request only
            log.exception("preparing a request failed")
            return self._fail(500, "internal error while preparing the request", None)

    def _prepare_batch(
        self, items: list[tuple[GenerationJob, LoadedAdapter | None]]
    ) -> list[GenerationRequest | JobOutcome]:
        """Each queued ``(job, adapter)`` -> its engine request, or the outcome that refuses it.

        Per request: the prompt, the condition image and the reference's decoding and SAM
        (:meth:`_prepare_parts`). Then the style references go through CLIP and the resampler in one
        batch per resampler (an adapter's own, or the base's), each with its own noise seed, so a
        request's tokens do not depend on its neighbours.
        """
        parts = [self._outcome_of(self._prepare_parts, job, adapter) for job, adapter in items]
        groups: dict[int, list[int]] = {}
        for i, part in enumerate(parts):
            if isinstance(part, _Prepared) and part.reference is not None:
                groups.setdefault(id(part.resampler), []).append(i)
        for index in groups.values():
            batch = [parts[i] for i in index]
            try:
                tokens = self.style.encode(
                    [p.reference for p in batch],
                    [p.sampling.noise_strength for p in batch],
                    [p.seed for p in batch],
                    batch[0].resampler,
                )
            except Exception:
                log.exception("encoding %d style references failed", len(batch))
                for i in index:
                    parts[i] = self._fail(500, "internal error while preparing the request", None)
                continue
            for part, style in zip(batch, tokens):
                part.style = style
        return [p if isinstance(p, JobOutcome) else self._outcome_of(self._request_of, p) for p in parts]

    def _decode_batch(self, results: list[GenerationResult]) -> list[JobOutcome]:
        """Finished requests -> PNG outcomes, each token grid VQ-decoded on its own.

        A batched convolution sums in another order than a single one, which moves a pixel by one grey
        level now and then: decoding alone keeps a seed's PNG the same bytes whatever finished with it.
        The VQ decode is a small fraction of a request's time (the backbone decodes token by token).
        """
        outcomes: list[JobOutcome] = []
        for result in results:
            try:
                image = self.generator.decode(result.tokens[None], result.layout)[0]
            except Exception:
                log.exception(
                    "VQ decoding a %dx%d-code image failed", result.layout.h_latent, result.layout.w_latent
                )
                outcomes.append(self._fail(500, "internal error while decoding the image", None))
                continue
            outcomes.append(JobOutcome(png=encode_png(image), seed=result.seed))
        return outcomes

    def _preview(self, handle: GenerationHandle, send: Callable[[int, str, int, int], None]) -> bool:
        """Start a preview of ``handle``'s image so far; called on the decode loop's thread.

        The loop pays for a copy of the request's tokens only: the VQ decode runs on the replica's
        preparation/decode thread, and while one preview is queued or decoding no other is started
        (``False``), so previews cost at most one decode at a time whatever the number of jobs.
        """
        if not self._preview_slot.acquire(blocking=False):
            return False
        try:
            tokens = self.loop.tokens_so_far(handle)
            if tokens is not None:
                self._worker.submit("preview", (tokens, handle.layout, send))
                return True
        except RuntimeError:  # the worker is shut down: the replica is stopping
            pass
        self._preview_slot.release()
        return False

    def _preview_batch(self, items: list[tuple[torch.Tensor, ImageTokenLayout, Callable]]) -> list[None]:
        return [self._decode_preview(*item) for item in items]

    def _decode_preview(
        self, tokens: torch.Tensor, layout: ImageTokenLayout, send: Callable[[int, str, int, int], None]
    ) -> None:
        """Decode ``tokens`` (the first of ``layout``'s; the rest one fixed code) at 1/4 side, to ``send``."""
        try:
            codes = torch.full((layout.h_latent, layout.w_latent), PREVIEW_FILL_CODE, dtype=torch.long)
            full = layout.encode(codes)
            full[: len(tokens)] = tokens
            (image,) = self.generator.decode(full.unsqueeze(0), layout)
            side = (max(image.width // PREVIEW_DOWNSCALE, 1), max(image.height // PREVIEW_DOWNSCALE, 1))
            small = image.resize(side, Image.Resampling.BILINEAR)
            self._previews += 1
            send(len(tokens), base64.b64encode(encode_png(small)).decode(), small.width, small.height)
        except Exception:  # a preview is best effort: the job goes on
            log.exception("decoding a job preview failed")
        finally:
            self._preview_slot.release()

    def _prepare_parts(self, job: GenerationJob, adapter: LoadedAdapter | None) -> _Prepared:
        """Everything of a request but its style tokens: prompt ids, sampling, seed, the prepared reference."""
        seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**63)
        strength = (
            job.noise_strength if job.noise_strength is not None else self.cfg.model.noise_strength_infer
        )
        sampling = SamplingConfig(
            cfg_scale=job.cfg, top_k=job.top_k, temperature=job.temperature, noise_strength=strength
        )
        # A condition image's tokens (e.g. a depth map's) go into the prompt at the requested size.
        condition = None
        if job.condition is not None:
            condition = self.generator.condition_ids(job.condition, job.height, job.width)
        if job.kind == "style":
            ids = self.generator.style_prompt_ids(job.prompt, job.height, job.width, condition)
            if job.reference is None:
                raise StyleRequestError("image", "a style reference image is required")
            resampler = adapter.resampler if adapter is not None else None
            reference = self.style.prepare(job.reference, job.sam, job.sam_mode)
            return _Prepared(
                job, ids, condition, sampling, seed, reference, resampler or self.style.resampler
            )
        self._check_subject_prompt(job, adapter)
        ids = self.generator.text_prompt_ids(job.prompt, job.height, job.width, condition)
        return _Prepared(job, ids, condition, sampling, seed)

    def _request_of(self, part: _Prepared) -> GenerationRequest:
        """The engine request of a prepared job (style tokens in place), validated as the engine will."""
        job = part.job
        request = self.generator.request(
            part.ids, job.height, job.width, part.sampling, part.seed, style_embeds=part.style
        )
        try:
            self.engine.validate(request)
        except GenerationRequestError as e:
            if part.condition is None or e.field != "prompt":
                raise
            # The prompt is too long because of the condition's tokens: name the field that made it so.
            raise GenerationRequestError(
                "condition", f"with the condition image's {len(part.condition)} tokens, {e}"
            ) from None
        request.cancel = threading.Event()
        return request

    @staticmethod
    def _check_subject_prompt(job: GenerationJob, adapter: LoadedAdapter | None) -> None:
        subjects = adapter.weights.manifest.get("subjects", []) if adapter is not None else []
        identifiers = [s["identifier"] for s in subjects if isinstance(s, dict) and s.get("identifier")]
        if identifiers and not any(i in job.prompt for i in identifiers):
            raise GenerationRequestError(
                "prompt",
                f"the prompt names none of adapter {job.adapter!r}'s subjects ({', '.join(identifiers)})",
            )

    # --- observability --------------------------------------------------------------------------

    def _count_dropped(self) -> None:
        for handle in [h for h in self._dropped if h.finished]:
            self._dropped.remove(handle)
            if handle.status != "cancelled":
                continue  # it ended before the cancellation reached the loop
            self._tally.requests_dropped += 1
            full = handle.layout.decode_steps
            if handle.admitted_step is None:
                self._tally.steps_skipped += full
            else:
                self._tally.batches_stopped += 1
                ran = handle.finished_step - handle.admitted_step
                self._tally.steps_skipped += max(full - ran, 0)

    def stats(self) -> dict[str, Any]:
        """Counters of this replica: requests, cancellations, the decode loop, failures, adapters.

        ``batch_sizes``: requests admitted together at one decode step (recent steps, finished requests);
        ``decode``: the loop's counters (:class:`~stylear_core.inference.continuous.EngineCounters`:
        steps, rows stepped, prefills, ``max_live_rows``...), its ``live_rows``/``live_requests`` and
        ``queued`` now, and what cancelled requests left undone (``requests_dropped``,
        ``batches_stopped``: those stopped mid-decode, ``steps_skipped``). ``cancelled`` counts calls
        their caller cancelled; ``previews``: job previews decoded; ``replica`` and ``pid`` say which
        replica answered.
        """
        self._count_dropped()
        sizes = list(self._admitted.values())
        running = list(self.loop.running)
        decode = {
            **self.loop.counters.as_dict(),
            "live_rows": sum(len(r.rows) for r in running),
            "live_requests": len(running),
            "queued": len(self.loop.queue),
            "max_slots": self.loop.max_slots,
            **asdict(self._tally),
        }
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "batch_sizes": sizes,
            "max_batch_size_seen": max(sizes, default=0),
            "batches": len(sizes),
            "requests": self._requests,
            "cancelled": self._cancelled,
            "decode": decode,
            "failures": {str(k): v for k, v in self._failures.items()},
            "adapter_loads": dict(self._adapter_loads),
            "resident_adapters": sorted(self._resident),
            "pool_adapters": self.pool.slots,
            "pool_waits": self._pool_waits,
            "previews": self._previews,
            "base_builds": self.base_builds,
            "build_seconds": round(self.build_seconds, 3),
            "device": str(self.device),
        }

    def ping(self) -> str:
        """Cheap liveness probe for the ingress's ``/healthz``."""
        return "ok"
