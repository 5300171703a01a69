"""A 2x (or s x) upscaling decoder head: the output conv makes ``3 * s**2`` channels, a depth-to-space makes pixels.

This is the layout of spacepxl's Wan2.1-VAE-upscale2x: a diffusers ``AutoencoderKLWan(out_channels=12)`` whose
decoded 12 channels are turned into a 2x larger RGB video by ``torch.nn.functional.pixel_shuffle`` (ComfyUI-VAE-
Utils applies it per frame after decoding). In that order output channel ``c * s**2 + i * s + j`` is sub-pixel
``(i, j)`` (row, column) of colour ``c``. diffusers' own ``unpatchify`` (Wan2.2's patchified output) reads the
sub-pixels transposed, ``c * s**2 + j * s + i``; ``order="unpatchify"`` selects it.

:func:`attach_upscale_head` swaps the decoder's output conv for a copy with ``3 * s**2`` output channels whose
weights replicate each colour's weights into its ``s**2`` sub-pixels, so at initialisation the upscaled output is
exactly the nearest-neighbour 2x of the original output; fine-tuning the decoder then learns the detail. The VAE
keeps its state-dict keys (only ``decoder.conv_out.*`` change shape), its diffusers config says
``out_channels = 3 * s**2`` so ``vae.save_pretrained`` writes a VAE that diffusers loads as such, and
:meth:`UpscaleHead.restore` puts the original conv and config back.

Decoding with the head yields ``B, 3 * s**2, T, H, W``; :meth:`UpscaleHead.apply` (or :func:`depth_to_space`)
turns it into ``B, 3, T, s*H, s*W``. Tiled decoding must blend tiles in the ``3 * s**2``-channel space and shuffle
once at the end (blending after the shuffle would mix sub-pixel phases at tile borders). Clamping commutes with the
shuffle (it only moves values), so clamping either side gives the same video.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from refdecoder.errors import ConfigError, InputError

__all__ = [
    "UpscaleConfig",
    "depth_to_space",
    "replicate_subpixels",
    "UpscaleHead",
    "attach_upscale_head",
]

logger = logging.getLogger("refdecoder")

Order = Literal["pixel_shuffle", "unpatchify"]
_ORDERS = ("pixel_shuffle", "unpatchify")


@dataclass
class UpscaleConfig:
    """Decoder output head (``factor == 1``: the backbone's own head, nothing attached).

    Attributes:
        factor: spatial upscaling s of the decoded video (spacepxl: 2).
        order: sub-pixel channel order, ``"pixel_shuffle"`` (spacepxl / ComfyUI) or ``"unpatchify"`` (diffusers).
        train_head: train (and save) the head conv even when the rest of the decoder stays frozen.
    """

    factor: int = 1
    order: Order = "pixel_shuffle"
    train_head: bool = True

    def __post_init__(self) -> None:
        if int(self.factor) != self.factor or self.factor < 1:
            raise ConfigError(f"upscale.factor must be an integer >= 1, got {self.factor}")
        self.factor = int(self.factor)
        if self.order not in _ORDERS:
            raise ConfigError(f"upscale.order must be one of {_ORDERS}, got {self.order!r}")


def depth_to_space(x: torch.Tensor, factor: int, order: Order = "pixel_shuffle") -> torch.Tensor:
    """Move ``factor**2`` channel groups into space.

    Args:
        x: ``B, C * s**2, T, H, W`` (video) or ``B, C * s**2, H, W`` (image), any range.
        factor: s.
        order: sub-pixel channel order (see the module docstring).

    Returns:
        ``B, C, T, s*H, s*W`` (or ``B, C, s*H, s*W``), same dtype; values are only moved.
    """
    if order not in _ORDERS:
        raise ConfigError(f"order must be one of {_ORDERS}, got {order!r}")
    if x.ndim not in (4, 5) or x.shape[1] % (factor * factor):
        raise InputError(
            f"depth_to_space expects B, C*{factor * factor}, [T,] H, W with channels divisible by "
            f"{factor * factor}, got shape {tuple(x.shape)}"
        )
    if factor == 1:
        return x
    image = x.ndim == 4
    if image:
        x = x.unsqueeze(2)
    b, cs, t, h, w = x.shape
    x = x.reshape(b, cs // (factor * factor), factor, factor, t, h, w)
    # Axes 2 and 3 are the outer and inner sub-pixel index; pixel_shuffle reads them as (row, column).
    rows, cols = (2, 3) if order == "pixel_shuffle" else (3, 2)
    x = x.permute(0, 1, 4, 5, rows, 6, cols).reshape(b, cs // (factor * factor), t, h * factor, w * factor)
    return x[:, :, 0] if image else x


def replicate_subpixels(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each output channel of a conv weight (``C_out, ...``) or bias (``C_out``) ``factor**2`` times.

    Channel ``c`` becomes channels ``c * s**2 ... c * s**2 + s**2 - 1``: all sub-pixels of colour ``c`` compute the
    same value, whichever sub-pixel order is used, so the shuffled output is a nearest-neighbour upsampling.
    """
    return tensor.repeat_interleave(factor * factor, dim=0)


def _resolve(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        getattr(parent, attr)
    except AttributeError as err:
        raise InputError(
            f"{type(root).__name__} has no module {dotted!r}; pass conv_name= with the path of its output conv"
        ) from err
    return parent, attr


class UpscaleHead:
    """Handle of an attached upscale head: the shuffle to apply after decoding, and how to undo the attachment.

    Not an ``nn.Module`` on purpose: the head conv lives inside the VAE (``<conv_name>``), where diffusers expects
    it; registering it here too would store it twice.

    Attributes:
        factor, order: the shuffle.
        conv: the head conv inside the VAE (``3 * s**2`` output channels).
        conv_name: its dotted path in the VAE, e.g. ``decoder.conv_out``.
    """

    def __init__(self, vae: nn.Module, conv_name: str, factor: int, order: Order, original: nn.Module) -> None:
        self.vae, self.conv_name, self.factor, self.order = vae, conv_name, factor, order
        self._original = [original]  # a list, so the original conv is never mistaken for a submodule anywhere
        self._attached = True

    @property
    def conv(self) -> nn.Module:
        parent, attr = _resolve(self.vae, self.conv_name)
        return getattr(parent, attr)

    def apply(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3 * s**2, T, H, W`` decoder output -> ``B, 3, T, s*H, s*W`` video (same range)."""
        return depth_to_space(video, self.factor, self.order)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size of the upscaled output for a decoder output of ``height x width``."""
        return height * self.factor, width * self.factor

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The head conv's parameters, named as in the VAE (``decoder.conv_out.weight``, ...)."""
        return [(f"{self.conv_name}.{n}", p) for n, p in self.conv.named_parameters()]

    def restore(self) -> nn.Module:
        """Put the original output conv (moved to the head's device and dtype) and config back; returns the VAE."""
        if not self._attached:
            return self.vae
        parent, attr = _resolve(self.vae, self.conv_name)
        head = getattr(parent, attr)
        original = self._original[0].to(device=head.weight.device, dtype=head.weight.dtype)
        setattr(parent, attr, original)
        _set_out_channels(self.vae, original.out_channels)
        self._attached = False
        return self.vae


def _set_out_channels(vae: nn.Module, channels: int) -> None:
    # diffusers builds decoder.conv_out from config.out_channels: keep it true so save/from_pretrained round-trip.
    config = getattr(vae, "config", None)
    if hasattr(vae, "register_to_config") and getattr(config, "out_channels", None) is not None:
        vae.register_to_config(out_channels=channels)


def attach_upscale_head(
    target: nn.Module,
    factor: int = 2,
    order: Order = "pixel_shuffle",
    conv_name: str = "decoder.conv_out",
    image_channels: int = 3,
) -> UpscaleHead:
    """Give a VAE's decoder an ``image_channels * factor**2``-channel output conv initialised as nearest 2x.

    Args:
        target: the VAE (e.g. diffusers ``AutoencoderKLWan``) or a ``RefDecoder`` (its ``vae`` is used).
        factor: spatial upscaling s.
        order: sub-pixel channel order of the output (see the module docstring).
        conv_name: dotted path of the decoder's output conv inside the VAE.
        image_channels: channels of the current output conv (3 for RGB).

    Returns:
        The :class:`UpscaleHead`; apply ``head.apply(decoded)`` after decoding, ``head.restore()`` to undo.
        The new conv keeps the old one's ``requires_grad`` flags, device and dtype.
    """
    UpscaleConfig(factor=factor, order=order)  # validates
    vae = getattr(target, "vae", target)
    parent, attr = _resolve(vae, conv_name)
    original = getattr(parent, attr)
    weight = getattr(original, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape[0] != image_channels:
        shape = None if weight is None else tuple(weight.shape)
        raise InputError(
            f"{conv_name} must be a conv with {image_channels} output channels, got weight shape {shape}; "
            "an upscale head is already attached or the decoder is not an RGB decoder"
        )
    head = copy.deepcopy(original)
    with torch.no_grad():
        head.weight = nn.Parameter(replicate_subpixels(weight, factor), requires_grad=weight.requires_grad)
        if getattr(original, "bias", None) is not None:
            bias = original.bias
            head.bias = nn.Parameter(replicate_subpixels(bias, factor), requires_grad=bias.requires_grad)
    head.out_channels = image_channels * factor * factor
    setattr(parent, attr, head)
    _set_out_channels(vae, head.out_channels)
    logger.debug("attached a %dx upscale head at %s (%d channels)", factor, conv_name, head.out_channels)
    return UpscaleHead(vae, conv_name, factor, order, original)
