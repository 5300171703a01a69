"""Loading a backbone VAE from a path, and RefDecoder weights on top of it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from refdecoder.backbones.registry import BackboneAdapter, find_backbone, get_backbone
from refdecoder.errors import CheckpointError

__all__ = ["Decoder", "DTYPES", "load_vae", "load_decoder"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


@dataclass
class Decoder:
    """A loaded VAE ready for streamed work: its backbone adapter and, when weights were given, the RefDecoder.

    Attributes:
        adapter: drives the plain backbone (encode, plain decode).
        model: the RefDecoder wrapping ``adapter.vae``, or None to decode with the base decoder only.
    """

    adapter: BackboneAdapter
    model: nn.Module | None = None

    @property
    def vae(self) -> nn.Module:
        """The backbone VAE."""
        return self.adapter.vae

    @property
    def conditioned(self) -> bool:
        """True when decoding goes through RefDecoder (a reference is used)."""
        return self.model is not None

    @property
    def main(self) -> nn.Module | BackboneAdapter:
        """What :func:`iter_decode` should decode with: the RefDecoder, or the plain adapter."""
        return self.model if self.model is not None else self.adapter


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a backbone VAE from a diffusers folder (``config.json`` with ``_class_name``) or a VideoVAE+ checkpoint.

    Args:
        path: a diffusers model folder (e.g. ``Wan2.1-I2V-14B-480P-Diffusers/vae``) or a ``.ckpt`` / ``.pt`` /
            ``.safetensors`` VideoVAE+ checkpoint.
        device: where to put it.
        dtype: its parameter dtype.

    Returns:
        The VAE in eval mode.

    Raises:
        CheckpointError: missing path, unknown folder layout, or weights that do not load.
    """
    path = Path(path)
    if path.is_dir():
        vae = _load_diffusers(path, dtype)
    elif path.is_file() and path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        from refdecoder.backbones.videovaeplus import VideoVAEPlus

        vae = VideoVAEPlus.from_checkpoint(path).to(dtype)
    elif path.exists():
        raise CheckpointError(
            f"--vae {path} is neither a diffusers folder nor a {'/'.join(_CHECKPOINT_SUFFIXES)} file"
        )
    else:
        raise CheckpointError(f"VAE not found: {path}")
    return vae.to(device).eval()


def _load_diffusers(folder: Path, dtype: torch.dtype) -> nn.Module:
    import diffusers

    config = folder / "config.json"
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{folder} is not a diffusers model folder (config.json with _class_name): {err}"
        ) from err
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"{config} names class {name!r}, which diffusers {diffusers.__version__} does not have")
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns at length without it.
        return cls.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load {name} from {folder}: {err}") from err


def load_decoder(
    vae: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    backbone: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Decoder:
    """Load a VAE and, with ``weights``, the RefDecoder saved by ``save_pretrained`` on top of it.

    Raises:
        CheckpointError: unreadable VAE or weights; ConfigError: weights made for another backbone;
        BackboneError: no adapter fits the VAE.
    """
    import refdecoder

    module = load_vae(vae, device, dtype)
    if weights is None:
        adapter_cls = get_backbone(backbone) if backbone else find_backbone(module)
        return Decoder(adapter_cls(module))
    model = refdecoder.load(module, weights, backbone=backbone).eval()
    return Decoder(model.adapter, model)
