"""Chameleon's VQGAN files (``vqgan.ckpt`` + ``vqgan.yaml``) read into :class:`~stylear_core.models.vqgan.ChameleonVQGAN`.

* ``vqgan.yaml``: :func:`vqgan_config_from_yaml` reads taming's ``model.params.{ddconfig, n_embed,
  embed_dim}`` into a :class:`~stylear_core.models.vqgan.VQGANConfig`; :func:`vqgan_config_to_yaml`
  writes one for VQGANs this project trains.
* ``vqgan.ckpt``: :func:`read_taming_state_dict` reads a taming (PyTorch Lightning) checkpoint with
  ``weights_only`` unpickling, or its safetensors conversion; :func:`load_chameleon_vqgan` checks every
  key and shape (:func:`check_state_dict`) and loads the weights into the model, whose ``state_dict``
  is the checkpoint layout, so no key converter is needed.
* The one-time conversion of a trusted pickled checkpoint to tensors only
  (:func:`convert_taming_checkpoint`), also as a command::

      python -m stylear_core.models.vqgan_checkpoint convert SRC.ckpt DST.safetensors
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from numpy._core.multiarray import _reconstruct as _np_reconstruct
from numpy._core.multiarray import scalar as _np_scalar
from torch import nn

from stylear_core.config import ConfigError, from_dict
from stylear_core.models.vqgan import ChameleonVQGAN, VQGANConfig, chameleon_vqgan_config

# ddconfig switches of taming's Encoder/Decoder that this module implements with one value only.
_TAMING_FIXED_DDCONFIG = {
    "double_z": False,
    "resamp_with_conv": True,
    "give_pre_end": False,
    "tanh_out": False,
    "use_linear_attn": False,
    "attn_type": "vanilla",
}


def vqgan_config_from_yaml(path: str | Path) -> VQGANConfig:
    """Read a taming ``vqgan.yaml`` (``model.params.{ddconfig, n_embed, embed_dim}``) into a :class:`VQGANConfig`.

    ``lossconfig``, ``ckpt_path`` and the training keys are ignored; a ddconfig switch this module
    does not implement (``double_z: true``, a ``remap`` file, linear attention, ...) is a ``ValueError``
    that names it.
    """
    data = yaml.safe_load(Path(path).read_text())
    try:
        params = data["model"]["params"]
        ddconfig = dict(params["ddconfig"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a taming VQModel config (expected model.params.ddconfig)") from None
    if params.get("remap") is not None:
        raise ValueError(f"{path}: model.params.remap is set; remapped codebooks are not supported")
    for key, supported in _TAMING_FIXED_DDCONFIG.items():
        if key in ddconfig and ddconfig.pop(key) != supported:
            raise ValueError(f"{path}: model.params.ddconfig.{key} must be {supported!r} for a VQGAN")
    for key in ("n_embed", "embed_dim"):
        if key not in params:
            raise ValueError(f"{path}: missing model.params.{key}")
        ddconfig[key] = params[key]
    try:
        return from_dict(VQGANConfig, ddconfig)
    except ConfigError as e:
        raise ConfigError(f"{path}: model.params.ddconfig: {e}") from None


def vqgan_config_to_yaml(config: VQGANConfig) -> str:
    """``config`` as a taming ``vqgan.yaml`` (``model.params.{ddconfig, n_embed, embed_dim}``): the inverse of
    :func:`vqgan_config_from_yaml`, for VQGANs this project trains (the miniature world's)."""
    ddconfig = {
        "double_z": False,
        "z_channels": config.z_channels,
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "out_ch": config.out_ch,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": list(config.attn_resolutions),
        "dropout": config.dropout,
    }
    params = {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": ddconfig}
    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}})


def _taming_safe_globals() -> list:
    """Harmless globals a (PyTorch Lightning) taming checkpoint may hold beside its tensors.

    Lightning writes ``hparams`` / ``hyper_parameters`` (``argparse.Namespace``, paths), callback
    state (paths, numpy scalars) and counters as numpy scalars. None of these run code when
    rebuilt, so ``weights_only`` loading may build them; anything else still fails.
    Numpy 1.x pickles its helpers under ``numpy.core``, numpy 2 under ``numpy._core``: both names are listed.
    """
    allowed: list = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        np.dtype,
        np.ndarray,
        _np_reconstruct,
        _np_scalar,
        (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_np_scalar, "numpy.core.multiarray.scalar"),
    ]
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64)
    allowed += [type(np.dtype(t)) for t in numeric]
    return allowed


def convert_command(ckpt_path: str | Path) -> str:
    """The one-time command that rewrites ``ckpt_path`` as a tensors-only safetensors file."""
    return f"python -m stylear_core.models.vqgan_checkpoint convert {ckpt_path} {Path(ckpt_path).with_suffix('.safetensors')}"


def read_taming_state_dict(ckpt_path: str | Path, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a taming checkpoint (``{"state_dict": ...}`` or a bare state dict), ``loss.*`` dropped.

    ``loss.*`` holds the training-only LPIPS network and discriminator. A ``.safetensors`` file is
    read as the state dict itself (see :func:`convert_taming_checkpoint`). A pickled checkpoint is
    read with ``weights_only`` unpickling that also allows the harmless non-tensor entries of a
    Lightning checkpoint (:func:`_taming_safe_globals`); any other object raises ``ValueError``
    naming it and the conversion command. ``weights_only=False`` unpickles arbitrary objects:
    only for checkpoints from a trusted source.
    """
    if Path(ckpt_path).suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(ckpt_path), device="cpu")
    else:
        try:
            with torch.serialization.safe_globals(_taming_safe_globals()):
                obj = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as e:
            try:
                unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt_path))
            except Exception:  # an unreadable file: torch's own message says why
                unsafe = str(e).splitlines()[0]
            raise ValueError(
                f"{ckpt_path}: holds objects that are not safe to unpickle ({unsafe}). If you trust the file, "
                f"convert it once to tensors only: {convert_command(ckpt_path)} (and point vqgan_ckpt at the "
                "result), or load it with weights_only=False"
            ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{ckpt_path}: expected a taming checkpoint {{'state_dict': {{name: tensor}}}}")
    return {k: v for k, v in obj.items() if not k.startswith("loss.")}


def convert_taming_checkpoint(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Rewrite a trusted taming checkpoint as a safetensors file of its model weights (``loss.*`` dropped).

    This unpickles ``ckpt_path`` with ``weights_only=False``: run it once, on a file you trust.
    The result loads with :func:`load_chameleon_vqgan` without any unpickling.
    """
    from safetensors.torch import save_file

    state_dict = read_taming_state_dict(ckpt_path, weights_only=False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_path))
    return out_path


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key (first few of each) of ``state_dict``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(v.shape)}, model {expected[k]})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{what} key(s): {', '.join(keys[:5])}{more}")
    if problems:
        raise ValueError("VQGAN checkpoint does not match the model: " + "; ".join(problems))


def load_chameleon_vqgan(
    ckpt_path: str | Path,
    yaml_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    weights_only: bool = True,
) -> ChameleonVQGAN:
    """Meta's ``vqgan.ckpt`` (+ ``vqgan.yaml``; Chameleon's sizes when omitted) -> a frozen :class:`ChameleonVQGAN`.

    Strict: every model key must be in the checkpoint with its shape and nothing else may be
    (``loss.*`` aside), else a ``ValueError`` names the keys. ``dtype`` None keeps the checkpoint's.
    """
    config = vqgan_config_from_yaml(yaml_path) if yaml_path is not None else chameleon_vqgan_config()
    state_dict = read_taming_state_dict(ckpt_path, weights_only=weights_only)
    with torch.device("meta"):
        model = ChameleonVQGAN(config)
    check_state_dict(model, state_dict)
    # assign=True adopts the loaded tensors: no second copy of the weights is allocated.
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


__all__ = [
    "check_state_dict",
    "convert_command",
    "convert_taming_checkpoint",
    "load_chameleon_vqgan",
    "read_taming_state_dict",
    "vqgan_config_from_yaml",
    "vqgan_config_to_yaml",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stylear_core.models.vqgan_checkpoint convert SRC.ckpt DST.safetensors``: the one-time conversion."""
    parser = argparse.ArgumentParser(prog="python -m stylear_core.models.vqgan_checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "convert", help="rewrite a trusted taming vqgan.ckpt as tensors-only safetensors"
    )
    convert.add_argument("src")
    convert.add_argument("dst")
    args = parser.parse_args(argv)
    out = convert_taming_checkpoint(args.src, args.dst)
    print(f"wrote {out}; set vqgan_ckpt: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
