"""Reusable neural blocks of RefDecoder (one concept per module, functional core + thin ``nn.Module``)."""

from __future__ import annotations

from refdecoder.blocks.attention import attention, attention_backend
from refdecoder.blocks.attention_scope import (
    AttentionScope,
    flex_neighbourhood_attention,
    local_attention_mask,
    neighbourhood_attention,
    per_position_attention,
    scoped_attention,
)
from refdecoder.blocks.correspondence import (
    CorrespondenceEstimate,
    CorrespondenceField,
    cost_volume_displacement,
    pixel_flow_to_latent_grid,
)
from refdecoder.blocks.guided_attention import ReferenceGuide, guided_neighbourhood_attention
from refdecoder.blocks.latent_degradation import (
    DegradationProxy,
    LatentBlur,
    LatentDegradationConfig,
    LatentDegrader,
    LatentMaskedReconstruction,
    LatentNoise,
)
from refdecoder.blocks.locality_bias import LocalityBias
from refdecoder.blocks.norms import ChannelRMSNorm, FP32LayerNorm, RMSNorm
from refdecoder.blocks.reference_tokenizer import ReferenceTokenizer, space_to_depth
from refdecoder.blocks.rope import RotaryEmbedding3D, apply_rope, rope_at, rope_axis_dims, rope_tables
from refdecoder.blocks.stage_projector import StageProjector
from refdecoder.blocks.sub_token_shift import remainder_in_cells, shift_features
from refdecoder.blocks.token_dropout import LatentTokenDropout, latent_token_dropout
from refdecoder.blocks.transformer import FeedForward, SelfAttention, SharedTransformer, TransformerBlock
from refdecoder.blocks.upscale_head import UpscaleConfig, UpscaleHead, attach_upscale_head

__all__ = [
    "attention",
    "attention_backend",
    "AttentionScope",
    "scoped_attention",
    "neighbourhood_attention",
    "flex_neighbourhood_attention",
    "local_attention_mask",
    "per_position_attention",
    "LocalityBias",
    "CorrespondenceEstimate",
    "CorrespondenceField",
    "cost_volume_displacement",
    "pixel_flow_to_latent_grid",
    "ReferenceGuide",
    "guided_neighbourhood_attention",
    "remainder_in_cells",
    "shift_features",
    "ChannelRMSNorm",
    "FP32LayerNorm",
    "RMSNorm",
    "ReferenceTokenizer",
    "space_to_depth",
    "RotaryEmbedding3D",
    "apply_rope",
    "rope_at",
    "rope_axis_dims",
    "rope_tables",
    "StageProjector",
    "LatentTokenDropout",
    "latent_token_dropout",
    "SharedTransformer",
    "TransformerBlock",
    "SelfAttention",
    "FeedForward",
    "LatentDegradationConfig",
    "DegradationProxy",
    "LatentDegrader",
    "LatentBlur",
    "LatentNoise",
    "LatentMaskedReconstruction",
    "UpscaleConfig",
    "UpscaleHead",
    "attach_upscale_head",
]
