"""The shift probe: does a decoder's use of the reference follow the content when the reference is displaced?

Held-out natural clips are decoded with their frame 0 shifted sideways by ``k`` tokens as the reference (the same
scene, displaced), and the PSNR gain over decoding with an unrelated reference (another clip's frame 0) is measured
per shift, over whole frames and over the shared columns (those whose content the displaced reference shows). A
decoder that copies only at the query's own position gains at ``k = 0`` and not beyond; one that finds the content
keeps its gain while the shift stays within its reach. With ``true_displacements`` each model also decodes with the
shift given as ``decode(displacements=...)`` (exact on frame 0): the attention apart from the estimate's errors.

Run by ``quality_small.py``'s eval phase on the headline and its comparison (``eval.shift_probe``), and by
``reference_probe.py --correspondence`` on any saved variants. Video tensors are ``B, 3, T, H, W`` in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.quality.data import Media, shots
from benchmarks.quality.settings import Settings
from refdecoder.metrics import psnr

__all__ = ["ShiftedClips", "shifted_clips", "shift_probe", "follow_ratios"]


@dataclass
class ShiftedClips:
    """``clips``: ``B, 3, T, ch, cw``; ``references``: ``{offset px: B, 3, 1, ch, cw}`` frame 0 cut ``offset`` px
    further right; ``sources``: the videos used."""

    clips: torch.Tensor
    references: dict[int, torch.Tensor]
    sources: list[str]


def shifted_clips(
    settings: Settings, media: Media, shift: int, per_source: int, crop: tuple[int, int] | None = None
) -> ShiftedClips:
    """Natural held-out clips cut at the frame's centre, and their frame 0 cut up to ``shift`` px right and left.

    ``crop`` is ``(ch, cw)`` (default the benchmark's square crop). Sources whose frames are too small for the crop
    plus the shift are left out (named in the log).
    """
    data, frames = settings.data, settings.data.eval_frames
    ch, cw = crop or (data.crop, data.crop)
    clips, references, used = [], {}, []
    for v, src in enumerate(data.sources):
        video = media.videos[v]
        h, w = video.frames.shape[-2:]
        span = data.span(frames, video.stride)
        starts = [t0 for a, b in shots(src["heldout"], video.cuts) for t0 in range(a, b - span + 1, span)][:per_source]
        left, top = (w - cw) // 2, (h - ch) // 2
        if left < shift or top < 0 or not starts:
            print(f"{src['name']}: {h}x{w} frames leave no room for a {ch}x{cw} crop shifted by {shift} px; left out")
            continue
        used.append(src["name"])
        for t0 in starts:
            part = video.frames[:, t0 : t0 + span : video.stride, top : top + ch].float().div(127.5).sub(1.0)
            clips.append(part[..., left : left + cw])
            for offset in range(-shift, shift + 1):
                references.setdefault(offset, []).append(part[:, :1, :, left + offset : left + offset + cw])
    if not clips:
        raise ValueError(f"no source leaves room for a {ch}x{cw} crop shifted by {shift} px (no room in any)")
    return ShiftedClips(torch.stack(clips), {k: torch.stack(v) for k, v in references.items()}, used)


def _shared(offset: int, width: int) -> slice:
    """Clip columns whose content a reference shifted by ``offset`` px shows (clip column x is its x - offset)."""
    return slice(max(0, offset), min(width, width + offset))


@torch.no_grad()
def shift_probe(
    encoder: nn.Module,
    models: dict[str, nn.Module],
    probe: ShiftedClips,
    shifts: list[float],
    token: int,
    true_displacements: bool = False,
) -> dict:
    """Frame-0 and all-frame PSNR gains over an unrelated reference, per model and shift (``+-shifts`` tokens).

    Args:
        encoder: the benchmark's pretrained VAE (encodes the clips once).
        models: RefDecoders to probe, by name.
        probe: from :func:`shifted_clips` with ``shift >= max(shifts) * token``.
        shifts: shifts in tokens (each in both directions; 0 is always included); a fraction of a token (0.5: half
            of one) is whole pixels.
        token: output pixels per token.
        true_displacements: also decode with the shift given as displacements (``dx = -offset`` px, every frame).

    Returns:
        ``{"clips", "sources", "crop", "token_pixels", "models": {name: {"shift_tokens": [...], mode: {metric:
        [per shift]}, "psnr_unrelated"}}}`` with modes ``default`` (the model's own decode) and
        ``true_displacements``, metrics ``gain_frame0``, ``gain_all`` and their ``_shared`` (columns) forms.
    """
    clips, references = probe.clips, probe.references
    latents = encoder.encode(clips).latent_dist.mode()
    unrelated = references[0].roll(1, dims=0)  # another clip's frame 0
    offsets = sorted({s * sign for s in [0, *shifts] for sign in (1, -1)})
    pixels = {k: round(k * token) for k in offsets}
    columns = {k: _shared(pixels[k], clips.shape[-1]) for k in offsets}
    results = {}
    for name, model in models.items():
        plain = model.decode(latents, unrelated)
        base_whole = psnr(plain, clips)
        base_shared = {k: psnr(plain[..., cols], clips[..., cols]) for k, cols in columns.items()}
        # Displacements steer only a local scope's neighbourhoods; a global-attention model has none.
        local = model.config.transformer.attention_radius is not None
        modes = {"default": False} | ({"true_displacements": True} if true_displacements and local else {})
        rows: dict = {"shift_tokens": offsets}
        for mode, given in modes.items():
            table: dict[str, list[float]] = {}
            for k in offsets:
                offset, cols = pixels[k], columns[k]
                flow = None
                if given:
                    flow = torch.zeros(clips.shape[0], 2, *clips.shape[2:])
                    flow[:, 1] = -float(offset)
                out = model.decode(latents, references[offset], displacements=flow)
                whole, shared = psnr(out, clips) - base_whole, psnr(out[..., cols], clips[..., cols]) - base_shared[k]
                for key, value in {
                    "gain_frame0": whole[:, 0], "gain_all": whole, "gain_frame0_shared": shared[:, 0],
                    "gain_all_shared": shared,
                }.items():  # fmt: skip
                    table.setdefault(key, []).append(value.mean().item())
            rows[mode] = table
            print(
                f"{name} [{mode}] frame-0 gain, whole / shared columns:",
                " ".join(f"{k:+g}:{a:+.2f}/{b:+.2f}" for k, a, b in zip(offsets, table["gain_frame0"],
                                                                         table["gain_frame0_shared"])),
            )  # fmt: skip
        results[name] = rows | {"psnr_unrelated": base_whole.mean().item()}
    return {
        "clips": clips.shape[0],
        "sources": probe.sources,
        "crop": list(clips.shape[-2:]),
        "token_pixels": token,
        "models": results,
    }


def follow_ratios(row: dict, metric: str = "gain_frame0") -> dict[int, float]:
    """Per shift magnitude ``k > 0``: the worse of ``+-k``'s gain as a fraction of the gain at shift 0."""
    gains = dict(zip(row["shift_tokens"], row["default"][metric]))
    at_zero = gains[0]
    return {k: min(gains[k], gains[-k]) / at_zero for k in sorted({abs(s) for s in gains if s})}
