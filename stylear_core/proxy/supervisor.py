"""The Proxy-Tuning supervisor after stage 1: the tuned subjects and one pipeline that samples them all.

* :class:`TunedSubject` / :func:`tuned_subjects`: the subjects with a finished stage-1 DreamBooth LoRA
  (identifier, class noun, instance images, the base it was trained on);
* :class:`SupervisorConfig` / :func:`resolve_supervisor`: the supervisor pipeline and how it samples,
  its base taken from the subjects' LoRAs unless set;
* :class:`SupervisorSampler`: one supervisor pipeline with every subject's LoRA as a named adapter,
  ``activate(subject)`` then ``generate(prompts, seeds)``. Proxy data (stage 2) and subject
  evaluation both sample the supervisor through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from stylear_core.config import ConfigError, option
from stylear_core.devices import resolve_device
from stylear_core.proxy.dreambooth import LORA_FORMAT
from stylear_core.proxy.families import DTYPES, LORA_WEIGHT_NAME, load_supervisor
from stylear_core.proxy.subjects import SubjectSet, SubjectSetError
from stylear_core.runs import is_complete, read_manifest


@dataclass
class SupervisorConfig:
    """The supervisor pipeline and how it samples (its preset and weights default to stage 1's)."""

    preset: str = option("", "sdxl or sd3; '' = the preset stage 1 trained")
    pretrained_dir: str = option("", "local diffusers pipeline dir; '' = the one stage 1 trained on")
    resolution: int = option(1024, "generated image side in pixels")
    num_inference_steps: int = option(30, "denoising steps")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    dtype: str = option("float32", "pipeline dtype", choices=tuple(DTYPES))
    device: str = option("", "torch device (empty: cuda when visible, else cpu)")


@dataclass(frozen=True)
class TunedSubject:
    """A subject with its stage-1 supervisor LoRA: ``name``, ``identifier``, ``class_noun``, ``lora_dir``,
    the instance image files, and the supervisor ``preset`` / ``pretrained_dir`` the LoRA was trained on."""

    name: str
    identifier: str
    class_noun: str
    lora_dir: str
    image_paths: tuple[str, ...]
    preset: str
    pretrained_dir: str

    def without_identifier(self, prompt: str) -> str:
        """``prompt`` with the identifier word removed (what a base CLIP can score for prompt adherence)."""
        return SubjectSet(self.name, self.class_noun, self.identifier, (), Path(".")).without_identifier(
            prompt
        )

    def entry(self) -> dict[str, str]:
        """``{"name", "identifier", "class_noun"}``: the subject as adapter manifests list it."""
        return {"name": self.name, "identifier": self.identifier, "class_noun": self.class_noun}


def tuned_subjects(
    dreambooth_dir: str | Path, subjects_dir: str | Path, names: Sequence[str] | None = None
) -> list[TunedSubject]:
    """Every subject with a complete stage-1 LoRA under ``dreambooth_dir`` (only ``names`` when given), by name.

    The identifier and class noun are the ones the LoRA was trained with (its manifest); the instance
    images are read from ``subjects_dir/<name>``. Raises :class:`SubjectSetError` for a requested
    subject without a finished LoRA, or when no subject is found.
    """
    root = Path(dreambooth_dir)
    found = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p, LORA_FORMAT))
        if root.is_dir()
        else []
    )
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise SubjectSetError(
                f"{root}: no finished DreamBooth LoRA for subject(s) {missing} (found: {found})"
            )
        found = [n for n in found if n in set(names)]
    if not found:
        raise SubjectSetError(f"{root}: no finished DreamBooth LoRA (run stage 1, jobs.dreambooth, first)")
    subjects = []
    for name in found:
        manifest = read_manifest(root / name) or {}
        subject = SubjectSet.from_folder(Path(subjects_dir) / name, identifier=manifest["identifier"])
        subjects.append(
            TunedSubject(
                name=name,
                identifier=subject.identifier,
                class_noun=manifest.get("class_noun", subject.class_noun),
                lora_dir=str((root / name).resolve()),
                image_paths=tuple(str(p.resolve()) for p in subject.image_paths),
                preset=manifest["preset"],
                pretrained_dir=manifest["pretrained_dir"],
            )
        )
    return subjects


def resolve_supervisor(cfg: SupervisorConfig, subjects: Sequence[TunedSubject]) -> SupervisorConfig:
    """``cfg`` with an empty preset / pretrained_dir taken from the subjects' LoRAs, which must share one base."""
    bases = sorted({(s.preset, s.pretrained_dir) for s in subjects})
    if (not cfg.preset or not cfg.pretrained_dir) and len(bases) > 1:
        raise ConfigError(f"supervisor: the subjects' LoRAs were trained on different bases {bases}; set one")
    preset, pretrained = bases[0]
    return replace(cfg, preset=cfg.preset or preset, pretrained_dir=cfg.pretrained_dir or pretrained)


class SupervisorSampler:
    """One supervisor pipeline with many subjects' stage-1 LoRAs: ``activate(subject)``, then ``generate``.

    Takes the resolved :class:`SupervisorConfig` and ``{subject: lora_dir}``. Each LoRA is loaded on first
    use as a diffusers adapter named after the subject and switched on alone with ``set_adapters``; the
    base weights are loaded once and never reloaded (the same images as ``load_supervisor(...,
    lora_dir=...)`` of that one subject).
    """

    def __init__(self, cfg: SupervisorConfig, loras: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.loras = dict(loras)
        self.device = resolve_device(cfg.device)
        self.pipe = load_supervisor(cfg.preset, cfg.pretrained_dir, self.device, DTYPES[cfg.dtype])
        self.loaded: set[str] = set()

    def activate(self, subject: str) -> None:
        """Load ``subject``'s LoRA (once) and make it the only active adapter."""
        if subject not in self.loras:
            raise KeyError(f"no supervisor LoRA for subject {subject!r} (have {sorted(self.loras)})")
        if subject not in self.loaded:
            self.pipe.load_lora_weights(
                self.loras[subject], weight_name=LORA_WEIGHT_NAME, adapter_name=subject
            )
            self.loaded.add(subject)
        self.pipe.set_adapters([subject])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One image per prompt from the active subject's supervisor, image ``i`` drawn with seed ``seeds[i]``."""
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return self.pipe(
            prompt=list(prompts),
            height=self.cfg.resolution,
            width=self.cfg.resolution,
            num_inference_steps=self.cfg.num_inference_steps,
            guidance_scale=self.cfg.guidance_scale,
            generator=generators,
        ).images


__all__ = [
    "SupervisorConfig",
    "SupervisorSampler",
    "TunedSubject",
    "resolve_supervisor",
    "tuned_subjects",
]
