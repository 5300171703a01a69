"""LPIPS (Zhang et al. 2018) on the ``lpips`` package, frozen, offline, for images and videos in ``[-1, 1]``.

The ``lpips`` package ships the calibrated linear layers, but its VGG16/AlexNet ImageNet trunk normally comes from
a torchvision download. Here the trunk is built randomly (``pnet_rand=True``, so nothing is fetched) and its
ImageNet weights are loaded from a local torchvision checkpoint (see :func:`resolve_trunk_weights`); a missing
file is an error, never a silent random trunk.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from refdecoder._deps import require
from refdecoder.errors import CheckpointError, ConfigError, InputError
from refdecoder.losses._inputs import as_video_pair, fold_frames
from refdecoder.losses._trunk import load_strict, load_trunk_features, resolve_trunk_weights

__all__ = ["LPIPS"]

logger = logging.getLogger("refdecoder.losses")

_TRUNKS = {"vgg": "vgg16", "alex": "alexnet"}
# Smallest frame side the trunk's pooling stack accepts (measured on the lpips networks).
_MIN_SIZE = {"vgg": 16, "alex": 31}


class LPIPS(nn.Module):
    """Frozen LPIPS distance between frames in ``[-1, 1]``.

    Args:
        net: trunk, ``"vgg"`` (the paper's training loss) or ``"alex"`` (the usual metric).
        pretrained_trunk: load the ImageNet trunk weights; ``False`` keeps a random trunk (tests only: the
            values then mean nothing perceptually). The calibrated linear layers always load.
        trunk_weights: path of torchvision's ImageNet checkpoint (``vgg16-397923af.pth`` or
            ``alexnet-owt-7be5be79.pth``); ``None`` looks in ``torch.hub.get_dir()/checkpoints``.

    Raises:
        CheckpointError: ``pretrained_trunk`` is set and the trunk weights are not found or do not fit.
    """

    def __init__(self, net: str = "vgg", pretrained_trunk: bool = True, trunk_weights: str | Path | None = None):
        super().__init__()
        if net not in _TRUNKS:
            raise ConfigError(f"LPIPS net must be one of {sorted(_TRUNKS)}, got {net!r}")
        if trunk_weights is not None and not pretrained_trunk:
            raise ConfigError("trunk_weights was given but pretrained_trunk=False; drop one of them")
        path = resolve_trunk_weights(_TRUNKS[net], trunk_weights) if pretrained_trunk else None
        self.net_name = net
        self.model = _build_lpips(net)
        if path is not None:
            _load_trunk(self.model.net, path)
        else:
            logger.warning("LPIPS(%s) uses a RANDOM trunk (pretrained_trunk=False): only meaningful for tests", net)
        self.model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Keep the wrapped network in eval mode (its linear layers carry dropout) whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """LPIPS distance of each frame of ``pred`` to the same frame of ``target``.

        Gradients flow to the inputs; the network itself is frozen. Frames of a video are folded into the batch.

        Args:
            pred: ``B, 3, H, W`` images or ``B, 3, T, H, W`` videos in ``[-1, 1]``.
            target: same shape and range as ``pred``.
            reduction: ``"mean"`` for a scalar (mean over samples and frames), ``"none"`` for per-sample ``(B,)``
                values for images and per-frame ``(B, T)`` values for videos.

        Returns:
            The distance, ``>= 0``, ``0`` for identical inputs.
        """
        if reduction not in ("mean", "none"):
            raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        is_video = isinstance(pred, torch.Tensor) and pred.ndim == 5
        pred5, target5 = as_video_pair(pred, target, "LPIPS")
        self._check_frames(pred5)
        values = self.model(fold_frames(pred5), fold_frames(target5)).reshape(pred5.shape[0], pred5.shape[2])
        if reduction == "mean":
            return values.mean()
        return values if is_video else values[:, 0]

    def _check_frames(self, video: torch.Tensor) -> None:
        h, w = video.shape[-2:]
        if video.shape[1] != 3 or min(h, w) < _MIN_SIZE[self.net_name]:
            raise InputError(
                f"LPIPS({self.net_name}) needs RGB frames of at least {_MIN_SIZE[self.net_name]} pixels a side, "
                f"got {video.shape[1]} channels at {h}x{w}"
            )


def _build_lpips(net: str) -> nn.Module:
    lpips = require("lpips", extra="train")
    # pnet_rand=True keeps torchvision from downloading the trunk; lpips prints on init and torchvision warns
    # about the deprecated `pretrained` argument lpips passes, neither of which a library should show.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    # lpips splits torchvision's `features` Sequential into slices but keeps each layer's original index as its
    # name ("slice2.5.weight" is "features.5.weight"), so the key map is a prefix swap.
    features = load_trunk_features(path)
    state = {key: features.get(key.split(".", 1)[1]) for key in trunk.state_dict()}
    missing = sorted(f"features.{key.split('.', 1)[1]}" for key, value in state.items() if value is None)
    if missing:
        raise CheckpointError(f"trunk weights in {path} lack {missing}; is it the right network's checkpoint?")
    load_strict(trunk, state, path)
