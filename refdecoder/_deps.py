"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from refdecoder.errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` telling how to install it.

    Args:
        module: dotted module name, e.g. ``"lightning_fabric"``.
        extra: the refdecoder extra that provides it, e.g. ``"train"``.
        package: the PyPI package name when it differs from the module name.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{name} is required for this feature but could not be imported ({err}). "
            f"Install it with: pip install 'refdecoder[{extra}]'"
        ) from err
