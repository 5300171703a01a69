"""ClipSampler: frame rules, fps resampling by index choice, random start, short videos, reference index."""

from __future__ import annotations

import pytest
import torch

from refdecoder.data import ClipSampler, VideoInfo, derive_seed, sample_generator
from refdecoder.errors import ConfigError, DataError
from refdecoder.frames import CAUSAL_1_PLUS_4K, GROUPS_OF_4


def video(fps: float = 25.0, frames: int = 250) -> VideoInfo:
    return VideoInfo(fps=fps, frames=frames, width=640, height=272, duration=frames / fps if fps else 0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_frames_must_follow_the_frame_rule():
    ClipSampler(frames=17, frame_rule=CAUSAL_1_PLUS_4K)
    ClipSampler(frames=16, frame_rule=GROUPS_OF_4)
    with pytest.raises(ConfigError, match=r"13 or 17"):
        ClipSampler(frames=16, frame_rule=CAUSAL_1_PLUS_4K)
    with pytest.raises(ConfigError, match=r"16 or 20"):
        ClipSampler(frames=17, frame_rule=GROUPS_OF_4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fps": 0}, "fps"),
        ({"short": "drop"}, "short"),
        ({"reference": 17}, "reference"),
        ({"reference": "first"}, "reference"),
        ({"resize_mode": "fit"}, "resize_mode"),
        ({"size": (0, 8)}, "size"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ClipSampler(frames=17, **kwargs)


def test_integer_fps_ratio_takes_every_nth_frame():
    plan = ClipSampler(frames=17, fps=15).plan(video(fps=30, frames=300), gen(0))
    start = plan.indices[0]
    assert list(plan.indices) == [start + 2 * k for k in range(17)]
    assert 0 <= start <= 300 - 33 and plan.fps == 15 and plan.padded == 0


def test_fractional_fps_ratio_rounds_each_time_to_the_nearest_frame():
    plan = ClipSampler(frames=17, fps=15).plan(video(fps=25, frames=250), gen(0))
    # 25 -> 15 fps: clip frame k shows source frame start + 5k/3, rounded half up (worked out by hand).
    offsets = [i - plan.indices[0] for i in plan.indices]
    assert offsets == [0, 2, 3, 5, 7, 8, 10, 12, 13, 15, 17, 18, 20, 22, 23, 25, 27]
    assert plan.fps == 15


def test_fractional_fps_first_frames_by_hand():
    plan = ClipSampler(frames=9, fps=15).plan(video(fps=25, frames=14), gen(0))
    # Span: round(8 * 5 / 3) = 13 -> needs 14 frames; exactly 14 available, so the start must be 0.
    assert list(plan.indices) == [0, 2, 3, 5, 7, 8, 10, 12, 13]


def test_target_above_source_rate_keeps_the_source_rate():
    plan = ClipSampler(frames=5, fps=60).plan(video(fps=24, frames=100), gen(1))
    assert plan.fps == 24 and list(plan.indices) == list(range(plan.indices[0], plan.indices[0] + 5))


def test_random_start_covers_every_valid_start():
    sampler = ClipSampler(frames=5)
    starts = {sampler.plan(video(frames=12), gen(seed)).indices[0] for seed in range(200)}
    assert starts == set(range(0, 12 - 4))


def test_short_video_is_padded_with_its_last_frame():
    plan = ClipSampler(frames=17, short="pad").plan(video(frames=10), gen(0))
    assert list(plan.indices) == list(range(10)) + [9] * 7
    assert plan.padded == 7
    references = {ClipSampler(frames=17).plan(video(frames=10), gen(s)).reference_index for s in range(100)}
    assert references == set(range(10))  # uniform over the real frames only


def test_short_video_is_skipped_when_configured():
    with pytest.raises(DataError, match="too short"):
        ClipSampler(frames=17, short="skip").plan(video(frames=10), gen(0))
    with pytest.raises(DataError, match="too short"):
        ClipSampler(frames=17, fps=10, short="skip").plan(video(fps=25, frames=40), gen(0))  # needs 41


def test_reference_index_uniform_and_fixed():
    draws = [ClipSampler(frames=9).plan(video(), gen(s)).reference_index for s in range(300)]
    assert set(draws) == set(range(9))
    counts = torch.bincount(torch.tensor(draws), minlength=9).float()
    assert counts.min() > 300 / 9 * 0.4  # roughly uniform
    assert ClipSampler(frames=9, reference=0).plan(video(), gen(0)).reference_index == 0
    assert ClipSampler(frames=9, reference=-1).plan(video(), gen(0)).reference_index == 8
    assert ClipSampler(frames=9, reference=-9).plan(video(), gen(0)).reference_index == 0


def test_image_becomes_a_repeated_clip_or_a_skip():
    image = VideoInfo(fps=0.0, frames=1, width=64, height=64, duration=0.0, is_image=True)
    plan = ClipSampler(frames=5).plan(image, gen(0))
    assert plan.indices == (0,) * 5 and plan.fps == 0.0 and plan.reference_index == 0
    assert ClipSampler(frames=1).plan(image, gen(0)).padded == 0
    with pytest.raises(DataError):
        ClipSampler(frames=5, short="skip").plan(image, gen(0))


def test_video_without_frame_rate_is_a_data_error():
    with pytest.raises(DataError, match="fps"):
        ClipSampler(frames=5).plan(video(fps=0.0), gen(0))


def test_same_generator_seed_same_plan():
    sampler = ClipSampler(frames=17, fps=12)
    plans = [sampler.plan(video(), sample_generator(3, 0, "shard", "key")) for _ in range(2)]
    assert plans[0] == plans[1]
    others = {sampler.plan(video(), sample_generator(3, 0, "shard", f"key{i}")).indices[0] for i in range(20)}
    assert len(others) > 5


def test_derive_seed_is_stable_and_separates_ids():
    assert derive_seed(1, 2, "a") == derive_seed(1, 2, "a")
    seeds = {derive_seed(0, epoch, index) for epoch in range(5) for index in range(50)}
    assert len(seeds) == 250
    assert all(0 <= s < 2**63 for s in seeds)
