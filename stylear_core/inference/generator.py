"""One front-end for image generation with a StyleAR model: the parts built once, the sequence in one place.

:class:`StyleARGenerator` builds, from a model block, an optional adapter directory and a device: the
backbone, the prompt tokenizer, the :class:`~stylear_core.inference.engine.ImageGenerationEngine`
(with the unconditional prefix of the tokenizer's template), the VQGAN and the style path (frozen CLIP
vision tower + resampler behind a :class:`~stylear_core.inference.style_request.ReferenceStyleEncoder`).
Every path that generates goes through it:

* :meth:`~StyleARGenerator.style`: prompts + style reference images + seeds -> image tokens
  (style tokens with their noise, the StyleAR prompt, the request, the engine);
* :meth:`~StyleARGenerator.text`: text-only prompts + seeds -> image tokens (the subject student);
* :meth:`~StyleARGenerator.decode`: image tokens -> images (the VQGAN);
* condition images (a depth map, or a photo through the optional depth estimator): ``conditions=`` of
  ``style`` / ``text``, :meth:`~StyleARGenerator.condition_tokens`, :meth:`~StyleARGenerator.condition_ids`
  (bytes, under the reference's limits): their tokens go where the prompt's ``<image>`` stands;
* for callers that batch and cancel requests themselves (the serving model): the prompt ids
  (:meth:`~StyleARGenerator.style_prompt_ids`, :meth:`~StyleARGenerator.text_prompt_ids`), the request
  (:meth:`~StyleARGenerator.request`) and :meth:`~StyleARGenerator.generate`.

An adapter reaches the backbone in one of two ways, chosen at construction:

* ``adapter_slot_rank=None``: the model is built as training builds it (``build_stylear_model``) and
  ``adapter_dir`` is loaded into it with peft (LoRA or full-backbone artefacts) -- evaluation,
  preference pairs, the subject student;
* ``adapter_slot_rank=r``: the bare backbone gets one LoRA slot of rank ``r``
  (:class:`~stylear_core.inference.adapters.AdapterSlot`) that adapters are copied into
  (:meth:`~StyleARGenerator.read_adapter`, :meth:`~StyleARGenerator.activate`); each adapter's
  resampler is a copy of the base one, passed per call -- the serving model, and the export parity
  gate that must check exactly what serving runs.

The sampling settings are one :class:`~stylear_core.inference.defaults.SamplingConfig`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from stylear_core.adapters.io import AdapterWeights, load_adapter, read_adapter_dir
from stylear_core.data.condition_tokens import splice_condition_tokens
from stylear_core.data.layout import ImageTokenLayout
from stylear_core.data.tokenizer import style_prompt_ids, text_prompt_ids, unconditional_prompt_ids
from stylear_core.devices import resolve_device
from stylear_core.inference.adapters import AdapterSlot
from stylear_core.inference.condition_request import ConditionEncoder
from stylear_core.inference.defaults import SamplingConfig
from stylear_core.inference.engine import (
    GenerationRequest,
    GenerationRequestError,
    GenerationResult,
    ImageGenerationEngine,
    decode_images,
)
from stylear_core.inference.style_request import ReferenceStyleEncoder
from stylear_core.models.depth import DepthEstimator
from stylear_core.models.presets import (
    ModelConfig,
    build_backbone,
    build_prompt_tokenizer,
    build_resampler,
    build_style_encoder,
    build_stylear_model,
    build_vqgan,
)
from stylear_core.models.resampler import load_image_proj
from stylear_core.models.stylear import StyleARModel


@dataclass
class GeneratedImages:
    """Image token sequences of one resolution: ``tokens`` ``(B, num_tokens)`` on the CPU, their ``layout``
    and the ``seeds`` they were sampled with."""

    tokens: torch.Tensor
    layout: ImageTokenLayout
    seeds: list[int]

    def codes(self) -> torch.Tensor:
        """The VQ code grids ``(B, h, w)`` the tokens carry."""
        return self.layout.decode(self.tokens)


@dataclass(eq=False)
class ServedAdapter:
    """An adapter read for the LoRA slot: its factors (on the generator's device) and its own resampler
    (a copy of the base resampler with the adapter's weights), if it brings one."""

    weights: AdapterWeights
    resampler: nn.Module | None


class StyleARGenerator:
    """A StyleAR model's generation parts, built once: ``style``, ``text`` and ``decode`` (module docstring).

    Takes the model block, an optional adapter directory, the device (``"auto"``: CUDA if present), and
    for the engine ``max_batch`` (requests decoded together), ``cuda_graphs`` (None: on for CUDA) and
    ``engine_dtype`` (None: the engine's choice, bf16 on CUDA). ``adapter_slot_rank`` picks how adapters
    attach (module docstring). ``masker`` (a SAM masker, optional) and ``reference_limits`` (keyword
    arguments of :class:`ReferenceStyleEncoder`: size limits, working side, SAM subtraction weights) set
    up the style path for reference bytes; condition-image bytes are decoded under the same limits.
    ``depth_estimator`` (optional) turns photos into depth-map conditions (``depth=True``).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        adapter_dir: str | Path | None = None,
        device: str | torch.device = "auto",
        *,
        adapter_slot_rank: int | None = None,
        max_batch: int = 16,
        cuda_graphs: bool | None = None,
        engine_dtype: torch.dtype | None = None,
        masker: object | None = None,
        reference_limits: Mapping[str, Any] | None = None,
        depth_estimator: DepthEstimator | None = None,
    ) -> None:
        if adapter_dir is not None and adapter_slot_rank is not None:
            raise ValueError("slot mode takes adapters through read_adapter / activate, not adapter_dir")
        self.model_cfg = model_cfg
        self.device = resolve_device(device)
        self.slot: AdapterSlot | None = None
        if adapter_slot_rank is None:
            model = build_stylear_model(model_cfg, self.device)
            if adapter_dir is not None:
                load_adapter(model, adapter_dir)
        else:
            backbone, vocab = build_backbone(model_cfg, self.device)
            self.slot = AdapterSlot(backbone, rank=adapter_slot_rank)
            encoder = build_style_encoder(model_cfg, self.device)
            resampler = build_resampler(model_cfg, encoder.width, backbone.config.hidden_size, self.device)
            model = StyleARModel(backbone, encoder, resampler, vocab)
        self.model = model.eval()
        self.vocab = model.vocab
        self.tokenizer = build_prompt_tokenizer(model_cfg, self.vocab)
        # Every path gives the unconditional CFG row the same prefix, taken from the tokenizer's template.
        self.engine = ImageGenerationEngine(
            model.backbone,
            self.vocab,
            device=self.device,
            dtype=engine_dtype,
            cuda_graphs=cuda_graphs,
            max_batch=max_batch,
            uncond_prefix=unconditional_prompt_ids(self.tokenizer),
        )
        self.vq = build_vqgan(model_cfg, self.vocab, self.device)
        self.references = ReferenceStyleEncoder(
            model.style_encoder, model.resampler, masker, **dict(reference_limits or {})
        )
        self.conditions = ConditionEncoder(self.vq, self.vocab, self.references.load, depth_estimator)

    @property
    def num_style_tokens(self) -> int:
        """Style tokens per prompt (= the resampler's queries)."""
        return self.model.num_style_tokens

    @property
    def image_size(self) -> int:
        """The model block's square image side, used when a call gives no height / width."""
        return self.model_cfg.image_size

    # --- adapters in the serving slot --------------------------------------------------------------

    def read_adapter(self, path: str | Path, name: str | None = None) -> ServedAdapter:
        """Read an adapter directory for the slot: its LoRA factors on this device and, when it has one, its
        resampler loaded into a copy of the base resampler (the base one is never changed)."""
        weights = read_adapter_dir(path, name).to(self.device)
        resampler = None
        if weights.resampler_state is not None:
            resampler = copy.deepcopy(self.model.resampler)
            load_image_proj(weights.resampler_state, resampler)
            resampler.eval()
        return ServedAdapter(weights=weights, resampler=resampler)

    def activate(self, adapter: ServedAdapter | None) -> None:
        """Copy ``adapter``'s factors into the LoRA slot (``None``: the base model), unless it is there
        already. Slot mode only; the adapter's resampler is passed per call (``resampler=``)."""
        if self.slot is None:
            raise RuntimeError("this generator loaded its adapter at construction; it has no LoRA slot")
        if self.slot.active != (adapter.weights.name if adapter is not None else None):
            self.slot.activate(adapter.weights if adapter is not None else None)

    def stylear_model(self, resampler: nn.Module | None = None) -> StyleARModel:
        """The parts as a :class:`StyleARModel` (sharing their weights), with ``resampler`` in place of the
        base one when given -- what training-side checks (the export probe) run on."""
        if resampler is None:
            return self.model
        return StyleARModel(self.model.backbone, self.model.style_encoder, resampler, self.vocab).eval()

    # --- the sequence, step by step -----------------------------------------------------------------

    def style_prompt_ids(
        self, prompt: str, height: int, width: int, condition: Sequence[int] | None = None
    ) -> list[int]:
        """The StyleAR prompt ids (one placeholder per style token), with a condition image's token ids
        (:meth:`condition_ids`) in the condition wording when given; :class:`GenerationRequestError` on
        ``prompt`` if the prompt cannot be worded so."""
        try:
            ids = style_prompt_ids(
                self.tokenizer, prompt, self.num_style_tokens, height, width, condition=condition is not None
            )
        except ValueError as e:
            raise GenerationRequestError("prompt", str(e)) from None
        return ids if condition is None else splice_condition_tokens(ids, condition, self.vocab)

    def text_prompt_ids(
        self, prompt: str, height: int, width: int, condition: Sequence[int] | None = None
    ) -> list[int]:
        """Lumina-mGPT's text-to-image prompt ids (no style tokens), with a condition image's token ids
        when given; :class:`GenerationRequestError` on ``prompt`` if the prompt cannot be worded so."""
        try:
            ids = text_prompt_ids(self.tokenizer, prompt, height, width, condition=condition is not None)
        except ValueError as e:
            raise GenerationRequestError("prompt", str(e)) from None
        return ids if condition is None else splice_condition_tokens(ids, condition, self.vocab)

    def condition_tokens(
        self, images: Sequence[Image.Image], height: int, width: int, depth: bool = False
    ) -> torch.Tensor:
        """Condition images -> token ids ``(B, num_tokens)`` at ``height x width`` (with ``depth``: the
        images' depth maps, from the depth estimator)."""
        return self.conditions.tokens(images, height, width, depth)

    def condition_ids(self, data: bytes, height: int, width: int, depth: bool = False) -> list[int]:
        """One condition image's bytes -> its token ids, decoded under the reference's limits
        (:class:`~stylear_core.inference.condition_request.ConditionImageError` if it does not decode)."""
        return self.conditions(data, height, width, depth)

    def style_tokens(
        self,
        references: Sequence[Image.Image],
        seeds: Sequence[int],
        noise_strength: float,
        resampler: nn.Module | None = None,
    ) -> torch.Tensor:
        """Style tokens ``(B, N, hidden)`` of prepared references, row ``b``'s noise drawn from ``seeds[b]``
        (one CLIP batch); ``resampler`` None: the base one (or the loaded adapter's)."""
        return self.references.style_tokens(
            list(references), [noise_strength] * len(seeds), list(seeds), resampler
        )

    def request(
        self,
        prompt_ids: Sequence[int],
        height: int,
        width: int,
        sampling: SamplingConfig,
        seed: int | None,
        style_embeds: torch.Tensor | None = None,
    ) -> GenerationRequest:
        """The engine request of one image (``seed`` None: the engine picks one and reports it)."""
        return GenerationRequest(
            prompt_ids=prompt_ids,
            height=height,
            width=width,
            style_embeds=style_embeds,
            cfg_scale=sampling.cfg_scale,
            top_k=sampling.top_k,
            temperature=sampling.temperature,
            seed=seed,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | None]:
        """Decode the requests with the engine (see :meth:`ImageGenerationEngine.generate`)."""
        return self.engine.generate(requests)

    # --- the sequence, whole ------------------------------------------------------------------------

    def style(
        self,
        prompts: Sequence[str],
        references: Sequence[Image.Image],
        seeds: Sequence[int],
        sampling: SamplingConfig,
        *,
        height: int | None = None,
        width: int | None = None,
        resampler: nn.Module | None = None,
        conditions: Sequence[Image.Image] | None = None,
        depth: bool = False,
    ) -> GeneratedImages:
        """Image ``i`` for ``prompts[i]`` in the style of ``references[i]``, sampled with ``seeds[i]`` (which
        also seeds its style noise), all at ``height`` x ``width`` (default: the model's image size);
        with ``conditions``, image ``i`` follows condition image ``conditions[i]`` (its depth map with
        ``depth``)."""
        if not len(prompts) == len(references) == len(seeds):
            raise ValueError(f"{len(prompts)} prompts, {len(references)} references, {len(seeds)} seeds")
        height, width = height or self.image_size, width or self.image_size
        tokens = self.style_tokens(references, seeds, sampling.noise_strength, resampler)
        condition = self._condition_rows(conditions, len(prompts), height, width, depth)
        ids: dict[str, list[int]] = {}
        requests = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            if condition[i] is not None:  # each row's own condition: its own prompt ids
                prompt_ids = self.style_prompt_ids(prompt, height, width, condition[i])
            else:
                if prompt not in ids:
                    ids[prompt] = self.style_prompt_ids(prompt, height, width)
                prompt_ids = ids[prompt]
            requests.append(self.request(prompt_ids, height, width, sampling, int(seed), tokens[i]))
        return self._run(requests)

    def text(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingConfig,
        *,
        height: int | None = None,
        width: int | None = None,
        conditions: Sequence[Image.Image] | None = None,
        depth: bool = False,
    ) -> GeneratedImages:
        """Image ``i`` for the text-only ``prompts[i]`` sampled with ``seeds[i]`` (no style tokens), following
        ``conditions[i]`` when given (as in :meth:`style`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        height, width = height or self.image_size, width or self.image_size
        condition = self._condition_rows(conditions, len(prompts), height, width, depth)
        requests = [
            self.request(self.text_prompt_ids(p, height, width, c), height, width, sampling, int(s))
            for p, s, c in zip(prompts, seeds, condition)
        ]
        return self._run(requests)

    def _condition_rows(
        self, conditions: Sequence[Image.Image] | None, rows: int, height: int, width: int, depth: bool
    ) -> list[list[int] | None]:
        if conditions is None:
            return [None] * rows
        if len(conditions) != rows:
            raise ValueError(f"{rows} prompts but {len(conditions)} condition images")
        return self.condition_tokens(conditions, height, width, depth).tolist()

    def _run(self, requests: list[GenerationRequest]) -> GeneratedImages:
        if not requests:
            raise ValueError("nothing to generate: no prompts")
        results = self.generate(requests)
        return GeneratedImages(
            tokens=torch.stack([r.tokens for r in results]),
            layout=results[0].layout,
            seeds=[r.seed for r in results],
        )

    def decode(self, tokens: torch.Tensor, layout: ImageTokenLayout) -> list[Image.Image]:
        """Image token ids ``(B, num_tokens)`` of ``layout`` -> RGB images (the VQGAN decode)."""
        return decode_images(self.vq, layout, tokens)


__all__ = ["GeneratedImages", "SamplingConfig", "ServedAdapter", "StyleARGenerator"]
