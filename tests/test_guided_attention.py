"""Correspondence-guided attention: zero displacement is today's neighbourhood attention; a displacement moves the
reference neighbourhood (checked against a by-hand oracle); memory stays linear."""

from __future__ import annotations

import math

import pytest
import torch

from refdecoder.blocks import AttentionScope, LocalityBias, neighbourhood_attention
from refdecoder.blocks.guided_attention import (
    GUIDED_CHUNK_BYTES,
    ReferenceGuide,
    bilinear_tokens,
    guided_neighbourhood_attention,
    take_tokens,
)
from refdecoder.blocks.rope import apply_rope, rope_at, rope_tables

HEADS, HEAD_DIM, THETA = 2, 12, 10000.0


def inputs(grid, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    q_raw, k_raw, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
    cos, sin = rope_tables(grid, HEAD_DIM, THETA)
    return apply_rope(q_raw, cos, sin), apply_rope(k_raw, cos, sin), k_raw, v


def random_bias(extent: int) -> LocalityBias:
    bias = LocalityBias(HEADS, extent, slope=1.0)
    with torch.no_grad():
        bias.table.add_(torch.randn(bias.table.shape, generator=torch.Generator().manual_seed(1)))
    return bias


def guided(q, k, k_raw, v, scope, displacement, bias=None, chunk_bytes=2**20, gather=None):
    times = torch.arange(scope.num_reference)
    return guided_neighbourhood_attention(
        q, k, k_raw, v, scope, displacement, times, THETA, bias, chunk_bytes, gather=gather
    )


def zeros(batch, scope):
    t, h, w = scope.grid
    return torch.zeros(batch, scope.num_reference, 2, t - scope.num_reference, h, w)


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("grid", [(3, 5, 5), (4, 4, 7), (3, 6, 3)])
@pytest.mark.parametrize("num_reference", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_zero_displacement_equals_neighbourhood_attention(radius, grid, num_reference, with_bias):
    scope = AttentionScope(grid, num_reference, radius)
    q, k, k_raw, v = inputs(grid)
    bias = random_bias(radius) if with_bias else None
    want = neighbourhood_attention(q, k, v, scope, bias)
    got = guided(q, k, k_raw, v, scope, zeros(2, scope), bias, chunk_bytes=4096)  # many small chunks
    assert (got - want).abs().max().item() <= 1e-5
    # The check can fail: a displacement of one token changes the result.
    shifted = zeros(2, scope)
    shifted[:, :, 1] = 1.0
    moved = guided(q, k, k_raw, v, scope, shifted, bias)
    assert (moved - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("video_radius", [0, 1])
def test_zero_displacement_with_another_video_radius(video_radius):
    scope = AttentionScope((4, 5, 6), 1, 2, video_radius)
    q, k, k_raw, v = inputs(scope.grid)
    bias = random_bias(2)
    want = neighbourhood_attention(q, k, v, scope, bias)
    assert (guided(q, k, k_raw, v, scope, zeros(2, scope), bias) - want).abs().max().item() <= 1e-5


def oracle(q, k, k_raw, v, scope, displacement, bias):
    """Token by token, in float64: the keys each query sees, sampled and rotated by hand."""
    t, h, w = scope.grid
    r, rr, rv = scope.num_reference, scope.reference_radius, scope.video_frame_radius
    b, heads, n, d = q.shape
    out = torch.zeros(b, heads, n, d, dtype=torch.float64)
    ref_raw, ref_v = k_raw.double().reshape(b, heads, t, h, w, d), v.double().reshape(b, heads, t, h, w, d)

    def sample(grid_values, bi, j, y, x):
        y0, x0 = math.floor(y), math.floor(x)
        total = 0
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if wy * wx:
                    total = total + wy * wx * grid_values[bi, :, j, yy, xx]
        return total

    for bi in range(b):
        for i in range(n):
            f, y, x = i // (h * w), i % (h * w) // w, i % w
            keys, values, logit_bias = [], [], []
            for j in range(r):
                dy, dx = (0.0, 0.0) if f < r else displacement[bi, j, :, f - r, y, x].double().tolist()
                for oy in range(-rr, rr + 1):
                    for ox in range(-rr, rr + 1):
                        sy, sx = y + dy + oy, x + dx + ox
                        if not (0 <= sy <= h - 1 and 0 <= sx <= w - 1):
                            continue
                        cos, sin = rope_at(torch.tensor(j), torch.tensor(y + oy), torch.tensor(x + ox), d, THETA)
                        raw = sample(ref_raw, bi, j, sy, sx)
                        keys.append(apply_rope(raw[:, None], cos.double(), sin.double())[:, 0])
                        values.append(sample(ref_v, bi, j, sy, sx))
                        logit_bias.append(bias.table[:, 0, oy + rr, ox + rr].double())
            for fk in range(r, t):
                for oy in range(-rv, rv + 1):
                    for ox in range(-rv, rv + 1):
                        if 0 <= y + oy < h and 0 <= x + ox < w:
                            key = fk * h * w + (y + oy) * w + x + ox
                            keys.append(k[bi, :, key].double())
                            values.append(v[bi, :, key].double())
                            logit_bias.append(bias.table[:, 1, oy + rv, ox + rv].double())
            logits = torch.einsum("hd,shd->hs", q[bi, :, i].double(), torch.stack(keys)) / math.sqrt(d)
            weights = torch.softmax(logits + torch.stack(logit_bias, 1), -1)
            out[bi, :, i] = torch.einsum("hs,shd->hd", weights, torch.stack(values))
    return out


@pytest.mark.parametrize("num_reference", [1, 2])
def test_fractional_displacements_match_the_oracle(num_reference):
    scope = AttentionScope((num_reference + 2, 4, 5), num_reference, 1)
    q, k, k_raw, v = inputs(scope.grid, batch=2, seed=3)
    g = torch.Generator().manual_seed(4)
    displacement = (torch.rand(zeros(2, scope).shape, generator=g) - 0.5) * 5  # up to 2.5 tokens, both signs
    displacement[0, :, :, 0] = displacement[0, :, :, 0].round()  # integer ones too
    bias = random_bias(1)
    got = guided(q, k, k_raw, v, scope, displacement, bias, chunk_bytes=8192).double()
    want = oracle(q, k, k_raw, v, scope, displacement, bias)
    assert (got - want).abs().max().item() <= 1e-5
    # The oracle objects to a wrong centre: the same attention with the displacement's sign flipped differs.
    wrong = guided(q, k, k_raw, v, scope, -displacement, bias).double()
    assert (wrong - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("num_reference", [1, 2])
@pytest.mark.parametrize("gather", [None, False])
def test_whole_token_displacements_match_the_oracle_by_gather_and_by_taps(num_reference, gather):
    """Snapped fields take the gather path (query turned, keys at their own positions); it equals the bilinear
    path and the oracle, also where the displaced neighbourhood leaves the grid."""
    scope = AttentionScope((num_reference + 2, 5, 4), num_reference, 2)
    q, k, k_raw, v = inputs(scope.grid, batch=2, seed=5)
    g = torch.Generator().manual_seed(6)
    displacement = ((torch.rand(zeros(2, scope).shape, generator=g) - 0.5) * 8).round()  # -4..4 tokens
    bias = random_bias(2)
    got = guided(q, k, k_raw, v, scope, displacement, bias, chunk_bytes=4096, gather=gather).double()
    assert (got - oracle(q, k, k_raw, v, scope, displacement, bias)).abs().max().item() <= 1e-5
    shifted = displacement.clone()
    shifted[..., 0, :, :] += 1  # a wrong row: the gather path objects too
    assert (guided(q, k, k_raw, v, scope, shifted, bias, gather=gather).double() - got).abs().max().item() > 1e-3


def test_gather_refuses_fractional_displacements():
    scope = AttentionScope((3, 4, 4), 1, 1)
    q, k, k_raw, v = inputs(scope.grid)
    with pytest.raises(ValueError, match="whole-token"):
        guided(q, k, k_raw, v, scope, zeros(2, scope) + 0.5, gather=True)


def test_bilinear_taps_are_exact_at_integers_and_linear_between():
    frames = torch.randn(2, 2 * 3 * 4, 5)  # B, F*H*W, C: two 3x4 frames stacked on rows
    y = torch.tensor([[0.0, 2.0, 3.0, 1.5]]).expand(2, -1)
    x = torch.tensor([[0.0, 3.0, 1.0, 2.25]]).expand(2, -1)
    got = bilinear_tokens(frames, y, x, 4, 6)
    grid = frames.reshape(2, 6, 4, 5)
    assert torch.equal(got[:, 0], grid[:, 0, 0]) and torch.equal(got[:, 1], grid[:, 2, 3])
    assert torch.equal(got[:, 2], grid[:, 3, 1])  # frame 1, row 0
    between = 0.5 * (0.75 * grid[:, 1, 2] + 0.25 * grid[:, 1, 3]) + 0.5 * (0.75 * grid[:, 2, 2] + 0.25 * grid[:, 2, 3])
    torch.testing.assert_close(got[:, 3], between)


def test_take_tokens_is_per_sample_indexing_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 10, 2, 4, generator=g, requires_grad=True)  # B, M, heads, D
    index = torch.randint(0, 10, (3, 5, 6), generator=g)  # repeats included: gradients must accumulate
    got = take_tokens(tokens, index)
    expected = tokens[torch.arange(3)[:, None, None], index]
    assert got.shape == (3, 5, 6, 2, 4) and torch.equal(got, expected)
    upstream = torch.randn(got.shape, generator=g)
    (by_take,) = torch.autograd.grad(got, tokens, upstream)
    (by_indexing,) = torch.autograd.grad(expected, tokens, upstream)
    torch.testing.assert_close(by_take, by_indexing, rtol=0, atol=1e-6)
    assert by_take[0].abs().sum() > 0 and by_take[2].abs().sum() > 0  # every sample receives its own gradient


@pytest.mark.parametrize("fractional", [False, True])
def test_a_stage_guide_reads_integrality_once_and_decodes_as_each_layer_looking(fractional):
    scope = AttentionScope((3, 4, 5), 1, 2)
    q, k, k_raw, v = inputs(scope.grid)
    displacement = 2 * torch.randn(2, 1, 2, 2, 4, 5, generator=torch.Generator().manual_seed(3))
    displacement = displacement if fractional else displacement.round()
    guide = ReferenceGuide.for_stage(displacement, torch.arange(1), THETA)
    assert guide.integral is (not fractional)
    told = guided_neighbourhood_attention(
        q, k, k_raw, v, scope, displacement, guide.reference_times, THETA, integral=guide.integral
    )
    assert torch.equal(told, guided(q, k, k_raw, v, scope, displacement, chunk_bytes=GUIDED_CHUNK_BYTES))


def test_wrong_displacement_shape_is_refused():
    scope = AttentionScope((3, 4, 4), 1, 1)
    q, k, k_raw, v = inputs(scope.grid)
    with pytest.raises(ValueError, match="displacement must be"):
        guided(q, k, k_raw, v, scope, torch.zeros(2, 1, 2, 3, 4, 4))
