"""Streamed encode and decode of one video: memory bounded by one chunk / one decode window, whatever the length.

- :class:`RuleChunks` cuts a stream of frames into the pieces the encoder takes one after another (Wan: frame 0
  alone, then groups of ``4 * group`` frames) and pads the end to the backbone's frame rule by repeating the last
  frame;
- :func:`encode_chunks` encodes those pieces carrying the encoder's causal caches from piece to piece, which equals
  one ``vae.encode`` of the whole clip while only a piece of pixels is held;
- :func:`iter_decode` yields the decoded video window by window (caches carried across windows: no seams, no
  re-encoding), with or without a reference, optionally in spatial tiles (:mod:`refdecoder.tiling`).

Videos are ``B, 3, T, H, W`` in [-1, 1]; latents are raw VAE latents ``B, C, t, h, w``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from refdecoder.backbones.base import BackboneAdapter
from refdecoder.errors import InputError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, IdentityHooks
from refdecoder.tiling import TilePlan, iter_tiled
from refdecoder.validation import FiniteOutput, check_latents, check_pixel_channels, check_reference, check_window

__all__ = ["RuleChunks", "encode_chunks", "iter_decode", "decode_video", "window_pixel_ranges"]


class RuleChunks:
    """Re-chunk a stream of frames into pieces an encoder can take one after another, padded to the frame rule.

    The first piece holds ``rule.first`` frames, the others ``rule.step * group`` frames (the last possibly fewer,
    but a multiple of ``rule.step``); the stream's last frame is repeated to reach a valid count. After iteration,
    :attr:`frames` is the real frame count and :attr:`padded` the encoded one. Iterate once.

    Args:
        frames: chunks ``3, t, H, W`` (or ``B, 3, t, H, W``) in time order, any ``t``.
        rule: the backbone's frame rule.
        group: latent frames per later piece.
    """

    def __init__(self, frames: Iterable[torch.Tensor], rule: FrameRule, group: int = 4) -> None:
        if group < 1:
            raise InputError(f"group must be >= 1 latent frame, got {group}")
        self._frames, self.rule, self.group = frames, rule, group
        self.frames = 0
        self.padded = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        held, want = 0, self.rule.first
        for chunk in self._frames:
            chunk = chunk if chunk.ndim == 5 else chunk[None]
            pending.append(chunk)
            held += chunk.shape[2]
            self.frames += chunk.shape[2]
            while held >= want:
                piece, pending, held = _split_frames(pending, want)
                self.padded += want
                yield piece
                want = self.rule.step * self.group
        if self.frames == 0:
            raise InputError("no frames to encode")
        if held:
            missing = self.rule.round(self.padded + held, "up") - self.padded - held
            last = pending[-1][:, :, -1:]
            pending.append(last.expand(*last.shape[:2], missing, *last.shape[3:]))
            self.padded += held + missing
            yield torch.cat(pending, dim=2)


def _split_frames(pending: list[torch.Tensor], count: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    joined = torch.cat(pending, dim=2)
    rest = joined[:, :, count:]
    return joined[:, :, :count], ([rest] if rest.shape[2] else []), rest.shape[2]


@torch.no_grad()
def encode_chunks(adapter: BackboneAdapter, chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Encode consecutive pixel chunks of one video into its raw latents (posterior mode).

    Causal backbones (the Wan family) carry the encoder's caches from chunk to chunk, which equals one
    ``vae.encode`` of the whole video while holding one chunk of pixels; other backbones get the chunks joined and
    encoded at once (memory then grows with the length). See :meth:`BackboneAdapter.encode_chunks`.

    Args:
        adapter: the backbone adapter.
        chunks: ``B, 3, t, H, W`` pieces in [-1, 1] in time order, as :class:`RuleChunks` makes them (dtype and
            device of the VAE).

    Returns:
        Latents ``B, C, t_latent, h, w``.
    """
    return adapter.encode_chunks(_checked(adapter, chunks))


def _checked(adapter: BackboneAdapter, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        check_pixel_channels(chunk, adapter.pixel_channels, adapter.name)
        yield chunk


# --- decoding -----------------------------------------------------------------------------------------------------
def window_pixel_ranges(rule: FrameRule | BackboneAdapter, windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pixel-frame range ``[start, stop)`` decoded by each latent window (consecutive windows from latent frame 0).

    Pass the adapter where windows overlap or end off the frame rule (MiniMax-H3's clips): its ``window_frames``
    then counts each window's frames.
    """
    if isinstance(rule, BackboneAdapter):
        ranges, start = [], 0
        for first, stop in windows:
            frames = rule.window_frames(first, stop)
            ranges.append((start, start + frames))
            start += frames
        return ranges
    return [(0 if start == 0 else rule.pixel_frames(start), rule.pixel_frames(stop)) for start, stop in windows]


def _stream_windows(
    source: nn.Module | BackboneAdapter,
    latents: torch.Tensor,
    reference: torch.Tensor | None,
    window: int | None,
    depth_to_space: bool = True,
    displacements: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Unclamped window chunks of the plain backbone decode (adapter) or of a RefDecoder decode (before an upscale
    head's shuffle when ``depth_to_space`` is False)."""
    if isinstance(source, BackboneAdapter):
        windows = source.plan_windows(latents.shape[2], window or source.default_window)
        return source.iter_decode_windows(latents, IdentityHooks(), DecodeContext(), windows)
    return source.iter_decode(
        latents, reference, window=window, clamp=False, depth_to_space=depth_to_space, displacements=displacements
    )


def iter_decode(
    source: nn.Module | BackboneAdapter,
    latents: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    window: int | None = None,
    resize_reference: bool = False,
    clamp: bool | None = None,
    tiles: TilePlan | None = None,
    displacements: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Decode raw latents window by window, yielding each window's frames as soon as they exist.

    Concatenated, the chunks equal ``model.decode(latents, reference, window)`` (RefDecoder) or the backbone's own
    decode (adapter); only one window of frames is alive at a time. Runs without gradients.

    Args:
        source: a RefDecoder (conditioned when ``reference`` is given) or a :class:`BackboneAdapter` (plain decode).
        latents: raw latents ``B, C, t, h, w``.
        reference: ``B, 3, H, W`` or ``B, 3, R, H, W`` in [-1, 1] at the decoded size, or None.
        window: latent frames per decoder pass (default: the model's / backbone's).
        resize_reference: resize a reference of another size instead of raising :class:`InputError`.
        clamp: clamp to [-1, 1]; default (None) exactly where the backbone's own decode does (``output_clamp``).
        tiles: decode in spatial tiles with this plan (:func:`refdecoder.tiling.plan_tiles`).
        displacements: where each decoded pixel's content lies in the reference, as for ``RefDecoder.decode``
            (``B, [R,] 2, T, H, W`` output pixels); with ``tiles`` each tile gets its crop.

    Yields:
        ``B, 3, t, H, W`` chunks in time order (17, 16, 16, ... frames for Wan's default window).
    """
    adapter = source if isinstance(source, BackboneAdapter) else source.adapter
    check_latents(latents, adapter.latent_channels)
    if window is not None:
        check_window(window)
    if reference is not None:
        if isinstance(source, BackboneAdapter):
            raise InputError("a reference needs RefDecoder weights; the plain backbone decode takes none")
        size = source.output_size(latents.shape[-2:])
        reference = check_reference(
            reference, latents.shape[0], size, resize_reference, warn_range=False, channels=adapter.pixel_channels
        )
    if displacements is not None and reference is None:
        raise InputError("displacements point into a reference; pass a reference (and RefDecoder weights)")
    if tiles is not None:
        chunks = _iter_tiles(source, latents, reference, window, tiles, displacements)
    else:
        chunks = _stream_windows(source, latents, reference, window, displacements=displacements)
    # A RefDecoder checks its own output; the plain backbone decode is checked here, once at the end.
    finite = FiniteOutput(enabled=isinstance(source, BackboneAdapter))
    while True:
        # no_grad only around each step: a `with` spanning the yield would leak into the caller's code.
        with torch.no_grad():
            chunk = next(chunks, None)
        if chunk is None:
            finite.check(latents, adapter.decoder_parameters())
            return
        finite.add(chunk)
        yield chunk.clamp(-1.0, 1.0) if (adapter.output_clamp if clamp is None else clamp) else chunk


def _iter_tiles(
    source: nn.Module | BackboneAdapter,
    latents: torch.Tensor,
    reference: torch.Tensor | None,
    window: int | None,
    tiles: TilePlan,
    displacements: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    full_tile = latents[..., : tiles.tile[0] // tiles.spatial_factor, : tiles.tile[1] // tiles.spatial_factor]
    # Tiles advance in lockstep, so all must use the window a full tile gets (edge tiles alone could get larger).
    if isinstance(source, BackboneAdapter):
        size = window or source.default_window
    else:
        size = source.window_size(full_tile, 0 if reference is None else reference.shape[2], window)

    # With an upscale head, tiles are blended in its 3 * s**2-channel output and the mosaic is shuffled once.
    head = getattr(source, "upscale_head", None)

    def stream(z: torch.Tensor, ref: torch.Tensor | None, moved: torch.Tensor | None) -> Iterator[torch.Tensor]:
        return _stream_windows(source, z, ref, size, depth_to_space=head is None, displacements=moved)

    scale = 1 if head is None else head.factor
    blended = iter_tiled(stream, latents, reference, tiles, output_scale=scale, displacements=displacements)
    return blended if head is None else map(head.apply, blended)


def decode_video(source: nn.Module | BackboneAdapter, latents: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Whole-video form of :func:`iter_decode` (same arguments): ``B, 3, T, H, W`` in [-1, 1]."""
    return torch.cat(list(iter_decode(source, latents, **kwargs)), dim=2)
