"""Hook points of a decode and the per-decode context that the adapter's window loop hands them.

A backbone adapter drives its own decoder loop and, at named places, hands the current tensor to the hooks:

- ``latents``: the latent entering the decoder (after ``post_quant_conv`` for Wan), once per decode, before it is
  split into windows. Training-time components (token dropout, latent degradation, LMR) attach here.
- ``stage{i}``: the feature map entering up-sampling stage ``i``, once per window, together with the reference's
  features entering it. The reference-conditioning stage attaches here
  (:class:`refdecoder.conditioning.StageConditioner`: stage projector + shared transformer).

The reference travels through the adapter's window loop as a named value, ``reference``: None into stage 0 (the
hook supplies the tokenized reference there), then whatever the hook returned, carried through the stage by the
adapter's own reference branch (:meth:`~refdecoder.backbones.base.BackboneAdapter.conditioned_stage` does both), so
the hooks never call back into the adapter. The reference is not in the context: the model tokenizes it once per
decode into a :class:`~refdecoder.conditioning.ReferenceFeatures` that the conditioner it hands the loop holds. The
adapter never knows what is attached; it only calls :class:`DecodeHooks`. :class:`IdentityHooks` gives the plain
backbone decode through the same loop, which is what the identity tests compare against ``vae.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from refdecoder.errors import BackboneError

__all__ = ["DecodeContext", "DecodeHooks", "IdentityHooks", "check_stage_call", "plan_windows"]


@dataclass
class DecodeContext:
    """What the adapter's window loop and its hook points read during one decode.

    The loop (:meth:`~refdecoder.backbones.base.BackboneAdapter.iter_decode_windows`) sets ``window_index``,
    ``first_window`` and ``last_window`` before each window; the rest is set when the decode starts, except
    ``reference_branch_inputs``, which the adapter sets.

    Attributes:
        window_index: index of the window being decoded (0 holds latent frame 0).
        first_window: True while decoding the window that holds latent frame 0 (causal backbones decode its frame
            0 like an image).
        last_window: True while decoding the decode's last window.
        decode_inputs: the backbone's own extra decode inputs, keyed by the names in
            :attr:`~refdecoder.backbones.base.BackboneAdapter.decode_arguments` (LTX's ``temb``), as the adapter's
            :meth:`~refdecoder.backbones.base.BackboneAdapter.decode_inputs` checked them; empty for most backbones.
        reference_pixels: the ``B, 3, R, H, W`` pixel reference in [-1, 1], or None. Read only by adapters whose
            reference branch needs more than features (CogVideoX encodes it to the ``zq`` of its norms).
        reference_branch_inputs: what the adapter's reference branch
            (:meth:`~refdecoder.backbones.base.BackboneAdapter.run_stage_on_reference`) derives from
            ``reference_pixels`` beyond features, made by the adapter on first use and kept for the rest of the
            decode (every window and stage); its type is the adapter's to define and document (CogVideoX: the
            reference's own latent ``B, C, R, h, w``, the ``zq`` of its norms). None until then, and for adapters
            whose branch needs nothing more.
        generator: RNG of the training-time components at the ``latents`` hook (token dropout, degradation), for
            reproducible draws; None draws from torch's default generator.
        degradation_timestep: a fixed timestep for :class:`~refdecoder.blocks.LatentDegrader` (float or ``(B,)``
            tensor in [0, 1]) instead of its draw from ``t_range``; None draws.
    """

    window_index: int = 0
    first_window: bool = True
    last_window: bool = True
    decode_inputs: dict[str, Any] = field(default_factory=dict)
    reference_pixels: torch.Tensor | None = None
    reference_branch_inputs: Any = None
    generator: torch.Generator | None = None
    degradation_timestep: float | torch.Tensor | None = None


class DecodeHooks(Protocol):
    """What an adapter's decode loop calls at the hook points."""

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """``B, C, T, h, w`` decoder-input latent -> same shape."""
        ...

    def stage(
        self, index: int, x: torch.Tensor, reference: torch.Tensor | None, ctx: DecodeContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hook point before stage ``index`` of the current window.

        Args:
            index: the stage (``stage{index}``).
            x: ``B, C_i, t_i, h_i, w_i`` video features entering the stage.
            reference: ``B, C_i, R, h_i, w_i``, the reference's features entering the stage: None at stage 0 (the
                hooks supply the first stage's), later what the hook returned at the stage before, carried through
                that stage by the adapter's reference branch.
            ctx: the decode's context; always passed (its default only lets an adapter written for the old
                ``stage(index, x, ctx)`` get a one-line error from :func:`check_stage_call`).

        Returns:
            ``x`` after the hook (same shape), and the reference's features after it, for the adapter's reference
            branch to carry through stage ``index`` into the next (``B, C_i, R, h_i, w_i``); None when no later
            stage needs the reference (no reference, or past the last conditioned stage).
        """
        ...


def check_stage_call(reference: Any, ctx: DecodeContext | None) -> DecodeContext:
    """``ctx`` of a ``hooks.stage`` call, or a one-line :class:`~refdecoder.errors.BackboneError` for a call made
    as the old ``stage(index, x, ctx)`` (three arguments, one return value)."""
    if ctx is None or isinstance(reference, DecodeContext):
        raise BackboneError(
            "hooks.stage was called as stage(index, x, ctx); the hook is now stage(index, x, reference, ctx) -> "
            "(x, reference): in decode_window set reference = None before the stages and write h, reference = "
            "self.conditioned_stage(i, h, reference, hooks, ctx) before stage i (docs/backbones.md, section 4)"
        )
    return ctx


class IdentityHooks:
    """Hooks that change nothing: the adapter's loop then computes the backbone's own decode."""

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return x

    def stage(
        self, index: int, x: torch.Tensor, reference: torch.Tensor | None, ctx: DecodeContext | None = None
    ) -> tuple[torch.Tensor, None]:
        """``x`` unchanged, and no reference for the stages after (the plain decode has none)."""
        check_stage_call(reference, ctx)
        return x, None


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
