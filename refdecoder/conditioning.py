"""What a RefDecoder does at a decode's hook points: the reference, tokenized once, meets the video at each stage.

``RefDecoder.decode`` makes two values before the adapter's window loop starts and hands the second to it:

- :class:`ReferenceFeatures` (frozen): the pixel reference tokenized once per decode, by the first stage's
  tokenizer and, with ``tokenizer.per_stage``, by each later conditioned stage's own;
- :class:`StageConditioner`: the :class:`~refdecoder.hooks.DecodeHooks` the adapter calls. It holds the model's
  stage modules and those features, never the model nor the adapter.

In each window the adapter's loop calls ``stage(i, x, reference, ctx)`` before up-sampling stage ``i``, with
``reference`` the reference's features entering stage ``i`` (None at stage 0). The conditioner starts the reference
at stage 0 with the tokenizer's features, adds stage ``i``'s own tokens of the pixels (per-stage tokenizers), runs
the joint attention over ``[reference, video]`` when stage ``i`` is conditioned
(:class:`~refdecoder.blocks.StageProjector` around the :class:`~refdecoder.blocks.SharedTransformer`) and returns the
video features and the reference's. The adapter's loop carries the reference through stage ``i`` spatially with its
own reference branch (:meth:`~refdecoder.backbones.base.BackboneAdapter.run_stage_on_reference`) into stage
``i + 1``; the conditioner never holds or calls the adapter. After the last conditioned stage it returns no
reference, and the loop stops carrying one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from refdecoder.blocks.sub_token_shift import remainder_in_cells, shift_features
from refdecoder.errors import BackboneError
from refdecoder.hooks import DecodeContext, check_stage_call

if TYPE_CHECKING:
    from refdecoder.blocks import CorrespondenceField, ReferenceTokenizer, SharedTransformer, StageProjector

__all__ = ["ReferenceFeatures", "StageConditioner"]


@dataclass(frozen=True)
class ReferenceFeatures:
    """One decode's reference and its tokenized features, made once before the window loop.

    Attributes:
        pixels: ``B, P, R, H, W`` in [-1, 1] at the decoded size, ``P`` the adapter's ``pixel_channels`` (3: RGB).
        first_stage: ``B, C_0, R, h_0, w_0``, the tokenizer's features on the first stage's grid (what stage 0's
            joint attention takes as the reference).
        per_stage: ``tokenizer.per_stage``: each later conditioned stage's own features of ``pixels``,
            ``B, C_i, R, h_i, w_i``, keyed ``stage{i}`` (added to what reaches that stage); empty without it.
    """

    pixels: torch.Tensor
    first_stage: torch.Tensor
    per_stage: Mapping[str, torch.Tensor]

    @property
    def num_frames(self) -> int:
        """R, the number of reference frames."""
        return self.pixels.shape[2]

    @classmethod
    def tokenize(
        cls, pixels: torch.Tensor, tokenizer: ReferenceTokenizer, stage_tokenizers: Mapping[str, ReferenceTokenizer]
    ) -> ReferenceFeatures:
        """Tokenize ``B, P, R, H, W`` pixels with the first stage's tokenizer and the per-stage ones (keyed
        ``stage{i}``), each in its weights' dtype."""

        def features(module: ReferenceTokenizer) -> torch.Tensor:
            return module(pixels.to(module.proj.weight.dtype))

        return cls(pixels, features(tokenizer), {name: features(t) for name, t in stage_tokenizers.items()})


class StageConditioner:
    """The hook points of a reference-conditioned decode (a :class:`~refdecoder.hooks.DecodeHooks`).

    Made per decode. Stage modules are keyed by hook point name (``stage{i}``).

    Args:
        latent_components: training-time modules applied in order at the ``latents`` hook (identity in eval).
        projectors: the conditioned stages' :class:`~refdecoder.blocks.StageProjector`.
        transformer: the shared transformer of the joint attention.
        last_stage: index of the last conditioned stage; the reference stops there.
        reference_features: the decode's tokenized reference, or None for the plain decode at every stage.
        correspondence: where video content lies in the reference (correspondence-guided attention), or None.
    """

    def __init__(
        self,
        latent_components: Mapping[str, nn.Module],
        projectors: Mapping[str, StageProjector],
        transformer: SharedTransformer,
        last_stage: int,
        reference_features: ReferenceFeatures | None,
        correspondence: CorrespondenceField | None,
    ) -> None:
        self.latent_components, self.projectors, self.transformer = latent_components, projectors, transformer
        self.last_stage, self.reference_features, self.correspondence = last_stage, reference_features, correspondence

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """``B, C, T, h, w`` decoder-input latent through the latent components."""
        for component in self.latent_components.values():
            x = component(x, ctx)
        return x

    def stage(
        self, index: int, x: torch.Tensor, reference: torch.Tensor | None, ctx: DecodeContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``index``'s hook point (see :meth:`~refdecoder.hooks.DecodeHooks.stage`).

        ``x``: ``B, C_i, t_i, h_i, w_i`` video features entering the stage; ``reference``: the reference's
        ``B, C_i, R, h_i, w_i`` features entering it (None at stage 0, where the tokenizer's are taken). Returns
        ``x`` after the joint attention and the reference's features after it, or None from the last conditioned
        stage on (and without a reference).
        """
        ctx = check_stage_call(reference, ctx)
        if self.reference_features is None or index > self.last_stage:
            return x, None
        name, tokenized = f"stage{index}", self.reference_features
        features = self._entering(index, reference)
        if name in tokenized.per_stage:  # tokenizer.per_stage: the pixels' own features at this stage
            features = features + tokenized.per_stage[name].to(features.dtype)
        if name in self.projectors:
            features, x = self._joint_attention(index, self.projectors[name], features, x, ctx)
        return x, (features if index < self.last_stage else None)

    def _entering(self, index: int, reference: torch.Tensor | None) -> torch.Tensor:
        """The reference's features entering stage ``index``: the tokenizer's at stage 0, else what the loop carried
        (a one-line error when the loop carried none, or handed stage 0 one)."""
        if (index == 0) != (reference is None):
            carried = "was handed reference features" if index == 0 else "got no reference features"
            raise BackboneError(
                f"hooks.stage({index}) {carried}: decode_window must start each window with reference = None and "
                "carry what each stage hook returns through self.run_stage_on_reference into the next stage "
                "(h, reference = self.conditioned_stage(i, h, reference, hooks, ctx))"
            )
        return self.reference_features.first_stage if index == 0 else reference

    def _joint_attention(
        self, index: int, projector: StageProjector, features: torch.Tensor, x: torch.Tensor, ctx: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``B, C, R, h, w`` reference and ``B, C, t, h, w`` video features of stage ``index`` attended jointly.

        Reference frames go first on the time axis, so they take RoPE time positions ``0..R-1``.
        """
        num_frames, displacement, shift = self.reference_features.num_frames, None, None
        field, stage_args = self.correspondence, (index, x, projector.patch_size, ctx.window_index, ctx.first_window)
        if field is not None and field.sub_token_shift:
            displacement, remainder = field.stage_split(*stage_args)
            shift = remainder_in_cells(remainder[:, 0], projector.patch_size, x.shape[-2:])
            if shift.device.type != "meta" and not shift.any():  # every token whole: the stage as without
                shift = None
        elif field is not None:  # where each video token's content lies in the reference
            displacement = field.stage(*stage_args)
        # Moved by the remainder, each video token shows its content where the gathered reference token does.
        video = x if shift is None else shift_features(x, -shift, "nearest")
        joint = projector(torch.cat([features.to(x.dtype), video], dim=2), self.transformer, num_frames, displacement)
        reference_out, video_out = joint[:, :, :num_frames], joint[:, :, num_frames:]
        if shift is not None:  # the update back onto the frame's own grid; the skip path is never moved
            video_out = (
                x + shift_features(video_out - video, shift, "nearest")
                if projector.residual
                else shift_features(video_out, shift, "nearest")
            )
        return reference_out, video_out
