"""The slow reference decode the engine is checked against: no cache, no batching, unbatched CFG.

It does what Lumina-mGPT's ``generate`` with its logits processors does, in the plainest form:
every step runs the full causal LM over the whole sequence so far, once for the conditional
sequence and, when guided, once more for the unconditional one (which starts at the image-start
token), then applies the same sampling rules. Tests use it to prove the engine's cache, padding,
batching and forced tokens change nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from stylear_core.data.layout import TokenVocab
from stylear_core.inference.engine import GenerationRequest, validate_request
from stylear_core.inference.sampling import BatchSampling, guided_logits, sample_codes
from stylear_core.models.style_tokens import inject_style_tokens


def _last_logits(lm: nn.Module, ids: list[int], style: torch.Tensor | None, placeholder: int) -> torch.Tensor:
    device = next(lm.parameters()).device
    seq = torch.tensor([ids], device=device)
    embeds = lm.model.embed_tokens(seq)
    if style is not None:
        embeds = inject_style_tokens(embeds, seq, style.to(device).unsqueeze(0), placeholder)
    return lm(inputs_embeds=embeds).logits[:, -1].float()


@torch.inference_mode()
def reference_generate(
    lm: nn.Module, vocab: TokenVocab, request: GenerationRequest, uncond_prefix: tuple[int, ...] = ()
) -> torch.Tensor:
    """Generate one request the slow way; returns its image tokens ``(num_tokens,)`` on the CPU.

    ``request.seed`` must be set (the engine reports the seed it used).
    """
    cfg = lm.config
    layout = validate_request(request, vocab, int(cfg.max_position_embeddings), int(cfg.hidden_size))
    if request.seed is None:
        raise ValueError("the reference path needs an explicit seed")
    sampling = BatchSampling.build(
        [request.cfg_scale],
        [request.top_k],
        [request.temperature],
        [request.seed],
        vocab.codebook_size,
        next(lm.parameters()).device,
    )
    code_ids = vocab.code_to_id.to(next(lm.parameters()).device)
    forced = layout.forced_tokens()
    cond = list(request.prompt_ids) + layout.header
    uncond = list(uncond_prefix) + layout.header
    image = list(layout.header)
    for pos in range(3, layout.num_tokens):
        if pos in forced:
            token = forced[pos]
        else:
            logits = _last_logits(lm, cond, request.style_embeds, vocab.style_placeholder)[:, code_ids]
            uncond_logits = None
            if request.cfg_scale != 1.0:
                uncond_logits = _last_logits(lm, uncond, None, vocab.style_placeholder)[:, code_ids]
            code = sample_codes(guided_logits(logits, uncond_logits, sampling.cfg_scale), sampling)
            token = int(code_ids[code[0]])
        image.append(token)
        cond.append(token)
        uncond.append(token)
    return torch.tensor(image)
