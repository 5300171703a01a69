"""What every adapter of a diffusers VAE shares: fit checks (is the VAE that diffusers class, do its config fields
hold) and the per-channel ``latents_mean`` / ``latents_std`` normalisation.

Shared by the families (Wan, HunyuanVideo 1.5, LTX, CogVideoX, Qwen-Image 2.1, MiniMax-H3), so none imports another
family's private module.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["MeanStdLatents", "class_reason", "config_reasons"]


class MeanStdLatents:
    """Latent normalisation by the config's per-channel ``latents_mean`` / ``latents_std`` lists (the Wan family,
    Qwen-Image 2.1, MiniMax-H3: their pipelines decode ``z * latents_std + latents_mean``). Mixed into an adapter
    (before :class:`~refdecoder.backbones.base.BackboneAdapter`) that has ``vae``."""

    vae: nn.Module

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_statistics(latents)
        return (latents - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_statistics(latents)
        return latents * std + mean

    @staticmethod
    def tiny_statistics(kwargs: dict[str, Any], channels: int) -> None:
        """Give a tiny test config made-up ``latents_mean`` / ``latents_std`` of length ``channels`` (distinct per
        channel, so a normalisation that mixes channels up shows), unless it sets its own."""
        kwargs.setdefault("latents_mean", [0.1 * i for i in range(channels)])
        kwargs.setdefault("latents_std", [1.0 + 0.1 * i for i in range(channels)])

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``1, C, 1, 1, 1`` statistics, made in fp32 and then cast like ``like``."""
        config = self.vae.config
        mean, std = (
            torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
            for values in (config.latents_mean, config.latents_std)
        )
        return mean, std


def class_reason(vae: nn.Module, class_name: str, explain_cache: bool = False) -> str | None:
    """None when ``vae`` is an instance of ``diffusers.<class_name>``, else why not (with ``explain_cache``, also
    that its decoder lacks the Wan family's per-conv cache, when it does)."""
    try:
        import diffusers
    except ImportError:
        return f"it drives diffusers {class_name}, and diffusers is not installed (pip install 'diffusers')"
    if isinstance(vae, getattr(diffusers, class_name)):
        return None
    reason = f"it drives diffusers {class_name} only, not {type(vae).__name__}"
    decoder = getattr(vae, "decoder", None)
    if (
        explain_cache
        and isinstance(decoder, nn.Module)
        and "feat_cache" not in inspect.signature(decoder.forward).parameters
    ):
        reason += ", whose decoder has no per-conv causal cache (feat_cache) to decode window by window with"
    return reason


def config_reasons(vae: nn.Module, expected: dict[str, Any], adapter: str) -> list[str]:
    """One ``field=value (adapter needs X)`` entry per config field of ``vae`` that differs from ``expected``."""
    return [
        f"{key}={vae.config.get(key)!r} ({adapter} needs {value!r})"
        for key, value in expected.items()
        if vae.config.get(key) != value
    ]
