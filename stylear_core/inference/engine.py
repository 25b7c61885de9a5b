"""Image-generation engine for Lumina-mGPT / StyleAR: token ids (and style embeddings) in, image token ids out.

One call decodes a batch of requests of one resolution together:

* **Prefill, then a static KV cache.** Rows are left-padded to one length (rounded up to
  ``length_bucket`` so shapes repeat), run through the backbone once into a preallocated
  transformers ``StaticCache`` sized for the whole image, then one token per row per step. Padding
  is handled by an explicit 4-D additive attention mask and per-row position ids, so a padded row
  computes what it would alone.
* **Batched classifier-free guidance.** Each request has a conditional row (its prompt, style
  tokens and the image header) and, when any request in the batch asks for guidance, an
  unconditional row that restarts at the image-start token with no text and no style (as Lumina-mGPT's
  unbatched CFG processor does), both in the same forward.
* **Layout-forced tokens.** The header (image start, grid sizes), every new-line and the end token
  are written from :class:`ImageTokenLayout`, not sampled; at code positions only VQ-code ids can be
  drawn. Every output therefore decodes with ``layout.decode``.
* **Cancellation.** A request may carry a ``cancel`` event (set from any thread, e.g. when its
  client gave up). The flags are read between decode steps: a batch whose every request is cancelled
  stops at once, and a cancelled request's row in a batch that goes on is dropped from the results
  (``None`` in its place). Already-cancelled requests never enter a batch. :attr:`ImageGenerationEngine.counters`
  counts decode steps run and skipped.
* **Per-request seeds.** Each request samples from its own ``torch.Generator``
  (:mod:`stylear_core.inference.sampling`), so its noise does not depend on its batch neighbours.
  Its logits can: a different batch or padding changes the floating-point reduction order, so
  under sampling a request's tokens match its solo run exactly only when those tiny differences
  do not move a choice (on CPU in fp32 they practically never do; in bf16 on a GPU they may).
* **On CUDA**: bf16 weights, and the decode step (backbone + head for a fixed row count and cache
  length) captured once in a CUDA graph and replayed every step; only sampling runs outside it.
  Batches are padded to a power of two (copies of their first request, dropped at the end) and
  prompts to multiples of 64, so a few captured graphs serve every batch. This path has not been
  run in this repository's CPU-only tests; ``benchmarks/decode.py --device cuda`` exercises it.

The engine knows nothing about tokenisation, images or HTTP; see :func:`decode_images` for the
VQ decode and :mod:`stylear_core.inference.style_request` for the request-time style path.
"""

from __future__ import annotations

import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import nn
from transformers import StaticCache

from stylear_core.data.layout import ImageTokenLayout, LayoutError, TokenVocab
from stylear_core.inference.defaults import LUMINA_CFG_SCALE, LUMINA_IMAGE_TOP_K
from stylear_core.inference.sampling import BatchSampling, guided_logits, sample_codes
from stylear_core.models.style_tokens import inject_style_tokens
from stylear_core.models.vqgan import ChameleonVQGAN, decode_to_images


class GenerationRequestError(ValueError):
    """A request the engine cannot run; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass
class GenerationRequest:
    """One image to generate.

    ``prompt_ids`` is the conditional prefix (BOS, the prompt template, and one
    ``vocab.style_placeholder`` per style token when ``style_embeds`` is given); the engine appends
    the image header itself. ``style_embeds`` is ``(num_placeholders, hidden)``, already computed
    (resampler output plus noise). ``top_k`` is clamped to the codebook; ``top_k=1`` or
    ``temperature=0`` is greedy. ``seed=None`` picks a random seed, reported in the result.
    ``cancel``, once set, tells the engine nobody wants the result any more (see the module docstring).
    """

    prompt_ids: Sequence[int]
    height: int
    width: int
    style_embeds: torch.Tensor | None = None
    cfg_scale: float = LUMINA_CFG_SCALE
    top_k: int = LUMINA_IMAGE_TOP_K
    temperature: float = 1.0
    seed: int | None = None
    cancel: threading.Event | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the request's ``cancel`` event is set."""
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class DecodeCounters:
    """Running totals of an engine's work: decode steps run, steps saved by cancellation, dropped requests.

    ``steps`` counts decode steps run (forward passes after the prefill, one per image token fed back);
    ``steps_skipped`` the steps cancellation saved (a batch never started counts all of its steps);
    ``batches_stopped`` batches ended early because every request in them was cancelled;
    ``requests_dropped`` cancelled requests whose result was not returned.
    """

    steps: int = 0
    steps_skipped: int = 0
    batches_stopped: int = 0
    requests_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for stats endpoints)."""
        return asdict(self)


@dataclass
class GenerationResult:
    """The image's token ids ``(layout.num_tokens,)`` on the CPU (start to end token), its layout and seed."""

    tokens: torch.Tensor
    layout: ImageTokenLayout
    seed: int


def validate_request(
    request: GenerationRequest, vocab: TokenVocab, max_positions: int, hidden_size: int
) -> ImageTokenLayout:
    """Check a request against the model; returns its layout or raises :class:`GenerationRequestError`."""
    for name in ("height", "width"):
        value = getattr(request, name)
        if not isinstance(value, int) or value <= 0:
            raise GenerationRequestError(name, f"{name} must be a positive integer, got {value!r}")
    try:
        layout = ImageTokenLayout.for_resolution(request.height, request.width, vocab)
    except LayoutError as e:
        field = "height" if "height" in str(e) or "h_latent" in str(e) else "width"
        raise GenerationRequestError(field, str(e)) from None
    if not math.isfinite(request.cfg_scale) or request.cfg_scale < 0:
        raise GenerationRequestError(
            "cfg_scale", f"cfg_scale must be a finite number >= 0, got {request.cfg_scale}"
        )
    if request.top_k < 1:
        raise GenerationRequestError("top_k", f"top_k must be >= 1, got {request.top_k}")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise GenerationRequestError("temperature", f"temperature must be >= 0, got {request.temperature}")
    ids = list(request.prompt_ids)
    if not ids:
        raise GenerationRequestError("prompt", "the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab.vocab_size:
        raise GenerationRequestError("prompt", f"prompt ids must lie in [0, {vocab.vocab_size})")
    # The last image token is written, never fed, so the model sees num_tokens - 1 of them.
    needed = len(ids) + layout.num_tokens - 1
    if needed > max_positions:
        raise GenerationRequestError(
            "prompt",
            f"prompt of {len(ids)} tokens plus a {request.height}x{request.width} image needs {needed} "
            f"positions; the model has {max_positions}",
        )
    placeholders = sum(1 for i in ids if i == vocab.style_placeholder)
    if request.style_embeds is None:
        if placeholders:
            raise GenerationRequestError(
                "style", f"the prompt has {placeholders} style placeholders but no style"
            )
    else:
        shape = tuple(request.style_embeds.shape)
        if len(shape) != 2 or shape[0] != placeholders or shape[1] != hidden_size:
            raise GenerationRequestError(
                "style",
                f"style embeddings of shape {shape} do not fill {placeholders} placeholders of width {hidden_size}",
            )
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise GenerationRequestError("seed", f"seed must lie in [0, 2**63), got {request.seed}")
    return layout


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StaticKVDecoder:
    """A preallocated KV cache for ``rows x cache_len`` plus the decode step over it.

    :meth:`prefill` runs the left-padded prompts and returns the last position's code logits;
    :meth:`step` feeds one token per row at cache slot ``slot`` and returns the next code logits
    ``(rows, codebook)``. The step's inputs live in fixed buffers (token, position, mask), so on
    CUDA the step is captured once as a CUDA graph and replayed.
    """

    def __init__(
        self,
        lm: nn.Module,
        rows: int,
        cache_len: int,
        code_ids: torch.Tensor,
        dtype: torch.dtype,
        cuda_graph: bool,
    ) -> None:
        self.lm = lm
        self.rows, self.cache_len = rows, cache_len
        self.code_ids = code_ids
        device = code_ids.device
        self.cache = StaticCache(config=lm.config, max_cache_len=cache_len)
        self.neg = torch.finfo(dtype).min
        self.token_buf = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.pos_buf = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.mask_buf = torch.full((rows, 1, 1, cache_len), self.neg, dtype=dtype, device=device)
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None

    def _code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head's full vocab row is computed (a LoRA on lm_head applies to it), then only code ids kept.
        return self.lm.lm_head(hidden).float().index_select(-1, self.code_ids)

    def prefill(self, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``(rows, L, hidden)`` embeddings (``valid`` False on left padding); returns ``(rows, codebook)`` logits."""
        rows, length = valid.shape
        self.cache.reset()
        device = embeds.device
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)
        # A padding query attends to itself only: a row with nothing to attend to would give NaN.
        allowed |= torch.eye(length, dtype=torch.bool, device=device).unsqueeze(0)
        mask = torch.full((rows, 1, length, self.cache_len), self.neg, dtype=embeds.dtype, device=device)
        mask[:, 0, :, :length].masked_fill_(allowed, 0.0)
        out = self.lm.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.mask_buf.fill_(self.neg)
        self.mask_buf[:, 0, 0, :length].masked_fill_(valid, 0.0)
        self.pos_buf.copy_(positions[:, -1:])
        return self._code_logits(out.last_hidden_state[:, -1])

    def _forward_step(self) -> torch.Tensor:
        out = self.lm.model(
            input_ids=self.token_buf,
            attention_mask=self.mask_buf,
            position_ids=self.pos_buf,
            past_key_values=self.cache,
            use_cache=True,
        )
        return self._code_logits(out.last_hidden_state[:, -1])

    def _capture(self, slot: int) -> None:
        # Warm-up on a side stream (as torch.cuda.graphs requires), capture, then rewind the cache's write
        # counters: warm-up wrote slot `slot`, which the first replay overwrites.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.graph_logits = self._forward_step()
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(slot)
        self.graph = graph

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed ``tokens`` ``(rows,)`` into cache slot ``slot``; returns the next ``(rows, codebook)`` logits."""
        self.token_buf.copy_(tokens.unsqueeze(1))
        self.pos_buf += 1
        self.mask_buf[:, 0, 0, slot] = 0.0
        if not self.use_graph:
            return self._forward_step()
        if self.graph is None:
            self._capture(slot)
        self.graph.replay()
        return self.graph_logits


class ImageGenerationEngine:
    """Generates Lumina-mGPT image token sequences from prompt ids with a static KV cache and batched CFG.

    Takes the causal LM (an object with ``.model``, a transformers ``ChameleonModel``, ``.lm_head``
    and ``.config``; LoRA layers, if any, injected in place) and the :class:`TokenVocab`. The model is
    put in eval mode and moved to ``device``/``dtype`` (default: its own device; bf16 on CUDA).
    ``cuda_graphs`` defaults to on for CUDA. ``max_batch`` caps the requests decoded together
    (larger calls are split). ``uncond_prefix`` is what precedes the image header in the
    unconditional row (empty, as in Lumina-mGPT). Decoders (cache + graph) are kept for the
    ``max_cached_decoders`` most recent shapes.
    """

    def __init__(
        self,
        lm: nn.Module,
        vocab: TokenVocab,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        length_bucket: int | None = None,
        max_batch: int = 16,
        max_cached_decoders: int = 2,
        uncond_prefix: Sequence[int] = (),
    ) -> None:
        first = next(lm.parameters())
        self.device = torch.device(device) if device is not None else first.device
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_cuda else first.dtype)
        self.lm = lm.to(device=self.device, dtype=self.dtype).eval()
        self.vocab = vocab
        self.code_ids = vocab.code_to_id.to(self.device)
        self.config = lm.config
        self.hidden_size = int(self.config.hidden_size)
        self.max_positions = int(self.config.max_position_embeddings)
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        # Padding batches to powers of two (CUDA): a few cached graphs then cover every batch size.
        self.bucket_rows = self.cuda_graphs
        # On CUDA, coarse buckets keep the number of captured graphs (one per shape) small.
        self.length_bucket = length_bucket or (64 if on_cuda else 8)
        self.max_batch = max_batch
        self.max_cached_decoders = max_cached_decoders
        self.uncond_prefix = list(uncond_prefix)
        self._decoders: OrderedDict[tuple[int, int], StaticKVDecoder] = OrderedDict()
        self.counters = DecodeCounters()

    def validate(self, request: GenerationRequest) -> ImageTokenLayout:
        """The request's layout, or :class:`GenerationRequestError` naming the bad field."""
        return validate_request(request, self.vocab, self.max_positions, self.hidden_size)

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | None]:
        """Generate every request; requests of one resolution share decode batches. Results in request order.

        A request that was cancelled (its ``cancel`` event set) before its result was ready gets ``None``.
        """
        layouts = [self.validate(r) for r in requests]
        seeds = [r.seed if r.seed is not None else random.SystemRandom().randrange(2**63) for r in requests]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, layout in enumerate(layouts):
            groups.setdefault((layout.h_latent, layout.w_latent), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                # Requests given up on before their batch starts take no row in it.
                live = [i for i in chunk if not requests[i].cancelled]
                self.counters.requests_dropped += len(chunk) - len(live)
                if not live:
                    self.counters.steps_skipped += layouts[chunk[0]].decode_steps
                    continue
                batch = [requests[i] for i in live]
                tokens = self._generate_batch(
                    batch,
                    [seeds[i] for i in live],
                    layouts[live[0]],
                    should_stop=lambda batch=batch: all(r.cancelled for r in batch),
                )
                for row, i in enumerate(live):
                    if tokens is None or requests[i].cancelled:
                        self.counters.requests_dropped += 1
                        continue
                    results[i] = GenerationResult(tokens=tokens[row], layout=layouts[i], seed=seeds[i])
        return results

    def _decoder(self, rows: int, cache_len: int) -> StaticKVDecoder:
        key = (rows, cache_len)
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key]
        while len(self._decoders) >= self.max_cached_decoders:
            self._decoders.popitem(last=False)
        decoder = StaticKVDecoder(self.lm, rows, cache_len, self.code_ids, self.dtype, self.cuda_graphs)
        self._decoders[key] = decoder
        return decoder

    def _prefill_inputs(
        self, requests: Sequence[GenerationRequest], layout: ImageTokenLayout, with_uncond: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded embeddings ``(R, L, hidden)``, validity ``(R, L)`` and position ids ``(R, L)``.

        Rows ``0..B-1`` are conditional, ``B..2B-1`` (when ``with_uncond``) unconditional.
        """
        header = layout.header
        seqs = [list(r.prompt_ids) + header for r in requests]
        if with_uncond:
            seqs += [self.uncond_prefix + header] * len(requests)
        length = _round_up(max(len(s) for s in seqs), self.length_bucket)
        ids = torch.full((len(seqs), length), self.vocab.pad, dtype=torch.long)
        valid = torch.zeros((len(seqs), length), dtype=torch.bool)
        for row, seq in enumerate(seqs):
            ids[row, length - len(seq) :] = torch.tensor(seq)
            valid[row, length - len(seq) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        embeds = self.lm.model.embed_tokens(ids)
        for row, request in enumerate(requests):
            if request.style_embeds is not None:
                style = request.style_embeds.to(self.device).unsqueeze(0)
                embeds[row : row + 1] = inject_style_tokens(
                    embeds[row : row + 1], ids[row : row + 1], style, self.vocab.style_placeholder
                )
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        return embeds, valid, positions

    def _generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        seeds: Sequence[int],
        layout: ImageTokenLayout,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> torch.Tensor | None:
        """Tokens ``(len(requests), num_tokens)`` on the CPU, or ``None`` once ``should_stop()`` says so.

        ``should_stop`` is asked before the prefill and before every decode step.
        """
        wanted = len(requests)
        if self.bucket_rows:
            # Round the batch up to a power of two with copies of the first request (dropped at the end):
            # a memory-bound decode step costs about the same, and a few cached graphs cover every batch size.
            target = 1 << (wanted - 1).bit_length()
            requests = list(requests) + [requests[0]] * (target - wanted)
            seeds = list(seeds) + [seeds[0]] * (target - wanted)
        batch = len(requests)
        with_uncond = any(r.cfg_scale != 1.0 for r in requests)
        embeds, valid, positions = self._prefill_inputs(requests, layout, with_uncond)
        prefix = embeds.shape[1]
        num_tokens = layout.num_tokens
        # Image positions 3..num_tokens-1 are chosen one per step; all but the last are fed back.
        decoder = self._decoder(embeds.shape[0], prefix + layout.decode_steps)
        sampling = BatchSampling.build(
            [r.cfg_scale for r in requests],
            [r.top_k for r in requests],
            [r.temperature for r in requests],
            seeds,
            self.vocab.codebook_size,
            self.device,
        )
        forced = layout.forced_tokens()
        out = torch.empty((batch, num_tokens), dtype=torch.long, device=self.device)
        out[:, :3] = torch.tensor(layout.header, device=self.device)
        full_steps = layout.decode_steps
        if should_stop():
            self.counters.steps_skipped += full_steps
            self.counters.batches_stopped += 1
            return None
        logits = decoder.prefill(embeds, valid, positions)
        for pos in range(3, num_tokens):
            done = pos - 3  # decode steps run so far in this batch
            if done and should_stop():
                self.counters.steps_skipped += full_steps - done
                self.counters.batches_stopped += 1
                return None
            if pos in forced:
                out[:, pos] = forced[pos]
            else:
                cond = logits[:batch]
                uncond = logits[batch:] if with_uncond else None
                codes = sample_codes(guided_logits(cond, uncond, sampling.cfg_scale), sampling)
                out[:, pos] = self.code_ids[codes]
            if pos == num_tokens - 1:
                break
            fed = out[:, pos].repeat(2) if with_uncond else out[:, pos]
            logits = decoder.step(fed, prefix + pos - 3)
            self.counters.steps += 1
        return out[:wanted].cpu()


def decode_images(vq: ChameleonVQGAN, layout: ImageTokenLayout, tokens: torch.Tensor) -> list[Image.Image]:
    """Token ids ``(B, num_tokens)`` of one layout -> RGB PIL images of the layout's pixel size.

    Raises :class:`LayoutError` if a sequence is not a well-formed image of ``layout``.
    """
    codes = layout.decode(tokens.cpu())
    with torch.inference_mode():
        return decode_to_images(vq, codes)
