"""Which decoder stages a RefDecoder conditions, on which token patches, and what it does at the hook points.

:func:`stage_indices` and :func:`stage_patches` turn a config and the adapter's :class:`StageSpec` list into the
conditioned stages and their token patches; :class:`ReferenceHooks` is what an adapter's decode loop calls at the
``latents`` and ``stage{i}`` hook points: the latent components once per decode, and at each conditioned stage the
joint attention over ``[reference, video]`` features followed by the reference's pass through the stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from refdecoder.backbones.base import StageSpec
from refdecoder.config import RefDecoderConfig
from refdecoder.errors import ConfigError
from refdecoder.hooks import DecodeContext

if TYPE_CHECKING:
    from refdecoder.model import RefDecoder

__all__ = ["ReferenceHooks", "stage_indices", "stage_patches"]


class ReferenceHooks:
    """The hook-point behaviour of a RefDecoder (what the adapter's decode loop calls)."""

    def __init__(self, model: RefDecoder) -> None:
        # Made per decode, so no lasting cycle; a strong reference, because torch.compile cannot guard a proxy.
        self._model = model

    def latents(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        for component in self._model.latent_components.values():
            x = component(x, ctx)
        return x

    def stage(self, index: int, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        model = self._model
        if not ctx.has_reference or index > max(model.stage_indices):
            return x
        reference = ctx.reference_tokens if index == 0 else ctx.stage_reference
        name, r = f"stage{index}", ctx.num_reference
        if name in ctx.stage_reference_tokens:  # tokenizer.per_stage: the pixel reference's own tokens at this stage
            reference = reference + ctx.stage_reference_tokens[name].to(reference.dtype)
        if name in model.projectors:
            # Reference frames go first on the time axis, so they take RoPE time positions 0..R-1.
            projector, displacement = model.projectors[name], None
            if ctx.correspondence is not None:  # where each video token's content lies in the reference
                displacement = ctx.correspondence.stage(
                    index, x, projector.patch_size, ctx.window_index, ctx.first_window
                )
            joint = projector(torch.cat([reference.to(x.dtype), x], dim=2), model.transformer, r, displacement)
            reference, x = joint[:, :, :r], joint[:, :, r:]
        if index < max(model.stage_indices):
            ctx.stage_reference = model.adapter.run_stage_on_reference(index, reference, ctx)
        return x


def stage_indices(config: RefDecoderConfig, num_stages: int) -> tuple[int, ...]:
    """The conditioned stages (sorted): ``config.stages.indices``, or every one of the backbone's ``num_stages``."""
    indices = config.stages.indices if config.stages.indices is not None else tuple(range(num_stages))
    if any(not 0 <= i < num_stages for i in indices):
        raise ConfigError(f"stages.indices {indices} out of range: this backbone has stages 0..{num_stages - 1}")
    if config.stages.patch_sizes is not None and len(config.stages.patch_sizes) != len(indices):
        raise ConfigError(
            f"stages.patch_sizes needs one patch per conditioned stage ({len(indices)}), "
            f"got {len(config.stages.patch_sizes)}"
        )
    return tuple(sorted(indices))


def stage_patches(config: RefDecoderConfig, specs: list[StageSpec]) -> list[tuple[int, int, int]]:
    """Token patch of each conditioned stage: the config's, or the adapter's default times the multipliers."""
    stages = config.stages
    if stages.patch_sizes is not None:
        return list(stages.patch_sizes)
    if stages.patch_multipliers is None:
        return [spec.patch_size for spec in specs]
    if len(stages.patch_multipliers) != len(specs):
        raise ConfigError(
            f"stages.patch_multipliers needs one value per conditioned stage ({len(specs)}), "
            f"got {stages.patch_multipliers}"
        )
    return [(p[0], p[1] * m, p[2] * m) for p, m in zip((s.patch_size for s in specs), stages.patch_multipliers)]
