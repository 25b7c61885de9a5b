"""Image-token sampling: classifier-free guidance, image top-k, temperature, per-request seeds.

The rules follow Lumina-mGPT's logits processors: guidance ``uncond + scale * (cond - uncond)`` on
raw logits, then only VQ-code ids may be drawn at code positions (the layout writes the rest),
then top-k and temperature. Each request draws its noise from its own ``torch.Generator``, one
draw of ``codebook_size`` exponentials per code position, indexed by code, so which codes a
neighbour in the batch keeps (its top-k) cannot change this request's draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on ``(B, V)`` logits with one scale per row.

    Rows with scale 1 return ``cond`` bit for bit (``u + 1 * (c - u)`` would round differently).
    ``uncond=None`` means no unconditional branch was run, so ``cond`` is returned as it is.
    """
    if uncond is None:
        return cond
    scale = cfg_scale.to(cond.dtype).unsqueeze(-1)
    guided = uncond + scale * (cond - uncond)
    return torch.where(scale == 1.0, cond, guided)


def draw_exponential_noise(
    generators: Sequence[torch.Generator], width: int, device: torch.device
) -> torch.Tensor:
    """``(B, width)`` Exp(1) draws, row ``b`` from ``generators[b]`` (so rows do not share a stream)."""
    rows = [torch.empty(width, device=device).exponential_(generator=g) for g in generators]
    return torch.stack(rows)


@dataclass
class BatchSampling:
    """Per-row sampling settings of one decode batch, on the device, plus what the host needs to know.

    Built once per batch so the decode loop never reads a device tensor back (no sync per step).
    """

    cfg_scale: torch.Tensor  # (B,) float
    top_k: torch.Tensor  # (B,) long, clamped to [1, codebook]
    temperature: torch.Tensor  # (B,) float
    generators: list[torch.Generator]
    sampled_rows: list[int]  # rows that draw noise; the others are greedy
    sampled_index: torch.Tensor  # the same rows as a device tensor
    k_max: int

    @classmethod
    def build(
        cls,
        cfg_scale: Sequence[float],
        top_k: Sequence[int],
        temperature: Sequence[float],
        seeds: Sequence[int],
        codebook_size: int,
        device: torch.device | str,
    ) -> BatchSampling:
        """Settings for rows ``0..B-1``; ``top_k`` is clamped to ``[1, codebook_size]``."""
        k = [min(max(int(v), 1), codebook_size) for v in top_k]
        sampled = [b for b, (kb, t) in enumerate(zip(k, temperature)) if kb > 1 and t > 0]
        return cls(
            cfg_scale=torch.tensor(list(cfg_scale), dtype=torch.float32, device=device),
            top_k=torch.tensor(k, dtype=torch.long, device=device),
            temperature=torch.tensor(
                [t if t > 0 else 1.0 for t in temperature], dtype=torch.float32, device=device
            ),
            generators=[request_generator(int(s), device) for s in seeds],
            sampled_rows=sampled,
            sampled_index=torch.tensor(sampled, dtype=torch.long, device=device),
            k_max=max((k[b] for b in sampled), default=1),
        )


def sample_codes(code_logits: torch.Tensor, sampling: BatchSampling) -> torch.Tensor:
    """Draw one VQ code per row from ``(B, codebook)`` logits; returns ``(B,)`` code indices.

    A row with ``top_k == 1`` or ``temperature == 0`` is greedy (argmax; its generator is not
    advanced). Others keep every code whose logit is at least the k-th largest (ties at the
    boundary kept, as Lumina's top-k warper does), divide by the temperature, and pick
    ``argmax(logit / T - log E)`` with ``E ~ Exp(1)``: an exact sample from the softmax (the
    exponential-race form of the Gumbel-max trick).
    """
    logits = code_logits.float()
    choice = logits.argmax(dim=-1)
    rows = sampling.sampled_rows
    if not rows:
        return choice
    if len(rows) < logits.shape[0]:
        index = sampling.sampled_index
        sub, k, temp = logits[index], sampling.top_k[index], sampling.temperature[index]
    else:
        index, sub, k, temp = None, logits, sampling.top_k, sampling.temperature
    kth = sub.topk(sampling.k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    scaled = (sub / temp.unsqueeze(1)).masked_fill(sub < kth, float("-inf"))
    noise = draw_exponential_noise([sampling.generators[b] for b in rows], sub.shape[1], logits.device)
    drawn = (scaled - noise.log()).argmax(dim=-1)
    if index is None:
        return drawn
    return choice.index_copy(0, index, drawn)


def request_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one per request)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
