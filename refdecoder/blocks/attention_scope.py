"""Attention scopes over a token grid of reference and video frames: global, per position, or a neighbourhood.

A stage's tokens form a ``T x H x W`` grid ordered (t, h, w), w fastest; its first ``num_reference`` frames are
reference frames. An :class:`AttentionScope` with a radius ``r`` lets the query at row/column ``(y, x)`` of any
frame see the keys with ``|dy| <= r`` and ``|dx| <= r`` in every frame (fewer at the grid's edges). Reference and
video frames may use different radii, e.g. a neighbourhood in the reference but only the query's own position in
the video frames. Time is never restricted. An optional additive bias (:class:`~refdecoder.blocks.LocalityBias`)
is a function of the head, the kind of the key's frame and the offset ``(dy, dx)``.

One scope, three computations of it, equal to float rounding (tested):

- :func:`local_attention_mask` (+ :meth:`LocalityBias.dense`): the dense ``N x N`` definition, ``N^2`` bytes;
  for tests and tiny grids only.
- :func:`neighbourhood_attention`: each grid position's keys are gathered from its neighbourhood in every frame
  and attended with SDPA, a chunk of positions at a time. Memory grows with ``tokens x (2r+1)^2`` (bounded per
  chunk by ``chunk_bytes``), never with ``N^2``. With radius 0 everywhere nothing is gathered: it is ``H*W``
  attentions over the frames (:func:`per_position_attention`).
- :func:`flex_neighbourhood_attention`: ``torch.nn.attention.flex_attention`` with a block mask and the bias as
  a score modification, compiled; the default on CUDA where flex_attention exists.

:func:`scoped_attention` picks one. Global attention without a bias is plain :func:`~refdecoder.blocks.attention`
(no mask); global attention with a bias runs in chunks of queries so the dense bias never exceeds ``chunk_bytes``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from refdecoder.blocks.attention import attention, note_kernel

__all__ = [
    "AttentionScope",
    "local_attention_mask",
    "per_position_attention",
    "neighbourhood_attention",
    "flex_neighbourhood_attention",
    "scoped_attention",
    "flex_available",
    "CHUNK_BYTES",
    "DENSE_BYTES",
    "DENSE_TOKENS",
]

logger = logging.getLogger("refdecoder")

Backend = Literal["auto", "gather", "flex", "dense"]
# Working memory of one chunk of neighbourhood / biased global attention (gathered keys and values, logits).
CHUNK_BYTES = 16 * 2**20
# A local scope of at most DENSE_TOKENS tokens whose dense float32 logits and weights (8 bytes per query-key pair,
# batch and heads included) fit in DENSE_BYTES runs dense on CPU. Training (forward and backward) of one radius-2
# attention call, dense against the gather, with batch x heads of 8 and 16: dense 1.3-1.5x faster at 576-640
# tokens, even at 768, the gather faster beyond (1.4-1.6x at 1024 tokens, about 2x at 1536); with batch x heads of
# 4 the gather is about as fast from 576 tokens on (`python benchmarks/attention_scope.py --dense-crossover`,
# benchmarks/results/attention_scope_crossover.json).
DENSE_TOKENS = 768
DENSE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class AttentionScope:
    """Which keys each query of a ``T x H x W`` token grid sees.

    Attributes:
        grid: ``(T, H, W)``; tokens ordered (t, h, w), w fastest.
        num_reference: R, the leading frames of the grid that are reference frames.
        radius: None = global attention; r >= 0 = keys within r rows and columns, in every reference frame (and
            in every video frame unless ``video_radius`` says otherwise).
        video_radius: with a local ``radius``, the radius in the video frames; None = the same as ``radius``.
    """

    grid: tuple[int, int, int]
    num_reference: int = 0
    radius: int | None = None
    video_radius: int | None = None

    def __post_init__(self) -> None:
        t = self.grid[0]
        if not 0 <= self.num_reference <= t:
            raise ValueError(f"num_reference must be in 0..T={t}, got {self.num_reference}")
        if self.radius is not None and self.radius < 0:
            raise ValueError(f"attention radius must be None (global) or >= 0, got {self.radius}")
        if self.video_radius is not None and (self.radius is None or self.video_radius < 0):
            raise ValueError(f"video_radius needs a local radius and must be >= 0, got {self.video_radius}")

    @property
    def is_global(self) -> bool:
        return self.radius is None

    @property
    def reference_radius(self) -> int | None:
        """Radius in the reference frames (None: global)."""
        return self.radius

    @property
    def video_frame_radius(self) -> int | None:
        """Radius in the video frames (None: global)."""
        return self.radius if self.video_radius is None else self.video_radius

    def frame_radii(self) -> list[int | None]:
        """The radius of each of the T frames."""
        t, r = self.grid[0], self.num_reference
        return [self.reference_radius] * r + [self.video_frame_radius] * (t - r)


def _grid_coordinates(grid: tuple[int, int, int], device: torch.device | str | None) -> tuple[torch.Tensor, ...]:
    """Frame, row and column of every token of ``grid``, each ``(N,)``."""
    t, h, w = grid
    index = torch.arange(t * h * w, device=device)
    return index // (h * w), index % (h * w) // w, index % w


class ScopeBias(Protocol):
    """An additive attention bias over a scope's keys (:class:`~refdecoder.blocks.LocalityBias`); typed here by what
    the attention computations call, so that this module does not depend on the bias module that reads scopes."""

    num_heads: int

    def slots(self, kind: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """``heads, S`` bias of keys of frame kind ``kind`` (0 reference, 1 video) at offsets ``(dy, dx)``."""
        ...

    def per_frame(self, scope: AttentionScope) -> torch.Tensor:
        """``heads, T`` bias of each frame's key at the query's own position (radius 0)."""
        ...

    def dense(self, scope: AttentionScope, rows: slice | None = None) -> torch.Tensor:
        """``heads, N, N`` (or the ``rows`` of it) bias of every query-key pair."""
        ...

    def score_mod(self, scope: AttentionScope) -> Any:
        """The bias as a ``flex_attention`` score modification."""
        ...


def local_attention_mask(scope: AttentionScope, device: torch.device | str | None = None) -> torch.Tensor:
    """The dense definition of a local scope: ``N x N`` bool, True = the query (row) sees the key (column)."""
    if scope.is_global:
        raise ValueError("a global scope has no local mask")
    frames, rows, cols = _grid_coordinates(scope.grid, device)
    radius = torch.where(frames < scope.num_reference, scope.reference_radius, scope.video_frame_radius)
    near = ((rows[:, None] - rows[None, :]).abs() <= radius[None, :]) & (
        (cols[:, None] - cols[None, :]).abs() <= radius[None, :]
    )
    return near


def per_position_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    bias: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Attention where each token sees only its own grid position, in every frame (radius 0 everywhere).

    Args:
        q, k, v: ``B, heads, N, head_dim`` with ``N = frames * H * W`` ordered (t, h, w).
        frames: T, the grid's frame count.
        bias: optional ``heads, T`` additive bias per key frame.
        chunk_bytes: working-memory budget of one chunk of grid positions.

    Returns:
        ``B, heads, N, head_dim``; ``H*W`` attentions over ``frames`` tokens each, a chunk of positions at a time,
        so neither time nor memory grows with the square of the token count.
    """
    b, heads, n, d = q.shape
    if n % frames:
        raise ValueError(f"token count {n} is not a multiple of the frame count {frames}")
    p = n // frames
    # Per position: its queries, keys, values and outputs (T each) and float32 logits and weights (T x T each).
    chunk = max(1, chunk_bytes // (b * heads * (4 * frames * d * q.element_size() + 8 * frames * frames)))
    grid_q, grid_k, grid_v = (x.reshape(b, heads, frames, p, d) for x in (q, k, v))
    out = q.new_empty(b, heads, frames, p, d)
    for p0 in range(0, p, chunk):
        pos = slice(p0, min(p0 + chunk, p))
        pc = pos.stop - pos.start
        # Batch dims (B, heads * Pc): each position's tokens over the frames are one attention.
        part_q, part_k, part_v = (
            x[:, :, :, pos].transpose(2, 3).reshape(b, heads * pc, frames, d) for x in (grid_q, grid_k, grid_v)
        )
        mask = None
        if bias is not None:
            mask = (
                bias.to(q.dtype)[None, :, None, None, :]
                .expand(b, heads, pc, 1, frames)
                .reshape(b, heads * pc, 1, frames)
            )
        out[:, :, :, pos] = attention(part_q, part_k, part_v, mask).reshape(b, heads, pc, frames, d).transpose(2, 3)
    return out.reshape(b, heads, n, d)


@functools.lru_cache(maxsize=32)
def _neighbours(h: int, w: int, radius: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For each of the ``P = h*w`` positions, its ``O = (2r+1)^2`` neighbours (row-major offsets).

    Returns ``(index, valid, dy, dx)``: ``index`` ``P, O`` long (an outside neighbour points at the position
    itself, and ``valid`` ``P, O`` is False there), ``dy``/``dx`` ``(O,)`` the offsets.
    """
    steps = torch.arange(-radius, radius + 1, device=device)
    dy, dx = steps.repeat_interleave(2 * radius + 1), steps.repeat(2 * radius + 1)
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    ny, nx = rows[:, None] + dy[None, :], cols[:, None] + dx[None, :]
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    index = torch.where(valid, ny * w + nx, (rows * w + cols)[:, None])
    return index, valid, dy, dx


@dataclass(frozen=True)
class _Slots:
    """The keys of every grid position in a local scope, ``S`` per position, frame by frame."""

    tokens: torch.Tensor  # P, S: token index (t * P + position) of each key
    valid: torch.Tensor  # P, S: False where the neighbourhood leaves the grid (the index then repeats a token)
    kind: torch.Tensor  # S: 0 = a key in a reference frame, 1 = in a video frame
    dy: torch.Tensor  # S: row offset from the query
    dx: torch.Tensor  # S: column offset from the query


def _slots(scope: AttentionScope, device: torch.device) -> _Slots:
    t, h, w = scope.grid
    tokens, valid, kind, dy, dx = [], [], [], [], []
    for frame, radius in enumerate(scope.frame_radii()):
        index, ok, oy, ox = _neighbours(h, w, radius, device)
        tokens.append(index + frame * h * w)
        valid.append(ok)
        kind.append(torch.full_like(oy, int(frame >= scope.num_reference)))
        dy.append(oy)
        dx.append(ox)
    return _Slots(torch.cat(tokens, 1), torch.cat(valid, 1), torch.cat(kind), torch.cat(dy), torch.cat(dx))


def neighbourhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scope: AttentionScope,
    bias: ScopeBias | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Local-scope attention without an ``N x N`` mask: gathered neighbourhoods, a chunk of positions at a time.

    Args:
        q, k, v: ``B, heads, N, head_dim``, ``N = T*H*W`` of ``scope.grid``.
        scope: a local scope.
        bias: optional locality bias added to the logits.
        chunk_bytes: working-memory budget of one chunk of grid positions.

    Returns:
        ``B, heads, N, head_dim``.
    """
    t, h, w = scope.grid
    if scope.reference_radius == 0 and scope.video_frame_radius == 0:
        return per_position_attention(q, k, v, t, None if bias is None else bias.per_frame(scope))
    b, heads, n, d = q.shape
    slots = _slots(scope, q.device)
    s, elt = slots.tokens.shape[1], q.element_size()
    # Per position: gathered keys and values (S each), its queries and outputs (T each), the additive mask (S),
    # and float32 logits and weights (T x S each) when SDPA takes its math path.
    per_position = b * heads * (elt * (2 * s * d + 2 * t * d + s) + 8 * t * s)
    chunk = max(1, chunk_bytes // per_position)
    logit_bias = None if bias is None else bias.slots(slots.kind, slots.dy, slots.dx).to(q.dtype)  # heads, S
    grid_q = q.reshape(b, heads, t, h * w, d)
    out = q.new_empty(b, heads, t, h * w, d)
    for p0 in range(0, h * w, chunk):
        pos = slice(p0, min(p0 + chunk, h * w))
        pc = pos.stop - pos.start
        tokens = slots.tokens[pos]
        # Batch dims (B, heads * Pc): every position of the chunk is its own short attention. Keys and values are
        # taken by index_select (backward: an index_add), not by advanced indexing, whose backward is an
        # accumulating index_put: fwd+bwd 20-30% faster on CPU, the same values and gradients bit for bit.
        keys, values = (x.index_select(2, tokens.flatten()).reshape(b, heads * pc, s, d) for x in (k, v))
        queries = grid_q[:, :, :, pos].transpose(2, 3).reshape(b, heads * pc, t, d)
        mask = torch.zeros(1, 1, pc, 1, s, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~slots.valid[pos][None, None, :, None, :], float("-inf"))
        if logit_bias is not None:
            mask = mask + logit_bias[None, :, None, None, :]
        mask = mask.expand(b, heads, pc, 1, s).reshape(b, heads * pc, 1, s)
        out[:, :, :, pos] = attention(queries, keys, values, mask).reshape(b, heads, pc, t, d).transpose(2, 3)
    return out.reshape(b, heads, n, d)


def _global_biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scope: AttentionScope, bias: ScopeBias, chunk_bytes: int
) -> torch.Tensor:
    """Global attention plus a locality bias, in chunks of queries so the dense bias stays within budget."""
    b, heads, n, d = q.shape
    chunk = max(1, chunk_bytes // (b * heads * n * 4 * 2))
    parts = []
    for n0 in range(0, n, chunk):
        rows = slice(n0, min(n0 + chunk, n))
        parts.append(attention(q[:, :, rows], k, v, bias.dense(scope, rows).to(q.dtype)))
    return torch.cat(parts, dim=2)


@functools.lru_cache(maxsize=8)
def _cached_mask(scope: AttentionScope, device: torch.device) -> torch.Tensor:
    return local_attention_mask(scope, device)


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scope: AttentionScope, bias: ScopeBias | None
) -> torch.Tensor:
    """The scope's definition, materialised: ``N x N`` mask and bias (tests and tiny grids)."""
    logits = torch.zeros(q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
    if not scope.is_global:
        logits = logits.masked_fill(~_cached_mask(scope, q.device), float("-inf"))
    if bias is not None:
        logits = logits + bias.dense(scope).to(q.dtype)
    return attention(q, k, v, logits)


def flex_available() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` can be imported."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(scope: AttentionScope, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    t, h, w = scope.grid
    p, r_ref, r_vid = h * w, scope.reference_radius, scope.video_frame_radius

    def mask_mod(batch, head, q_idx, kv_idx):
        dy = (q_idx % p) // w - (kv_idx % p) // w
        dx = q_idx % w - kv_idx % w
        near_ref = (dy.abs() <= r_ref) & (dx.abs() <= r_ref)
        near_vid = (dy.abs() <= r_vid) & (dx.abs() <= r_vid)
        return torch.where(kv_idx // p < scope.num_reference, near_ref, near_vid)

    return create_block_mask(mask_mod, None, None, t * p, t * p, device=device)


def flex_neighbourhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scope: AttentionScope, bias: ScopeBias | None = None
) -> torch.Tensor:
    """The scope on compiled ``flex_attention``: a block mask for local scopes, the bias as a score modification."""
    block_mask = None if scope.is_global else _flex_block_mask(scope, q.device)
    score_mod = None if bias is None else bias.score_mod(scope)
    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)


def scoped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scope: AttentionScope,
    bias: ScopeBias | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of ``B, heads, N, head_dim`` tokens within ``scope``, plus ``bias``; returns ``B, heads, N, D``.

    ``backend="auto"``: global without a bias -> :func:`~refdecoder.blocks.attention` (no mask); on CUDA with
    flex_attention -> :func:`flex_neighbourhood_attention`; else global with a bias -> chunked dense bias, and
    local -> :func:`neighbourhood_attention` (a small grid runs dense: :data:`DENSE_TOKENS`, :data:`DENSE_BYTES`).
    ``"gather"``, ``"flex"`` and ``"dense"`` (the ``N x N`` definition) force one computation.
    """
    t, h, w = scope.grid
    if q.shape[2] != t * h * w or k.shape[2] != q.shape[2]:
        raise ValueError(f"scope grid {scope.grid} has {t * h * w} tokens, got q {tuple(q.shape)} k {tuple(k.shape)}")
    if bias is not None and bias.num_heads != q.shape[1]:
        raise ValueError(f"the locality bias has {bias.num_heads} heads, the queries {q.shape[1]}")
    if scope.is_global and bias is None and backend != "dense":
        return attention(q, k, v)
    path = _scope_path(q, scope, backend)
    note_kernel(f"scope:{path}", q)
    if path == "dense":
        return _dense_attention(q, k, v, scope, bias)
    if path == "flex":
        return flex_neighbourhood_attention(q, k, v, scope, bias)
    if path == "chunked-bias":
        return _global_biased_attention(q, k, v, scope, bias, CHUNK_BYTES)
    return neighbourhood_attention(q, k, v, scope, bias)


def _scope_path(q: torch.Tensor, scope: AttentionScope, backend: Backend) -> str:
    """Which computation :func:`scoped_attention` runs for a scope with a mask or a bias."""
    if backend in ("dense", "flex"):
        return backend
    if backend == "auto" and q.device.type == "cuda" and flex_available():
        return "flex"
    if scope.is_global:
        return "chunked-bias"
    both_zero = scope.reference_radius == 0 and scope.video_frame_radius == 0
    b, heads, n = q.shape[:3]
    if backend == "auto" and not both_zero and n <= DENSE_TOKENS and 8 * b * heads * n**2 <= DENSE_BYTES:
        return "dense"  # see DENSE_TOKENS
    return "per-position" if both_zero else "gather"
