"""Exception hierarchy of refdecoder.

Every error the library raises on purpose derives from :class:`RefDecoderError`, so callers can catch the
library's complaints without swallowing unrelated bugs. Messages say what was wrong, what was expected and how
to fix it.
"""

from __future__ import annotations

__all__ = [
    "RefDecoderError",
    "ConfigError",
    "InputError",
    "CheckpointError",
    "BackboneError",
    "DataError",
    "MissingDependencyError",
]


class RefDecoderError(Exception):
    """Base class of every error raised by refdecoder."""


class ConfigError(RefDecoderError, ValueError):
    """A configuration value is invalid, unknown or inconsistent."""


class InputError(RefDecoderError, ValueError):
    """A tensor or file given to a public function has the wrong shape, range, dtype or content."""


class CheckpointError(RefDecoderError):
    """A checkpoint is missing, truncated, or does not match the model it is loaded into."""


class BackboneError(RefDecoderError):
    """No backbone adapter fits a VAE, or a backbone name is unknown or registered twice."""


class DataError(RefDecoderError):
    """A dataset cannot produce samples (every sample failed, empty source, bad format)."""


class MissingDependencyError(RefDecoderError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""
