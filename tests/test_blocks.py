"""Unit tests of refdecoder.blocks against by-hand or independent computations (tiny CPU sizes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from refdecoder.blocks import (
    ChannelRMSNorm,
    FP32LayerNorm,
    LatentTokenDropout,
    ReferenceTokenizer,
    RMSNorm,
    RotaryEmbedding3D,
    SharedTransformer,
    StageProjector,
    TransformerBlock,
    apply_rope,
    attention,
    attention_backend,
    latent_token_dropout,
    rope_axis_dims,
    rope_tables,
    space_to_depth,
)
from refdecoder.errors import ConfigError, InputError

DIM, HEADS = 24, 2  # head_dim 12 -> RoPE axes (4, 4, 4)


def tiny_transformer(depth: int = 2) -> SharedTransformer:
    return SharedTransformer(DIM, depth, HEADS, ffn_dim=32)


class IdentityTransformer(torch.nn.Module):
    """Stand-in for SharedTransformer that records its call and returns the tokens unchanged."""

    def forward(self, tokens, grid, time_positions=None, num_reference=0):
        self.grid, self.time_positions, self.num_reference = grid, time_positions, num_reference
        return tokens


# --- norms ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 6, 2, 3, 4)])
def test_channel_rms_norm_matches_formula(shape):
    norm = ChannelRMSNorm(6)
    assert norm.gamma.shape == (6, 1, 1)
    with torch.no_grad():
        norm.gamma.copy_(torch.arange(1.0, 7.0).reshape(6, 1, 1))
    x = torch.randn(shape)
    gamma = torch.arange(1.0, 7.0).reshape(1, 6, *([1] * (len(shape) - 2)))
    expected = x / x.pow(2).sum(1, keepdim=True).sqrt() * math.sqrt(6) * gamma
    torch.testing.assert_close(norm(x), expected)


def test_channel_rms_norm_half_precision_computes_in_float32():
    x = torch.randn(1, 8, 2, 3, 3) * 100
    for dtype in (torch.float16, torch.bfloat16):
        out = ChannelRMSNorm(8)(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ChannelRMSNorm(8)(x.to(dtype).float()), atol=1e-2, rtol=1e-2)


def test_channel_rms_norm_rejects_wrong_channels():
    with pytest.raises(InputError, match=r"\(2, 5, 4, 4\)"):
        ChannelRMSNorm(6)(torch.randn(2, 5, 4, 4))


def test_fp32_layer_norm_bf16():
    x = torch.randn(3, 5, 16) * 10 + 3
    out = FP32LayerNorm(16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    xf = x.bfloat16().double()
    expected = (xf - xf.mean(-1, keepdim=True)) / (xf.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=1e-2)
    assert not list(FP32LayerNorm(16).parameters())


def test_rms_norm_matches_formula():
    norm = RMSNorm(16)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 16)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.half()).dtype == torch.float16


# --- reference tokenizer -----------------------------------------------------------------------------------------
def test_space_to_depth_order_by_hand():
    x = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).reshape(2, 2, 4, 6)
    out = space_to_depth(x, 2)
    assert out.shape == (2, 8, 2, 3)
    for n, c, dy, dx, i, j in torch.cartesian_prod(*(torch.arange(s) for s in (2, 2, 2, 2, 2, 3))).tolist():
        assert out[n, c * 4 + dy * 2 + dx, i, j] == x[n, c, i * 2 + dy, j * 2 + dx]


@pytest.mark.parametrize("kind", ["patch_conv", "space_to_depth"])
@pytest.mark.parametrize("norm", ["rms", "group", "none"])
def test_tokenizer_shapes_and_submodules(kind, norm):
    tok = ReferenceTokenizer(32, 4, kind=kind, norm=norm, groups=8)
    out = tok(torch.rand(2, 3, 3, 16, 24) * 2 - 1)
    assert out.shape == (2, 32, 3, 4, 6)
    assert isinstance(tok.proj, torch.nn.Conv3d)
    expected_kernel = (1, 4, 4) if kind == "patch_conv" else (1, 3, 3)
    assert tok.proj.kernel_size == expected_kernel
    assert torch.count_nonzero(tok.proj.bias) == 0
    assert isinstance(tok.norm, torch.nn.Identity) == (norm == "none")


def test_tokenizer_patch_conv_by_hand():
    tok = ReferenceTokenizer(8, 2, kind="patch_conv", norm="none")
    ref = torch.randn(1, 3, 2, 4, 6)
    weight = tok.proj.weight[:, :, 0]
    for r in range(2):
        expected = F.conv2d(ref[:, :, r], weight, tok.proj.bias, stride=2)
        torch.testing.assert_close(tok(ref)[:, :, r], expected)


def test_tokenizer_xavier_init():
    tok = ReferenceTokenizer(64, 2, kind="space_to_depth", kernel_size=3)
    fan_in, fan_out = 12 * 9, 64 * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert tok.proj.weight.abs().max() <= bound
    assert tok.proj.weight.abs().max() > 0.9 * bound


def test_tokenizer_frames_are_independent():
    tok = ReferenceTokenizer(16, 2, norm="group", groups=4)
    ref = torch.randn(1, 3, 2, 8, 8)
    changed = ref.clone()
    changed[:, :, 1] *= 5
    torch.testing.assert_close(tok(ref)[:, :, 0], tok(changed)[:, :, 0])


def test_tokenizer_errors():
    tok = ReferenceTokenizer(16, 8)
    with pytest.raises(InputError, match="30x48"):
        tok(torch.rand(1, 3, 1, 30, 48))
    with pytest.raises(InputError, match=r"\(1, 3, 32, 48\)"):
        tok(torch.rand(1, 3, 32, 48))
    with pytest.raises(InputError, match="divisible by 2"):
        space_to_depth(torch.rand(1, 3, 5, 4), 2)
    with pytest.raises(ConfigError):
        ReferenceTokenizer(16, 8, kind="pixel")
    with pytest.raises(ConfigError):
        ReferenceTokenizer(20, 8, norm="group", groups=8)


# --- RoPE --------------------------------------------------------------------------------------------------------
def test_rope_axis_dims():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(12) == (4, 4, 4)
    assert rope_axis_dims(32) == (12, 10, 10)
    with pytest.raises(ValueError, match="even"):
        rope_axis_dims(127)


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Independent RoPE: each channel pair is a complex number multiplied by exp(i * pos / theta^(2j/d))."""
    head_dim = x.shape[-1]
    angles = []
    for axis, d in enumerate(rope_axis_dims(head_dim)):
        j = torch.arange(d // 2, dtype=torch.float64)
        angles.append(positions[:, axis : axis + 1].double() / theta ** (2 * j / d))
    rotation = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=1))
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(z * rotation).flatten(-2)


def grid_positions(t: int, h: int, w: int, times: torch.Tensor | None = None) -> torch.Tensor:
    times = torch.arange(t) if times is None else times
    tt, hh, ww = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def test_rope_matches_complex_rotation():
    times = torch.tensor([0, 3, 7])
    cos, sin = rope_tables((3, 4, 5), 32, time_positions=times)
    assert cos.shape == sin.shape == (60, 32) and cos.dtype == torch.float32
    x = torch.randn(2, 3, 60, 32)
    expected = complex_rope(x, grid_positions(3, 4, 5, times))
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, atol=1e-5, rtol=1e-5)


def test_rope_preserves_norms_and_dtype():
    cos, sin = rope_tables((2, 3, 3), 12)
    x = torch.randn(1, 2, 18, 12)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rope_logits_depend_on_position_difference_only():
    q, k = torch.randn(12), torch.randn(12)

    def logit(pos_q, pos_k):
        cos, sin = rope_tables((2, 6, 6), 12, time_positions=torch.tensor([pos_q[0], pos_k[0]]))
        index = lambda t, p: t * 36 + p[1] * 6 + p[2]  # noqa: E731
        rq = apply_rope(q.reshape(1, 1, 1, 12), cos[index(0, pos_q)], sin[index(0, pos_q)])
        rk = apply_rope(k.reshape(1, 1, 1, 12), cos[index(1, pos_k)], sin[index(1, pos_k)])
        return (rq * rk).sum().item()

    base = logit((1, 2, 0), (4, 1, 3))
    assert logit((6, 4, 2), (9, 3, 5)) == pytest.approx(base, abs=1e-4)  # same offset everywhere
    assert abs(logit((1, 2, 0), (5, 1, 3)) - base) > 1e-3  # other time offset


def test_rotary_module_caches_and_has_no_state():
    rope = RotaryEmbedding3D(12)
    assert not list(rope.parameters()) and not rope.state_dict()
    first = rope((2, 3, 4))
    assert rope((2, 3, 4))[0] is first[0]
    shifted = rope((2, 3, 4), time_positions=torch.tensor([1, 2]))
    assert shifted[0] is not first[0]
    torch.testing.assert_close(shifted[0][:12], first[0][12:])  # frame at t=1 in both
    with pytest.raises(ValueError):
        rope_tables((2, 3, 4), 12, time_positions=torch.arange(3))


# --- attention ---------------------------------------------------------------------------------------------------
def test_attention_matches_softmax_by_hand():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), dim=-1) @ v.double()
    torch.testing.assert_close(attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)
    assert attention_backend("cpu") == "sdpa"


def test_attention_with_mask_matches_masked_softmax_by_hand():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = torch.rand(5, 5) > 0.5
    mask.fill_diagonal_(True)
    logits = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ v.double()
    torch.testing.assert_close(attention(q, k, v, mask).double(), expected, atol=1e-5, rtol=1e-5)


def test_local_attention_only_mixes_nearby_positions():
    torch.manual_seed(0)
    local, wide = SharedTransformer(DIM, 2, HEADS, ffn_dim=32, attention_radius=0), tiny_transformer()
    wide.load_state_dict(local.state_dict())
    grid, x = (2, 3, 3), torch.randn(1, 18, DIM)
    moved = x.clone()
    moved[0, 0] += torch.randn(DIM)  # frame 0, row 0, column 0 (not a constant: LayerNorm would remove it)
    far = 9 + 2 * 3 + 2  # frame 1, row 2, column 2: another position
    same = 9  # frame 1, row 0, column 0: the same position in the other frame
    for model, far_changes in ((local, False), (wide, True)):
        diff = (model(moved, grid) - model(x, grid)).abs().amax(dim=-1)[0]
        assert diff[same] > 1e-3
        assert (diff[far] > 1e-3) == far_changes
    # A radius that covers the whole grid is global attention.
    covering = SharedTransformer(DIM, 2, HEADS, ffn_dim=32, attention_radius=2)
    covering.load_state_dict(wide.state_dict())
    torch.testing.assert_close(covering(x, grid), wide(x, grid), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        SharedTransformer(DIM, 1, HEADS, attention_radius=-1)


@pytest.mark.gpu
def test_attention_cuda_matches_by_hand():
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8, dim=-1) @ v.float()
    torch.testing.assert_close(attention(q, k, v).float(), expected, atol=2e-2, rtol=2e-2)


# --- transformer -------------------------------------------------------------------------------------------------
def test_transformer_shapes_names_and_init():
    transformer = tiny_transformer()
    assert transformer.head_dim == 12
    names = set(transformer.state_dict())
    for suffix in ("to_q", "to_k", "to_v", "to_out"):
        assert f"blocks.1.attn.{suffix}.weight" in names and f"blocks.1.attn.{suffix}.bias" in names
    assert {"blocks.0.attn.norm_q.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.bias"} <= names
    assert all(torch.count_nonzero(p) > 0 for p in transformer.parameters()), "nothing may be zero-initialised"
    out = transformer(torch.randn(2, 2 * 3 * 4, DIM), (2, 3, 4))
    assert out.shape == (2, 24, DIM)
    assert SharedTransformer(DIM, 1, HEADS).blocks[0].ffn.fc1.out_features == 4 * DIM


def test_transformer_block_by_hand():
    block = TransformerBlock(DIM, HEADS, 32)
    x, (cos, sin) = torch.randn(1, 6, DIM), rope_tables((1, 2, 3), 12)
    a = block.attn
    h = F.layer_norm(x, (DIM,), eps=1e-6)
    heads = lambda y: y.reshape(1, 6, HEADS, 12).transpose(1, 2)  # noqa: E731
    rms = lambda y, w: y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q = complex_rope(heads(rms(a.to_q(h), a.norm_q.weight)), grid_positions(1, 2, 3)).float()
    k = complex_rope(heads(rms(a.to_k(h), a.norm_k.weight)), grid_positions(1, 2, 3)).float()
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(12), dim=-1)
    x1 = x + a.to_out((weights @ heads(a.to_v(h))).transpose(1, 2).reshape(1, 6, DIM))
    ffn = block.ffn
    expected = x1 + ffn.fc2(F.gelu(ffn.fc1(F.layer_norm(x1, (DIM,), eps=1e-6)), approximate="tanh"))
    torch.testing.assert_close(block(x, (cos, sin)), expected, atol=1e-5, rtol=1e-5)


def test_transformer_rejects_wrong_token_count():
    with pytest.raises(InputError, match=r"T\*H\*W=24.*\(1, 20, 24\)"):
        tiny_transformer()(torch.randn(1, 20, DIM), (2, 3, 4))
    with pytest.raises(ConfigError):
        SharedTransformer(25, 1, 2)


def test_gradient_checkpointing_same_values_and_grads():
    transformer = tiny_transformer().train()
    x = torch.randn(1, 12, DIM)

    def run(flag):
        transformer.gradient_checkpointing = flag
        transformer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = transformer(xi, (1, 3, 4))
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in transformer.parameters()]

    plain, checkpointed = run(False), run(True)
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])
    for a, b in zip(checkpointed[2], plain[2]):
        torch.testing.assert_close(a, b)


def test_transformer_under_bf16_autocast():
    transformer = tiny_transformer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer(torch.randn(1, 12, DIM), (1, 3, 4))
    assert out.shape == (1, 12, DIM) and torch.isfinite(out).all()


# --- stage projector ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_norm", ["none", "group"])
def test_projector_identity_at_init(input_norm):
    projector = StageProjector(8, DIM, (1, 2, 2), residual=True, input_norm=input_norm, groups=4)
    assert torch.count_nonzero(projector.out.weight) == 0 and torch.count_nonzero(projector.out.bias) == 0
    x = torch.randn(2, 8, 3, 5, 7)
    assert torch.equal(projector(x, tiny_transformer(), num_reference=1), x)


def test_projector_replace_mode_changes_values():
    projector = StageProjector(8, DIM, (1, 2, 2), residual=False)
    assert torch.count_nonzero(projector.out.weight) > 0 and torch.count_nonzero(projector.out.bias) == 0
    x = torch.randn(1, 8, 3, 4, 6)
    out = projector(x, tiny_transformer(), num_reference=1)
    assert out.shape == x.shape
    assert (out - x).abs().mean() > 0.1


@pytest.mark.parametrize(
    ("shape", "patch", "grid"),
    [
        ((1, 8, 3, 4, 6), (1, 2, 2), (3, 2, 3)),
        ((1, 8, 2, 5, 7), (1, 2, 2), (2, 3, 4)),
        ((1, 8, 3, 5, 4), (2, 4, 4), (2, 2, 1)),
    ],
)
def test_projector_padding_grid_and_token_count(shape, patch, grid):
    projector = StageProjector(8, DIM, patch, residual=False)
    stub = IdentityTransformer()
    out = projector(torch.randn(shape), stub, num_reference=1)
    assert out.shape == shape
    assert stub.grid == grid and stub.time_positions is None  # None = arange(T'): reference at 0..R-1
    assert stub.num_reference == 1  # the token frame holding the reference (with pt = 2 it also holds a video frame)
    assert projector.token_count(*shape[2:]) == math.prod(grid)


def test_projector_output_layout_is_patch_then_channel():
    # Identity transformer + per-token linear layers: each output patch pixel [pt][ph][pw][C] comes from one
    # slice of `out`. Give `out` a bias only, so the output shows the layout directly.
    projector = StageProjector(2, DIM, (1, 2, 2), residual=False)
    with torch.no_grad():
        projector.out.weight.zero_()
        projector.out.bias.copy_(torch.arange(8.0))
    out = projector(torch.randn(1, 2, 1, 2, 2), IdentityTransformer(), num_reference=0)
    for c, dy, dx in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(2)).tolist():
        assert out[0, c, 0, dy, dx] == (dy * 2 + dx) * 2 + c


def test_projector_group_norms_use_each_parts_own_statistics():
    projector = StageProjector(8, DIM, (1, 1, 1), residual=False, input_norm="group", groups=4)
    x = torch.randn(1, 8, 3, 4, 4)
    changed = x.clone()
    changed[:, :, 1:] = changed[:, :, 1:] * 7 + 3  # video frames only
    stub = IdentityTransformer()
    a, b = projector(x, stub, 1), projector(changed, stub, 1)
    torch.testing.assert_close(a[:, :, :1], b[:, :, :1])  # reference untouched by video statistics
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:], atol=1e-4, rtol=1e-4)  # GroupNorm is affine-invariant


def test_projector_residual_gradients_reach_out_layer():
    projector = StageProjector(8, DIM, (1, 2, 2), residual=True)
    transformer = tiny_transformer()
    x = torch.randn(1, 8, 2, 4, 4, requires_grad=True)
    projector(x, transformer, 1).pow(2).sum().backward()
    assert projector.out.weight.grad.abs().sum() > 0 and projector.out.bias.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, 2 * x.detach())  # delta is zero, so d/dx sum(x^2)


def test_projector_errors():
    projector = StageProjector(8, DIM, (1, 2, 2))
    with pytest.raises(InputError, match=r"\(1, 6, 2, 4, 4\)"):
        projector(torch.randn(1, 6, 2, 4, 4), tiny_transformer(), 1)
    with pytest.raises(InputError, match="num_reference"):
        projector(torch.randn(1, 8, 2, 4, 4), tiny_transformer(), 3)
    with pytest.raises(ConfigError):
        StageProjector(12, DIM, (1, 2, 2), input_norm="group", groups=8)


# --- token dropout -----------------------------------------------------------------------------------------------
def test_token_dropout_statistics_and_spatial_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, 3, 8, 8)
    out = latent_token_dropout(x, 0.7, "spatial", generator=g)
    dropped = out == 0
    assert torch.equal(dropped, dropped[:, :1, :1].expand_as(dropped))  # same for every channel and frame
    assert dropped.float().mean().item() == pytest.approx(0.35, abs=0.02)
    per_sample = dropped[:, 0, 0].flatten(1).float().mean(1)
    # p ~ U(0, 0.7) per sample: fraction std ~0.21 over 64 positions (one shared p would give ~0.06).
    assert 0.17 < per_sample.std().item() < 0.25 and per_sample.max() < 0.95
    torch.testing.assert_close(out[~dropped], x[~dropped], atol=0, rtol=0)  # kept values are not rescaled


def test_token_dropout_spatiotemporal_mask():
    g = torch.Generator().manual_seed(1)
    out = latent_token_dropout(torch.randn(500, 3, 4, 4, 4), 0.7, "spatiotemporal", generator=g)
    dropped = out == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))
    assert not torch.equal(dropped, dropped[:, :, :1].expand_as(dropped))
    assert dropped.float().mean().item() == pytest.approx(0.35, abs=0.03)


def test_token_dropout_module():
    module = LatentTokenDropout(0.7)
    x = torch.randn(8, 2, 2, 4, 4)
    assert module.eval()(x) is x
    assert LatentTokenDropout(0.0).train()(x) is x
    module.train()
    first = module(x, SimpleNamespace(generator=torch.Generator().manual_seed(5)))
    again = module(x, SimpleNamespace(generator=torch.Generator().manual_seed(5)))
    assert torch.equal(first, again) and (first == 0).any()
    assert module(x, SimpleNamespace(generator=None)).shape == x.shape
    with pytest.raises(InputError):
        latent_token_dropout(torch.randn(2, 4, 4, 4), 0.5)
    with pytest.raises(ConfigError):
        LatentTokenDropout(0.5, mode="channel")
