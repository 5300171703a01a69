"""Spatial tiling of a decode, with a reference: for frames too large to decode in one piece.

The latent frame is cut into overlapping tiles exactly as diffusers' ``AutoencoderKLWan.tiled_decode`` does (tiles of
``tile`` pixels every ``tile - overlap`` pixels, the last ones truncated at the border). Each tile is decoded on its
own, with the matching crop of the reference (the crop covers the whole tile, overlap included), then tiles are
blended like diffusers: in raster order each tile is mixed with the already blended tile above it and then the one
to its left by linear ramps over the overlap, and cropped to the stride. With a ``plain`` stream this reproduces
``vae.tiled_decode`` (see ``tests/test_tiling.py``).

Tiling is an approximation: any layer that looks at the whole frame (Wan's mid-block attention, the RefDecoder
joint attention) sees only its tile. Away from the seams the result equals the untiled decode when those global
layers are disabled; with trained weights the seams are usually invisible but never bit-exact.

Tiles are decoded as streams (one generator per tile, advanced window by window in lockstep), so tiling composes
with the streamed decode of :func:`refdecoder.inference.iter_decode` and memory stays bounded by one window.

With an upscale head (``3 * s**2`` output channels, then a depth-to-space shuffle) the plan stays in the decoder's
own pixel grid: tiles are blended in the ``3 * s**2``-channel space and the caller shuffles the blended mosaic once.
Blending after the shuffle would ramp between different sub-pixel phases at every seam. The reference is then at
the upscaled size, and ``output_scale = s`` gives each tile the matching ``s``-times larger crop.

A decoder that writes ``p x p`` pixel patches (Wan2.2's patchified output, unpatchified at the end) is blended by
diffusers in its patch grid; ``ramp_step = p`` gives the same ramps in pixels (constant over each patch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from refdecoder.errors import ConfigError, InputError

__all__ = ["Tile", "TilePlan", "plan_tiles", "blend_tiles", "iter_tiled", "token_alignment"]

# decode_stream(latent_tile, reference_tile, displacement_tile) -> chunks of pixel frames, the same chunking for every
# tile (reference and displacement tiles are None when the decode has none).
TileStream = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class Tile:
    """One tile in latent units: rows ``top:top+height``, columns ``left:left+width`` of the latent frame."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one latent frame lie and how they are blended (diffusers' layout).

    Attributes:
        latent_size: (h, w) of the latents.
        spatial_factor: pixels per latent position.
        tile: (height, width) of a full tile in pixels.
        stride: (height, width) between tile origins in pixels (``tile - overlap``).
        rows: the tiles, row by row, in raster order.
        ramp_step: pixels per step of the blend ramps (the decoder's output patch; 1 = a ramp per pixel).
    """

    latent_size: tuple[int, int]
    spatial_factor: int
    tile: tuple[int, int]
    stride: tuple[int, int]
    rows: tuple[tuple[Tile, ...], ...]
    ramp_step: int = 1

    @property
    def blend(self) -> tuple[int, int]:
        """Rows and columns (pixels) over which neighbouring tiles are ramped into each other."""
        return self.tile[0] - self.stride[0], self.tile[1] - self.stride[1]

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(H, W) of the decoded frame."""
        return self.latent_size[0] * self.spatial_factor, self.latent_size[1] * self.spatial_factor

    @property
    def num_tiles(self) -> int:
        """Tiles per frame."""
        return sum(len(row) for row in self.rows)

    def pixel_box(self, tile: Tile) -> tuple[slice, slice]:
        """Row and column slices of ``tile`` in the decoded frame (overlap included)."""
        f = self.spatial_factor
        return slice(tile.top * f, (tile.top + tile.height) * f), slice(tile.left * f, (tile.left + tile.width) * f)


def plan_tiles(
    latent_size: tuple[int, int],
    spatial_factor: int,
    tile: tuple[int, int] = (256, 256),
    overlap: tuple[int, int] = (64, 64),
    alignment: int = 1,
    ramp_step: int = 1,
) -> TilePlan:
    """Lay out diffusers-style tiles over a ``latent_size`` frame.

    Args:
        latent_size: (h, w) of the latents.
        spatial_factor: pixels per latent position (8 for Wan).
        tile: tile (height, width) in pixels; diffusers' Wan default is 256x256.
        overlap: pixels shared by neighbouring tiles (diffusers' default 64, i.e. a stride of 192).
        alignment: tile origins must fall on multiples of this many pixels; use :func:`token_alignment` for a
            RefDecoder, so that each tile's tokens coincide with the untiled token grid.
        ramp_step: pixels per blend-ramp step; the adapter's ``output_patch`` reproduces diffusers' blend.

    Returns:
        The :class:`TilePlan`; a frame no larger than one tile gives a single tile.

    Raises:
        ConfigError: sizes that are not multiples of ``spatial_factor``/``alignment``, or an overlap that leaves no
            stride.
    """
    stride = tuple(t - o for t, o in zip(tile, overlap))
    step = math.lcm(spatial_factor, alignment)
    for name, values in (("tile", tile), ("tile overlap", overlap), ("tile stride", stride)):
        if any(v % spatial_factor or v < 0 for v in values):
            raise ConfigError(f"{name} {values} must be non-negative multiples of {spatial_factor} pixels")
    if min(stride) < 1 or any(s % step for s in stride):
        raise ConfigError(
            f"tile {tile} with overlap {overlap} gives a stride of {stride} pixels; it must be positive and a "
            f"multiple of {step} pixels (the token grid of this model); change tile or overlap"
        )
    (h, w), f = latent_size, spatial_factor
    rows = tuple(
        tuple(
            Tile(top, left, min(tile[0] // f, h - top), min(tile[1] // f, w - left))
            for left in range(0, w, stride[1] // f)
        )
        for top in range(0, h, stride[0] // f)
    )
    return TilePlan(tuple(latent_size), f, tuple(tile), stride, rows, ramp_step)


def _blend_into(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int, step: int) -> None:
    """Ramp the first ``extent`` rows/columns of ``current`` from ``previous``'s last ones (diffusers' blend),
    one ramp value per ``step`` pixels."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * current.ndim
    shape[dim] = extent
    positions = torch.arange(extent, device=current.device) // step * step
    ramp = (positions.to(torch.float32) / extent).view(shape)
    head = current.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * (1 - ramp) + head * ramp)


def blend_tiles(decoded: Sequence[Sequence[torch.Tensor]], plan: TilePlan) -> torch.Tensor:
    """Blend decoded tiles into one frame sequence, with diffusers' ``tiled_decode`` maths.

    Tiles are blended in place, in raster order: each with the (already blended) tile above over ``blend[0]`` rows,
    then with the (already blended) tile to its left over ``blend[1]`` columns; each is then cropped to the stride
    and the mosaic to the frame size.

    Args:
        decoded: ``plan.rows``-shaped nested sequence of ``B, C, T, h_tile, w_tile`` tensors (pixels); modified.
        plan: the layout they were decoded with.

    Returns:
        ``B, C, T, H, W``.
    """
    if [len(row) for row in decoded] != [len(row) for row in plan.rows]:
        raise InputError(
            f"got tiles in rows of {[len(r) for r in decoded]}, but the plan has rows of {[len(r) for r in plan.rows]}"
        )
    (blend_h, blend_w), (stride_h, stride_w) = plan.blend, plan.stride
    mosaic_rows = []
    for i, row in enumerate(decoded):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_into(decoded[i - 1][j], tile, blend_h, -2, plan.ramp_step)
            if j > 0:
                _blend_into(row[j - 1], tile, blend_w, -1, plan.ramp_step)
        mosaic_rows.append(torch.cat([tile[..., :stride_h, :stride_w] for tile in row], dim=-1))
    height, width = plan.pixel_size
    return torch.cat(mosaic_rows, dim=-2)[..., :height, :width]


def iter_tiled(
    decode_stream: TileStream,
    latents: torch.Tensor,
    reference: torch.Tensor | None,
    plan: TilePlan,
    output_scale: int = 1,
    displacements: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Decode ``latents`` tile by tile and yield blended chunks of frames, one per decode window.

    Args:
        decode_stream: ``(latent_tile, reference_tile) -> iterator of B, C, t, h, w`` chunks in the plan's pixel
            grid (``C = 3``, or ``3 * s**2`` before an upscale head's shuffle); every tile must be chunked alike
            (pass one explicit window size to all of them).
        latents: ``B, C, T, h, w``.
        reference: ``B, 3, R, s*H, s*W`` in [-1, 1] at the final output size (each tile gets its crop), or None.
        plan: from :func:`plan_tiles` for ``latents``' spatial size.
        output_scale: s, how much larger than the plan's pixel grid the final output (and the reference) is.
        displacements: a caller's ``B, [R,] 2, T, s*H, s*W`` pixel displacements (``RefDecoder.decode``), or None;
            each tile gets its crop, ``decode_stream``'s third argument. Pixel offsets do not change
            with the crop; content displaced outside the tile's reference crop is masked like content outside the
            frame.

    Yields:
        ``B, C, t, H, W`` chunks in time order (still to be shuffled when ``output_scale > 1``).
    """
    if tuple(latents.shape[-2:]) != plan.latent_size:
        raise InputError(f"latents are {tuple(latents.shape[-2:])} but the tile plan is for {plan.latent_size}")
    output_size = (plan.pixel_size[0] * output_scale, plan.pixel_size[1] * output_scale)
    if reference is not None and tuple(reference.shape[-2:]) != output_size:
        raise InputError(
            f"reference is {tuple(reference.shape[-2:])} but the decoded frames are {output_size}; "
            "resize it to the output size first"
        )
    if displacements is not None and not isinstance(displacements, torch.Tensor):
        raise InputError(
            "tiled decodes take displacements as a B, [R,] 2, T, H, W pixel flow (each tile gets its crop); a "
            "correspondence estimate is for one whole decode: leave it out and each tile makes its own"
        )
    if displacements is not None and tuple(displacements.shape[-2:]) != output_size:
        shape = tuple(displacements.shape[-2:])
        raise InputError(f"displacements are {shape} but the decoded frames are {output_size}")

    def tile_stream(tile: Tile) -> Iterator[torch.Tensor]:
        rows, cols = _latent_box(tile)
        crops = (_crop(pixels, plan, tile, output_scale) for pixels in (reference, displacements))
        return decode_stream(latents[..., rows, cols], *crops)

    streams = [[tile_stream(t) for t in row] for row in plan.rows]
    while True:
        chunks = [[next(stream, None) for stream in row] for row in streams]
        done = [c is None for row in chunks for c in row]
        if all(done):
            return
        if any(done) or len({c.shape[2] for row in chunks for c in row}) != 1:
            raise InputError("tiles were decoded in different windows; give every tile the same window size")
        yield blend_tiles(chunks, plan)


def _latent_box(tile: Tile) -> tuple[slice, slice]:
    return slice(tile.top, tile.top + tile.height), slice(tile.left, tile.left + tile.width)


def _crop(pixels: torch.Tensor | None, plan: TilePlan, tile: Tile, scale: int) -> torch.Tensor | None:
    """The tile's part of a full-size ``..., s*H, s*W`` pixel tensor (reference or displacements), or None."""
    if pixels is None:
        return None
    rows, cols = plan.pixel_box(tile)
    return pixels[..., rows.start * scale : rows.stop * scale, cols.start * scale : cols.stop * scale]


def token_alignment(model: torch.nn.Module) -> int:
    """Pixels between token-grid lines of a RefDecoder's conditioned stages (tile origins must fall on them).

    A token of stage ``i`` covers ``scale_i * patch_i`` pixels; a tile that starts off that grid would cut every
    token differently from the untiled decode, not only at the seams.
    """
    specs = model.adapter.stages()
    sizes = [model.adapter.spatial_factor]
    for i in model.stage_indices:
        patch = model.projectors[specs[i].name].patch_size
        sizes += [specs[i].scale * patch[1], specs[i].scale * patch[2]]
    return math.lcm(*sizes)
