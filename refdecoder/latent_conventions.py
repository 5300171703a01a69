"""The latent conventions of diffusers' pipelines: how each pipeline turns its normalised latents into raw latents.

An adapter's ``denormalize`` must do what the pipelines of its VAE family do before ``vae.decode``, or latents from a
diffusion model decode wrongly. :func:`pipeline_convention` gives, for a VAE of a class whose pipelines diffusers
ships, the pipeline's rule (a formula to name in messages and a function to compare with); the conformance suite
(:func:`refdecoder.contract_checks.check_latent_conventions`) holds adapters to it. The rules are read from the
pipelines of diffusers 0.42 (``WanPipeline``, ``LTXPipeline._denormalize_latents``, ...), keyed by the VAE's class
name so that nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PipelineConvention", "pipeline_convention"]


@dataclass(frozen=True)
class PipelineConvention:
    """One family's rule. ``pipelines``: who applies it; ``formula``: for messages; ``denormalize``: the rule."""

    pipelines: str
    formula: str
    denormalize: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _channels(values: object, like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics (a config list or a buffer) shaped ``1, C, 1, 1, 1`` like ``like``."""
    return torch.as_tensor(values).to(like.device, like.dtype).view(1, -1, 1, 1, 1)


def _statistics(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents_mean`` / ``latents_std``: the VAE's buffers where it has them (LTX), else its config's lists."""
    buffers = dict(vae.named_buffers(recurse=False))  # not getattr: diffusers warns on config attributes
    if "latents_mean" in buffers:
        return _channels(buffers["latents_mean"], like), _channels(buffers["latents_std"], like)
    return _channels(vae.config.latents_mean, like), _channels(vae.config.latents_std, like)


def _mean_std(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    mean, std = _statistics(vae, z)
    return z * std + mean


def _scaled_mean_std(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if not dict(vae.named_buffers(recurse=False)) and vae.config.get("latents_mean") is None:
        return _scaled(vae, z)  # MochiPipeline without statistics in the config
    mean, std = _statistics(vae, z)
    return z * std / vae.config.scaling_factor + mean


def _scaled(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return z / vae.config.scaling_factor


def _scaled_shifted(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return z / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)


_MEAN_STD = "latents * latents_std + latents_mean (config lists)"
_SCALED_MEAN_STD = "latents * latents_std / scaling_factor + latents_mean"
_SCALED = "latents / scaling_factor"
_CONVENTIONS: dict[str, PipelineConvention] = {
    "AutoencoderKLWan": PipelineConvention("WanPipeline, WanImageToVideoPipeline", _MEAN_STD, _mean_std),
    "AutoencoderKLQwenImage": PipelineConvention("QwenImagePipeline", _MEAN_STD, _mean_std),
    "AutoencoderKLQwenImage21": PipelineConvention("QwenImage21Pipeline", _MEAN_STD, _mean_std),
    "AutoencoderKLMiniMaxH3": PipelineConvention("MiniMaxH3ModularPipeline", _MEAN_STD, _mean_std),
    "AutoencoderKLLTXVideo": PipelineConvention("LTXPipeline", _SCALED_MEAN_STD, _scaled_mean_std),
    "AutoencoderKLLTX2Video": PipelineConvention("LTX2Pipeline", _SCALED_MEAN_STD, _scaled_mean_std),
    "AutoencoderKLMochi": PipelineConvention("MochiPipeline", _SCALED_MEAN_STD, _scaled_mean_std),
    "AutoencoderKLHunyuanVideo15": PipelineConvention("HunyuanVideo15Pipeline", _SCALED, _scaled),
    "AutoencoderKLHunyuanVideo": PipelineConvention("HunyuanVideoPipeline", _SCALED, _scaled),
    "AutoencoderKLHunyuanImage": PipelineConvention("HunyuanImagePipeline", _SCALED, _scaled),
    "AutoencoderKLHunyuanImageRefiner": PipelineConvention("HunyuanImageRefinerPipeline", _SCALED, _scaled),
    "AutoencoderKLCogVideoX": PipelineConvention("CogVideoXPipeline", _SCALED, _scaled),
    "AutoencoderKLAllegro": PipelineConvention("AllegroPipeline", _SCALED, _scaled),
    "AutoencoderKLMagvit": PipelineConvention("EasyAnimatePipeline", _SCALED, _scaled),
    "AutoencoderKLTemporalDecoder": PipelineConvention("StableVideoDiffusionPipeline", _SCALED, _scaled),
    "AutoencoderDC": PipelineConvention("SanaPipeline", _SCALED, _scaled),
    "AutoencoderKL": PipelineConvention(
        "StableDiffusionPipeline, FluxPipeline", "latents / scaling_factor + shift_factor (0 if None)", _scaled_shifted
    ),
}


def pipeline_convention(vae: nn.Module) -> PipelineConvention | None:
    """The convention of the diffusers pipelines for ``vae``'s diffusers class, or None when it has none here.

    The class is the nearest diffusers class in ``vae``'s MRO (a user's subclass counts as its diffusers base; a
    diffusers class that subclasses another is looked up under its own name only).
    """
    for cls in type(vae).__mro__:
        if cls.__module__.startswith("diffusers."):
            return _CONVENTIONS.get(cls.__name__)
    return None
