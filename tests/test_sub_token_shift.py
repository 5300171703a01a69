"""Sub-token shift (``correspondence.sub_token_shift``): the video moved by what snapping drops lines its content up
with the reference tokens the snapped attention gathers, and the update comes back onto the frame's own grid."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import refdecoder
from refdecoder.blocks.correspondence import CorrespondenceField
from refdecoder.blocks.sub_token_shift import remainder_in_cells, shift_features
from refdecoder.conditioning import ReferenceFeatures, StageConditioner
from refdecoder.config import CorrespondenceConfig
from refdecoder.errors import ConfigError
from refdecoder.hooks import DecodeContext
from tests.helpers import latents_for, reference_for, tiny_wan


def ramp(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``1, 2, 1, H, W``: two channels linear in the (possibly fractional) cell position, which bilinear sampling
    reproduces exactly away from the border."""
    return torch.stack([3.0 * y - 0.5 * x, 0.25 * y + 2.0 * x])[None, :, None]


def ramp_on_grid(h: int, w: int, dy: float = 0.0, dx: float = 0.0, frames: int = 1) -> torch.Tensor:
    """The ramp at every cell ``(y, x)`` of an ``h x w`` grid taken at ``(y + dy, x + dx)``, over ``frames``."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ramp(y + dy, x + dx).expand(-1, -1, frames, -1, -1).contiguous()


def interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin]


def test_shift_features_reads_each_cell_at_its_shifted_position():
    x = ramp_on_grid(9, 11)
    for dy, dx in ((0.5, -0.25), (1.0, 2.0), (-0.3, 0.7)):
        shift = torch.tensor([dy, dx]).reshape(1, 2, 1, 1, 1).expand(1, 2, 1, 9, 11)
        torch.testing.assert_close(interior(shift_features(x, shift), 3), interior(ramp_on_grid(9, 11, dy, dx), 3))
    torch.testing.assert_close(shift_features(x, torch.zeros(1, 2, 1, 9, 11)), x)  # zero: each cell back
    bf16 = shift_features(x.to(torch.bfloat16), torch.full((1, 2, 1, 9, 11), 0.5))
    assert bf16.dtype == torch.bfloat16


def test_remainder_in_cells_moves_each_token_as_one_piece_by_whole_cells():
    remainder = torch.tensor([[0.25, -0.5, 0.1], [0.0, 0.4, -0.2]]).reshape(1, 1, 1, 2, 3).repeat(1, 2, 1, 1, 1)
    remainder[:, 1] *= -1
    cells = remainder_in_cells(remainder, (1, 2, 3), (3, 8))  # partial last token row and column
    assert cells.shape == (1, 2, 1, 3, 8)
    for y in range(3):
        for x in range(8):
            expected = (remainder[0, :, 0, y // 2, x // 3] * torch.tensor([2, 3])).round()
            torch.testing.assert_close(cells[0, :, 0, y, x], expected)
    assert not remainder_in_cells(remainder, (1, 1, 1), (2, 3)).any()  # tokens of one cell never move


def _field(dy_px: float, dx_px: float, frames: int = 3) -> tuple[CorrespondenceField, torch.nn.Module]:
    """A constant displacement of the tiny Wan's 3 latent frames of 4x6 cells (32x48 px), with snapping and the
    sub-token shift on."""
    model = refdecoder.wrap(tiny_wan(), "tiny")
    pixels = torch.tensor([dy_px, dx_px]).reshape(1, 1, 2, 1, 1, 1).expand(1, 1, 2, frames, 4, 6).contiguous()
    field = CorrespondenceField(pixels, (32, 48), [(0, frames)], model.adapter, snap=True, sub_token_shift=True)
    return field, model


def test_the_moved_video_shows_what_the_gathered_reference_token_shows():
    """Video cell ``p`` shows the reference at ``p + d``; snapped, the attention reads the reference token ``n`` =
    round(d) tokens away. Moved by the remainder, the video shows inside each token what that reference token shows,
    exactly where it shows it; unmoved, or moved the wrong way, it does not."""
    index, patch = 2, (1, 4, 4)  # the tiny Wan's stage 2: cells of 2 px, tokens of 4x4 cells (8 px)
    field, model = _field(dy_px=-6.0, dx_px=10.0)  # -0.75 and 1.25 tokens: whole -1 and 1, remainder 0.25 and 0.25
    frames = model.adapter.stage_frames(index, 3, True)
    video = ramp_on_grid(16, 24, -3.0, 5.0, frames=frames)  # the reference is ramp_on_grid(16, 24)
    whole, remainder = field.stage_split(index, video, patch, 0, True)
    assert torch.all(whole[:, 0, 0] == -1) and torch.all(whole[:, 0, 1] == 1)
    torch.testing.assert_close(remainder[:, 0], torch.full_like(remainder[:, 0], 0.25))
    assert torch.equal(field.stage(index, video, patch, 0, True), whole)
    shift = remainder_in_cells(remainder[:, 0], patch, (16, 24))  # one cell each way
    gathered = ramp_on_grid(16, 24, -4.0, 4.0, frames=frames)  # the reference n tokens (4n cells) away
    margin = 3
    moved = shift_features(video, -shift, "nearest")
    torch.testing.assert_close(interior(moved, margin), interior(gathered, margin))
    for wrong in (video, shift_features(video, shift, "nearest")):
        assert (interior(wrong, margin) - interior(gathered, margin)).abs().max() > 0.4


class _Recorder(nn.Module):
    """A stand-in stage projector: records what it is handed and adds a known ``update`` to the video frames."""

    def __init__(self, update: torch.Tensor, residual: bool = True) -> None:
        super().__init__()
        self.patch_size, self.residual, self.update = (1, 2, 2), residual, update
        self.seen: torch.Tensor | None = None
        self.displacement: torch.Tensor | None = None

    def forward(self, x, transformer, num_reference, displacement=None):
        self.seen, self.displacement = x, displacement
        video = x[:, :, num_reference:]
        out = video + self.update if self.residual else self.update
        return torch.cat([x[:, :, :num_reference], out], dim=2)


def _stage(dy_px: float, dx_px: float, residual: bool = True) -> tuple[_Recorder, torch.Tensor, torch.Tensor]:
    """Stage 0 of the tiny Wan (cells of 8 px, tokens of 2x2 cells) through a conditioner with the recorder: returns
    the recorder, the video features handed in and the video features the stage returned."""
    field, model = _field(dy_px, dx_px)
    frames = model.adapter.stage_frames(0, 3, True)
    video = ramp_on_grid(4, 6, frames=frames)
    update = ramp_on_grid(4, 6, frames=frames) * 0.1 + 1.0
    recorder = _Recorder(update, residual)
    features = ReferenceFeatures(torch.zeros(1, 3, 1, 32, 48), ramp_on_grid(4, 6), {})
    conditioner = StageConditioner({}, {"stage0": recorder}, None, 0, features, field)
    out, _ = conditioner.stage(0, video, None, DecodeContext())
    return recorder, video, out


@pytest.mark.parametrize("residual", [True, False])
def test_the_conditioner_moves_the_video_one_way_and_the_update_back(residual):
    # 0.4375 and -1.5625 tokens of 16 px: whole 0 and -2, remainder 0.4375 tokens = 0.875 cells -> 1 cell
    recorder, video, out = _stage(dy_px=7.0, dx_px=-25.0, residual=residual)
    assert torch.all(recorder.displacement[:, 0, 0] == 0) and torch.all(recorder.displacement[:, 0, 1] == -2)
    shift = torch.ones(1, 2, video.shape[2], 4, 6)  # the remainder in whole cells
    torch.testing.assert_close(recorder.seen[:, :, 1:], shift_features(video, -shift, "nearest"))
    back = shift_features(recorder.update, shift, "nearest")
    if residual:  # the skip path is the frame's own features, never resampled
        torch.testing.assert_close(out - video, back)
        assert (back - recorder.update).abs().max() > 0.01  # the check can tell an update left where it was
    else:
        torch.testing.assert_close(out, back)


@pytest.mark.parametrize(("dy_px", "dx_px"), [(16.0, -32.0), (3.0, -35.0)])
def test_remainders_under_half_a_cell_leave_the_stage_as_without_the_shift(dy_px, dx_px):
    recorder, video, out = _stage(dy_px, dx_px)  # whole tokens, or remainders of 3 px in cells of 8 px
    assert torch.equal(recorder.seen[:, :, 1:], video)
    assert torch.equal(out, video + recorder.update)


@torch.no_grad()
def test_decode_with_the_shift():
    """Zero and whole-token displacements decode exactly as without the shift; a fractional one differs."""
    config = refdecoder.preset("tiny")
    config.transformer = replace(config.transformer, attention_radius=1, locality_bias=True)
    models = {}
    for on in (False, True):
        config.correspondence = CorrespondenceConfig(sub_token_shift=on)
        models[on] = refdecoder.wrap(tiny_wan(), config)
        torch.manual_seed(3)
        for _, param in models[on].added_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    z = latents_for(models[True].vae, 3, h=4, w=6)
    ref, frames = reference_for(z), models[True].adapter.frame_rule.pixel_frames(3)
    for px in (0.0, 16.0):
        flow = torch.full((1, 2, frames, 32, 48), px)
        assert torch.equal(
            models[True].decode(z, ref, displacements=flow), models[False].decode(z, ref, displacements=flow)
        )
    flow = torch.full((1, 2, frames, 32, 48), 5.0)
    on, off = (models[k].decode(z, ref, displacements=flow) for k in (True, False))
    assert torch.isfinite(on).all() and (on - off).abs().max() > 1e-3


def test_the_shift_needs_snapping():
    with pytest.raises(ConfigError, match="sub_token_shift needs"):
        CorrespondenceConfig(snap=False, sub_token_shift=True)
    with pytest.raises(ConfigError, match="sub_token_shift must be a bool"):
        CorrespondenceConfig(sub_token_shift=1)
    model = refdecoder.wrap(tiny_wan(), "tiny")  # a field made directly, without a config
    with pytest.raises(ConfigError, match="sub_token_shift needs snap"):
        CorrespondenceField(torch.zeros(1, 1, 2, 3, 4, 6), (32, 48), [(0, 3)], model.adapter, sub_token_shift=True)
