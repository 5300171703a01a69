"""Media helpers: streamed reading equals the data layer, chunked mp4 writing, side-by-side videos, PNG grids."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from refdecoder.data import bundled_clips, read_clip, read_image
from refdecoder.errors import DataError, InputError
from refdecoder.media import VideoWriter, comparison_grid, iter_frames, side_by_side, write_grid, zoom_box

pytestmark = pytest.mark.usefixtures("one_thread")


def test_iter_frames_equals_read_clip() -> None:
    clip = bundled_clips()[0]
    chunks = list(iter_frames(clip, size=(32, 40), chunk=4, max_frames=10))
    assert [c.shape[1] for c in chunks] == [4, 4, 2]
    torch.testing.assert_close(torch.cat(chunks, dim=1), read_clip(clip, range(10), size=(32, 40)), atol=0, rtol=0)


def test_iter_frames_reports_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 50)
    with pytest.raises(DataError):
        next(iter_frames(broken))
    with pytest.raises(DataError):
        next(iter_frames(tmp_path / "missing.mp4"))


def test_video_writer_appends_chunks(tmp_path: Path) -> None:
    ramp = torch.linspace(-0.8, 0.8, 24)
    video = torch.stack([ramp.expand(7, 16, 24), ramp.flip(0).expand(7, 16, 24), torch.zeros(7, 16, 24)])
    with VideoWriter(tmp_path / "out.mp4", fps=12.5, crf=0) as writer:
        writer.write(video[:, :3])
        writer.write(video[None, :, 3:])
    assert not list(tmp_path.glob(".*partial"))
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert (len(frames), float(stream.average_rate), stream.width, stream.height) == (7, 12.5, 24, 16)
    expected = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().numpy()
    # crf 0 is lossless in luma only; chroma is 4:2:0 subsampled and YUV-rounded, so allow a few levels.
    assert np.abs(np.stack(frames).astype(float) - expected).mean() < 6


def test_video_writer_drops_the_partial_file_on_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "out.mp4", fps=10) as writer:
            writer.write(torch.zeros(3, 2, 16, 16))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_side_by_side_layout() -> None:
    a, b = torch.full((3, 4, 16, 24), 0.5), torch.full((3, 4, 16, 8), -0.5)
    image = torch.full((3, 1, 16, 10), 1.0)
    plain = side_by_side([image, a, b], gap=2)
    assert plain.shape == (3, 4, 16, 10 + 2 + 24 + 2 + 8)
    assert (
        (plain[:, :, :, :10] == 1).all()
        and (plain[:, :, :, 12:36] == 0.5).all()
        and (plain[:, :, :, 10:12] == -1).all()
    )
    labelled = side_by_side([image, a, b], ["ref", "a", "b"], gap=2)
    assert labelled.shape[2] > 16 and torch.equal(labelled[:, :, -16:], plain)
    assert labelled[:, 0, : labelled.shape[2] - 16].amax() > -0.5  # some label text was drawn
    with pytest.raises(InputError, match="equal heights"):
        side_by_side([a, torch.zeros(3, 4, 8, 8)])


def test_zoom_box_finds_the_difference() -> None:
    a = torch.zeros(3, 64, 96)
    b = a.clone()
    b[:, 40:52, 60:80] = 1.0
    top, left, h, w = zoom_box(a, b)
    assert (h, w) == (16, 24)
    assert top <= 40 and top + h >= 52 - 4 and left <= 60 + 4 and left + w >= 76


def test_comparison_grid_writes_a_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    rows = [[torch.rand(3, 32, 48, generator=g) * 2 - 1 for _ in range(4)] for _ in range(2)]
    grid = comparison_grid(rows, ["reference", "base", "RefDecoder", "ground truth"], gap=2)
    # label strip + 2 time steps x (full frames + zoomed crops), with 2-px separators
    assert grid.shape[0] == 3 and grid.shape[2] == 4 * 48 + 3 * 2 and grid.shape[1] > 4 * 32 + 3 * 2
    path = write_grid(tmp_path / "grid.png", grid)
    assert read_image(path).shape[-2:] == grid.shape[-2:]
    with pytest.raises(InputError, match="one per label"):
        comparison_grid(rows, ["a", "b"])
