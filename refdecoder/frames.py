"""Frame-count rules of video VAEs: which pixel frame counts a backbone accepts and how they map to latents.

A rule is ``valid = first + step * k`` for ``k >= 0``. Causal VAEs such as Wan2.1 encode the first frame alone
and every later group of ``step`` frames into one latent frame (``first=1, step=4``: 1, 5, 9, 13, 17, ...).
Chunked non-causal VAEs such as VideoVAE+ take whole groups (``first=4, step=4``: 4, 8, 12, 16, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refdecoder.errors import InputError

__all__ = ["FrameRule", "CAUSAL_1_PLUS_4K", "GROUPS_OF_4"]


@dataclass(frozen=True)
class FrameRule:
    """Valid pixel frame counts ``first + step * k`` and their latent frame counts ``1 + k``.

    Attributes:
        first: pixel frames encoded into the first latent frame.
        step: pixel frames per later latent frame (the temporal compression factor).
    """

    first: int
    step: int

    def __post_init__(self) -> None:
        if self.first < 1 or self.step < 1:
            raise ValueError(f"FrameRule needs first >= 1 and step >= 1, got first={self.first}, step={self.step}")

    def describe(self) -> str:
        """Human-readable form used in error messages, e.g. ``"1 + 4k (1, 5, 9, ...)"``."""
        examples = ", ".join(str(self.first + self.step * k) for k in range(3))
        head = f"{self.first} + {self.step}k" if self.first != self.step else f"{self.step}k (k >= 1)"
        return f"{head} ({examples}, ...)"

    def is_valid(self, pixel_frames: int) -> bool:
        """True when ``pixel_frames`` is a count the backbone encodes without padding."""
        return pixel_frames >= self.first and (pixel_frames - self.first) % self.step == 0

    def check(self, pixel_frames: int) -> None:
        """Raise :class:`InputError` unless ``pixel_frames`` follows the rule."""
        if not self.is_valid(pixel_frames):
            raise InputError(
                f"got {pixel_frames} frames, but this backbone needs a frame count of the form {self.describe()}; "
                f"the nearest valid counts are {self.round(pixel_frames, 'down')} and {self.round(pixel_frames, 'up')}"
            )

    def round(self, pixel_frames: int, direction: Literal["down", "up"] = "down") -> int:
        """Nearest valid count at or below (``down``) or at or above (``up``) ``pixel_frames``.

        ``down`` never returns less than ``first``, so a too-short clip rounds up to the shortest valid count.
        """
        if pixel_frames <= self.first:
            return self.first
        k, rest = divmod(pixel_frames - self.first, self.step)
        if rest and direction == "up":
            k += 1
        return self.first + self.step * k

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frame count for a valid pixel frame count."""
        self.check(pixel_frames)
        return 1 + (pixel_frames - self.first) // self.step

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frame count produced by decoding ``latent_frames`` latent frames."""
        if latent_frames < 1:
            raise InputError(f"need at least one latent frame, got {latent_frames}")
        return self.first + self.step * (latent_frames - 1)


CAUSAL_1_PLUS_4K = FrameRule(first=1, step=4)
GROUPS_OF_4 = FrameRule(first=4, step=4)
