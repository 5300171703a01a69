"""Hook points of a decode and the per-decode context that components read.

A backbone adapter drives its own decoder loop and, at named places, hands the current tensor to the hooks:

- ``latents``: the latent entering the decoder (after ``post_quant_conv`` for Wan), once per decode, before it is
  split into windows. Training-time components (token dropout, latent degradation, LMR) attach here.
- ``stage{i}``: the feature map entering up-sampling stage ``i``, once per window. The reference-conditioning
  stage attaches here (stage projector + shared transformer).

Reference tokens are made once per decode before the loop starts (``DecodeContext.reference_tokens``), so they
need no hook point of their own.

The adapter never knows what is attached; it only calls :class:`DecodeHooks`. :class:`IdentityHooks` gives the
plain backbone decode through the same loop, which is what the identity tests compare against ``vae.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["DecodeContext", "DecodeHooks", "IdentityHooks", "plan_windows"]


@dataclass
class DecodeContext:
    """Per-decode state shared by the adapter's loop and the attached components.

    Attributes:
        reference_tokens: ``B, C0, R, h0, w0`` reference features at the first stage's resolution, or None.
        num_reference: R, the number of reference frames.
        stage_reference_tokens: ``tokenizer.per_stage``: each later conditioned stage's own tokens of the pixel
            reference (``B, Ci, R, hi, wi``), keyed ``stage{i}``, made once per decode like ``reference_tokens``.
        stage_reference: the reference features entering the current stage in the current window (the stage hook
            updates it after its joint attention and the adapter's spatial-only stage run).
        window_index: index of the window being decoded (0 holds latent frame 0).
        first_window: True while decoding the window that holds latent frame 0.
        generator: optional RNG for training-time components, for reproducible draws.
        extras: free slot for components that need more per-decode inputs (e.g. a degradation timestep).
        reference: the ``B, 3, R, H, W`` pixel reference the tokens were made from, or None; adapters whose stages
            need more than features derive their extra reference inputs from it (CogVideoX encodes it to a ``zq``).
        decode_inputs: the backbone's own extra decode inputs (LTX's ``temb``), as the adapter's
            :meth:`~refdecoder.backbones.base.BackboneAdapter.decode_inputs` checked them.
        adapter_state: the adapter's scratch space for this decode (e.g. a reference input derived once).
        correspondence: with correspondence-guided attention, the decode's
            :class:`~refdecoder.blocks.correspondence.CorrespondenceField` (where video content lies in the
            reference), else None.
    """

    reference_tokens: torch.Tensor | None = None
    num_reference: int = 0
    stage_reference_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_reference: torch.Tensor | None = None
    window_index: int = 0
    first_window: bool = True
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None
    decode_inputs: dict[str, Any] = field(default_factory=dict)
    adapter_state: dict[str, Any] = field(default_factory=dict)
    correspondence: Any = None

    @property
    def has_reference(self) -> bool:
        return self.reference_tokens is not None


class DecodeHooks(Protocol):
    """What an adapter's decode loop calls at the hook points."""

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """``B, C, T, h, w`` decoder-input latent -> same shape."""
        ...

    def stage(self, index: int, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """``B, C_i, t_i, h_i, w_i`` features entering stage ``index`` of the current window -> same shape."""
        ...


class IdentityHooks:
    """Hooks that change nothing: the adapter's loop then computes the backbone's own decode."""

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return x

    def stage(self, index: int, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return x


def plan_windows(num_latent_frames: int, first: int, later: int | None = None) -> list[tuple[int, int]]:
    """Split ``num_latent_frames`` into consecutive ``(start, stop)`` windows: ``first`` frames, then ``later``.

    The first window starts at latent frame 0, which causal backbones decode like an image; later windows continue
    from the caches the earlier ones left behind, so the split changes which frames attend to each other but
    never re-decodes a frame.
    """
    later = first if later is None else later
    if num_latent_frames < 1 or first < 1 or later < 1:
        raise ValueError(f"need >= 1 latent frame and windows >= 1, got {num_latent_frames=} {first=} {later=}")
    windows, start = [(0, min(first, num_latent_frames))], min(first, num_latent_frames)
    while start < num_latent_frames:
        windows.append((start, min(start + later, num_latent_frames)))
        start = windows[-1][1]
    return windows
