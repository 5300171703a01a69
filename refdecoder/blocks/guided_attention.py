"""Correspondence-guided neighbourhood attention: reference keys around where the content is, not where the query is.

A local :class:`~refdecoder.blocks.AttentionScope` lets the query at ``(y, x)`` see the reference keys at
``(y + oy, x + ox)`` for ``|oy|, |ox| <= r``. Here a video query carries a displacement ``(dy, dx)`` (in tokens,
fractional) into each reference frame, and sees the reference at ``(y + dy + oy, x + dx + ox)`` instead:

- keys and values there are sampled bilinearly from the reference frame (4 taps, deformable-attention style), the
  keys before RoPE, and then rotated as if they sat at ``(y + oy, x + ox)``: the query meets the displaced content
  at the relative position it would have met content in place, so what attention learned at zero displacement
  carries over unchanged;
- the locality prior (:class:`~refdecoder.blocks.LocalityBias`) is indexed by ``(oy, ox)``, the offset from the
  displaced centre;
- a slot whose sample position leaves the grid is masked, as a neighbour outside the grid is today.

Video keys, and everything a reference query sees, are today's neighbourhoods (reference queries use displacement 0).
With zero displacement this is :func:`~refdecoder.blocks.attention_scope.neighbourhood_attention` to float rounding
(tested for radii 1-3, square and non-square grids, several reference frames, with and without the prior).

Every query token gathers its own keys (``R (2r+1)^2`` reference and ``(T-R) (2r_v+1)^2`` video slots), a chunk of
tokens at a time, so memory stays linear in the tokens. It runs on every device (no fused kernel: the displaced
gather is data-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refdecoder.blocks.attention import attention, note_kernel
from refdecoder.blocks.attention_scope import CHUNK_BYTES, AttentionScope, _neighbours
from refdecoder.blocks.rope import apply_rope, rope_at

if TYPE_CHECKING:
    from refdecoder.blocks.locality_bias import LocalityBias

__all__ = ["ReferenceGuide", "guided_neighbourhood_attention", "bilinear_tokens"]


@dataclass(frozen=True)
class ReferenceGuide:
    """What one stage's attention layers need to centre the reference neighbourhoods (made per stage call).

    Attributes:
        displacement: ``B, R, 2, T - R, H, W`` float ``(dy, dx)`` in tokens of the stage grid (see
            :func:`guided_neighbourhood_attention`).
        reference_times: ``(R,)`` RoPE time positions of the reference frames.
        rope_theta: RoPE base.
    """

    displacement: torch.Tensor
    reference_times: torch.Tensor
    rope_theta: float


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
    batch = torch.arange(frames.shape[0], device=frames.device).reshape(-1, *([1] * (y.ndim - 1)))
    extra = frames.ndim - 2

    def tap(row: torch.Tensor, col: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return frames[batch, row * width + col].float() * weight.reshape(*weight.shape, *([1] * extra))

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
    chunk_bytes: int = CHUNK_BYTES,
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
    # Per query token and reference frame: its displacement (reference queries: none).
    shift = torch.zeros(b, r, 2, t, p, dtype=torch.float32, device=q.device)
    shift[:, :, :, r:] = displacement.float().flatten(-2)
    shift = shift.flatten(3).permute(0, 3, 1, 2)  # B, N, R, 2
    rr = scope.reference_radius
    steps = torch.arange(-rr, rr + 1, device=q.device)
    oy, ox = steps.repeat_interleave(2 * rr + 1), steps.repeat(2 * rr + 1)  # O: row-major offsets
    video_index, video_valid, vy, vx = _neighbours(h, w, scope.video_frame_radius, q.device)
    frames_v = torch.arange(r, t, device=q.device)
    video_tokens = (video_index[:, None, :] + frames_v[None, :, None] * p).flatten(1)  # P, (T-R)*Ov
    video_valid = video_valid[:, None, :].expand(-1, t - r, -1).flatten(1)
    slot_bias = None
    if bias is not None:
        ref_bias = bias.slots(torch.zeros_like(oy), oy, ox).repeat(1, r)  # heads, R*O
        kinds = torch.ones_like(vy).repeat(t - r)
        slot_bias = torch.cat([ref_bias, bias.slots(kinds, vy.repeat(t - r), vx.repeat(t - r))], 1).to(q.dtype)
    s = r * oy.numel() + video_tokens.shape[1]
    # Per query token: gathered keys and values (S each, float32 taps while sampling), mask and logits.
    chunk = max(1, chunk_bytes // (b * heads * (s * d * (2 * q.element_size() + 8) + 8 * s)))
    k_tok, v_tok, kraw_tok = (x.transpose(1, 2) for x in (k, v, k_raw))  # B, N, heads, D
    times = reference_times.to(q.device).reshape(r, 1)
    out = q.new_empty(b, heads, n, d)
    for n0 in range(0, n, chunk):
        tok = torch.arange(n0, min(n0 + chunk, n), device=q.device)
        pos = tok % p
        ry, rx = (pos // w)[:, None] + oy, (pos % w)[:, None] + ox  # C, O: where the slot sits relative to q
        sy = ry[None, :, None] + shift[:, tok, :, 0, None]  # B, C, R, O: where it samples
        sx = rx[None, :, None] + shift[:, tok, :, 1, None]
        inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
        frame_rows = (torch.arange(r, device=q.device) * h)[None, None, :, None]
        keys = bilinear_tokens(kraw_tok[:, : r * p], sy + frame_rows, sx, w, r * h)  # B, C, R, O, heads, D
        values = bilinear_tokens(v_tok[:, : r * p], sy + frame_rows, sx, w, r * h)
        cos, sin = rope_at(times[None], ry[:, None], rx[:, None], d, rope_theta)  # C, R, O, D
        keys = apply_rope(keys, cos[:, :, :, None], sin[:, :, :, None])
        c = tok.numel()
        vt = video_tokens[pos]
        keys = torch.cat([keys.flatten(2, 3), k_tok[:, vt]], 2)  # B, C, S, heads, D
        values = torch.cat([values.flatten(2, 3), v_tok[:, vt]], 2)
        valid = torch.cat([inside.flatten(2), video_valid[pos][None].expand(b, -1, -1)], 2)  # B, C, S
        mask = torch.zeros(b, 1, c, s, dtype=q.dtype, device=q.device).masked_fill(~valid[:, None], float("-inf"))
        if slot_bias is not None:
            mask = mask + slot_bias[None, :, None, :]
        mask = mask.expand(b, heads, c, s).reshape(b, heads * c, 1, s)
        keys, values = (x.permute(0, 3, 1, 2, 4).reshape(b, heads * c, s, d) for x in (keys, values))
        part = attention(q[:, :, tok].reshape(b, heads * c, 1, d), keys, values, mask)
        out[:, :, tok] = part.reshape(b, heads, c, d)
    return out
