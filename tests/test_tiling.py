"""Spatial tiling: diffusers' layout and blend, reference crops per tile, tiled ~ untiled away from seams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import refdecoder
from refdecoder.blocks.upscale_head import UpscaleConfig, depth_to_space
from refdecoder.errors import ConfigError, InputError
from refdecoder.inference import decode_video
from refdecoder.tiling import blend_tiles, iter_tiled, plan_tiles, token_alignment
from tests.helpers import randomize_, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_follows_diffusers_tile_loop() -> None:
    # diffusers: for i in range(0, h, stride): for j in range(0, w, stride): z[..., i:i+tile, j:j+tile]
    plan = plan_tiles((10, 14), 8, tile=(48, 48), overlap=(16, 16))
    expected = [[(i, j, min(6, 10 - i), min(6, 14 - j)) for j in range(0, 14, 4)] for i in range(0, 10, 4)]
    assert [[(t.top, t.left, t.height, t.width) for t in row] for row in plan.rows] == expected
    assert plan.blend == (16, 16) and plan.stride == (32, 32) and plan.pixel_size == (80, 112)


def test_plan_rejects_bad_geometry() -> None:
    with pytest.raises(ConfigError, match="multiples of 8"):
        plan_tiles((8, 8), 8, tile=(60, 60), overlap=(16, 16))
    with pytest.raises(ConfigError, match="stride"):
        plan_tiles((8, 8), 8, tile=(48, 48), overlap=(48, 48))
    with pytest.raises(ConfigError, match="multiple of 16"):
        plan_tiles((8, 8), 8, tile=(48, 48), overlap=(24, 24), alignment=16)


def test_blend_is_a_partition_of_unity() -> None:
    # Tiles cut from one smooth image blend back into exactly that image: the ramps sum to 1 everywhere.
    plan = plan_tiles((7, 9), 8, tile=(32, 40), overlap=(16, 8))
    image = torch.linspace(-1, 1, 56 * 72).reshape(1, 1, 1, 56, 72)
    tiles = [[image[..., plan.pixel_box(t)[0], plan.pixel_box(t)[1]].clone() for t in row] for row in plan.rows]
    torch.testing.assert_close(blend_tiles(tiles, plan), image, atol=1e-6, rtol=0)


def test_blend_matches_diffusers_blend_functions() -> None:
    from diffusers import AutoencoderKLWan

    plan = plan_tiles((6, 8), 8, tile=(40, 40), overlap=(16, 16))
    g = torch.Generator().manual_seed(0)
    tiles = [[torch.randn(1, 3, 2, t.height * 8, t.width * 8, generator=g) for t in row] for row in plan.rows]
    ours = blend_tiles([[t.clone() for t in row] for row in tiles], plan)
    # The same maths with diffusers' own blend_v / blend_h, in its order (in place, raster order).
    rows = []
    for i, row in enumerate(tiles):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = AutoencoderKLWan.blend_v(None, tiles[i - 1][j], tile, 16)
            if j > 0:
                tile = AutoencoderKLWan.blend_h(None, row[j - 1], tile, 16)
            out_row.append(tile[..., :24, :24])
        rows.append(torch.cat(out_row, dim=-1))
    torch.testing.assert_close(ours, torch.cat(rows, dim=-2)[..., :48, :64], atol=1e-6, rtol=0)


def test_plain_tiled_decode_equals_diffusers_tiled_decode() -> None:
    vae = tiny_wan()
    adapter = refdecoder.get_backbone("wan2.1")(vae)
    z = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    vae.enable_tiling(40, 40, 24, 24)
    with torch.no_grad():
        expected = vae.decode(z).sample
        ours = decode_video(adapter, z, tiles=plan_tiles((6, 6), 8, tile=(40, 40), overlap=(16, 16)))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def _local_stream(z: torch.Tensor, ref: torch.Tensor | None, moved: None = None) -> Iterator[torch.Tensor]:
    """A decoder whose every output pixel depends only on its own position: latent colour + reference pixel."""
    video = F.interpolate(z[:, :3], scale_factor=(1, 8, 8), mode="nearest") + ref[:, :, :1]
    yield from video.split(1, dim=2)  # one frame per window: the tiles must advance in lockstep


def test_each_tile_gets_its_reference_crop() -> None:
    # With a position-local decoder, any misplaced reference crop or blend weight shows up as a difference.
    g = torch.Generator().manual_seed(0)
    z, ref = torch.randn(1, 4, 3, 7, 9, generator=g), torch.randn(1, 3, 1, 56, 72, generator=g)
    plan = plan_tiles((7, 9), 8, tile=(32, 32), overlap=(16, 16))
    tiled = torch.cat(list(iter_tiled(_local_stream, z, ref, plan)), dim=2)
    torch.testing.assert_close(tiled, torch.cat(list(_local_stream(z, ref)), dim=2), atol=1e-6, rtol=0)


def test_iter_tiled_rejects_a_reference_of_another_size() -> None:
    plan = plan_tiles((4, 4), 8, tile=(16, 16), overlap=(8, 8))
    with pytest.raises(InputError, match="reference"):
        next(iter_tiled(_local_stream, torch.zeros(1, 4, 1, 4, 4), torch.zeros(1, 3, 1, 30, 32), plan))


def _local_model(config: refdecoder.RefDecoderConfig | str = "tiny") -> torch.nn.Module:
    """RefDecoder with random added weights whose global attention (Wan mid-block, joint attention) is off."""
    vae = tiny_wan()
    model = refdecoder.wrap(vae, config).eval()
    for part in (model.tokenizer, model.transformer, model.projectors):
        randomize_(part, scale=0.2)
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.attn.to_out.weight.zero_()
            block.attn.to_out.bias.zero_()
        for attention in vae.decoder.mid_block.attentions:
            attention.proj.weight.zero_()
            attention.proj.bias.zero_()
    return model


@pytest.mark.parametrize("scale", [1, 2])
def test_tiled_equals_untiled_away_from_seams(scale: int) -> None:
    model = _local_model("tiny" if scale == 1 else _upscale_config())
    if scale == 2:
        randomize_(model.vae.decoder.conv_out, scale=0.05)  # a trained head: its sub-pixels differ
    g = torch.Generator().manual_seed(0)
    size = 128 * scale
    z, ref = torch.randn(1, 4, 1, 16, 16, generator=g), torch.rand(1, 3, size, size, generator=g) * 2 - 1
    plan = plan_tiles((16, 16), 8, tile=(96, 96), overlap=(32, 32), alignment=token_alignment(model))
    with torch.no_grad():
        whole = model.decode(z, reference=ref)
        tiled = decode_video(model, z, reference=ref, tiles=plan)
    assert whole.shape[-2:] == (size, size)
    if scale == 2:
        assert (whole[..., ::2, ::2] - whole[..., 1::2, 1::2]).abs().max() > 0.5  # not a nearest upsample
    error = (whole - tiled).abs().amax(dim=(0, 1, 2))
    # Tile (0, 0) spans 0..96 px (of the decoder's grid), blended from 64; 64 px from its edge only the decoder's
    # receptive-field tail differs (zero padding at the tile border), while near the seams the tiles disagree.
    assert error[: 32 * scale, : 32 * scale].max() < 1e-2
    assert error[64 * scale : 96 * scale, 64 * scale : 96 * scale].max() > 0.05


def test_token_alignment_follows_the_patch_grid() -> None:
    model = refdecoder.wrap(tiny_wan(), "tiny")
    assert token_alignment(model) == 16  # stages at H/8, H/4, H/2 with patches 2, 4, 8: one token = 16 px


def _upscale_config() -> refdecoder.RefDecoderConfig:
    config = refdecoder.preset("tiny")
    config.upscale = UpscaleConfig(factor=2)
    return config


def _local_stream_2x(z: torch.Tensor, ref: torch.Tensor | None, moved: None = None) -> Iterator[torch.Tensor]:
    """A position-local decoder with a 12-channel head: each sub-pixel = latent colour + its reference pixel."""
    base = F.interpolate(z[:, :3].repeat_interleave(4, 1), scale_factor=(1, 8, 8), mode="nearest")
    video = base + F.pixel_unshuffle(ref[:, :, 0], 2)[:, :, None]  # reference at 2x, folded into the 12 channels
    yield from video.split(1, dim=2)


def test_upscale_tiles_get_2x_reference_crops_and_blend_before_the_shuffle() -> None:
    g = torch.Generator().manual_seed(0)
    z, ref = torch.randn(1, 4, 2, 7, 9, generator=g), torch.randn(1, 3, 1, 112, 144, generator=g)
    plan = plan_tiles((7, 9), 8, tile=(32, 32), overlap=(16, 16))
    tiled = torch.cat([depth_to_space(c, 2) for c in iter_tiled(_local_stream_2x, z, ref, plan, output_scale=2)], 2)
    whole = depth_to_space(torch.cat(list(_local_stream_2x(z, ref)), dim=2), 2)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="112, 144"):  # a 1x reference is refused: the output is 2x
        next(iter_tiled(_local_stream_2x, z, ref[..., ::2, ::2], plan, output_scale=2))


def test_tiled_upscale_at_init_is_nearest_2x_of_diffusers_tiled_decode() -> None:
    # At init the head replicates each colour into its 4 sub-pixels, so blending before the shuffle gives exactly
    # the nearest 2x of the plain tiled decode; blending after it would ramp at 2x resolution instead.
    model = refdecoder.wrap(tiny_wan(), _upscale_config()).eval()
    g = torch.Generator().manual_seed(0)
    z, ref = torch.randn(1, 4, 2, 8, 8, generator=g), torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    plan = plan_tiles((8, 8), 8, tile=(48, 48), overlap=(16, 16), alignment=token_alignment(model))
    with torch.no_grad():
        tiled = decode_video(model, z, reference=ref, tiles=plan)
    vae = model.unwrap()
    vae.enable_tiling(48, 48, 32, 32)
    with torch.no_grad():
        expected = vae.decode(z).sample
    assert tiled.shape[-2:] == (128, 128)
    torch.testing.assert_close(tiled, expected.repeat_interleave(2, -2).repeat_interleave(2, -1), atol=1e-5, rtol=0)


def test_wan22_tiles_blend_in_its_patch_grid() -> None:
    """diffusers blends Wan2.2 tiles before unpatchifying: ramps constant over each 2x2 patch, not per pixel."""
    torch.manual_seed(0)
    adapter = refdecoder.get_backbone("wan2.2")(refdecoder.get_backbone("wan2.2").build_tiny().eval())
    z = torch.randn(1, adapter.latent_channels, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    tile, overlap = (48, 48), (16, 16)
    patch_plan = plan_tiles((5, 5), 16, tile, overlap, ramp_step=adapter.output_patch)
    with torch.no_grad():
        expected = adapter.plain_tiled_decode(z, patch_plan)
        ours = decode_video(adapter, z, tiles=patch_plan)
        per_pixel = decode_video(adapter, z, tiles=plan_tiles((5, 5), 16, tile, overlap))
    assert patch_plan.num_tiles == 9 and not adapter.vae.use_tiling  # the VAE's own settings were restored
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (per_pixel - expected).abs().max() > 1e-3


def _displaced_stream(z: torch.Tensor, ref: torch.Tensor | None, moved: torch.Tensor) -> Iterator[torch.Tensor]:
    """Position-local again, and it reads its displacement tile: latent colour + the displacement's dx channel."""
    video = F.interpolate(z[:, :3], scale_factor=(1, 8, 8), mode="nearest") + moved[:, 1:2]
    yield from video.split(1, dim=2)


def test_each_tile_gets_its_displacement_crop() -> None:
    g = torch.Generator().manual_seed(1)
    z, ref = torch.randn(1, 4, 3, 7, 9, generator=g), torch.randn(1, 3, 1, 56, 72, generator=g)
    moved = torch.randn(1, 2, 3, 56, 72, generator=g)
    plan = plan_tiles((7, 9), 8, tile=(32, 32), overlap=(16, 16))
    tiled = torch.cat(list(iter_tiled(_displaced_stream, z, ref, plan, displacements=moved)), dim=2)
    torch.testing.assert_close(tiled, torch.cat(list(_displaced_stream(z, ref, moved)), dim=2), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="displacements are"):
        next(iter_tiled(_displaced_stream, z, ref, plan, displacements=moved[..., :40]))
