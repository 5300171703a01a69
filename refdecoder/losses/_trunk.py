"""ImageNet trunks of the perceptual losses: where their weights are looked for, and how they load, offline.

refdecoder never downloads weights. The trunks are torchvision's ImageNet checkpoints, found either at an
explicit path or in torch's hub cache (``torch.hub.get_dir()/checkpoints``), where torchvision itself would have
put them; a missing file is a :class:`CheckpointError` that says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from refdecoder.errors import CheckpointError, ConfigError

__all__ = ["TRUNK_FILES", "resolve_trunk_weights", "load_trunk_features", "load_strict", "VGGFeatures"]

logger = logging.getLogger("refdecoder.losses")

# File names torchvision gives its ImageNet checkpoints (the hash suffix is part of the name).
TRUNK_FILES: dict[str, str] = {
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
}

_VGG_CONVS_PER_BLOCK = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_VGG_WIDTHS = (64, 128, 256, 512, 512)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_trunk_weights(arch: str, path: str | Path | None = None) -> Path:
    """Return the file holding ``arch``'s ImageNet weights, or raise :class:`CheckpointError` naming what is missing.

    Args:
        arch: one of :data:`TRUNK_FILES` (``"vgg16"``, ``"vgg19"``, ``"alexnet"``).
        path: explicit checkpoint path; ``None`` looks in ``torch.hub.get_dir()/checkpoints``.

    Returns:
        The path of an existing file.
    """
    if arch not in TRUNK_FILES:
        raise ConfigError(f"unknown trunk {arch!r}; expected one of {sorted(TRUNK_FILES)}")
    filename = TRUNK_FILES[arch]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidate = Path(path).expanduser() if path is not None else hub_dir / filename
    if candidate.is_file():
        return candidate
    where = "the trunk_weights path given" if path is not None else "torch's hub cache (torch.hub.get_dir())"
    raise CheckpointError(
        f"ImageNet weights of the {arch} trunk not found: looked for {candidate} ({where}). refdecoder never "
        f"downloads weights. Copy torchvision's checkpoint {filename} to {hub_dir}/ or pass trunk_weights=<path>. "
        "pretrained_trunk=False builds a RANDOM trunk instead, which is only meaningful for tests."
    )


def load_trunk_features(path: Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision ImageNet checkpoint, keyed without the ``features.`` prefix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        raise CheckpointError(f"could not read trunk weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise CheckpointError(
            f"{path} holds no 'features.*' tensors; expected a torchvision VGG/AlexNet ImageNet checkpoint"
        )
    return features


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``module.load_state_dict(state, strict=True)`` with a :class:`CheckpointError` that names the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"trunk weights in {source} do not fit the {type(module).__name__} trunk: {err}"
        ) from err


class VGGFeatures(nn.Module):
    """Frozen VGG16/VGG19 convolutional trunk returning the last ReLU of each of its five blocks.

    The layer indices match torchvision's ``vgg*.features`` so its ImageNet checkpoints load as they are.
    Returned maps: relu1_2, relu2_2, relu3_3|4, relu4_3|4, relu5_3|4 (64, 128, 256, 512, 512 channels, at
    strides 1, 2, 4, 8, 16).

    Args:
        arch: ``"vgg19"`` (the FDL paper's trunk) or ``"vgg16"`` (the LPIPS trunk).
        pretrained: load ImageNet weights (see :func:`resolve_trunk_weights`); ``False`` keeps a random trunk,
            for tests only.
        weights: explicit checkpoint path, used when ``pretrained``.
    """

    def __init__(self, arch: str = "vgg19", pretrained: bool = True, weights: str | Path | None = None) -> None:
        super().__init__()
        if arch not in _VGG_CONVS_PER_BLOCK:
            raise ConfigError(f"VGGFeatures arch must be one of {sorted(_VGG_CONVS_PER_BLOCK)}, got {arch!r}")
        path = resolve_trunk_weights(arch, weights) if pretrained else None
        self.features, self.taps = _vgg_layers(_VGG_CONVS_PER_BLOCK[arch])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if path is not None:
            load_strict(self.features, load_trunk_features(path), path)
        else:
            logger.warning("VGGFeatures(%s) uses a RANDOM trunk (pretrained=False): only meaningful for tests", arch)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of images ``N, 3, H, W`` in ``[-1, 1]``; a list of five ``N, C_l, H_l, W_l`` tensors."""
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out


def _vgg_layers(convs_per_block: tuple[int, ...]) -> tuple[nn.Sequential, frozenset[int]]:
    # torchvision puts a max-pool after every block; the last one follows relu5 and is not needed, and dropping
    # it leaves every conv at torchvision's index.
    layers: list[nn.Module] = []
    taps = []
    in_ch = 3
    for block, (count, width) in enumerate(zip(convs_per_block, _VGG_WIDTHS)):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(count):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU()]
            in_ch = width
        taps.append(len(layers) - 1)
    return nn.Sequential(*layers), frozenset(taps)
