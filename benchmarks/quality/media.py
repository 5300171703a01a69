"""Real footage and photographs for the quality benchmark, from what the package registries ship.

The OpenCV source distribution on PyPI (``opencv-python``, pinned below and checked by SHA-256) carries OpenCV's
sample data: real videos (pedestrians, hand-held objects, foliage, an animated film clip) and colourful
photographs (fruit, sweets, animals, buildings, a painting). :func:`opencv_samples` downloads the archive once,
extracts only those media files into a cache folder and returns it; later calls read the cache. Nothing here is
committed to the repository.

    folder = opencv_samples()            # ~/.cache/refdecoder/opencv-samples-4.14.0.94 (or $REFDECODER_MEDIA)
    folder / "vtest.avi"
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from refdecoder.errors import DataError

__all__ = ["OPENCV_VERSION", "OPENCV_MEDIA", "opencv_samples", "media_folder"]

logger = logging.getLogger("refdecoder.benchmarks.media")

OPENCV_VERSION = "4.14.0.94"
_SDIST = (
    "https://files.pythonhosted.org/packages/ed/e8/c2959c0f969ea4ae96b55ad10c108c0410de4e8b3550d9941a4cfdd52703/"
    f"opencv_python-{OPENCV_VERSION}.tar.gz"
)
_SHA256 = "afadc76a38a07713a4c2b4702da917cf0ed489be57e2a40a34e670189731de7d"
# Archive member (below the top folder) -> file name in the cache.
OPENCV_MEDIA: dict[str, str] = {
    "opencv/samples/data/vtest.avi": "vtest.avi",
    "opencv/samples/data/tree.avi": "tree.avi",
    "opencv/samples/data/Megamind.avi": "Megamind.avi",
    "opencv/doc/js_tutorials/js_assets/cup.mp4": "cup.mp4",
    "opencv/samples/cpp/tutorial_code/calib3d/real_time_pose_estimation/Data/box.mp4": "box.mp4",
    **{
        f"opencv/samples/data/{name}": name
        for name in (
            "aero1.jpg aero3.jpg aloeL.jpg aloeR.jpg apple.jpg baboon.jpg board.jpg building.jpg butterfly.jpg "
            "ela_original.jpg fruits.jpg gauge-1.jpg graf1.png graf3.png HappyFish.jpg home.jpg left.jpg right.jpg "
            "leuvenA.jpg leuvenB.jpg licenseplate_motion.jpg messi5.jpg orange.jpg rubberwhale1.png "
            "rubberwhale2.png smarties.png squirrel_cls.jpg starry_night.jpg stuff.jpg Blender_Suzanne1.jpg"
        ).split()
    },
}


def media_folder() -> Path:
    """The cache folder: ``$REFDECODER_MEDIA`` or ``~/.cache/refdecoder``."""
    root = os.environ.get("REFDECODER_MEDIA")
    return Path(root) if root else Path.home() / ".cache" / "refdecoder"


def opencv_samples(folder: Path | None = None) -> Path:
    """The folder holding :data:`OPENCV_MEDIA`, downloaded from PyPI and extracted on first use.

    Raises:
        DataError: the download fails or the archive's checksum does not match.
    """
    target = (folder or media_folder()) / f"opencv-samples-{OPENCV_VERSION}"
    if all((target / name).is_file() for name in OPENCV_MEDIA.values()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "opencv.tar.gz"
        logger.info("downloading OpenCV %s sample media from PyPI (96 MB, once) into %s", OPENCV_VERSION, target)
        try:
            urllib.request.urlretrieve(_SDIST, archive)
        except OSError as err:
            raise DataError(f"cannot download {_SDIST}: {err}; the benchmark needs it once (PyPI access)") from err
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != _SHA256:
            raise DataError(f"{_SDIST} has SHA-256 {digest}, expected {_SHA256}")
        staging = Path(tmp) / "media"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]
                if inner in OPENCV_MEDIA and member.isfile():
                    with tar.extractfile(member) as src, open(staging / OPENCV_MEDIA[inner], "wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = sorted(set(OPENCV_MEDIA.values()) - {p.name for p in staging.iterdir()})
        if missing:
            raise DataError(f"the OpenCV archive lacks {missing}")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target
