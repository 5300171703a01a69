"""What one training micro-batch computes, the non-finite guard, and validation on held-out clips.

Video batches (the paper's main recipe): encode the clip with the frozen encoder, decode it with one of its own
frames as the reference (the dataset draws the index per sample), L1 (+ LPIPS) against the clip.

Latent batches (paper App. G, latent finetuning): diffusion-generated latents with the image they were generated
from; the decoded first frame must reproduce that image, the other frames have no ground truth. With the
bidirectional variant, some batches are first decoded with the base decoder, reversed in time and re-encoded, so
the reference becomes the *last* frame; the loss then applies to the last decoded frame.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refdecoder.data import derive_seed
from refdecoder.errors import RefDecoderError

__all__ = [
    "step_generator",
    "video_loss",
    "latent_loss",
    "reverse_latents",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "validate",
]


def step_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The RNG of one micro-batch, seeded by (seed, optimizer step, slot in the global batch).

    Seeding by position rather than carrying one RNG along makes the random draws of a step (token dropout, latent
    reversal) the same after a resume and the same whether a global batch is split over ranks or over
    accumulation steps.
    """
    return torch.Generator().manual_seed(derive_seed(seed, "step", step, slot))


def video_loss(
    model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reconstruct ``batch["video"]`` (``B, 3, T, H, W`` in [-1, 1]) with each sample's reference.

    The reference is ``batch["reference"]`` (``B, 3, 1, H, W``: an explicit image, or a frame outside the clip)
    when the batch has one, else the clip frame ``batch["reference_index"]``.

    Returns:
        ``(loss parts, reconstruction)``: ``{"loss", "l1"[, "lpips"]}`` scalars and the unclamped output.
    """
    video = batch["video"]
    if "reference" in batch:
        out = model(video, reference=batch["reference"].to(video), generator=generator)
    else:
        out = model(video, reference_index=batch["reference_index"], generator=generator)
    return loss_fn(out.sample.float(), video.float()), out.sample


def reverse_latents(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode raw latents with the base decoder, reverse the frames, encode again (no gradients).

    The frame count is kept, so the result is valid for the backbone whenever the input was.
    """
    with torch.no_grad():
        video = model.adapter.plain_decode(latents).clamp(-1, 1)
        return model.encode(video.flip(2))


def latent_loss(
    model: nn.Module,
    batch: dict[str, Any],
    loss_fn: nn.Module,
    generator: torch.Generator,
    reversed_prob: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Latent finetuning loss: the decoded frame that corresponds to the reference image must match it.

    Args:
        model: the (Fabric-wrapped) RefDecoder; ``decode`` and ``encode`` must be marked forward methods.
        batch: ``latents`` ``B, C, t, h, w`` (normalised where ``batch["normalized"]``), ``reference``
            ``B, 3, 1, H, W`` in [-1, 1].
        loss_fn: the reconstruction loss.
        generator: RNG of this micro-batch (token dropout and the reversal draw).
        reversed_prob: probability that this batch is reversed (bidirectional variant).

    Returns:
        ``(loss parts, decoded video)``.
    """
    latents, reference = batch["latents"], batch["reference"]
    normalized = torch.as_tensor(batch.get("normalized", False), device=latents.device).view(-1, 1, 1, 1, 1)
    latents = torch.where(normalized, model.denormalize(latents), latents)
    reverse = reversed_prob > 0 and float(torch.rand((), generator=generator)) < reversed_prob
    if reverse:
        latents = reverse_latents(model, latents)
    sample = model.decode(latents.to(reference.dtype), reference, clamp=False, generator=generator)
    frame = sample[:, :, -1:] if reverse else sample[:, :, :1]
    return loss_fn(frame.float(), reference.float()), sample


class NonFiniteLossError(RefDecoderError, FloatingPointError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class NonFiniteGuard:
    """Counts skipped non-finite steps; raises :class:`NonFiniteLossError` after ``limit`` in a row."""

    def __init__(self, limit: int, in_a_row: int = 0, total: int = 0) -> None:
        self.limit, self.in_a_row, self.total = limit, in_a_row, total

    def update(self, finite: bool, step: int, what: str = "loss") -> None:
        """Record the outcome of optimizer step ``step``."""
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite {what}; the run is "
                "diverging. Lower optim.lr, enable optim.grad_clip, use precision 32-true to rule out overflow, "
                "or resume from an earlier checkpoint (--resume PATH)."
            )

    def state_dict(self) -> dict[str, int]:
        """Counters for checkpoints."""
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


@torch.no_grad()
def validate(
    model: nn.Module, clips: dict[str, Any], lpips: nn.Module | None = None, device: torch.device | None = None
) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Reconstruct held-out clips (eval mode: no dropout) and measure them, split by reference vs other frames.

    Args:
        model: the RefDecoder (Fabric-wrapped or not); restored to its previous train/eval mode.
        clips: collated ``video`` ``N, 3, T, H, W`` and ``reference_index`` ``(N,)``, decoded one clip at a time.
        lpips: optional LPIPS metric network.
        device: where to run.

    Returns:
        ``(metrics, (reference, target, reconstruction) of the first clip)``; metrics are ``psnr``, ``ssim``
        (``lpips``) overall and ``*_reference`` / ``*_others``, plus ``l1``, averaged over clips.
    """
    from refdecoder.metrics import video_metrics

    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    first = None
    count = clips["video"].shape[0]
    for i in range(count):
        video = clips["video"][i : i + 1].to(device)
        index = clips["reference_index"][i : i + 1].to(device)
        pred = model(video, reference_index=index).sample.float().clamp(-1, 1)
        metrics = video_metrics(pred, video.float(), index, lpips=lpips)
        metrics["l1"] = (pred - video.float()).abs().mean().item()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value / count
        if first is None:
            first = (video[0, :, int(index[0])].cpu(), video[0].cpu(), pred[0].cpu())
    model.train(was_training)
    return sums, first
