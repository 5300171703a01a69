"""Correspondence: where each video token's content lies in the reference, estimated from content or supplied.

The estimate is a local cost volume on the frozen encoder's latent grid: the raw latents being decoded against the
encoder's latents of the reference frame(s), brought into each latent frame's own feature space (a temporally
compressing encoder codes its first and later latent frames differently): by a per-sample channel map fitted from
the video's own frames, or by encoding the reference as a still clip. It needs no training and no downloaded
weights, so it is as good at step 0 as later. Per latent cell, the normalised correlation with every reference cell
within ``+-S`` cells (averaged over the ``(2m+1)^2`` patch cells whose candidates lie on the reference grid, which
makes 16-channel latents discriminative) is turned into a sub-cell displacement by a soft-argmax; out-of-grid
candidates never count. Cells in flat regions, whose correlations nearly tie, then take their confident neighbours'
displacement (a confidence-weighted box average) and, where their own correlations do not contradict it, the frame's
global translation (a pan, a displaced reference); where nothing in the frame is confident the field stays about
zero and the attention looks where it looked without correspondence. Cost and memory: ``tokens x (2S+1)^2``
multiply-adds, one candidate offset at a time, plus the reference's encoder pass (one image with the fitted maps).
With ``half_cell`` the reference is also encoded with its content moved half a cell (:func:`half_cell_phases`) and
the candidates lie half a cell apart: four times the multiply-adds and the encoder passes.

:class:`CorrespondenceField` holds one decode's field on the latent grid, in output pixels per latent frame (the
estimate, one kept from before as a :class:`CorrespondenceEstimate`, or a caller's ``B, 2, T, H, W`` pixel flow
pooled onto that grid), and hands each conditioned stage its
part: the window's frames, resampled onto the stage's token grid, in tokens of that grid (what
:func:`~refdecoder.blocks.guided_attention.guided_neighbourhood_attention` takes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from refdecoder.errors import ConfigError, InputError

if TYPE_CHECKING:
    from refdecoder.backbones.base import BackboneAdapter

__all__ = [
    "cost_volume_displacement",
    "half_cell_phases",
    "pixel_flow_to_latent_grid",
    "CorrespondenceEstimate",
    "CorrespondenceField",
    "correspondence_field",
    "estimate_correspondence",
]


def cost_volume_displacement(
    video: torch.Tensor,
    reference: torch.Tensor,
    search_radius: int,
    temperature: float,
    match_radius: int = 1,
    smooth_radius: int = 0,
    global_prior: float = 0.0,
    subcell: bool = False,
    half_cell: bool = False,
) -> torch.Tensor:
    """Displacement of every video cell into every reference frame, from a local cost volume and a soft-argmax.

    Args:
        video: ``B, C, T, h, w`` features of the video (e.g. raw latents).
        reference: ``B, C, R, h, w`` features of the reference frames on the same grid.
        search_radius: S, candidate offsets ``|dy|, |dx| <= S`` cells.
        temperature: softmax temperature of the soft-argmax over the correlations (cosine similarity, in [-1, 1]).
        match_radius: m, correlations are averaged over a ``(2m+1)^2`` patch around each cell before the softmax.
        smooth_radius: q, each cell's displacement is replaced by the mean over a ``(2q+1)^2`` box of its
            neighbours' weighted by their confidence (:func:`_confident_average`); 0 keeps every cell's own.
        global_prior: weight of each frame's global translation (:func:`_global_translation`) in that average, in
            boxes of the frame's mean confidence, where the cell's own correlations do not contradict it: cells
            with no confident neighbour take it instead of about zero (0: off; needs ``smooth_radius >= 1``).
        subcell: instead of the soft-argmax, the best candidate refined by the vertex of a parabola through its
            correlation and its two neighbours' along each axis (:func:`_parabolic_peak`): a soft-argmax at a low
            temperature rounds content displaced by a fraction of a cell towards a whole cell. The smoothing's
            confidence then measures the best candidate's margin over rivals beyond its neighbours
            (:func:`_confident_average`).
        half_cell: ``reference`` is ``B, C, 4R, h, w``: each reference frame's features followed by those of the
            same frame with its content moved half a cell down, right, and both (:func:`half_cell_phases`, in that
            order). Candidates then lie on a half-cell grid, ``(4S+2)^2`` of them from ``-S - 1/2`` to ``S``: a
            fraction of a cell is found between candidates half a cell apart, each matched by features the encoder
            made from content at that position, instead of between whole cells.

    Returns:
        ``B, R, 2, T, h, w`` float32 ``(dy, dx)`` in cells: video cell ``(t, y, x)`` matches reference frame ``j`` at
        ``(y + dy, x + dx)``. Memory: one ``B, T, h, w`` correlation per candidate offset, ``(2S+1)^2`` of them.
    """
    if video.ndim != 5 or reference.ndim != 5 or video.shape[:2] != reference.shape[:2]:
        raise InputError(
            f"correspondence needs video B, C, T, h, w and reference B, C, R, h, w with the same B and C, "
            f"got {tuple(video.shape)} and {tuple(reference.shape)}"
        )
    if video.shape[-2:] != reference.shape[-2:]:
        raise InputError(
            f"correspondence needs one grid for video and reference, got {tuple(video.shape[-2:])} and "
            f"{tuple(reference.shape[-2:])}"
        )
    phases = len(HALF_CELL_PHASES) if half_cell else 1
    if reference.shape[2] % phases:
        raise InputError(
            f"half_cell needs {phases} feature maps per reference frame, got {reference.shape[2]} reference maps"
        )
    b, _, t, h, w = video.shape
    s = search_radius
    grid = _CandidateGrid.half_cells(s) if half_cell else _CandidateGrid.whole_cells(s)
    video, reference = video.float(), reference.float()
    # Centre both on the reference's channel means (latents carry a large constant part), then unit length per cell.
    centre = reference.mean(dim=(2, 3, 4), keepdim=True)
    video = F.normalize(video - centre, dim=1)
    reference = F.normalize(reference - centre, dim=1)
    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    shifts = grid.shifts.to(video.device)  # K, 2
    padded = F.pad(reference, (s, s, s, s))
    inside = F.pad(torch.ones(1, 1, h, w, device=video.device), (s, s, s, s))
    size = 2 * match_radius + 1

    def patch_mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, size, 1, match_radius, count_include_pad=False)

    # Per offset, the same for every reference frame: which cells' candidates lie on the reference grid and, with a
    # patch, the share of each cell's patch whose candidates do. Correlations are averaged over those candidates
    # only: a zero for each one off the grid would handicap the true match of a cell next to the reference's border
    # against in-grid wrong ones.
    in_grid = [inside[:, :, s + dy : s + dy + h, s + dx : s + dx + w] for dy, dx in offsets]  # 1, 1, h, w each
    shares = [patch_mean(g).clamp_min(1e-6) if match_radius else None for g in in_grid]
    out = torch.empty(b, reference.shape[2] // phases, 2, t, h, w, device=video.device)
    for j in range(out.shape[1]):
        per_phase = []
        for phase in range(phases):
            costs = []
            for (dy, dx), inside_grid, share in zip(offsets, in_grid, shares):
                candidate = padded[:, :, j * phases + phase, None, s + dy : s + dy + h, s + dx : s + dx + w]
                cost = (video * candidate).sum(1).flatten(0, 1)[:, None]  # B*T, 1, h, w
                if share is not None:
                    cost = patch_mean(cost) / share
                costs.append(cost.masked_fill(inside_grid == 0, float("-inf")))
            per_phase.append(torch.cat(costs, 1))  # B*T, (2S+1)^2, h, w
        correlations = grid.interleave(per_phase)  # B*T, K, h, w
        if subcell:
            field = _parabolic_peak(correlations, grid)
        else:
            weights = torch.softmax(correlations / temperature, dim=1)
            field = torch.einsum("nkhw,kc->nchw", weights, shifts)  # B*T, 2, h, w
        if smooth_radius and len(shifts) > 1:
            field = _confident_average(field, correlations, smooth_radius, global_prior, temperature, grid, subcell)
        out[:, j] = field.unflatten(0, (b, t)).transpose(1, 2)
    return out


# Half-cell phases of a reference frame, (down, right) in half cells: as is, down, right, both.
HALF_CELL_PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))


def half_cell_phases(frames: torch.Tensor, cell: int) -> torch.Tensor:
    """``N, 3, H, W`` images -> ``N * 4, 3, H, W``: each followed by itself with its content moved half a cell
    (``cell // 2`` px) down, right, and both (:data:`HALF_CELL_PHASES`; the uncovered border repeats the edge).

    Encoded, they give the reference's features at half-cell offsets as the encoder makes them for content there,
    which the half-cell cost volume (``cost_volume_displacement(half_cell=True)``) matches the video against.
    """
    if cell % 2:
        raise InputError(f"half_cell needs an even latent cell, got {cell} px")
    half = cell // 2
    h, w = frames.shape[-2:]
    padded = F.pad(frames, (half, 0, half, 0), mode="replicate")
    moved = [padded[..., half - down * half :, half - right * half :][..., :h, :w] for down, right in HALF_CELL_PHASES]
    return torch.stack(moved, 1).flatten(0, 1)


@dataclasses.dataclass(frozen=True)
class _CandidateGrid:
    """The candidate displacements of the cost volume: a ``side x side`` grid, row-major, from ``(first, first)``
    in steps of ``step`` cells along each axis."""

    side: int
    first: float
    step: float

    @classmethod
    def whole_cells(cls, search_radius: int) -> _CandidateGrid:
        return cls(2 * search_radius + 1, -float(search_radius), 1.0)

    @classmethod
    def half_cells(cls, search_radius: int) -> _CandidateGrid:
        """Whole offsets ``-S..S`` of the reference as is and less half a cell of each moved one: ``-S-1/2..S``."""
        return cls(4 * search_radius + 2, -search_radius - 0.5, 0.5)

    @property
    def shifts(self) -> torch.Tensor:
        """``K, 2`` float32 ``(dy, dx)`` in cells of every candidate, row-major."""
        axis = self.first + self.step * torch.arange(self.side, dtype=torch.float32)
        return torch.cartesian_prod(axis, axis)

    def offset(self, index: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
        """Cells of candidate row or column ``index`` plus ``fraction`` of a step (float tensors)."""
        return (self.first + self.step * index) + self.step * fraction

    def index(self, cells: torch.Tensor) -> torch.Tensor:
        """The nearest candidate row or column of ``cells`` (long, clamped to the grid)."""
        return ((cells / self.step).round() - round(self.first / self.step)).clamp(0, self.side - 1).long()

    def interleave(self, per_phase: list[torch.Tensor]) -> torch.Tensor:
        """``N, K, h, w`` candidates of this grid from ``N, (2S+1)^2, h, w`` correlations per phase
        (:data:`HALF_CELL_PHASES`; one phase: the whole-cell grid as it is). A reference moved half a cell down
        shows at whole offset ``dy`` what lies ``dy - 1/2`` cells from the cell: the half-grid row before ``dy``'s."""
        if len(per_phase) == 1:
            return per_phase[0]
        n, _, h, w = per_phase[0].shape
        whole = self.side // 2
        out = per_phase[0].new_empty(n, whole, 2, whole, 2, h, w)
        for (down, right), correlations in zip(HALF_CELL_PHASES, per_phase):
            out[:, :, 1 - down, :, 1 - right] = correlations.unflatten(1, (whole, whole))
        return out.flatten(1, 4)


def _parabolic_peak(correlations: torch.Tensor, grid: _CandidateGrid) -> torch.Tensor:
    """``N, 2, h, w`` offsets of each cell's best candidate, refined between candidates by a parabola per axis.

    ``correlations``: ``N, K, h, w`` over the ``grid``'s candidates, ``-inf`` off the latent grid. Along each axis
    the parabola through the best correlation ``c0`` and its neighbours ``a`` (one candidate less) and ``b`` (one
    more) peaks at ``(a - b) / (2 (a - 2 c0 + b))`` candidate steps from the best, kept within half a step; the
    offset stays on the best candidate where a neighbour is off the grid or beyond the search window, or the three
    do not bend down.
    """
    side = grid.side
    peak, best = correlations.max(1)  # N, h, w each
    row, col = best // side, best % side

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # correlation at candidate (r, c); -inf beyond it
        inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
        index = (r.clamp(0, side - 1) * side + c.clamp(0, side - 1))[:, None]
        return correlations.gather(1, index)[:, 0].masked_fill(~inside, float("-inf"))

    out = []
    for index, (a, b) in ((row, (at(row - 1, col), at(row + 1, col))), (col, (at(row, col - 1), at(row, col + 1)))):
        bend = a - 2 * peak + b
        usable = torch.isfinite(a) & torch.isfinite(b) & (bend < -1e-6)
        vertex = 0.5 * (a - b) / torch.where(usable, bend, torch.full_like(bend, -1.0))
        out.append(grid.offset(index.float(), torch.where(usable, vertex, 0.0).clamp(-0.5, 0.5)))
    return torch.stack(out, 1)


def _confident_average(
    field: torch.Tensor,
    correlations: torch.Tensor,
    radius: int,
    global_prior: float,
    temperature: float,
    grid: _CandidateGrid,
    rival_beyond_peak: bool = False,
) -> torch.Tensor:
    """``N, 2, h, w`` displacements averaged over ``(2q+1)^2`` boxes, each cell weighted by its confidence.

    A cell's confidence is the square of its best candidate's margin over the runner-up (``correlations``: ``N, K, h,
    w`` patch-averaged cosines over the ``grid``'s candidates, ``-inf`` off the latent grid), times ``exp(-(1 - best) /
    temperature)``: how well that best candidate matches. A textured cell has one clear peak and keeps about its own
    displacement; a cell in a flat region (sky, a wall) has a near-tie, so its soft-argmax falls back towards zero, and
    it takes its confident neighbours' displacement instead; a cell whose content the reference does not show (it left
    the frame, or sits next to the reference's border, where the encoder's padding changes the latents) matches even
    its best candidate clearly worse than a true match and gives way too (measured by
    ``benchmarks/correspondence_estimate.py``). Where no cell of the box is confident the plain mean is kept, or, with
    ``global_prior`` > 0, mostly the frame's global translation (:func:`_global_translation`): it joins each box with
    the weight of ``global_prior`` boxes of the frame's mean confidence, times ``exp(-(best - c) / temperature)`` where
    ``c`` is the cell's own correlation at the translation (rounded). A flat cell, whose correlations tie, takes it; a
    cell whose own evidence contradicts it (a moving object's, best well above ``c``) keeps its own, as without the
    prior.

    With ``rival_beyond_peak`` (``subcell``) the runner-up is the best candidate more than one candidate step (on
    either axis) from the best: content displaced between two candidates matches both about equally, so a margin over
    the best's own neighbour would take that cell's weight exactly where its displacement lies between them, and the
    average would lean towards the candidates (``benchmarks/correspondence_estimate.py``, its ``subcell`` rows).
    """
    best, runner_up = _best_and_rival(correlations, grid.side, rival_beyond_peak)
    # Cosines lie in [-1, 1]: the clamp also turns a lone in-grid candidate's infinite margin into a finite one.
    confidence = ((best - runner_up).clamp(0.0, 2.0) + 1e-4).square()[:, None]
    # ... times how well that best candidate matches: on the quality benchmark's latents a cell whose content the
    # reference does not show still finds a candidate at a cosine of ~0.92, with a clear margin, against ~1.0 for a
    # true match; by its margin alone it would spread its arbitrary displacement into the shown cells beside it.
    # The exponent is floored so that a box of cells that all match badly (unrelated content, a small temperature)
    # keeps a finite, margin-weighted average instead of 0 / 0: exp(-60) times the margin floor stays a normal float.
    fit = ((best.clamp(max=1.0)[:, None] - 1.0) / temperature).clamp(min=-60.0)
    confidence = confidence * torch.exp(fit)
    size = 2 * radius + 1

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, size, 1, radius, count_include_pad=False)

    if global_prior <= 0:
        return box(field * confidence) / box(confidence)
    translation = _global_translation(field, confidence)  # N, 2, 1, 1
    row, col = grid.index(translation).unbind(1)  # N, 1, 1 each: the candidate nearest the translation
    index = (row * grid.side + col)[:, None].expand(-1, 1, *correlations.shape[-2:])
    contradiction = (best[:, None] - correlations.gather(1, index)).clamp(0.0, 2.0)  # an off-grid one: 2
    prior = global_prior * confidence.mean(dim=(2, 3), keepdim=True) * torch.exp(-contradiction / temperature)
    return (box(field * confidence) + prior * translation) / (box(confidence) + prior)


def _best_and_rival(correlations: torch.Tensor, side: int, beyond_peak: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``N, h, w`` best and runner-up correlations of ``N, K, h, w`` candidates (a row-major ``side x side`` grid):
    the runner-up is the second best, or with ``beyond_peak`` the best more than one candidate from the best one
    (``-inf`` where none is)."""
    if not beyond_peak:
        best, runner_up = correlations.topk(2, dim=1).values.unbind(1)
        return best, runner_up
    best, index = correlations.max(1, keepdim=True)  # N, 1, h, w each
    candidates = torch.arange(side * side, device=correlations.device)[None, :, None, None]
    near = ((candidates // side - index // side).abs() <= 1) & ((candidates % side - index % side).abs() <= 1)
    return best[:, 0], correlations.masked_fill(near, float("-inf")).amax(1)


def _global_translation(
    field: torch.Tensor, confidence: torch.Tensor, iterations: int = 5, scale: float = 0.5
) -> torch.Tensor:
    """Per frame, the displacement most of the confident cells share: a robust, confidence-weighted mean.

    Starts from the confidence-weighted mean of ``field`` (``N, 2, h, w``; ``confidence``: ``N, 1, h, w``) and
    re-weights ``iterations - 1`` times by a Cauchy function of each cell's distance from it (``scale`` cells), so a
    moving object or the cells whose content left the reference do not drag the frame's motion. A pan, or a
    reference shifted against the video, is one translation; still content gives zero. An affine fit (zoom, turn)
    was measured worse: the truncated estimates where content left the reference read as a zoom
    (``benchmarks/correspondence_estimate.py``). Returns ``N, 2, 1, 1``.
    """
    values, weights = field.flatten(2), confidence.flatten(1)  # N, 2, h*w and N, h*w
    mean = (values * weights[:, None]).sum(2) / weights.sum(1, keepdim=True)  # N, 2
    for _ in range(iterations - 1):
        distance = (values - mean[..., None]).square().sum(1)  # N, h*w, squared cells
        robust = confidence.flatten(1) / (1.0 + distance / scale**2)
        mean = (values * robust[:, None]).sum(2) / robust.sum(1, keepdim=True)
    return mean[..., None, None]


def pixel_flow_to_latent_grid(
    flow: torch.Tensor, num_reference: int, latent_shape: tuple[int, int, int], adapter: BackboneAdapter
) -> torch.Tensor:
    """A caller's pixel displacements, pooled onto the latent grid: one value per latent frame and cell.

    Args:
        flow: ``B, 2, T, H, W`` (one field for every reference frame) or ``B, R, 2, T, H, W``: ``(dy, dx)`` in output
            pixels per decoded frame; pixel ``(y, x)`` of frame ``t`` shows the reference at ``(y + dy, x + dx)``.
        num_reference: R.
        latent_shape: ``(t, h, w)`` of the latents being decoded.
        adapter: the backbone adapter (its frame rule maps pixel frames to latent frames).

    Returns:
        ``B, R, 2, t, h, w`` float32 in output pixels: per latent frame the mean over the pixel frames it decodes
        to, per latent cell the mean over its pixels.
    """
    t, h, w = latent_shape
    rule = adapter.frame_rule
    frames = rule.pixel_frames(t)
    if flow.ndim == 5:
        flow = flow[:, None].expand(-1, num_reference, -1, -1, -1, -1)
    if flow.ndim != 6 or flow.shape[1:3] != (num_reference, 2) or flow.shape[3] != frames:
        raise InputError(
            f"displacements must be B, 2, T={frames}, H, W or B, R={num_reference}, 2, T, H, W (dy, dx in output "
            f"pixels per decoded frame), got shape {tuple(flow.shape)}"
        )
    size_h, size_w = flow.shape[-2:]
    if size_h % h or size_w % w or size_h // h != size_w // w:
        raise InputError(f"displacements are {size_h}x{size_w} px; expected the decoded size, a multiple of {h}x{w}")
    bounds = [0, rule.first] + [rule.first + rule.step * k for k in range(1, t)]
    per_latent = torch.stack([flow[:, :, :, a:b].float().mean(3) for a, b in zip(bounds[:-1], bounds[1:])], 3)
    pooled = F.avg_pool2d(per_latent.flatten(0, 3), size_h // h)
    return pooled.reshape(*per_latent.shape[:4], h, w)


def _reference_latents(
    adapter: BackboneAdapter, frames: torch.Tensor, latents: torch.Tensor, frame_spaces: str, still_frames: int
) -> list[tuple[slice, torch.Tensor]]:
    """The reference encoded in the feature space of each latent frame of the video, keyed by those video frames.

    A temporally compressing encoder codes its first latent frame from one pixel group and the later ones from the
    next groups with its causal caches, and each lives in its own feature space: on the quality benchmark's causal
    VAE a cost volume of later frames against the reference's first-frame latents is noise (2.4-3.7 cells mean
    error, ``benchmarks/correspondence_estimate.py``). Two ways to bring the reference into each frame's space:

    - ``"fitted"``: the reference is encoded as one image (latent frame 0's space) and, per sample, mapped into
      latent frame ``i``'s space by the affine channel map that best takes the video's own latent frame 0 to its
      latent frame ``i`` (least squares over the cells, :func:`_mapped_into_later_frames`). A per-cell channel map
      cannot move content, so the clip's motion does not leak into it. Costs one image through the encoder.
    - ``"still_clip"``: the reference is encoded as a still clip of ``min(t, still_frames)`` latent frames (the
      longest count the frame rule allows up to that, else ``t``) and video latent frame ``i`` is matched against
      its frame ``i`` (the last one for all later frames: a still clip's latents settle after a few frames). Costs
      ``pixel_frames(still_frames)`` frames through the encoder (13 for Wan at 4).

    Mean error at latent frames 1+ on the probe's natural clips (frame 0 shifted by 0-4 cells as the reference,
    the clips' own motion counted as error): fitted 0.18-0.95 cells, still clip of 4 frames 0.18-0.69.

    Args:
        adapter: the backbone adapter (frame rule and frozen encoder).
        frames: ``B*R, 3, H, W`` reference images in [-1, 1] at the encoder's input size (``B*R*4`` with
            ``half_cell``: each reference frame's phases in a row, which then count as its reference frames here).
        latents: ``B, C, t, h, w`` the latents being decoded.
        frame_spaces: ``"fitted"`` or ``"still_clip"``.
        still_frames: latent frames of the still clip (``"still_clip"``).

    Returns:
        ``[(slice of video latent frames, B, C, R, h, w reference latents)]``, the slices covering ``0..t`` in order.
    """
    b, t = latents.shape[0], latents.shape[2]
    if frame_spaces == "fitted":  # the shortest still clip the frame rule allows: one image for most backbones
        n = next((k for k in range(1, t + 1) if _decodable(adapter, k)), t)
    else:
        n = next((k for k in range(min(t, still_frames), 0, -1) if _decodable(adapter, k)), t)
    clip = frames[:, :, None].expand(-1, -1, adapter.frame_rule.pixel_frames(n), -1, -1)
    encoded = adapter.encode(clip.to(latents.dtype))  # B*R, C, n, h, w
    per_frame = encoded.unflatten(0, (b, -1)).transpose(1, 2)  # B, C, R, n, h, w
    if frame_spaces == "still_clip":
        kinds = [slice(i, i + 1) for i in range(n - 1)] + [slice(n - 1, t)]
        return [(kind, per_frame[:, :, :, i]) for i, kind in enumerate(kinds)]
    first = per_frame[:, :, :, 0]  # B, C, R, h, w
    later = _mapped_into_later_frames(latents, first)
    return [(slice(0, 1), first)] + [(slice(i, i + 1), mapped) for i, mapped in enumerate(later, start=1)]


def _mapped_into_later_frames(
    latents: torch.Tensor, reference: torch.Tensor, ridge: float = 1e-3
) -> list[torch.Tensor]:
    """Per sample, ``reference`` mapped from latent frame 0's feature space into each later latent frame's.

    Args:
        latents: ``B, C, t, h, w`` the latents being decoded.
        reference: ``B, C, R, h, w`` reference latents in latent frame 0's space.
        ridge: Tikhonov term, relative to the mean diagonal of the normal equations (keeps a flat frame solvable).

    Returns:
        ``t - 1`` tensors like ``reference``: for frame ``i``, ``[reference cell, 1] @ map_i``, with ``map_i``
        (``B, C + 1, C``, the last input row the bias) fitted by least squares to take each of the video's
        ``h * w`` cells of frame 0 to the same cell of frame ``i``.
    """

    def with_bias(cells: torch.Tensor) -> torch.Tensor:  # B, C, N -> B, C + 1, N (a row of ones)
        return torch.cat([cells, torch.ones_like(cells[:, :1])], dim=1)

    source = with_bias(latents[:, :, 0].flatten(2).float())  # B, C+1, h*w
    normal = source @ source.mT
    eye = torch.eye(normal.shape[-1], device=normal.device)
    normal = normal + ridge * normal.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    cells = with_bias(reference.flatten(2).float())  # B, C+1, R*h*w
    mapped = []
    for i in range(1, latents.shape[2]):
        weights = torch.linalg.solve(normal, source @ latents[:, :, i].flatten(2).float().mT)  # B, C+1, C
        mapped.append(torch.einsum("bdc,bdn->bcn", weights, cells).reshape(reference.shape).to(latents.dtype))
    return mapped


def _decodable(adapter: BackboneAdapter, latent_frames: int) -> bool:
    """Whether the backbone's frame rule has a clip of ``latent_frames`` latent frames (CogVideoX: odd counts only;
    MiniMax-H3: 7 + 5k); the still clip takes the longest such count up to ``still_frames``, else the video's."""
    try:
        adapter.check_latent_frames(latent_frames)
    except InputError:
        return False
    return True


class CorrespondenceField:
    """One decode's correspondence, on the latent grid, handed out per stage and window.

    Args:
        pixels: ``B, R, 2, t, h, w`` float32, ``(dy, dx)`` in output pixels per latent frame and latent cell.
        output_size: ``(H, W)`` of the decoded frames (and of the reference).
        windows: the decode's latent-frame windows ``(start, stop)``.
        adapter: the backbone adapter (stage frame counts per window).
        snap: round each stage's field to whole tokens of that stage's grid (the attention then gathers reference
            tokens at their centres instead of sampling them bilinearly).
        per_frame: a stage with more frames than latent frames (after temporal upsampling) gives each frame its
            own displacement, linear in time between the latent frames' values (each taken at the middle of the
            frames it decodes to, and extended along the nearest two beyond the first and last middle); without,
            every frame takes its latent frame's value.
        sub_token_shift: with ``snap``, the stages move each video frame by the part of its displacement that
            rounding drops (:mod:`~refdecoder.blocks.sub_token_shift`, via :meth:`stage_split`).
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        output_size: tuple[int, int],
        windows: list[tuple[int, int]],
        adapter: BackboneAdapter,
        snap: bool = False,
        per_frame: bool = False,
        sub_token_shift: bool = False,
    ) -> None:
        if sub_token_shift and not snap:
            raise ConfigError("correspondence.sub_token_shift needs snap: it moves the video by what snapping drops")
        self.pixels, self.output_size, self.windows, self.adapter = pixels, output_size, windows, adapter
        self.snap, self.per_frame, self.sub_token_shift = snap, per_frame, sub_token_shift

    def stage(
        self, index: int, video: torch.Tensor, patch: tuple[int, int, int], window_index: int, first_window: bool
    ) -> torch.Tensor:
        """The field for stage ``index``'s video features ``B, C, T_i, H_i, W_i`` of window ``window_index``.

        Returns ``B, R, 2, T_i, ceil(H_i / ph), ceil(W_i / pw)`` in tokens of the stage's grid (temporal patch 1):
        each stage frame takes the latent frame it decodes from (with ``per_frame``, its own value in time between
        the latent frames'), each token the mean over its stage cells; rounded to whole tokens with ``snap``.
        """
        displacement = self._on_stage_grid(index, video, patch, window_index, first_window)
        return displacement.round() if self.snap else displacement

    def stage_split(
        self, index: int, video: torch.Tensor, patch: tuple[int, int, int], window_index: int, first_window: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`stage`'s field split into whole tokens and the remainder rounding drops (each in ``[-0.5, 0.5]``),
        both ``B, R, 2, T_i, h, w`` (``correspondence.sub_token_shift`` moves the video by the remainder)."""
        displacement = self._on_stage_grid(index, video, patch, window_index, first_window)
        whole = displacement.round()
        return whole, displacement - whole

    def _on_stage_grid(
        self, index: int, video: torch.Tensor, patch: tuple[int, int, int], window_index: int, first_window: bool
    ) -> torch.Tensor:
        """:meth:`stage` before rounding."""
        start, stop = self.windows[window_index]
        frames, (height, width) = video.shape[2], video.shape[-2:]
        n = stop - start
        counts = [0] + [self.adapter.stage_frames(index, j, first_window) for j in range(1, n + 1)]
        if counts[-1] != frames:  # a backbone decoding in its own layout: spread the window's latent frames evenly
            field = self.pixels[:, :, :, [start + f * n // frames for f in range(frames)]]
        elif self.per_frame and n > 1 and frames > n:  # more frames than latent frames: each its own value
            weights = _time_weights(tuple(counts)).to(self.pixels.device)  # T_i, n
            field = torch.einsum("brcjhw,fj->brcfhw", self.pixels[:, :, :, start:stop], weights)
        else:
            latent = [start + next(j for j in range(n) if counts[j] <= f < counts[j + 1]) for f in range(frames)]
            field = self.pixels[:, :, :, latent]  # B, R, 2, T_i, h, w
        flat = F.interpolate(field.flatten(0, 3)[:, None], size=(height, width), mode="bilinear", align_corners=False)
        _, ph, pw = patch
        tokens = F.avg_pool2d(flat, (ph, pw), ceil_mode=True)
        scale = torch.tensor(
            [ph * self.output_size[0] / height, pw * self.output_size[1] / width], device=tokens.device
        ).reshape(1, 1, 2, 1, 1, 1)
        return tokens.reshape(*field.shape[:4], *tokens.shape[-2:]) / scale


@functools.lru_cache(maxsize=64)
def _time_weights(counts: tuple[int, ...]) -> torch.Tensor:
    """``T, n`` float32 weights taking ``n`` latent frames' values to the ``T = counts[-1]`` frames of a stage (cached:
    every stage and window of a decode asks again; callers must not modify the tensor).

    Latent frame ``j`` decodes to stage frames ``[counts[j], counts[j + 1])`` and its value is placed at their
    middle; every stage frame is linear between the two middles around it (beyond the first or last middle, along
    the first or last two). A stage frame at a middle takes that latent frame's value exactly.
    """
    n = len(counts) - 1
    middles = [(counts[j] + counts[j + 1] - 1) / 2 for j in range(n)]
    weights = torch.zeros(counts[-1], n)
    for f in range(counts[-1]):
        k = min(max(sum(m <= f for m in middles) - 1, 0), n - 2)  # the segment [middles[k], middles[k + 1]]
        alpha = (f - middles[k]) / (middles[k + 1] - middles[k])
        weights[f, k], weights[f, k + 1] = 1 - alpha, alpha
    return weights


@dataclasses.dataclass(frozen=True)
class CorrespondenceEstimate:
    """The content estimate of one decode's correspondence (:func:`estimate_correspondence`), kept to be reused.

    The estimate depends on the frozen encoder, the latents, the reference and the estimate's settings only, never on
    trained weights: a training loop over clips it has encoded before, or several decodes of the same latents, can
    make it once and pass it to ``RefDecoder.decode(displacements=...)``, which then skips the encoder passes.

    Attributes:
        pixels: ``B, R, 2, t, h, w`` float32, ``(dy, dx)`` in output pixels per latent frame and latent cell.
    """

    pixels: torch.Tensor

    def to(self, device: torch.device | str) -> CorrespondenceEstimate:
        """The same estimate on ``device``."""
        return CorrespondenceEstimate(self.pixels.to(device))


def estimate_correspondence(
    adapter: BackboneAdapter,
    latents: torch.Tensor,
    reference: torch.Tensor,
    output_size: tuple[int, int],
    search: tuple,
    still_frames: int = 4,
    frame_spaces: str = "still_clip",
    half_cell: bool = False,
) -> CorrespondenceEstimate:
    """Where each latent cell's content lies in each reference frame, estimated from content (no gradients).

    Args:
        adapter: the backbone adapter (its frozen encoder encodes the reference).
        latents: ``B, C, t, h, w`` raw latents being decoded.
        reference: ``B, 3, R, H, W`` in [-1, 1] at the decoded size ``output_size``.
        output_size: ``(H, W)`` of the decoded frames.
        search: ``(search_radius, temperature, match_radius[, smooth_radius[, global_prior[, subcell]]])`` of
            :func:`cost_volume_displacement`.
        still_frames: latent frames of the still clip the reference is encoded as (``frame_spaces="still_clip"``).
        frame_spaces: how the reference reaches each latent frame's feature space, ``"fitted"`` or ``"still_clip"``
            (see :func:`_reference_latents`).
        half_cell: the candidates lie half a cell apart: the reference is also encoded moved by half a cell
            (:func:`half_cell_phases`, 4 images per reference frame through the encoder instead of 1).
    """
    h, w = latents.shape[-2:]
    with torch.no_grad():
        frames = reference.transpose(1, 2).flatten(0, 1)  # B*R, 3, H, W
        if frames.shape[-2:] != (h * adapter.spatial_factor, w * adapter.spatial_factor):  # an upscale head
            frames = F.adaptive_avg_pool2d(frames, (h * adapter.spatial_factor, w * adapter.spatial_factor))
        if half_cell:
            frames = half_cell_phases(frames, adapter.spatial_factor)
        cells = torch.cat(
            [
                cost_volume_displacement(latents[:, :, kind], encoded, *search, half_cell=half_cell)
                for kind, encoded in _reference_latents(adapter, frames, latents, frame_spaces, still_frames)
            ],
            dim=3,
        )
    scale = torch.tensor([output_size[0] / h, output_size[1] / w], device=cells.device).reshape(1, 1, 2, 1, 1, 1)
    return CorrespondenceEstimate(cells * scale)


def correspondence_field(
    adapter: BackboneAdapter,
    latents: torch.Tensor,
    reference: torch.Tensor,
    windows: list[tuple[int, int]],
    output_size: tuple[int, int],
    search: tuple | None,
    displacements: torch.Tensor | CorrespondenceEstimate | None = None,
    snap: bool = False,
    still_frames: int = 4,
    frame_spaces: str = "still_clip",
    per_frame: bool = False,
    sub_token_shift: bool = False,
    half_cell: bool = False,
) -> CorrespondenceField:
    """One decode's :class:`CorrespondenceField`: the caller's ``displacements`` if given, else the estimate.

    Args:
        adapter: the backbone adapter (its frozen encoder encodes the reference for the estimate).
        latents: ``B, C, t, h, w`` raw latents being decoded.
        reference: ``B, 3, R, H, W`` in [-1, 1] at the decoded size ``output_size``.
        windows: the decode's latent-frame windows.
        output_size: ``(H, W)`` of the decoded frames.
        search, still_frames, frame_spaces, half_cell: the estimate's settings (:func:`estimate_correspondence`);
            used when no ``displacements`` are given.
        displacements: a caller's pixel displacements (see :func:`pixel_flow_to_latent_grid`), or an estimate made
            before for these latents and reference (:class:`CorrespondenceEstimate`).
        snap: round every stage's displacements to whole tokens (see :class:`CorrespondenceField`).
        per_frame: stages after temporal upsampling give each frame its own displacement, in time between the
            latent frames' (see :class:`CorrespondenceField`).
        sub_token_shift: move each video frame by the sub-token remainder (see :class:`CorrespondenceField`).
    """
    r, (t, h, w) = reference.shape[2], latents.shape[2:]
    if isinstance(displacements, CorrespondenceEstimate):
        expected = (latents.shape[0], r, 2, t, h, w)
        if tuple(displacements.pixels.shape) != expected:
            raise InputError(
                f"the correspondence estimate is {tuple(displacements.pixels.shape)}, but these latents and "
                f"reference need B, R, 2, t, h, w = {expected}: it was made for another decode"
            )
        pixels = displacements.pixels.to(latents.device)
    elif displacements is not None:
        pixels = pixel_flow_to_latent_grid(displacements.to(latents.device), r, (t, h, w), adapter)
    else:
        estimate = estimate_correspondence(
            adapter, latents, reference, output_size, search, still_frames, frame_spaces, half_cell
        )
        pixels = estimate.pixels
    return CorrespondenceField(pixels, output_size, windows, adapter, snap, per_frame, sub_token_shift)
