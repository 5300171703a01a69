"""Checks at the public API boundary: shapes, ranges and frame counts, with messages that say how to fix them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from refdecoder.errors import CheckpointError, ConfigError, InputError, RefDecoderError
from refdecoder.frames import FrameRule

__all__ = [
    "check_latents",
    "check_video",
    "check_reference",
    "check_reference_index",
    "check_range",
    "check_latent_statistics",
    "check_window",
    "check_finite_weights",
    "FiniteOutput",
]

# References a little outside [-1, 1] come from resampling overshoot; anything beyond this margin is almost
# certainly the wrong range (e.g. [0, 255] pixels).
_RANGE_MARGIN = 0.25
logger = logging.getLogger("refdecoder")
_warned: set[bool] = set()  # the [0, 1] reference warning was given

# Raw latents of the supported VAEs are of order 1-10; a decode that overflows with latents beyond this was
# almost certainly given latents at the wrong scale.
_LATENT_SCALE_LIMIT = 1e3


def _has_values(x: torch.Tensor) -> bool:
    # Meta tensors (FLOP counting) have shapes but no values, so value checks must skip them.
    return x.device.type != "meta"


def _check_tensor(x: object, what: str, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor of layout {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_latents(latents: torch.Tensor, channels: int) -> None:
    """Raw VAE latents ``B, C, T, h, w`` with ``C == channels``, no empty axis and finite values."""
    _check_tensor(latents, "latents", "B, C, T, h, w")
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise InputError(
            f"latents must have shape (B, {channels}, T, h, w), got {tuple(latents.shape)}; "
            "pass raw latents as vae.decode takes them"
        )
    _check_not_empty(latents, "latents", "B, C, T, h, w")
    if _has_values(latents) and not torch.isfinite(latents).all():
        raise InputError("latents contain NaN or inf values; check the diffusion sampler or the de-normalisation")


def check_range(x: torch.Tensor, what: str) -> None:
    """Raise :class:`InputError` unless ``x`` is finite and within [-1, 1] (up to a small resampling overshoot)."""
    if not _has_values(x) or x.numel() == 0:
        return
    lo, hi = x.amin().item(), x.amax().item()
    if not (lo >= -1 - _RANGE_MARGIN and hi <= 1 + _RANGE_MARGIN):
        raise InputError(
            f"{what} values must lie in [-1, 1], got range [{lo:.3g}, {hi:.3g}]; "
            "convert pixels with x / 127.5 - 1 (uint8) or x * 2 - 1 ([0, 1] floats)"
        )
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contains NaN or inf values")


def check_video(video: torch.Tensor, frame_rule: FrameRule, spatial_factor: int, channels: int = 3) -> None:
    """Video ``B, channels, T, H, W`` in [-1, 1] with a frame count the backbone accepts and H, W divisible."""
    _check_tensor(video, "video", "B, 3, T, H, W")
    if video.ndim != 5 or video.shape[1] != channels:
        raise InputError(f"video must have shape (B, {channels}, T, H, W), got {tuple(video.shape)}")
    _check_not_empty(video, "video", "B, 3, T, H, W")
    frame_rule.check(video.shape[2])
    h, w = video.shape[-2:]
    if h % spatial_factor or w % spatial_factor:
        raise InputError(f"video height and width must be multiples of {spatial_factor}, got {h}x{w}")
    check_range(video, "video")


def check_pixel_channels(pixels: torch.Tensor, channels: int, backbone: str) -> None:
    """Raise :class:`InputError` unless ``B, C, ...`` media have the backbone's ``channels`` (media files are RGB)."""
    if pixels.ndim < 2 or pixels.shape[1] != channels:
        got = pixels.shape[1] if pixels.ndim >= 2 else "no"
        raise InputError(
            f"the {backbone} backbone takes {channels}-channel pixels, got {got}: media files are read as RGB, so an "
            f"RGBA VAE (Qwen-Image 2.1) decodes from the Python API with {channels}-channel videos and references"
        )


def check_reference(
    reference: torch.Tensor,
    batch: int,
    size: tuple[int, int],
    resize: bool = False,
    warn_range: bool = True,
    channels: int = 3,
) -> torch.Tensor:
    """Return the reference as ``B, channels, R, H, W`` in [-1, 1], matching the decoded size ``(H, W)``.

    ``channels``: the backbone's pixel channels (4 for an RGBA VAE: the reference is RGBA too).

    Accepts ``B, 3, H, W`` (one frame) or ``B, 3, R, H, W``; a batch of 1 is broadcast to ``batch``. A size
    mismatch is an error unless ``resize`` is set, in which case frames are resized (bilinear, antialiased). A
    reference without any negative value is legal but suspicious (a [0, 1] image passed as is): logged once per
    process as a warning, unless ``warn_range`` is False (for a reference the decode checks again).
    """
    _check_tensor(reference, "reference", "B, 3, R, H, W")
    given = tuple(reference.shape)
    if reference.ndim == 4:
        reference = reference.unsqueeze(2)
    if reference.ndim != 5 or reference.shape[1] != channels:
        hint = "; channels must come second (channels-last images: x.permute(0, 3, 1, 2))" if given[-1] == 3 else ""
        c = channels
        raise InputError(f"reference must have shape (B, {c}, H, W) or (B, {c}, R, H, W), got {given}{hint}")
    _check_not_empty(reference, "reference", "B, 3, R, H, W")
    if reference.shape[0] not in (1, batch):
        raise InputError(f"reference batch {reference.shape[0]} does not match the latents' batch {batch} (or 1)")
    if tuple(reference.shape[-2:]) != tuple(size):
        if not resize:
            raise InputError(
                f"reference frames are {reference.shape[-2]}x{reference.shape[-1]} but the decoded video is "
                f"{size[0]}x{size[1]}; resize the reference or pass resize_reference=True"
            )
        reference = _resize_frames(reference, size)
    check_range(reference, "reference")
    if warn_range and _has_values(reference) and reference.amin().item() >= 0 and not _warned:
        _warned.add(True)  # once per process: a training run must not repeat it every step
        logger.warning(
            "the reference has no negative values: is it in [0, 1] instead of [-1, 1]? (convert with x * 2 - 1); "
            "a very bright image is the other explanation"
        )
    return reference.expand(batch, *reference.shape[1:])


def _check_not_empty(x: torch.Tensor, what: str, layout: str) -> None:
    """An axis of size 0 (an empty batch, no frames, no pixels) is refused before any module sees it."""
    if 0 in x.shape:
        axes = [name for name, size in zip(layout.split(", "), x.shape) if size == 0]
        raise InputError(f"{what} of shape {tuple(x.shape)} ({layout}) is empty along {', '.join(axes)}")


def check_window(window: object) -> int:
    """A window of latent frames: an integer >= 1 (``ConfigError`` for ``1.5``, ``0``, ``True``, ``"4"``)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be an integer >= 1 (latent frames per decoder pass), got {window!r}")
    return window


def check_finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state`` that holds NaN or inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and _has_values(tensor) and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{where}: tensor {name} holds NaN or inf values; the checkpoint is damaged or was saved after a "
                "diverged step: use an earlier checkpoint"
            )


class FiniteOutput:
    """Whether every chunk of one decode was finite: accumulated on the device (no host sync per window) and
    checked once, when the decode ends, by :meth:`check`. Disabled (``enabled=False``) in training mode, where the
    recipe's non-finite guard skips such steps instead of stopping the run."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.finite: torch.Tensor | None = None

    def add(self, video: torch.Tensor) -> torch.Tensor:
        """Note ``video`` (before any clamp: a clamp turns inf into 1) and return it."""
        if self.enabled and _has_values(video):
            flag = torch.isfinite(video).all()
            self.finite = flag if self.finite is None else self.finite & flag
        return video

    def check(self, latents: torch.Tensor, parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise, naming the likely cause, when a chunk held NaN or inf: the latents' scale
        (:class:`InputError`), a weight (:class:`CheckpointError`) or the model itself."""
        if self.finite is None or bool(self.finite):
            return
        peak = latents.abs().amax().item()
        if peak > _LATENT_SCALE_LIMIT:
            raise InputError(
                f"the decoded video holds NaN or inf values: the latents reach {peak:.3g} in magnitude, raw VAE "
                "latents are of order 1-10; check their scale (de-normalised twice, or a scaling factor applied?)"
            )
        bad = next((name for name, p in parameters if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise CheckpointError(f"the decoded video holds NaN or inf values because weight {bad} does; reload it")
        raise RefDecoderError(
            "the decoded video holds NaN or inf values although the latents and weights are finite: the model "
            "overflowed (fp16? decode in bf16 or fp32)"
        )


def _resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, c, r = frames.shape[:3]
    flat = frames.transpose(1, 2).reshape(b * r, c, *frames.shape[-2:])
    flat = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return flat.reshape(b, r, c, *size).transpose(1, 2)


def check_reference_index(index: torch.Tensor | int, batch: int, frames: int) -> torch.Tensor:
    """Per-sample reference frame indices as a ``(B,)`` long tensor within ``[0, frames)``."""
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise InputError(f"reference_index needs one index per sample ({batch}), got {index.numel()}")
    if ((index < 0) | (index >= frames)).any():
        raise InputError(f"reference_index must lie in [0, {frames}), got {index.tolist()}")
    return index


def check_latent_statistics(adapter: object) -> None:
    """Raise :class:`ConfigError` when the backbone's latent (de-)normalisation does not fit its latent channels.

    Probed once with zeros of the latent shape on the meta device, so no backbone literal is needed here: a Wan
    VAE whose ``latents_mean`` / ``latents_std`` have another length than ``z_dim`` fails at ``wrap()`` rather than
    at the first ``denormalize``.
    """
    channels = adapter.latent_channels
    probe = torch.zeros(1, channels, 1, 1, 1, device="meta")
    try:
        shapes = {tuple(adapter.normalize(probe).shape), tuple(adapter.denormalize(probe).shape)}
    except RuntimeError as err:
        shapes = {" ".join(str(err).split())}
    if shapes != {tuple(probe.shape)}:
        raise ConfigError(
            f"the {adapter.name} VAE has {channels} latent channels, but its latent statistics (e.g. latents_mean / "
            f"latents_std in its config) do not have {channels} values ({shapes.pop()}); fix the VAE config"
        )
