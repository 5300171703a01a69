"""Which decoder stages a RefDecoder conditions, on which token patches, and the modules that condition them.

:func:`stage_indices` and :func:`stage_patches` turn a config and the adapter's :class:`StageSpec` list into the
conditioned stages and their token patches; :func:`build_stage_modules` builds the reference tokenizers, the shared
transformer and the stage projectors from them (what :class:`~refdecoder.conditioning.StageConditioner` runs at
the hook points); :func:`largest_stage_token_count` says how many tokens the largest stage attends over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from refdecoder.backbones.base import BackboneAdapter, StageSpec
from refdecoder.blocks import ReferenceTokenizer, SharedTransformer, StageProjector
from refdecoder.config import RefDecoderConfig
from refdecoder.errors import ConfigError

__all__ = ["StageModules", "build_stage_modules", "largest_stage_token_count", "stage_indices", "stage_patches"]


@dataclass(frozen=True)
class StageModules:
    """The modules a RefDecoder adds for its conditioned stages (submodules of the model under these names).

    Attributes:
        tokenizer: pixel reference -> features on the first stage's grid, ``B, C_0, R, h_0, w_0``.
        stage_tokenizers: ``tokenizer.per_stage``: one tokenizer per later conditioned stage, keyed ``stage{i}``.
        transformer: the transformer shared by every conditioned stage.
        projectors: one :class:`StageProjector` per conditioned stage, keyed ``stage{i}``.
    """

    tokenizer: ReferenceTokenizer
    stage_tokenizers: nn.ModuleDict
    transformer: SharedTransformer
    projectors: nn.ModuleDict


def build_stage_modules(config: RefDecoderConfig, adapter: BackboneAdapter, indices: tuple[int, ...]) -> StageModules:
    """Build the modules for the conditioned stages ``indices`` of ``adapter``'s decoder (in this order, which
    fixes their random initialisation: tokenizers, transformer, projectors)."""
    specs, tf, tok, factor = adapter.stages(), config.transformer, config.tokenizer, config.upscale.factor

    def tokenizer(channels: int, scale: int) -> ReferenceTokenizer:
        # The reference comes at the output size; a larger patch lands it on the stage's grid.
        return ReferenceTokenizer(
            channels, scale * factor, tok.kind, tok.kernel_size, tok.norm, in_channels=adapter.pixel_channels
        )

    first = tokenizer(adapter.reference_channels, adapter.reference_scale)
    later = {specs[i].name: tokenizer(specs[i].channels, specs[i].scale) for i in indices if i > 0 and tok.per_stage}
    transformer = SharedTransformer(
        dim=tf.width,
        depth=tf.depth,
        num_heads=tf.num_heads,
        ffn_dim=tf.ffn_width,
        rope_theta=tf.rope_theta,
        attention_radius=tf.attention_radius,
        video_attention_radius=tf.video_attention_radius,
        locality_bias=tf.locality_bias,
        locality_bias_slope=tf.locality_bias_slope,
        locality_bias_extent=tf.locality_bias_extent,
    )
    transformer.gradient_checkpointing = tf.gradient_checkpointing
    patches, stages = stage_patches(config, [specs[i] for i in indices]), config.stages
    projectors = {
        specs[i].name: StageProjector(
            specs[i].channels,
            tf.width,
            patch,
            residual=stages.residual,
            residual_reference=stages.residual_reference,
            input_norm=stages.input_norm,
        )
        for i, patch in zip(indices, patches)
    }
    if config.correspondence.enabled and (tf.attention_radius is None or any(p[0] != 1 for p in patches)):
        raise ConfigError(
            "correspondence.enabled needs a local transformer.attention_radius and temporal token patches of 1, "
            f"got radius {tf.attention_radius} and patches {patches}"
        )
    return StageModules(first, nn.ModuleDict(later), transformer, nn.ModuleDict(projectors))


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


def largest_stage_token_count(
    adapter: BackboneAdapter,
    projectors: Mapping[str, StageProjector],
    indices: tuple[int, ...],
    latent_size: tuple[int, int],
    window: int,
    num_reference: int = 1,
) -> int:
    """Largest token count any conditioned stage attends over for a window of ``window`` latent frames of spatial
    size ``latent_size``, with ``num_reference`` reference frames."""
    specs, counts = adapter.stages(), []
    for i in indices:
        # The first window and a later one (a backbone decoding in its own layout may plan just one).
        planned = adapter.plan_windows(2 * window + 1, window)[:2]
        frames = num_reference + max(
            adapter.stage_frames(i, stop - start, k == 0) for k, (start, stop) in enumerate(planned)
        )
        h, w = (s * adapter.spatial_factor // specs[i].scale for s in latent_size)
        counts.append(projectors[specs[i].name].token_count(frames, h, w))
    return max(counts)
