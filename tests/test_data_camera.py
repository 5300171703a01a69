"""The virtual camera (pan / zoom / rotation crops) and the samplers' far reference."""

from __future__ import annotations

import math

import pytest
import torch

from refdecoder.data import CameraMotion, CameraPath, ClipSampler, camera_path, render_camera, write_video
from refdecoder.data.video import VideoInfo
from refdecoder.errors import ConfigError, InputError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def still(centre: list[tuple[float, float]], source: tuple[int, int], size: tuple[int, int]) -> CameraPath:
    t = len(centre)
    return CameraPath(torch.tensor(centre, dtype=torch.float64), torch.ones(t), torch.zeros(t), source, size)


# --- geometry ---------------------------------------------------------------------------------------------------
def test_whole_pixel_pans_are_exact_crops():
    frames = torch.rand(3, 3, 12, 16) * 2 - 1
    # Crops of 6 x 8 whose centres move by whole pixels: (x, y) centre of a crop at (left, top) = left + 4, top + 3.
    corners = [(0, 0), (3, 2), (8, 6)]
    path = still([(left + 4.0, top + 3.0) for left, top in corners], (12, 16), (6, 8))
    out = render_camera(frames, path)
    for i, (left, top) in enumerate(corners):
        torch.testing.assert_close(out[:, i], frames[:, i, top : top + 6, left : left + 8], atol=1e-5, rtol=0)


def test_the_flow_of_a_pan_is_the_pan_in_pixels():
    path = still([(8.0, 6.0), (11.0, 4.0), (14.5, 7.0)], (12, 24), (6, 8))  # (x, y) centres
    flow = path.flow_to(0)
    assert flow.shape == (2, 3, 6, 8)
    for t, (dx, dy) in enumerate([(0.0, 0.0), (3.0, -2.0), (6.5, 1.0)]):  # frame t's pixel p is frame 0's p + d
        torch.testing.assert_close(flow[1, t], torch.full((6, 8), dx), atol=1e-5, rtol=0)
        torch.testing.assert_close(flow[0, t], torch.full((6, 8), dy), atol=1e-5, rtol=0)
    torch.testing.assert_close(path.flow_to(2)[1, 0], torch.full((6, 8), -6.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_frame_warped_by_its_flow_is_the_reference_frame(seed):
    """Drawn moves (pan, zoom, rotation): sampling pose 0 at ``p + flow_t(p)`` gives pose t at ``p``."""
    g = gen(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 96, 128, generator=g) * 2 - 1, 9, 1, 4)[0]
    path = camera_path(CameraMotion(pan=0.2, zoom=0.2, rotation=5.0), (96, 128), (48, 64), range(5), 5, g)
    video = render_camera(smooth[:, None], path)  # 3, 5, 48, 64
    flow = path.flow_to(0)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")

    def pose0_at(dy: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pose 0 sampled at ``p + (dy, dx)`` for every frame: ``3, T, H, W``, and the normalised x, y sampled."""
        x, y = (xs + dx + 0.5) / 64 * 2 - 1, (ys + dy + 0.5) / 48 * 2 - 1
        frames = video[:, :1].transpose(0, 1).expand(5, -1, -1, -1)
        grid = torch.stack([x, y], dim=-1)  # T, H, W, 2
        return torch.nn.functional.grid_sample(frames, grid, align_corners=False).transpose(0, 1), x, y

    warped, x, y = pose0_at(flow[0], flow[1])
    inside = ((x.abs() < 0.9) & (y.abs() < 0.9))[None]  # away from pose 0's border
    error = (warped - video).abs()[inside.expand_as(video)]
    assert error.mean() < 0.01, error.mean()
    missed, _, _ = pose0_at(-flow[0], -flow[1])  # a flow of the wrong sign misses
    assert (missed - video)[:, 1:].abs().mean() > 5 * error.mean()


def test_half_pixel_pans_resample_between_pixels():
    frames = torch.rand(3, 1, 8, 8) * 2 - 1
    out = render_camera(frames, still([(4.5, 4.0)], (8, 8), (4, 4)))  # half a pixel right of the crop at left 2
    expected = (frames[:, 0, 2:6, 2:6] + frames[:, 0, 2:6, 3:7]) / 2
    torch.testing.assert_close(out[:, 0], expected, atol=1e-5, rtol=0)


def test_a_still_camera_over_the_whole_frame_is_the_identity_and_uint8_is_read_as_minus_1_to_1():
    frames = torch.randint(0, 256, (3, 4, 10, 14), dtype=torch.uint8)
    motion = CameraMotion(pan=0, zoom=0, rotation=0, source_scale=1)
    path = camera_path(motion, (10, 14), (10, 14), range(4), 4, gen(0))
    torch.testing.assert_close(render_camera(frames, path), frames.float() / 127.5 - 1, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("source", "size"), [((96, 96), (64, 64)), ((60, 100), (40, 64)), ((64, 64), (64, 64))])
def test_every_drawn_move_stays_inside_the_source_and_within_its_ranges(source, size):
    motion = CameraMotion(pan=0.3, zoom=0.2, rotation=4.0)
    g = gen(1)
    for _ in range(100):
        path = camera_path(motion, source, size, list(range(-4, 9)), 9, g)  # a reference 4 frames before a 9-clip
        assert path.fits()
        first, last = 4, 12  # clip frames 0 and 8
        assert (path.centre[last] - path.centre[first]).norm() <= 0.3 * max(size) + 1e-6
        ratio = float(path.scale[last] / path.scale[first])
        assert 1 / 1.2 - 1e-6 <= ratio <= 1.2 + 1e-6
        assert abs(float(path.angle[last] - path.angle[first])) <= math.radians(4.0) + 1e-6
        assert float(path.scale.min()) >= 0.8 - 1e-6  # never magnifies past the limit


def test_moves_are_linear_in_time_so_poses_outside_the_clip_continue_them():
    path = camera_path(
        CameraMotion(pan=0.3, zoom=0.2, rotation=4.0), (120, 120), (48, 48), [-3, 0, 1, 2, 8], 9, gen(2)
    )
    velocity = path.centre[2] - path.centre[1]
    torch.testing.assert_close(path.centre[0], path.centre[1] - 3 * velocity)
    torch.testing.assert_close(path.centre[4], path.centre[1] + 8 * velocity)
    torch.testing.assert_close(path.scale[4] / path.scale[1], (path.scale[2] / path.scale[1]) ** 8)


def test_moves_are_seeded_and_probability_0_keeps_the_crop_still():
    motion = CameraMotion()
    a, b = (camera_path(motion, (96, 96), (64, 64), range(9), 9, gen(3)) for _ in range(2))
    assert torch.equal(a.centre, b.centre) and torch.equal(a.scale, b.scale)
    frozen = camera_path(CameraMotion(probability=0.0), (96, 96), (64, 64), range(9), 9, gen(3))
    assert torch.equal(frozen.centre, frozen.centre[:1].expand(9, 2)) and frozen.scale.unique().numel() == 1
    moved = [camera_path(motion, (96, 96), (64, 64), range(9), 9, gen(s)) for s in range(20)]
    assert sum((p.centre[-1] - p.centre[0]).norm() > 1 for p in moved) >= 15  # most clips move


def test_camera_rejects_bad_input():
    with pytest.raises(ConfigError):
        CameraMotion(pan=-1)
    with pytest.raises(ConfigError):
        CameraMotion(source_scale=0.5)
    with pytest.raises(InputError, match="smaller"):
        camera_path(CameraMotion(), (32, 32), (64, 64), range(5), 5, gen(0))
    path = camera_path(CameraMotion(), (96, 96), (64, 64), range(5), 5, gen(0))
    with pytest.raises(InputError, match="5 frame"):
        render_camera(torch.zeros(3, 4, 96, 96), path)
    assert CameraMotion(source_scale=1.5).window((64, 40)) == (96, 60)


# --- in the samplers --------------------------------------------------------------------------------------------
def video(fps: float = 25.0, frames: int = 100) -> VideoInfo:
    return VideoInfo(fps=fps, frames=frames, width=64, height=64, duration=frames / fps)


def test_far_reference_lies_outside_the_clip_at_the_distance():
    sampler = ClipSampler(frames=9, reference="far", reference_distance=6)
    sides = set()
    for seed in range(40):
        plan = sampler.plan(video(), gen(seed))
        assert plan.reference_index == -1 and len(plan.indices) == 9
        if plan.reference_time < 0:
            assert plan.reference_time == -6 and plan.reference_source == plan.indices[0] - 6
        else:
            assert plan.reference_time == 8 + 6 and plan.reference_source == plan.indices[-1] + 6
        sides.add(plan.reference_time < 0)
    assert sides == {True, False}
    with pytest.raises(ConfigError, match="reference_distance"):
        ClipSampler(frames=9, reference="far", reference_distance=0)
    with pytest.raises(ConfigError, match="size"):
        ClipSampler(frames=9, size=None, motion=CameraMotion())


def test_sampler_reads_moving_clips_and_a_posed_far_reference(tmp_path):
    # Red follows the column, green the row: a camera move shifts their means, so motion shows in the frames.
    x, y = torch.linspace(-1, 1, 96).expand(72, 96), torch.linspace(-1, 1, 72)[:, None].expand(72, 96)
    frames = torch.stack([x, y, torch.zeros_like(x)])[:, None].expand(3, 30, 72, 96).clone()
    path = write_video(tmp_path / "ramps.mp4", frames, fps=25)
    motion = CameraMotion(pan=0.4, zoom=0.0, rotation=0.0)
    sampler = ClipSampler(frames=5, size=(32, 32), reference="far", reference_distance=4, motion=motion)
    moved = 0
    for seed in range(6):
        clip, plan, reference = sampler.read(path, gen(seed))
        assert clip.shape == (3, 5, 32, 32) and reference.shape == (3, 1, 32, 32)
        means = clip[:2].mean(dim=(2, 3))  # 2, T: red and green means per frame
        moved += int((means[:, -1] - means[:, 0]).abs().max() > 0.05)
        # The reference continues the move: its offset from the nearest clip frame follows the same velocity.
        step = means[:, 1] - means[:, 0]
        near = 0 if plan.reference_time < 0 else 4
        expected = means[:, near] + (plan.reference_time - near) * step
        torch.testing.assert_close(reference[:2, 0].mean(dim=(1, 2)), expected, atol=0.03, rtol=0)
    assert moved >= 5
