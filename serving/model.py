"""The model deployment: one base model per replica, batched decoding, LoRA adapters on demand.

A replica builds the backbone (with one empty LoRA slot), VQGAN, prompt tokenizer, CLIP style
encoder, resampler and optionally SAM once, as a :class:`~stylear_core.inference.generator.StyleARGenerator`
(the front-end every generation path shares). Requests arrive through :meth:`StyleARModelDeployment.generate`;
``@serve.batch`` merges concurrent ones (Ray Serve splits batches by multiplexed model id, i.e. by
adapter) and the engine decodes each resolution group as one CFG-batched decode. Adapters are
loaded by ``serve.multiplexed`` (an LRU of ``max_adapters_per_replica``) as small weight sets and
copied into the slot before their batch, so switching adapters never reloads the base.

Torch work runs on one worker thread so the replica's event loop keeps answering (stats, health,
queueing the next batch) while a batch decodes. Per-request problems come back as
:class:`JobOutcome` errors, never as exceptions, so one bad request cannot fail its batch.

A caller that gives up (the ingress cancels the call when its client times out) cancels
:meth:`StyleARModelDeployment.generate`; that sets the request's cancel event, which the decode
thread reads between steps: its preparation and VQ decode are skipped, and a batch whose every request
is cancelled stops decoding, so the replica moves on to the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from serving.config import ServingConfig
from serving.schemas import GenerationJob, JobOutcome
from stylear_core.adapters.format import AdapterError, AdapterNotFoundError, base_model_id
from stylear_core.adapters.io import adapter_path, list_adapters
from stylear_core.config import from_dict
from stylear_core.data.images import ImageDecodeError, encode_png
from stylear_core.devices import resolve_device
from stylear_core.inference.condition_request import ConditionImageError
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.engine import GenerationRequest, GenerationRequestError
from stylear_core.inference.generator import ServedAdapter, StyleARGenerator
from stylear_core.inference.style_request import StyleRequestError

log = logging.getLogger("ray.serve")


def _replica_id() -> str | None:
    """This Serve replica's id (``None`` when the class is built outside Ray Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


# Engine field names -> the HTTP API's.
API_FIELDS = {"cfg_scale": "cfg", "style": "image"}

# What a cancelled request's slot in a batch holds; its caller is gone, so no one receives it.
CANCELLED = JobOutcome.failure(499, "cancelled by the caller", None)


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


# One request in a ``serve.batch``: the job, its adapter and the event its caller's cancellation sets.
BatchItem = tuple[GenerationJob, LoadedAdapter | None, threading.Event]


@serve.deployment(name="StyleARModel", max_ongoing_requests=32, health_check_period_s=10)
class StyleARModelDeployment:
    """Ray Serve deployment wrapping :class:`ImageGenerationEngine` and the style path.

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
        # The base model, its LoRA slot, tokenizer, engine, VQGAN and style path: one generator front-end,
        # the same one evaluation, preference pairs and the export parity gate build.
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
        self.slot = self.generator.slot
        self.style = self.generator.references
        self.base_builds = 1  # the base model is built here and only here
        self.replica_id = _replica_id()
        self.base_model = base_model_id(model_cfg)  # what adapter manifests must name as their base
        self.build_seconds = time.perf_counter() - started
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylear-decode")
        self._batch_sizes: deque[int] = deque(maxlen=self.cfg.stats_window)
        self._adapter_loads: Counter[str] = Counter()
        self._requests = 0
        self._cancelled = 0
        self._failures: Counter[int] = Counter()
        self._resident: set[str] = set()

        async def load_adapter(name: str) -> LoadedAdapter:
            # Reading files is IO: keep it off the event loop and off the decode thread.
            return await asyncio.get_running_loop().run_in_executor(None, self._read_adapter, name)

        # Multiplexing is wired per instance (Ray Serve supports this) so the LRU bound comes from the config.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(
            load_adapter
        )
        self.generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

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

    # --- requests -----------------------------------------------------------------------------

    async def generate(self, job: GenerationJob) -> JobOutcome:
        """Generate one image (merged with concurrent requests into one decode batch).

        Cancelling the call (``DeploymentResponse.cancel()``) stops the request's work on the replica.
        """
        self._requests += 1
        cancel = threading.Event()
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
            return await self.generate_batch((job, adapter, cancel))
        except asyncio.CancelledError:
            # Ray Serve cancels this coroutine when the caller cancels; the batch it joined runs on in
            # the decode thread (``serve.batch`` only drops requests cancelled before their batch
            # starts), so tell that thread through the event.
            cancel.set()
            self._cancelled += 1
            raise

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[BatchItem]) -> list[JobOutcome]:
        """The batched half of :meth:`generate`: runs the whole batch on the decode thread."""
        self._batch_sizes.append(len(items))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_batch, items)

    def _fail(self, status: int, message: str, field: str | None) -> JobOutcome:
        self._failures[status] += 1
        return JobOutcome.failure(status, message, field)

    def _prepare(self, job: GenerationJob, adapter: LoadedAdapter | None) -> GenerationRequest:
        seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**63)
        strength = (
            job.noise_strength if job.noise_strength is not None else self.cfg.model.noise_strength_infer
        )
        sampling = SamplingConfig(
            cfg_scale=job.cfg, top_k=job.top_k, temperature=job.temperature, noise_strength=strength
        )
        style = None
        # A condition image's tokens (e.g. a depth map's) go into the prompt at the requested size.
        condition = None
        if job.condition is not None:
            condition = self.generator.condition_ids(job.condition, job.height, job.width)
        if job.kind == "style":
            ids = self.generator.style_prompt_ids(job.prompt, job.height, job.width, condition)
            if job.reference is None:
                raise StyleRequestError("image", "a style reference image is required")
            resampler = adapter.resampler if adapter is not None else None
            style = self.style(job.reference, job.sam, strength, seed, resampler, sam_mode=job.sam_mode)
        else:
            self._check_subject_prompt(job, adapter)
            ids = self.generator.text_prompt_ids(job.prompt, job.height, job.width, condition)
        request = self.generator.request(ids, job.height, job.width, sampling, seed, style_embeds=style)
        try:
            self.engine.validate(request)
        except GenerationRequestError as e:
            if condition is None or e.field != "prompt":
                raise
            # The prompt is too long because of the condition's tokens: name the field that made it so.
            raise GenerationRequestError(
                "condition", f"with the condition image's {len(condition)} tokens, {e}"
            ) from None
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

    def _run_batch(self, items: list[BatchItem]) -> list[JobOutcome]:
        outcomes: list[JobOutcome | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, (_, adapter, _) in enumerate(items):
            groups.setdefault(adapter.name if adapter else None, []).append(i)
        for members in groups.values():
            adapter = items[members[0]][1]
            try:
                self._run_group(items, members, adapter, outcomes)
            except Exception:  # a bug must not take the replica down: answer 500 and keep serving
                log.exception("decode batch failed")
                for i in members:
                    if outcomes[i] is None:
                        outcomes[i] = self._fail(500, "internal error while generating", None)
        return outcomes  # type: ignore[return-value]

    def _run_group(
        self,
        items: list[BatchItem],
        members: list[int],
        adapter: LoadedAdapter | None,
        outcomes: list[JobOutcome | None],
    ) -> None:
        live = []
        for i in members:
            if items[i][2].is_set():  # the caller is gone: nobody reads this outcome
                outcomes[i] = CANCELLED
            else:
                live.append(i)
        if not live:
            return
        self.generator.activate(adapter)
        ready: list[tuple[int, GenerationRequest]] = []
        for i in live:
            job, _, cancel = items[i]
            try:
                request = self._prepare(job, adapter)
                request.cancel = cancel
                ready.append((i, request))
            except ConditionImageError as e:
                outcomes[i] = self._fail(400, f"condition: {e}", "condition")
            except ImageDecodeError as e:
                outcomes[i] = self._fail(400, str(e), "image")
            except (GenerationRequestError, StyleRequestError) as e:
                outcomes[i] = self._fail(422, e.message, API_FIELDS.get(e.field, e.field))
            except Exception:  # a bug in one request's preparation fails that request only
                log.exception("preparing a request failed")
                outcomes[i] = self._fail(500, "internal error while preparing the request", None)
        if not ready:
            return
        results = self.generator.generate([request for _, request in ready])
        for (i, request), result in zip(ready, results):
            if result is None or request.cancelled:  # cancelled during the decode: skip the VQ decode
                outcomes[i] = CANCELLED
                continue
            (image,) = self.generator.decode(result.tokens.unsqueeze(0), result.layout)
            outcomes[i] = JobOutcome(png=encode_png(image), seed=result.seed)

    # --- observability --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of this replica: recent batch sizes, requests, cancellations, decode steps, failures, adapters.

        ``cancelled`` counts calls their caller cancelled; ``decode`` the engine's steps run and skipped
        (see :class:`stylear_core.inference.engine.DecodeCounters`); ``replica`` and ``pid`` say which
        replica answered.
        """
        sizes = list(self._batch_sizes)
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "batch_sizes": sizes,
            "max_batch_size_seen": max(sizes, default=0),
            "batches": len(sizes),
            "requests": self._requests,
            "cancelled": self._cancelled,
            "decode": self.engine.counters.as_dict(),
            "failures": {str(k): v for k, v in self._failures.items()},
            "adapter_loads": dict(self._adapter_loads),
            "resident_adapters": sorted(self._resident),
            "active_adapter": self.slot.active,
            "base_builds": self.base_builds,
            "build_seconds": round(self.build_seconds, 3),
            "device": str(self.device),
        }

    def ping(self) -> str:
        """Cheap liveness probe for the ingress's ``/healthz``."""
        return "ok"
