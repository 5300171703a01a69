"""Attention scopes: the dense definition; the neighbourhood, per-position and flex computations; the locality bias."""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch

from refdecoder.blocks import (
    AttentionScope,
    LocalityBias,
    SharedTransformer,
    attention,
    local_attention_mask,
    neighbourhood_attention,
    per_position_attention,
    scoped_attention,
)
from refdecoder.blocks.attention import kernels_used, sdpa_kernel_name
from refdecoder.blocks.attention_scope import DENSE_BYTES, DENSE_TOKENS, flex_available
from refdecoder.errors import ConfigError
from refdecoder.profiling import LiveTensorMeter

HEADS, HEAD_DIM = 3, 8


def qkv(grid: tuple[int, int, int], batch: int = 2, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    n = math.prod(grid)
    return tuple(torch.randn(batch, HEADS, n, HEAD_DIM, device=device) for _ in range(3))


def random_bias(extent: int) -> LocalityBias:
    bias = LocalityBias(HEADS, extent, slope=1.0)
    with torch.no_grad():
        bias.table.add_(torch.randn_like(bias.table))  # a table unlike its init: every entry matters
    return bias


def by_hand(q, k, v, scope: AttentionScope, bias: LocalityBias | None) -> torch.Tensor:
    """softmax over the keys the scope allows, in float64, with the bias looked up key by key."""
    t, h, w = scope.grid
    coords = [(f, y, x) for f in range(t) for y in range(h) for x in range(w)]
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    radii = scope.frame_radii()
    for i, (_, yq, xq) in enumerate(coords):
        for j, (fk, yk, xk) in enumerate(coords):
            r = radii[fk]
            if r is not None and (abs(yk - yq) > r or abs(xk - xq) > r):
                logits[:, :, i, j] = float("-inf")
            elif bias is not None:
                e = bias.extent
                dy, dx = max(-e, min(e, yk - yq)) + e, max(-e, min(e, xk - xq)) + e
                logits[:, :, i, j] += bias.table[:, int(fk >= scope.num_reference), dy, dx].double()
    return torch.softmax(logits, dim=-1) @ v.double()


# --- the definition ---------------------------------------------------------------------------------------------
def test_local_mask_by_definition_with_reference_and_video_radii():
    scope = AttentionScope((3, 3, 4), num_reference=1, radius=2, video_radius=0)
    mask = local_attention_mask(scope)
    coords = [(f, y, x) for f in range(3) for y in range(3) for x in range(4)]
    for i, (_, yq, xq) in enumerate(coords):
        for j, (fk, yk, xk) in enumerate(coords):
            r = 2 if fk == 0 else 0
            assert mask[i, j] == (abs(yk - yq) <= r and abs(xk - xq) <= r)
    # Radius 0 everywhere: exactly the own position in each of the T frames.
    assert local_attention_mask(AttentionScope((3, 2, 2), 1, 0)).sum(dim=1).eq(3).all()


def test_scope_rejects_bad_radii():
    for kwargs in ({"radius": -1}, {"radius": None, "video_radius": 0}, {"radius": 1, "video_radius": -2}):
        with pytest.raises(ValueError):
            AttentionScope((2, 2, 2), 1, **kwargs)
    with pytest.raises(ValueError, match="num_reference"):
        AttentionScope((2, 2, 2), 3, 1)
    with pytest.raises(ConfigError, match="scope"):
        SharedTransformer(24, 1, 2, video_attention_radius=1)


def test_dense_backend_equals_the_softmax_by_hand():
    scope = AttentionScope((3, 3, 4), num_reference=1, radius=1, video_radius=0)
    q, k, v = qkv(scope.grid)
    bias = random_bias(1)
    got = scoped_attention(q, k, v, scope, bias, backend="dense").double()
    torch.testing.assert_close(got, by_hand(q, k, v, scope, bias), atol=1e-5, rtol=1e-5)


# --- neighbourhood attention = the dense definition -------------------------------------------------------------
GRIDS = [(3, 5, 5), (4, 3, 7), (5, 6, 2)]  # square and non-square grids, radii up to and over their size


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("num_reference", [1, 2])
@pytest.mark.parametrize("video_radius", [None, 0])
def test_neighbourhood_attention_equals_the_dense_mask(grid, radius, num_reference, video_radius):
    scope = AttentionScope(grid, num_reference, radius, video_radius)
    q, k, v = qkv(grid)
    dense = attention(q, k, v, local_attention_mask(scope))
    # chunk_bytes=1: one grid position per chunk, so chunk edges are crossed everywhere.
    for chunk_bytes in (1, 2**20):
        torch.testing.assert_close(
            neighbourhood_attention(q, k, v, scope, chunk_bytes=chunk_bytes), dense, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(("grid", "radius", "video_radius"), [((3, 5, 5), 2, None), ((4, 3, 7), 3, 1)])
def test_neighbourhood_attention_with_bias_equals_the_dense_computation(grid, radius, video_radius):
    scope = AttentionScope(grid, 2, radius, video_radius)
    q, k, v = qkv(grid)
    bias = random_bias(max(radius, video_radius or 0))
    dense = scoped_attention(q, k, v, scope, bias, backend="dense")
    torch.testing.assert_close(neighbourhood_attention(q, k, v, scope, bias), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.double(), by_hand(q, k, v, scope, bias), atol=1e-5, rtol=1e-5)


def test_per_position_attention_equals_the_radius_0_scope_with_and_without_bias():
    scope = AttentionScope((3, 2, 4), 1, 0)
    q, k, v = qkv(scope.grid)
    dense = attention(q, k, v, local_attention_mask(scope))
    for chunk_bytes in (1, 2**20):  # one position per chunk, and all positions in one
        got = per_position_attention(q, k, v, frames=3, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    bias = random_bias(0)
    torch.testing.assert_close(
        scoped_attention(q, k, v, scope, bias),
        scoped_attention(q, k, v, scope, bias, backend="dense"),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="multiple"):
        per_position_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], frames=3)


def test_global_attention_with_a_distance_bias_equals_the_dense_computation():
    scope = AttentionScope((3, 4, 5), 1)
    q, k, v = qkv(scope.grid)
    bias = random_bias(2)  # offsets beyond +-2 share the edge values
    got = scoped_attention(q, k, v, scope, bias)
    torch.testing.assert_close(got.double(), by_hand(q, k, v, scope, bias), atol=1e-5, rtol=1e-5)
    # Without a bias, global attention is the plain (mask-free) call.
    torch.testing.assert_close(scoped_attention(q, k, v, scope), attention(q, k, v))


def test_neighbourhood_attention_gradients_equal_the_dense_ones():
    scope = AttentionScope((3, 4, 4), 1, 1, 0)
    q, k, v = (x.requires_grad_() for x in qkv(scope.grid))
    bias = random_bias(1)
    grads = []
    for backend in ("gather", "dense"):
        out = scoped_attention(q, k, v, scope, bias, backend=backend)
        grads.append(torch.autograd.grad(out.pow(2).sum(), (q, k, v, bias.table)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")
def test_flex_attention_equals_the_dense_computation_on_cpu():
    # Compiled on CPU here (seconds); the same code runs on CUDA by default. CPU flex cannot capture a tensor that
    # requires grad, so the bias table is a constant under no_grad.
    scope = AttentionScope((3, 4, 5), 2, 2, 0)
    q, k, v = qkv(scope.grid, batch=1)
    bias = random_bias(2)
    with torch.no_grad():
        got = scoped_attention(q, k, v, scope, bias, backend="flex")
        torch.testing.assert_close(got, scoped_attention(q, k, v, scope, bias, backend="dense"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")
@pytest.mark.parametrize(
    ("grid", "radius", "video_radius", "biased"), [((3, 5, 5), 1, None, False), ((4, 3, 7), 3, 1, True)]
)
def test_flex_attention_more_scopes_on_cpu(grid, radius, video_radius, biased):
    scope = AttentionScope(grid, 1, radius, video_radius)
    q, k, v = qkv(grid, batch=1)
    bias = random_bias(max(radius, video_radius or 0)) if biased else None
    with torch.no_grad():
        got = scoped_attention(q, k, v, scope, bias, backend="flex")
        torch.testing.assert_close(got, scoped_attention(q, k, v, scope, bias, backend="dense"), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_attention_is_the_cuda_default_and_trains():
    scope = AttentionScope((5, 6, 7), 1, 2, 0)
    q, k, v = (x.requires_grad_() for x in qkv(scope.grid, device="cuda"))
    bias = random_bias(2).cuda()
    out = scoped_attention(q, k, v, scope, bias)
    torch.testing.assert_close(out, scoped_attention(q, k, v, scope, bias, backend="gather"), atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert bias.table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("batch", "heads", "grid", "path"),
    [
        (2, 4, (10, 8, 8), "dense"),  # the quality benchmark's training grids
        (1, 4, (3, 16, 16), "dense"),  # DENSE_TOKENS itself
        (1, 4, (4, 16, 16), "gather"),  # more tokens: its logits would still fit in DENSE_BYTES
        (64, 8, (10, 8, 8), "gather"),  # few tokens, but the dense logits of the batch are too large
        (2, 4, (10, 8, 8), "per-position"),  # radius 0 never runs dense
    ],
)
def test_small_grids_run_dense_on_the_cpu_and_larger_ones_gather(fresh_kernel_log, batch, heads, grid, path):
    scope = AttentionScope(grid, 1, 0 if path == "per-position" else 2)
    n = math.prod(grid)
    if path != "per-position":  # the cases sit on either side of the limits they name
        assert (n <= DENSE_TOKENS and 8 * batch * heads * n * n <= DENSE_BYTES) == (path == "dense")
    with torch.device("meta"):
        q, k, v = (torch.empty(batch, heads, n, HEAD_DIM) for _ in range(3))
    scoped_attention(q, k, v, scope)
    assert [k for k in kernels_used() if k.startswith("scope:")] == [
        f"scope:{path} (meta, float32, head_dim {HEAD_DIM})"
    ]


@pytest.fixture
def fresh_kernel_log(monkeypatch):
    # The module, not the function of the same name that refdecoder.blocks exports.
    module = importlib.import_module("refdecoder.blocks.attention")
    monkeypatch.setattr(module, "_KERNELS", {})
    monkeypatch.setattr(module, "_SDPA_SEEN", set())


def test_the_kernel_is_logged_once_per_kind(fresh_kernel_log, caplog):
    scope = AttentionScope((2, 2, 3), 1, 0)
    q, k, v = qkv(scope.grid)
    with caplog.at_level(logging.INFO, logger="refdecoder"):
        for _ in range(3):
            attention(q, k, v)
            scoped_attention(q, k, v, scope)  # per position: SDPA without a mask again, nothing new to log
    sdpa = f"sdpa:{sdpa_kernel_name(q, k, v)} (cpu, float32, head_dim {HEAD_DIM})"
    expected = [sdpa, f"scope:per-position (cpu, float32, head_dim {HEAD_DIM})"]
    assert [r.getMessage() for r in caplog.records] == [f"attention kernel: {line}" for line in expected]
    assert kernels_used() == expected


@pytest.mark.gpu
def test_cuda_runs_fused_kernels_or_flex_never_the_math_path(fresh_kernel_log):
    scope = AttentionScope((3, 8, 8), 1, 1)
    q, k, v = (torch.randn(1, HEADS, 3 * 8 * 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attention(q, k, v)
    scoped_attention(q, k, v, scope)
    scoped_attention(q, k, v, AttentionScope(scope.grid, 1, 0))
    scoped_attention(q, k, v, AttentionScope(scope.grid, 1), random_bias(2).cuda())
    used = kernels_used()
    assert used[0].startswith(("sdpa:flash_attention", "sdpa:cudnn_attention", "sdpa:efficient_attention")), used
    assert [line.split(" ")[0] for line in used[1:]] == ["scope:flex"], used
    assert not any("math" in line for line in used)


# --- memory -----------------------------------------------------------------------------------------------------
def test_neighbourhood_attention_memory_at_28k_tokens_is_a_fraction_of_the_mask():
    # The stage grid of 17 frames at 480x832 plus one reference frame on the paper's H/16 layout: 28,080 tokens.
    # Measured on the meta device (shapes only). The dense mask alone would be N^2 bytes = 752 MiB.
    grid = (18, 30, 52)
    n = math.prod(grid)
    with torch.device("meta"):
        q, k, v = (torch.empty(1, 4, n, 64) for _ in range(3))
        bias = LocalityBias(4, 2)
    with torch.no_grad(), LiveTensorMeter() as meter:
        out = scoped_attention(q, k, v, AttentionScope(grid, 1, 2), bias)
    output_bytes = out.numel() * out.element_size()
    assert meter.peak < n * n / 10, (meter.peak, n * n)
    assert meter.peak - output_bytes < 32 * 2**20  # working memory beyond the output: the chunk budget


# --- the locality bias ------------------------------------------------------------------------------------------
def test_locality_bias_starts_on_the_own_position_and_can_spread():
    bias = LocalityBias(HEADS, extent=2, slope=3.0)
    assert bias.table.shape == (HEADS, 2, 5, 5)
    weights = bias.table[0, 0].flatten().softmax(0).reshape(5, 5)
    assert weights[2, 2] > 0.75 and weights[2, 2] == weights.max()  # concentrated on offset (0, 0)
    with pytest.raises(ValueError, match="heads"):
        scoped_attention(*qkv((2, 3, 3)), AttentionScope((2, 3, 3), 1, 2), LocalityBias(2, 2))
    # A gradient step that favours a neighbour raises its bias: the prior is learnable, not a fixed mask.
    scope = AttentionScope((2, 3, 3), 1, 2)
    q, k, v = qkv(scope.grid)
    v = torch.zeros_like(v)
    v[:, :, 0] = 1.0  # only the key at frame 0, row 0, column 0 carries signal
    out = scoped_attention(q, k, v, scope, bias)
    loss = -out[:, :, 4].sum()  # query at frame 0, row 1, column 1: wants more of the key at offset (-1, -1)
    loss.backward()
    assert bias.table.grad[:, 0, 1, 1].lt(0).all()  # gradient descent raises that entry


def test_transformer_with_locality_bias_saves_its_tables_per_layer():
    plain = SharedTransformer(24, 2, 2, ffn_dim=32, attention_radius=2, video_attention_radius=0)
    biased = SharedTransformer(24, 2, 2, ffn_dim=32, attention_radius=2, video_attention_radius=0, locality_bias=True)
    assert not any("locality_bias" in k for k in plain.state_dict())
    tables = sorted(k for k in biased.state_dict() if "locality_bias" in k)
    assert tables == ["blocks.0.attn.locality_bias.table", "blocks.1.attn.locality_bias.table"]
    assert biased.state_dict()[tables[0]].shape == (2, 2, 5, 5)
    # Global attention with the prior uses the configured extent.
    wide = SharedTransformer(24, 1, 2, locality_bias=True, locality_bias_extent=3)
    assert wide.blocks[0].attn.locality_bias.table.shape == (2, 2, 7, 7)
