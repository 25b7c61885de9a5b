"""Continuous (iteration-level) batching: a fixed pool of row slots over one static KV cache.

:class:`ContinuousBatchingEngine` decodes many requests in one loop. Between decode steps its scheduler
admits queued requests into free row slots, so a request that arrives mid-decode starts at the next step
instead of waiting for a whole batch to finish:

* **Slots.** The pool has ``max_slots`` rows and one KV cache of ``(max_slots, heads, cache_len, dim)``
  per layer (:class:`RowSlotCache`). A request takes one row (no guidance, ``cfg_scale == 1``) or two
  (its conditional and unconditional rows, admitted and retired together). Admission prefills the new
  rows into their slots while the other rows keep their cache; the prefill inputs are those of
  :meth:`ImageGenerationEngine._prefill_inputs`, so a request sees what its solo run sees.
* **Per-row positions and lengths.** Every row has its own position id, its own cache write column and
  its own attention mask over the cache (an additive ``(rows, 1, 1, cache_len)`` mask: only the columns
  the row has written are open). Rows of different prompt lengths and resolutions share a step, and
  finish independently: a finished or cancelled request frees its rows at once. Empty slots are
  masked (they attend to their own column 0 only) and nothing is padded to a power of two; a step runs
  the rows up to the highest occupied slot (admission fills the lowest free slots first).
* **Sampling** is the engine's: per-request seeds (one ``torch.Generator`` each, advanced only at the
  request's own code positions), per-request CFG scale, top-k and temperature, and layout-forced
  header, new-line and end tokens. Under greedy decoding a request gets the tokens of its solo
  :meth:`ImageGenerationEngine.generate` run.
* **Policies.** ``"continuous"`` admits whenever rows are free; ``"batch"`` admits only into an empty
  pool (batch-at-a-time, as the ``@serve.batch`` path decodes), so the two can be compared in one run.
* **Cancellation.** Setting a request's ``cancel`` event (or :meth:`GenerationHandle.cancel`) retires it
  at the next step, freeing its rows; it gets no result.
* **Adapters.** Each request carries an adapter index (0: the base model). Before every forward the
  engine calls ``row_adapters(indices)`` with the per-row indices of the rows about to run, which is
  where a batched multi-LoRA layer reads them (``row_adapters=MultiLoraPool.set_rows`` of
  :mod:`stylear_core.inference.multi_lora`). Without that hook only index 0 is accepted.

* **Step cost.** Requests admitted in the same step are prefilled in one forward (shorter prompts
  left-padded further, which changes no position); a decode step attends only to the cache columns up
  to the furthest live row (rounded up to 16), the prefill only to its own columns; per-step index
  tensors and merged sampling settings are rebuilt only when the running set changes, and every
  request's token is written in one indexed copy. The host mirrors the write columns, so none of this
  reads the device.

Not here yet: CUDA graphs (one per slot-count and attention-length bucket). The code is
device-agnostic and runs the model eagerly.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers.cache_utils import Cache, StaticLayer

from stylear_core.data.layout import ImageTokenLayout
from stylear_core.inference.engine import (
    GenerationRequest,
    GenerationRequestError,
    GenerationResult,
    ImageGenerationEngine,
)
from stylear_core.inference.sampling import BatchSampling, guided_logits, sample_codes

POLICIES = ("continuous", "batch")

# The name of the background loop thread (:meth:`ContinuousBatchingEngine.start`).
LOOP_THREAD_NAME = "continuous-batching"


class GenerationFailedError(RuntimeError):
    """A request's prefill or decode raised; the original exception is its ``__cause__``."""


class _SlotState:
    """What every layer of a :class:`RowSlotCache` reads: the rows a forward covers and where they write."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.write_col = torch.zeros(rows, dtype=torch.long, device=device)
        self.row_index = torch.arange(rows, device=device)
        self.active = rows  # a decode step covers rows [0, active)
        self.attend = 0  # ... and reads cache columns [0, attend) (0: all of them)
        self.prefill_rows: torch.Tensor | None = None  # set while prefilling these rows


class _RowSlotLayer(StaticLayer):
    """A static cache layer whose rows write at their own columns (decode) or are prefilled alone."""

    def __init__(self, max_cache_len: int, rows: int, state: _SlotState) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.rows, self.state = rows, state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # The first forward may be a prefill of a few rows: size the tensors for the whole pool.
        super().lazy_initialization(key_states[:1].expand(self.rows, *key_states.shape[1:]), value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: write columns ``[0, L)`` of the prefilled rows. Step: write each row at its own column."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows = self.state.prefill_rows
        if rows is not None:
            length = key_states.shape[-2]
            self.keys[rows, :, :length] = key_states
            self.values[rows, :, :length] = value_states
            return key_states, value_states  # what the prefilled rows hold in columns [0, length)
        n = self.state.active
        # One scatter along the column axis: row b writes its key at its own column write_col[b].
        cols = (
            self.state.write_col[:n].view(n, 1, 1, 1).expand(n, key_states.shape[1], 1, key_states.shape[3])
        )
        self.keys[:n].scatter_(2, cols, key_states)
        self.values[:n].scatter_(2, cols, value_states)
        # Columns past the longest live row are masked for every row: leave them out of the attention.
        attend = self.state.attend or self.keys.shape[2]
        return self.keys[:n, :, :attend], self.values[:n, :, :attend]


class RowSlotCache(Cache):
    """A ``(rows, heads, cache_len, dim)`` KV cache per layer whose rows advance independently."""

    def __init__(self, num_layers: int, rows: int, cache_len: int, device: torch.device) -> None:
        self.state = _SlotState(rows, device)
        super().__init__(layers=[_RowSlotLayer(cache_len, rows, self.state) for _ in range(num_layers)])


@dataclass
class EngineCounters:
    """Running totals: decode steps, rows they ran, prefills (admissions) and the forwards that ran them
    (requests admitted in one step share one), finished/cancelled/failed requests."""

    steps: int = 0
    rows_stepped: int = 0
    prefills: int = 0
    prefill_forwards: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    max_live_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for stats endpoints)."""
        return asdict(self)


@dataclass(eq=False)
class GenerationHandle:
    """One submitted request: its status, progress (``tokens_done`` of ``tokens_total``) and result.

    ``status`` goes ``queued`` -> ``running`` -> ``done`` (or ``cancelled`` from either, or ``failed``
    when a forward or its progress callback raised; ``error`` holds the exception). ``wait`` blocks
    until the request ends and returns its result (``None`` if cancelled; raises if failed).
    ``admitted_step``/``finished_step`` are the engine's step counter at admission and at the end.
    """

    request: GenerationRequest
    layout: ImageTokenLayout
    seed: int
    adapter: int = 0
    status: str = "queued"
    tokens_done: int = 0
    result: GenerationResult | None = None
    admitted_step: int | None = None
    finished_step: int | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    finished_at: float | None = None
    error: BaseException | None = None
    on_progress: Callable[[GenerationHandle], None] | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens_total(self) -> int:
        """The image's token count (start to end token)."""
        return self.layout.num_tokens

    @property
    def finished(self) -> bool:
        """Whether the request is done or cancelled."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; its rows are freed at the next step."""
        if self.request.cancel is None:
            self.request.cancel = threading.Event()
        self.request.cancel.set()

    def wait(self, timeout: float | None = None) -> GenerationResult | None:
        """Block until the request ends (``TimeoutError`` after ``timeout`` s); returns its result.

        Raises :class:`GenerationFailedError` if the request failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise GenerationFailedError(f"generation failed: {self.error!r}") from self.error
        return self.result


@dataclass
class _Admission:
    """A request being admitted: its handle, its rows and its solo prefill inputs."""

    handle: GenerationHandle
    rows: list[int]
    embeds: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


class _Running:
    """Decode state of an admitted request: its rows, next image position, tokens and sampling settings."""

    def __init__(
        self, handle: GenerationHandle, rows: list[int], sampling: BatchSampling, device: torch.device
    ) -> None:
        self.handle = handle
        self.rows = rows  # [cond] or [cond, uncond]
        self.sampling = sampling  # one row: this request's settings and its generator
        self.forced = handle.layout.forced_tokens()
        self.pos = 3  # the next image position to fill (the header is the prompt's end)


class ContinuousBatchingEngine:
    """Iteration-level batching over ``max_slots`` rows of one KV cache of ``cache_len`` columns.

    Uses ``engine``'s model, vocabulary, device, dtype, request validation and prefill inputs. A request
    needs ``prompt + header (rounded up to the engine's length bucket) + layout.decode_steps`` columns and one
    row (two with guidance); requests that cannot fit are refused at :meth:`submit`. ``policy`` is
    ``"continuous"`` or ``"batch"`` (see the module docstring). ``row_adapters`` receives the per-row
    adapter indices before every forward. Drive it with :meth:`step` / :meth:`run_until_idle` from one
    thread, or :meth:`start` a background loop; :meth:`submit` may be called from any thread.
    """

    def __init__(
        self,
        engine: ImageGenerationEngine,
        max_slots: int,
        cache_len: int,
        policy: str = "continuous",
        row_adapters: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_slots < 2:
            raise ValueError("max_slots must be at least 2 (a guided request takes two rows)")
        self.engine = engine
        self.max_slots, self.cache_len, self.policy = max_slots, cache_len, policy
        self.row_adapters = row_adapters
        self.lm, self.device, self.dtype = engine.lm, engine.device, engine.dtype
        self.code_ids = engine.code_ids
        self.cache = RowSlotCache(int(self.lm.config.num_hidden_layers), max_slots, cache_len, self.device)
        self.neg = torch.finfo(self.dtype).min
        self.token_buf = torch.zeros((max_slots, 1), dtype=torch.long, device=self.device)
        self.pos_buf = torch.zeros((max_slots, 1), dtype=torch.long, device=self.device)
        self.mask_buf = torch.full(
            (max_slots, 1, 1, cache_len), self.neg, dtype=self.dtype, device=self.device
        )
        self.mask_buf[:, 0, 0, 0] = 0.0  # an empty slot attends to its own column 0: finite, never read
        self.logits = torch.zeros((max_slots, engine.vocab.codebook_size), device=self.device)
        self.row_adapter = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        # Each request's tokens, in the row of its conditional branch (an image needs at most
        # cache_len + 4 of them); a step writes every request's token in one indexed copy.
        self.out_buf = torch.zeros((max_slots, cache_len + 4), dtype=torch.long, device=self.device)
        # The write column of every row, mirrored on the host: how far a step must attend is known
        # without reading the device.
        self.cols = [0] * max_slots
        # Per-step index tensors and merged sampling settings, rebuilt only when the running set changes.
        self._plan: _StepPlan | None = None
        self.free = list(range(max_slots))
        self.running: list[_Running] = []
        self.queue: deque[GenerationHandle] = deque()
        self.counters = EngineCounters()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- submission -------------------------------------------------------------------------------

    def columns_needed(self, request: GenerationRequest, layout: ImageTokenLayout) -> int:
        """KV-cache columns the request's rows use: the padded prefix plus every fed image token."""
        prefix = max(len(request.prompt_ids), len(self.engine.uncond_prefix)) + len(layout.header)
        bucket = self.engine.length_bucket
        return -(-prefix // bucket) * bucket + layout.decode_steps

    def submit(
        self,
        request: GenerationRequest,
        adapter: int = 0,
        on_progress: Callable[[GenerationHandle], None] | None = None,
    ) -> GenerationHandle:
        """Queue a request; returns its handle. Raises :class:`GenerationRequestError` if it cannot run.

        ``on_progress(handle)`` is called from the decode loop after every token the request gets.
        """
        layout = self.engine.validate(request)
        if self.columns_needed(request, layout) > self.cache_len:
            raise GenerationRequestError(
                "prompt",
                f"prompt and image need {self.columns_needed(request, layout)} cache columns; "
                f"the pool has {self.cache_len}",
            )
        if adapter != 0 and self.row_adapters is None:
            raise GenerationRequestError("adapter", "this engine has no adapters loaded")
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**63)
        handle = GenerationHandle(request, layout, seed, adapter=adapter, on_progress=on_progress)
        with self._lock:
            self.queue.append(handle)
            self._lock.notify_all()
        return handle

    def tokens_so_far(self, handle: GenerationHandle) -> torch.Tensor | None:
        """The image tokens ``handle``'s request has so far (``tokens_done`` of them, the header first), as a
        CPU copy; all of them once it is done; ``None`` while it is queued or once it was dropped.

        Call it on the loop's thread (e.g. from ``on_progress``): between steps the buffer it reads is
        written by the next step, and a freed row by the next request admitted into it.
        """
        for run in self.running:
            if run.handle is handle:
                return self.out_buf[run.rows[0], : handle.tokens_done].to("cpu", copy=True)
        return handle.result.tokens.clone() if handle.result is not None else None

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or running."""
        return not self.queue and not self.running

    @property
    def live_rows(self) -> int:
        """Rows currently held by running requests."""
        return self.max_slots - len(self.free)

    # ---- the loop ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled requests, admit queued ones, pick one token per request, decode."""
        self._retire_cancelled()
        self._admit()
        if not self.running:
            return
        self.counters.max_live_rows = max(self.counters.max_live_rows, self.live_rows)
        try:
            self._advance()
        except Exception as exc:  # the rows' state is unknown now: fail them and free their slots
            for run in list(self.running):
                self._release(run)
                self._end(run.handle, "failed", exc)

    def _advance(self) -> None:
        plan = self._step_plan()
        chosen = self._choose_tokens(plan)
        positions = torch.tensor([run.pos for run in self.running], device=self.device)
        self.out_buf[plan.cond_rows, positions] = chosen
        fed_rows: list[int] = []
        fed_from: list[int] = []
        for i, run in list(enumerate(self.running)):
            run.handle.tokens_done = run.pos + 1
            if run.pos == run.handle.layout.num_tokens - 1:
                self._finish(run)
            else:
                run.pos += 1
                fed_rows += run.rows
                fed_from += [i] * len(run.rows)
            if run.handle.on_progress is not None:
                try:
                    run.handle.on_progress(run.handle)
                except Exception as exc:  # a broken callback ends its own request, not its neighbours
                    if run in self.running:  # (a request it reported as done stays done)
                        self._release(run)
                        fed_rows, fed_from = fed_rows[: -len(run.rows)], fed_from[: -len(run.rows)]
                        self._end(run.handle, "failed", exc)
        if not fed_rows:
            return
        if fed_rows == plan.fed_rows and plan.dense_from is not None:
            # Nobody finished or failed, and the rows fill [0, n): slices instead of gathers.
            self._decode(fed_rows, None, chosen[plan.dense_from])
        elif fed_rows == plan.fed_rows:  # nobody finished or failed: the cached index tensors hold
            self._decode(fed_rows, plan.fed_index, chosen[plan.fed_from])
        else:
            index = torch.tensor(fed_rows, device=self.device)
            self._decode(fed_rows, index, chosen[torch.tensor(fed_from, device=self.device)])

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until nothing is queued or running (or ``max_steps`` steps); returns the steps taken."""
        taken = 0
        while not self.idle and (max_steps is None or taken < max_steps):
            self.step()
            taken += 1
        return taken

    def start(self) -> None:
        """Run the loop on a daemon thread: it steps while work exists and sleeps while idle."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=LOOP_THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the background loop (after its current step)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
            self.step()

    # ---- scheduling -------------------------------------------------------------------------------

    def _retire_cancelled(self) -> None:
        with self._lock:
            for handle in [h for h in self.queue if h.request.cancelled]:
                self.queue.remove(handle)
                self._end(handle, "cancelled")
        for run in [r for r in self.running if r.handle.request.cancelled]:
            self._release(run)
            self._end(run.handle, "cancelled")

    def _admit(self) -> None:
        if self.policy == "batch" and self.running:
            return
        admitted: list[GenerationHandle] = []
        with self._lock:
            free = len(self.free)
            # First come, first served: a two-row request at the head is not overtaken by one-row ones.
            while self.queue and self._rows_of(self.queue[0].request) <= free:
                handle = self.queue.popleft()
                free -= self._rows_of(handle.request)
                admitted.append(handle)
        if admitted:
            self._prefill(admitted)

    @staticmethod
    def _rows_of(request: GenerationRequest) -> int:
        return 2 if request.cfg_scale != 1.0 else 1

    def _prefill(self, handles: list[GenerationHandle]) -> None:
        """Prefill the requests admitted in one step together: one forward for all their rows."""
        self.free.sort()
        ready: list[_Admission] = []
        for handle in handles:
            count = self._rows_of(handle.request)
            rows, self.free = self.free[:count], self.free[count:]
            try:
                # The solo run's own prefill inputs (same left padding, positions and style injection).
                inputs = self.engine._prefill_inputs([handle.request], handle.layout, count == 2)
            except Exception as exc:  # e.g. a bad style tensor: this request fails, the pool goes on
                self._fail_admission(handle, rows, exc)
                continue
            ready.append(_Admission(handle, rows, *inputs))
        if not ready:
            return
        # Shorter prompts are left-padded further to the longest one (their positions do not change);
        # a request whose image would then overrun the cache is prefilled on its own.
        length = max(a.valid.shape[1] for a in ready)
        fits = [a for a in ready if length + a.handle.layout.decode_steps <= self.cache_len]
        groups = [fits] if len(fits) > 1 else [[a] for a in fits]
        groups += [[a] for a in ready if all(a is not f for f in fits)]
        for group in groups:
            try:
                self._prefill_rows(group)
            except Exception as exc:
                if len(group) == 1:
                    self._fail_admission(group[0].handle, group[0].rows, exc)
                    continue
                # Retry one by one, so only the request that breaks the forward fails.
                for admission in group:
                    try:
                        self._prefill_rows([admission])
                    except Exception as exc_one:
                        self._fail_admission(admission.handle, admission.rows, exc_one)

    def _fail_admission(self, handle: GenerationHandle, rows: list[int], exc: BaseException) -> None:
        self._reset_rows(rows)
        self.free += rows
        self._end(handle, "failed", exc)

    def _prefill_rows(self, group: list[_Admission]) -> None:
        length = max(a.valid.shape[1] for a in group)
        embeds, valid, positions = [], [], []
        for a in group:
            pad = length - a.valid.shape[1]
            # Extra left padding: masked columns (a finite embedding, never attended to), position 0.
            embeds.append(torch.nn.functional.pad(a.embeds, (0, 0, pad, 0)))
            valid.append(torch.nn.functional.pad(a.valid, (pad, 0), value=False))
            positions.append(torch.nn.functional.pad(a.positions, (pad, 0), value=0))
        embeds, valid, positions = torch.cat(embeds), torch.cat(valid), torch.cat(positions)
        rows = [row for a in group for row in a.rows]
        n = len(rows)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
        # A padding query attends to itself only: a row with nothing to attend to would give NaN.
        allowed |= torch.eye(length, dtype=torch.bool, device=self.device).unsqueeze(0)
        # The prefill reads only the columns it writes: [0, length).
        mask = torch.full((n, 1, length, length), self.neg, dtype=embeds.dtype, device=self.device)
        mask[:, 0].masked_fill_(allowed, 0.0)
        index = torch.tensor(rows, device=self.device)
        adapters = [a.handle.adapter for a in group for _ in a.rows]
        self.row_adapter[index] = torch.tensor(adapters, dtype=torch.long, device=self.device)
        if self.row_adapters is not None:
            self.row_adapters(self.row_adapter[index])
        self.cache.state.prefill_rows = index
        try:
            out = self.lm.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        finally:
            self.cache.state.prefill_rows = None
        self.logits[index] = self._code_logits(out.last_hidden_state[:, -1])
        self.mask_buf[index] = self.neg
        self.mask_buf[index, 0, 0, :length] = torch.where(valid, 0.0, self.neg).to(self.dtype)
        self.pos_buf[index] = positions[:, -1:]
        self.cache.state.write_col[index] = length
        for row in rows:
            self.cols[row] = length
        self.counters.prefill_forwards += 1
        for a in group:
            handle, request = a.handle, a.handle.request
            self.out_buf[a.rows[0], :3] = torch.tensor(handle.layout.header, device=self.device)
            sampling = BatchSampling.build(
                [request.cfg_scale],
                [request.top_k],
                [request.temperature],
                [handle.seed],
                self.engine.vocab.codebook_size,
                self.device,
            )
            self.running.append(_Running(handle, a.rows, sampling, self.device))
            handle.status = "running"
            handle.tokens_done = 3  # the header came with the prompt
            handle.admitted_step = self.counters.steps
            self.counters.prefills += 1
        self._plan = None

    def _step_plan(self) -> _StepPlan:
        if self._plan is None:
            self._plan = _StepPlan(self.running, self.device)
        return self._plan

    def _choose_tokens(self, plan: _StepPlan) -> torch.Tensor:
        """One token id per running request: forced by its layout, or sampled from its rows' logits."""
        forced_at = [i for i, r in enumerate(self.running) if r.pos in r.forced]
        if len(forced_at) == len(self.running):
            values = [r.forced[r.pos] for r in self.running]
            return torch.tensor(values, dtype=torch.long, device=self.device)
        sampled_at = tuple(i for i, r in enumerate(self.running) if r.pos not in r.forced)
        cond, uncond, sampling = plan.sampling_for(sampled_at, self.running, self.device)
        codes = sample_codes(
            guided_logits(self.logits[cond], self.logits[uncond], sampling.cfg_scale), sampling
        )
        ids = self.code_ids[codes]
        if not forced_at:
            return ids
        chosen = torch.zeros(len(self.running), dtype=torch.long, device=self.device)
        values = [self.running[i].forced[self.running[i].pos] for i in forced_at]
        chosen[torch.tensor(forced_at, device=self.device)] = torch.tensor(values, device=self.device)
        chosen[torch.tensor(sampled_at, device=self.device)] = ids
        return chosen

    def _decode(self, rows: list[int], index: torch.Tensor | None, tokens: torch.Tensor) -> None:
        """Feed ``tokens`` to ``rows`` (each at its own column and position) and keep the next logits.

        ``index`` is ``rows`` as a device tensor, or ``None`` when the rows are ``0..n-1`` in order.
        """
        state = self.cache.state
        active = max(rows) + 1
        if index is None:
            self.token_buf[:active, 0] = tokens
            self.pos_buf[:active] += 1
            self.mask_buf[:active, 0, 0].scatter_(1, state.write_col[:active, None], 0.0)
        else:
            self.token_buf[index, 0] = tokens
            self.pos_buf[index] += 1
            self.mask_buf[index, 0, 0, state.write_col[index]] = 0.0
        state.active = active
        # Attend only up to the furthest written column of a live row (rounded up to a multiple of 16
        # so the shapes repeat); every column beyond it is masked for every row.
        attend = min(-(-(max(self.cols[r] for r in rows) + 1) // 16) * 16, self.cache_len)
        state.attend = attend
        if self.row_adapters is not None:
            self.row_adapters(self.row_adapter[:active])
        try:
            out = self.lm.model(
                input_ids=self.token_buf[:active],
                attention_mask=self.mask_buf[:active, :, :, :attend],
                position_ids=self.pos_buf[:active],
                past_key_values=self.cache,
                use_cache=True,
            )
        finally:
            state.attend = 0
        # The head runs over every active row: a per-row adapter on lm_head expects the rows it was given.
        logits = self._code_logits(out.last_hidden_state[:, -1])
        if index is None:
            self.logits[:active] = logits
            state.write_col[:active] += 1
        else:
            self.logits[index] = logits[index]
            state.write_col[index] += 1
        for row in rows:
            self.cols[row] += 1
        self.counters.steps += 1
        self.counters.rows_stepped += active

    def _code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # As StaticKVDecoder: the full head row (a LoRA on lm_head applies to it), then the code ids.
        return self.lm.lm_head(hidden).float().index_select(-1, self.code_ids)

    def _release(self, run: _Running) -> None:
        self.running.remove(run)
        self._plan = None
        self._reset_rows(run.rows)
        self.free += run.rows

    def _reset_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        # Back to an empty slot: attends to its own column 0, writes there, position 0.
        self.mask_buf[index] = self.neg
        self.mask_buf[index, 0, 0, 0] = 0.0
        self.pos_buf[index] = 0
        self.token_buf[index] = 0
        self.cache.state.write_col[index] = 0
        for row in rows:
            self.cols[row] = 0
        self.row_adapter[index] = 0

    def _finish(self, run: _Running) -> None:
        self._release(run)
        handle = run.handle
        # A copy: on the CPU .cpu() would return a view of the row the next request reuses.
        tokens = self.out_buf[run.rows[0], : handle.layout.num_tokens].to("cpu", copy=True)
        handle.result = GenerationResult(tokens=tokens, layout=handle.layout, seed=handle.seed)
        self.counters.finished += 1
        self._end(handle, "done")

    def _end(self, handle: GenerationHandle, status: str, error: BaseException | None = None) -> None:
        if status in ("cancelled", "failed"):
            setattr(self.counters, status, getattr(self.counters, status) + 1)
        handle.status, handle.error = status, error
        handle.finished_step = self.counters.steps
        handle.finished_at = time.perf_counter()
        handle._done.set()


class _StepPlan:
    """Index tensors and merged sampling settings of one running set (the requests, in order)."""

    def __init__(self, running: list[_Running], device: torch.device) -> None:
        self.cond_rows = torch.tensor([r.rows[0] for r in running], device=device)
        self.fed_rows = [row for r in running for row in r.rows]
        self.fed_index = torch.tensor(self.fed_rows, device=device)
        from_request = [i for i, r in enumerate(running) for _ in r.rows]
        self.fed_from = torch.tensor(from_request, device=device)
        # When the rows are exactly 0..n-1 (the usual case), the requests' tokens in row order.
        by_row = sorted(range(len(self.fed_rows)), key=self.fed_rows.__getitem__)
        dense = [self.fed_rows[j] for j in by_row] == list(range(len(self.fed_rows)))
        self.dense_from = torch.tensor([from_request[j] for j in by_row], device=device) if dense else None
        self._sampling: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, BatchSampling]] = {}

    def sampling_for(
        self, at: tuple[int, ...], running: list[_Running], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, BatchSampling]:
        """The cond rows, uncond rows and merged settings of the requests ``at`` (cached per subset)."""
        if at not in self._sampling:
            runs = [running[i] for i in at]
            cond = torch.tensor([r.rows[0] for r in runs], device=device)
            # A request without guidance has no uncond row: scale 1 returns its cond logits bit for bit.
            uncond = torch.tensor([r.rows[-1] for r in runs], device=device)
            self._sampling[at] = (cond, uncond, _concat_sampling([r.sampling for r in runs]))
        return self._sampling[at]


def _concat_sampling(parts: list[BatchSampling]) -> BatchSampling:
    """The one-row settings of several requests as one batch (their generators are shared, not copied)."""
    sampled = [b for b, p in enumerate(parts) if p.sampled_rows]
    device = parts[0].cfg_scale.device
    return BatchSampling(
        cfg_scale=torch.cat([p.cfg_scale for p in parts]),
        top_k=torch.cat([p.top_k for p in parts]),
        temperature=torch.cat([p.temperature for p in parts]),
        generators=[p.generators[0] for p in parts],
        sampled_rows=sampled,
        sampled_index=torch.tensor(sampled, dtype=torch.long, device=device),
        k_max=max((p.k_max for p in parts if p.sampled_rows), default=1),
    )
