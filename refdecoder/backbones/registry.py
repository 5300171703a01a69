"""The backbone adapter contract and the registry that finds an adapter for a VAE.

An adapter knows one VAE family: where its decoder stages are, how its frames and latents are laid out, how to
encode, and how to run its decoder window by window while calling the hook points. The generic components never
contain a backbone literal; everything they need comes from here.

Registering::

    @register_backbone("my-vae")
    class MyAdapter(BackboneAdapter):
        ...

    register_backbone("my-vae", MyAdapter, override=True)  # call form, replacing an existing entry
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from refdecoder.errors import BackboneError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks, plan_windows

__all__ = [
    "StageSpec",
    "BackboneAdapter",
    "register_backbone",
    "get_backbone",
    "list_backbones",
    "find_backbone",
]

Patch = tuple[int, int, int]


@dataclass(frozen=True)
class StageSpec:
    """One decoder up-sampling stage that components can attach before.

    Attributes:
        name: hook point name, ``stage{i}``.
        module: dotted path of the stage module inside the VAE (e.g. ``decoder.up_blocks.0``), for humans and tools.
        channels: channels of the features entering the stage.
        scale: spatial down-sampling of those features relative to the decoded pixels (8 means H/8).
        patch_size: default token patch ``(t, h, w)`` that brings every stage to the same token grid.
        time_factor: how many frames the stage makes of each input frame (2 for Wan's temporal up-sampling).
    """

    name: str
    module: str
    channels: int
    scale: int
    patch_size: Patch
    time_factor: int = 1


class BackboneAdapter(abc.ABC):
    """Contract between a VAE family and the generic RefDecoder components.

    An instance wraps one VAE object; subclasses set the class attributes and implement the abstract methods.
    """

    name: ClassVar[str] = ""
    frame_rule: ClassVar[FrameRule]
    # True when latent frame 0 is decoded like an image and later frames are up-sampled in time (Wan); False for
    # backbones that up-sample every frame alike.
    causal_first_frame: ClassVar[bool] = True
    # Latent frames in the first decode window when the config does not say (the paper's chunk length).
    default_window: ClassVar[int] = 4

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def matches(cls, vae: nn.Module) -> bool:
        """True when this adapter can drive ``vae`` (used by ``wrap()`` auto-detection)."""

    @classmethod
    @abc.abstractmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A small randomly initialised VAE of this family, for tests and demos."""

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latents ``decode`` accepts."""

    @property
    @abc.abstractmethod
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W."""

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (after the first, for causal backbones)."""
        return self.frame_rule.step

    @abc.abstractmethod
    def stages(self) -> list[StageSpec]:
        """The decoder stages in call order (hook points ``stage0``, ``stage1``, ...)."""

    @property
    def reference_channels(self) -> int:
        """Channels the reference tokenizer must produce (those of the first stage)."""
        return self.stages()[0].channels

    @property
    def reference_scale(self) -> int:
        """Spatial down-sampling of the first stage, i.e. the reference tokenizer's patch size."""
        return self.stages()[0].scale

    def stage_frames(self, index: int, latent_frames: int, first_window: bool) -> int:
        """Frames entering stage ``index`` when a window of ``latent_frames`` latent frames is decoded."""
        frames = latent_frames
        for spec in self.stages()[:index]:
            if self.causal_first_frame and first_window:
                frames = 1 + spec.time_factor * (frames - 1)
            else:
                frames = spec.time_factor * frames
        return frames

    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """Latent-frame windows for one decode: ``window`` frames first, then windows of equal pixel length.

        With a causal first frame, latent frame 0 yields one pixel frame and every later one ``step`` frames, so a
        first window of W latent frames spans ``1 + step*(W-1)`` pixel frames and later windows of ``W - 1``
        latent frames span ``step*(W-1)``: every decoder pass (and so its memory and attention span) is the same
        size, e.g. 17 then 16 pixel frames for Wan with W = 5.
        """
        later = max(1, window - 1) if self.causal_first_frame else window
        return plan_windows(num_latent_frames, window, later)

    # --- encode / latent conventions ------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3, T, H, W`` video in [-1, 1] -> raw latents (posterior mode) ``B, C, t, h, w``."""

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the normalised latents diffusion models work in (identity if the family has none)."""
        return latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents -> raw latents that ``decode`` accepts (identity if none)."""
        return latents

    # --- decoding -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def iter_decode_windows(
        self, latents: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext, windows: list[tuple[int, int]]
    ) -> Iterator[torch.Tensor]:
        """Decode raw latents over ``windows`` (from :meth:`plan_windows`), yielding each window's pixel frames.

        Calls ``hooks`` at each hook point. Yields unclamped ``B, 3, t, H, W`` chunks in time order; only one
        window's activations are alive at a time, so a consumer that streams the chunks (e.g. to a video file)
        decodes any length in constant memory. Causal backbones carry their caches across windows.
        """

    def decode_windows(
        self, latents: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext, windows: list[tuple[int, int]]
    ) -> torch.Tensor:
        """:meth:`iter_decode_windows` collected into one unclamped video ``B, 3, T, H, W``."""
        video, filled = None, 0
        for part in self.iter_decode_windows(latents, hooks, ctx, windows):
            if video is None:
                # Filled window by window rather than concatenated at the end, which would hold the video twice.
                frames = self.frame_rule.pixel_frames(latents.shape[2])
                video = part.new_empty(*part.shape[:2], frames, *part.shape[3:])
            video[:, :, filled : filled + part.shape[2]] = part
            filled += part.shape[2]
        return video

    def compile_window(self, **options: Any) -> bool:
        """``torch.compile(**options)`` the per-window decoder pass in place; False when this adapter has none.

        A compiled pass must take the hooks as an argument (they are traced into its graph) and see inputs of the
        same shapes and strides in every window of one size, so that such windows reuse one graph.
        """
        return False

    @abc.abstractmethod
    def run_stage_on_reference(self, index: int, reference: torch.Tensor) -> torch.Tensor:
        """Push ``B, C_i, R, h_i, w_i`` reference features through stage ``index`` spatially only."""

    def plain_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The backbone's own decode of raw latents (what RefDecoder must equal at initialisation)."""
        return self.vae.decode(latents).sample

    # --- parameters -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the decoder side (what ``train_decoder`` unfreezes); names as in ``vae``."""


_REGISTRY: dict[str, type[BackboneAdapter]] = {}
A = TypeVar("A", bound=type[BackboneAdapter])


def register_backbone(
    name: str, adapter: type[BackboneAdapter] | None = None, *, override: bool = False
) -> Callable[[A], A] | type[BackboneAdapter]:
    """Register an adapter class under ``name``; usable as ``@register_backbone("x")`` or as a call."""

    def _register(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, BackboneAdapter)):
            raise BackboneError(f"backbone {name!r} must be a BackboneAdapter subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not override:
            raise BackboneError(
                f"backbone {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                "pass override=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return _register(adapter) if adapter is not None else _register


def _ensure_builtins() -> None:
    # Built-in adapters register on import; importing them here (not at package import) keeps
    # `import refdecoder` light, since their modules may need diffusers.
    import refdecoder.backbones.videovaeplus  # noqa: F401
    import refdecoder.backbones.wan  # noqa: F401


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_backbone(name: str) -> type[BackboneAdapter]:
    """The adapter class registered under ``name``."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; registered backbones: {sorted(_REGISTRY)}") from None


def find_backbone(vae: nn.Module) -> type[BackboneAdapter]:
    """The single registered adapter whose ``matches(vae)`` is true."""
    _ensure_builtins()
    found = [cls for cls in _REGISTRY.values() if cls.matches(vae)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise BackboneError(
            f"no registered backbone adapter matches a {type(vae).__name__}; registered: {sorted(_REGISTRY)}. "
            "Pass backbone='<name>' or register an adapter with refdecoder.register_backbone"
        )
    raise BackboneError(
        f"several backbones match a {type(vae).__name__}: {sorted(c.name for c in found)}; pass backbone='<name>'"
    )
