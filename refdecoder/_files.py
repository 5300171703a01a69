"""Small file-system helpers shared by the writers of weights and results."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["use_default_mode"]


def use_default_mode(path: str | os.PathLike) -> Path:
    """Give ``path`` the mode a plainly created file gets (``0o666`` less the umask, e.g. 0644).

    safetensors writes its files with mode 0600, so without this a weights file is unreadable to the group that
    can read the config beside it.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)
