"""Correspondence-guided neighbourhood attention: reference keys around where the content is, not where the query is.

A local :class:`~refdecoder.blocks.AttentionScope` lets the query at ``(y, x)`` see the reference keys at
``(y + oy, x + ox)`` for ``|oy|, |ox| <= r``. Here a video query carries a displacement ``(dy, dx)`` (in tokens,
fractional) into each reference frame, and sees the reference at ``(y + dy + oy, x + dx + ox)`` instead:

- the query meets the displaced content at the relative position ``(oy, ox)`` it would have met content in place,
  so what attention learned at zero displacement carries over unchanged. Whole-token displacements (the snapped
  default) gather the keys and values there and turn the query by ``(dy, dx)`` (RoPE rotations add); fractional
  ones sample keys (before RoPE) and values bilinearly (4 taps, deformable-attention style) and rotate the keys as
  if they sat at ``(y + oy, x + ox)``;
- the locality prior (:class:`~refdecoder.blocks.LocalityBias`) is indexed by ``(oy, ox)``, the offset from the
  displaced centre;
- a slot whose sample position leaves the grid is masked, as a neighbour outside the grid is today.

Video keys, and everything a reference query sees, are today's neighbourhoods (reference queries use displacement 0).
With zero displacement this is :func:`~refdecoder.blocks.attention_scope.neighbourhood_attention` to float rounding
(tested for radii 1-3, square and non-square grids, several reference frames, with and without the prior).

Queries are grouped by grid position, a chunk of positions at a time: the ``(T-R) (2r_v+1)^2`` video keys of a
position are gathered once for its T queries (as in today's gather), the ``R (2r+1)^2`` reference keys are read
per query; logits, a float32 softmax over both and the weighted values are computed explicitly. Memory stays linear
in the tokens. It runs on every device (no fused kernel: the displaced gather is data-dependent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refdecoder.blocks.attention import note_kernel
from refdecoder.blocks.attention_scope import CHUNK_BYTES, AttentionScope, _neighbours
from refdecoder.blocks.rope import apply_rope, rope_at

if TYPE_CHECKING:
    from refdecoder.blocks.locality_bias import LocalityBias

# Working memory of one chunk of positions: 4x the scopes' budget, because every query reads its own reference keys
# (budgeted as 4 float32 taps each), which at the quality benchmark's batch left one position per chunk otherwise.
GUIDED_CHUNK_BYTES = 4 * CHUNK_BYTES

__all__ = ["ReferenceGuide", "guided_neighbourhood_attention", "bilinear_tokens", "take_tokens"]


@dataclass(frozen=True)
class ReferenceGuide:
    """What one stage's attention layers need to centre the reference neighbourhoods (made per stage call).

    Attributes:
        displacement: ``B, R, 2, T - R, H, W`` float ``(dy, dx)`` in tokens of the stage grid (see
            :func:`guided_neighbourhood_attention`).
        reference_times: ``(R,)`` RoPE time positions of the reference frames.
        rope_theta: RoPE base.
        integral: whether every displacement is a whole number of tokens (None: each layer looks). Found once per
            stage call by :meth:`for_stage`, so the stage's layers do not each read it back from the device.
    """

    displacement: torch.Tensor
    reference_times: torch.Tensor
    rope_theta: float
    integral: bool | None = None

    @classmethod
    def for_stage(cls, displacement: torch.Tensor, reference_times: torch.Tensor, rope_theta: float) -> ReferenceGuide:
        """The guide of one stage call, ``integral`` read once (not on the meta device, which holds no values)."""
        meta = displacement.device.type == "meta"
        integral = None if meta else bool((displacement == displacement.round()).all())
        return cls(displacement, reference_times, rope_theta, integral)


def take_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per sample, the tokens at ``index``: ``tokens[b, index[b, ...]]``.

    Args:
        tokens: ``B, M, ...`` (M tokens per sample).
        index: ``B, S...`` long, in ``[0, M)``.

    Returns:
        ``B, S..., ...``. One ``index_select`` over the flattened samples: its backward is an ``index_add``, which on
        CPU cost a fraction of the accumulating ``index_put`` that advanced indexing (``tokens[batch, index]``)
        runs backward (the quality benchmark's training step: 0.2 of 1.6 s in that backward alone).
    """
    b, m = tokens.shape[:2]
    offset = (torch.arange(b, device=index.device) * m).reshape(b, *([1] * (index.ndim - 1)))
    flat = tokens.flatten(0, 1).index_select(0, (index + offset).flatten())
    return flat.reshape(*index.shape, *tokens.shape[2:])


def bilinear_tokens(frames: torch.Tensor, y: torch.Tensor, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Sample token vectors at fractional grid positions with 4 bilinear taps.

    Args:
        frames: ``B, F*height*width, ...`` tokens of F frames ordered (f, y, x), x fastest.
        y, x: ``B, S...`` fractional row / column positions (clamped into the grid; callers mask outside ones).
        width, height: the frames' grid size.

    Returns:
        ``B, S..., ...``: at an integer position exactly the token there (the other taps get weight 0). Frames
        stack along the rows (frame ``f``'s row ``y`` is row ``f*height + y``), so a caller passes ``height``
        as ``F*height`` and adds ``f*height`` to ``y``; a tap that would cross into the next frame has weight 0.
    """
    y = y.clamp(0, height - 1)
    x = x.clamp(0, width - 1)
    y0, x0 = y.floor(), x.floor()
    wy, wx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    extra = frames.ndim - 2

    def tap(row: torch.Tensor, col: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return take_tokens(frames, row * width + col).float() * weight.reshape(*weight.shape, *([1] * extra))

    out = tap(y0, x0, (1 - wy) * (1 - wx)) + tap(y0, x1, (1 - wy) * wx)
    return (out + tap(y1, x0, wy * (1 - wx)) + tap(y1, x1, wy * wx)).to(frames.dtype)


def guided_neighbourhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    k_raw: torch.Tensor,
    v: torch.Tensor,
    scope: AttentionScope,
    displacement: torch.Tensor,
    reference_times: torch.Tensor,
    rope_theta: float,
    bias: LocalityBias | None = None,
    chunk_bytes: int = GUIDED_CHUNK_BYTES,
    gather: bool | None = None,
    integral: bool | None = None,
) -> torch.Tensor:
    """Neighbourhood attention whose reference neighbourhoods are centred on displaced positions.

    Args:
        q, k: ``B, heads, N, head_dim`` after RoPE (``N = T*H*W`` of ``scope.grid``).
        k_raw: the keys before RoPE (reference keys are sampled from them and rotated at their virtual position).
        v: values ``B, heads, N, head_dim``.
        scope: a local scope with ``num_reference`` = R >= 1 leading reference frames.
        displacement: ``B, R, 2, T - R, H, W`` float, ``(dy, dx)`` in tokens of this grid: video token ``(t, y, x)``
            shows the content of reference frame ``j`` at ``(y + dy, x + dx)``.
        reference_times: ``(R,)`` RoPE time positions of the reference frames.
        rope_theta: RoPE base of the tables ``q`` and ``k`` were rotated with.
        bias: optional locality prior; for reference keys indexed by the offset from the displaced centre.
        chunk_bytes: working-memory budget of one chunk of query tokens.
        gather: read reference tokens at whole-token positions by a plain gather (``True``) or bilinearly
            (``False``); ``None`` gathers when every displacement is a whole number of tokens. Both agree there.
        integral: whether every displacement is a whole number of tokens, where the caller knows
            (:attr:`ReferenceGuide.integral`); None: looked up here (one read back from the device per call).

    Returns:
        ``B, heads, N, head_dim``.
    """
    t, h, w = scope.grid
    b, heads, n, d = q.shape
    r, p = scope.num_reference, h * w
    if scope.is_global or r < 1:
        raise ValueError("guided attention needs a local scope with at least one reference frame")
    if displacement.shape != (b, r, 2, t - r, h, w):
        raise ValueError(f"displacement must be {(b, r, 2, t - r, h, w)}, got {tuple(displacement.shape)}")
    note_kernel("scope:guided", q)
    # Per grid position and frame: the displacement into each reference frame (reference queries: none).
    shift = torch.zeros(b, r, 2, t, p, dtype=torch.float32, device=q.device)
    shift[:, :, :, r:] = displacement.float().flatten(-2)
    shift = shift.permute(0, 4, 3, 1, 2)  # B, P, T, R, 2
    rr = scope.reference_radius
    steps = torch.arange(-rr, rr + 1, device=q.device)
    oy, ox = steps.repeat_interleave(2 * rr + 1), steps.repeat(2 * rr + 1)  # O: row-major offsets
    video_index, video_valid, vy, vx = _neighbours(h, w, scope.video_frame_radius, q.device)
    frames_v = torch.arange(r, t, device=q.device)
    video_tokens = (video_index[:, None, :] + frames_v[None, :, None] * p).flatten(1)  # P, (T-R)*Ov
    video_valid = video_valid[:, None, :].expand(-1, t - r, -1).flatten(1)
    ref_bias = video_bias = None
    if bias is not None:
        ref_bias = bias.slots(torch.zeros_like(oy), oy, ox).repeat(1, r).float()  # heads, R*O
        kinds = torch.ones_like(vy).repeat(t - r)
        video_bias = bias.slots(kinds, vy.repeat(t - r), vx.repeat(t - r)).float()  # heads, (T-R)*Ov
    s_ref, s_vid = r * oy.numel(), video_tokens.shape[1]
    # Per position: T x S_ref sampled keys and values (float32 taps), S_vid gathered ones, T x S float32 logits.
    per_position = b * heads * (t * s_ref * d * 16 + 2 * s_vid * d * q.element_size() + 12 * t * (s_ref + s_vid))
    # On the meta device (FLOP counting) nothing is allocated: one chunk, the same operations in fewer calls.
    chunk = p if q.device.type == "meta" else max(1, chunk_bytes // per_position)
    kraw_tok = k_raw.transpose(1, 2)[:, : r * p]  # B, R*P, heads, D: the reference frames' keys before RoPE
    kref_tok = k.transpose(1, 2)[:, : r * p]  # ... after RoPE (the gather path)
    vref_tok = v.transpose(1, 2)[:, : r * p]
    zero = torch.zeros((), device=q.device)
    times = reference_times.to(q.device).reshape(r, 1)
    frame_rows = (torch.arange(r, device=q.device) * h)[None, None, None, :, None]
    grid_q = q.reshape(b, heads, t, p, d)
    parts = []
    # Whole-token displacements (snapped fields, zero) read the reference at token centres: a plain gather of the
    # rotated keys, and the query turned by the displacement instead of every key by its virtual position (RoPE
    # rotations add: the query-key angle is the same). Fractional ones take the bilinear path.
    if q.device.type == "meta":  # FLOP counting: no values to look at; the snapped default gathers
        whole = gather is not False
    else:
        if integral is None:
            integral = bool((shift == shift.round()).all())
        if gather and not integral:
            raise ValueError("gather=True needs whole-token displacements")
        whole = integral if gather is None else gather
    for p0 in range(0, p, chunk):
        chunk_slice = slice(p0, min(p0 + chunk, p))  # positions are taken in order: slices, not index lists
        pos = torch.arange(p0, min(p0 + chunk, p), device=q.device)
        ry, rx = (pos // w)[:, None] + oy, (pos % w)[:, None] + ox  # Pc, O: the slot relative to the query
        sy = ry[None, :, None, None] + shift[:, chunk_slice, :, :, 0, None]  # B, Pc, T, R, O: where it samples
        sx = rx[None, :, None, None] + shift[:, chunk_slice, :, :, 1, None]
        inside = ((sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)).flatten(3)  # B, Pc, T, R*O
        queries = grid_q[:, :, :, chunk_slice].float() / math.sqrt(d)  # B, heads, T, Pc, D
        if whole:
            rows = sy.clamp(0, h - 1).long() + frame_rows
            index = rows * w + sx.clamp(0, w - 1).long()  # B, Pc, T, R, O: token of the reference frames
            keys = take_tokens(kref_tok, index)  # B, Pc, T, R, O, heads, D
            values = take_tokens(vref_tok, index)
            turn = shift[:, chunk_slice].permute(0, 2, 1, 3, 4)  # B, T, Pc, R, 2
            cos, sin = rope_at(zero, turn[..., 0], turn[..., 1], d, rope_theta)  # B, T, Pc, R, D
            turned = apply_rope(queries[:, :, :, :, None], cos[:, None], sin[:, None])  # B, heads, T, Pc, R, D
            ref_logits = torch.einsum("bhtprd,bptrohd->bhtpro", turned, keys.float()).flatten(-2)
        else:
            keys = bilinear_tokens(kraw_tok, sy + frame_rows, sx, w, r * h)  # B, Pc, T, R, O, heads, D
            values = bilinear_tokens(vref_tok, sy + frame_rows, sx, w, r * h)
            cos, sin = rope_at(times[None], ry[:, None], rx[:, None], d, rope_theta)  # Pc, R, O, D
            keys = apply_rope(keys, cos[None, :, None, :, :, None], sin[None, :, None, :, :, None])
            ref_logits = torch.einsum("bhtpd,bptshd->bhtps", queries, keys.flatten(3, 4).float())
        ref_logits = ref_logits.masked_fill(~inside.permute(0, 2, 1, 3)[:, None], float("-inf"))
        vt = video_tokens[chunk_slice]  # Pc, S_vid
        vid_keys = k.index_select(2, vt.flatten()).unflatten(2, vt.shape).float()  # B, heads, Pc, S_vid, D
        vid_values = v.index_select(2, vt.flatten()).unflatten(2, vt.shape).float()
        vid_logits = torch.einsum("bhtpd,bhpsd->bhtps", queries, vid_keys)
        vid_logits = vid_logits.masked_fill(~video_valid[chunk_slice][None, None, None], float("-inf"))
        if bias is not None:
            ref_logits = ref_logits + ref_bias[None, :, None, None]
            vid_logits = vid_logits + video_bias[None, :, None, None]
        weights = torch.softmax(torch.cat([ref_logits, vid_logits], -1), dim=-1)
        ref_w, vid_w = weights.split([s_ref, s_vid], dim=-1)
        part = torch.einsum("bhtps,bptshd->bhtpd", ref_w, values.flatten(3, 4).float())
        part = part + torch.einsum("bhtps,bhpsd->bhtpd", vid_w, vid_values)
        parts.append(part.to(q.dtype))
    return torch.cat(parts, dim=3).reshape(b, heads, n, d)
