"""The baseline of a RefDecoder run: the backbone's own decoder fine-tuned alone, with no reference.

:class:`PlainDecoder` has the part of the :class:`~refdecoder.RefDecoder` interface the training recipe uses
(``forward``, ``encode``, ``param_groups``, ``refdecoder_state_dict``, ...), so ``model.kind: plain`` trains it with
the same data, steps, schedule and loss: an equal-budget baseline. Only the decoder side trains, at
``lr * decoder_lr_ratio`` as the RefDecoder's decoder does; the encoder stays frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from refdecoder.backbones.registry import BackboneAdapter
from refdecoder.model import RefDecoderOutput
from refdecoder.training.vae import unclamped_decode
from refdecoder.validation import check_video

__all__ = ["PlainDecoder"]

_PREFIX = "vae."


class PlainDecoder(nn.Module):
    """A VAE whose decoder trains on its own (``reference_index`` is accepted and ignored).

    Args:
        vae: the backbone VAE (frozen here, decoder parameters unfrozen).
        adapter: its backbone adapter class or instance.
    """

    def __init__(self, vae: nn.Module, adapter: BackboneAdapter) -> None:
        super().__init__()
        self.vae, self.adapter = vae, adapter
        self.latent_components = nn.ModuleDict()  # none: the recipe attaches nothing to a plain decoder
        vae.requires_grad_(False)
        for _, param in adapter.decoder_parameters():
            param.requires_grad_(True)

    def forward(
        self, video: torch.Tensor, reference_index: torch.Tensor | int | None = None, generator: Any = None
    ) -> RefDecoderOutput:
        """Encode ``B, 3, T, H, W`` in [-1, 1] without gradients and decode it (unclamped) with the plain decoder."""
        latents = self.encode(video)
        index = torch.as_tensor(0 if reference_index is None else reference_index).flatten().expand(video.shape[0])
        return RefDecoderOutput(sample=unclamped_decode(self.adapter, latents), reference_index=index, latents=latents)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: video in [-1, 1] -> raw latents."""
        check_video(video, self.adapter.frame_rule, self.adapter.spatial_factor, self.adapter.pixel_channels)
        return self.adapter.encode(video)

    def decode(self, latents: torch.Tensor, reference: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """The plain decode of raw latents, clamped to [-1, 1] (``reference`` is ignored)."""
        return unclamped_decode(self.adapter, latents).clamp(-1.0, 1.0)

    def _decoder(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.adapter.decoder_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The decoder-side parameters."""
        return [p for _, p in self._decoder()]

    def param_groups(self, lr: float, decoder_lr_ratio: float = 0.1) -> list[dict[str, Any]]:
        """One group, the decoder at ``lr * decoder_lr_ratio`` (as the RefDecoder's decoder group)."""
        return [{"name": "decoder", "params": self.trainable_parameters(), "lr": lr * decoder_lr_ratio}]

    def refdecoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (decoder side), keyed as in this module's state dict (``vae.``-prefixed)."""
        return {_PREFIX + name: p.detach() for name, p in self._decoder()}
