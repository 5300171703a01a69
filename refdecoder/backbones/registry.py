"""The registry of backbone adapters, and finding the adapter for a VAE.

Three sources, looked up by name; an adapter module is imported only when its adapter is needed:

- the built-ins, a ``name -> "module:Class"`` table (:data:`BUILTINS`);
- third-party packages, through the ``refdecoder.backbones`` entry-point group
  (``[project.entry-points."refdecoder.backbones"] my-vae = "my_pkg.adapter:MyAdapter"``);
- :func:`register_backbone` at run time::

    @register_backbone("my-vae")
    class MyAdapter(BackboneAdapter):
        ...

    register_backbone("my-vae", MyAdapter, override=True)  # call form, replacing an existing entry

Registering the class a name already holds is a no-op, whichever way it came (an import-time decorator, an entry
point naming the same ``module:Class``, or both), so a package may declare its entry point and register at import.

When no adapter drives a VAE, :func:`find_backbone` names the nearest one (the adapter whose checks the VAE gets
furthest through, see :class:`~refdecoder.backbones.base.Fit`) and why it refuses.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from torch import nn

from refdecoder.backbones.base import BackboneAdapter
from refdecoder.backbones.refused import REFUSED
from refdecoder.errors import BackboneError

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "BackboneAdapter",
    "register_backbone",
    "get_backbone",
    "list_backbones",
    "find_backbone",
    "resolve_backbone",
    "backbone_to_load",
]

logger = logging.getLogger("refdecoder")

ENTRY_POINT_GROUP = "refdecoder.backbones"
BUILTINS: dict[str, str] = {
    "wan2.1": "refdecoder.backbones.wan.wan21:WanAdapter",
    "wan2.2": "refdecoder.backbones.wan.wan22:Wan22Adapter",
    "qwen-image": "refdecoder.backbones.wan.qwen_image:QwenImageAdapter",
    "videovae+": "refdecoder.backbones.videovaeplus.adapter:VideoVAEPlusAdapter",
    "hunyuan-video": "refdecoder.backbones.hunyuan_video:HunyuanVideoAdapter",
    "hunyuan-video-1.5": "refdecoder.backbones.hunyuan_video15:HunyuanVideo15Adapter",
    "ltx-video": "refdecoder.backbones.ltx_video:LTXVideoAdapter",
    "ltx-2-video": "refdecoder.backbones.ltx_video:LTX2VideoAdapter",
    "cogvideox": "refdecoder.backbones.cogvideox:CogVideoXAdapter",
    "stable-video-diffusion": "refdecoder.backbones.stable_video_diffusion:StableVideoDiffusionAdapter",
    "qwen-image-2.1": "refdecoder.backbones.qwen_image21:QwenImage21Adapter",
    "minimax-h3": "refdecoder.backbones.minimax_h3:MiniMaxH3Adapter",
}

# name -> adapter class, or its "module:Class" path until first use. Insertion order (built-ins, entry points,
# run-time registrations) breaks ties between equally near adapters.
_REGISTRY: dict[str, type[BackboneAdapter] | str] = dict(BUILTINS)
_entry_points_read = False
A = TypeVar("A", bound=type[BackboneAdapter])


def register_backbone(
    name: str, adapter: type[BackboneAdapter] | None = None, *, override: bool = False
) -> Callable[[A], A] | type[BackboneAdapter]:
    """Register an adapter class under ``name``; usable as ``@register_backbone("x")`` or as a call."""

    def _register(cls: A) -> A:
        _check_adapter(name, cls)
        _read_entry_points()
        if name in _REGISTRY and not _same_adapter(_REGISTRY[name], cls) and not override:
            raise BackboneError(
                f"backbone {name!r} is already registered ({_describe(_REGISTRY[name])}); "
                "pass override=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return _register(adapter) if adapter is not None else _register


def list_backbones(refused: bool = False) -> list[str]:
    """Names of all registered backbones (built-in, entry points, run time), sorted; imports none of them.

    With ``refused``, instead the diffusers VAE classes no built-in adapter drives yet, one line each:
    ``"AutoencoderKLMochi: <why> (nearest adapter: 'cogvideox')"`` (see :mod:`refdecoder.backbones.refused`).
    """
    _read_entry_points()
    if refused:
        return [f"{name}: {why.reason} (nearest adapter: {why.nearest!r})" for name, why in sorted(REFUSED.items())]
    return sorted(_REGISTRY)


def get_backbone(name: str) -> type[BackboneAdapter]:
    """The adapter class registered under ``name`` (its module is imported on first use)."""
    _read_entry_points()
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; registered backbones: {sorted(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        entry = _load(name, entry)
    return entry


def find_backbone(vae: nn.Module) -> type[BackboneAdapter]:
    """The single registered adapter that drives ``vae``; if none does, the error names the nearest and why."""
    fits = {name: get_backbone(name).fit(vae) for name in _ordered_names()}
    found = [name for name, fit in fits.items() if fit.ok]
    if len(found) > 1:
        raise BackboneError(f"several backbones match a {type(vae).__name__}: {sorted(found)}; pass backbone='<name>'")
    if found:
        return get_backbone(found[0])
    refusal = REFUSED.get(type(vae).__name__)
    if refusal is not None:
        raise BackboneError(
            f"no registered backbone drives a {type(vae).__name__}: {refusal.reason}; nearest is {refusal.nearest!r} "
            "(an adapter for it would start there; docs/backbones.md, 'Writing an adapter')"
        )
    nearest = max(fits, key=lambda name: fits[name].passed)  # max() keeps the first of equals: registry order
    raise BackboneError(
        f"no registered backbone drives a {type(vae).__name__}; nearest is {nearest!r}: "
        f"{'; '.join(fits[nearest].reasons)}. Register an adapter for it (docs/backbones.md)"
    )


def resolve_backbone(vae: nn.Module, name: str | None = None) -> type[BackboneAdapter]:
    """The adapter ``name`` if it drives ``vae`` (else say why, and which one would); auto-detect when None."""
    if name is None:
        return find_backbone(vae)
    adapter = get_backbone(name)
    fit = adapter.fit(vae)
    if fit.ok:
        return adapter
    others = [other for other in _ordered_names() if other != name and get_backbone(other).fit(vae).ok]
    hint = f"backbone={others[0]!r} fits it" if others else "no registered backbone fits it"
    raise BackboneError(f"backbone {name!r} does not fit this {type(vae).__name__}: {'; '.join(fit.reasons)}; {hint}")


def backbone_to_load(vae: nn.Module, saved: str | None, explicit: str | None = None) -> str | None:
    """The adapter name to load saved weights with: ``explicit``, else the ``saved`` name when it fits ``vae``.

    None means auto-detection (no saved name, or one that does not fit: ``wrap`` then says which backbone the weights
    were made for). A saved name that is not registered here is a one-line :class:`BackboneError` naming what to
    install.
    """
    if explicit is not None or saved is None:
        return explicit
    if saved not in list_backbones():
        raise BackboneError(
            f"these weights were saved with backbone {saved!r}, which is not registered here: install the package "
            f"that registers it (entry point group {ENTRY_POINT_GROUP!r}) or import its adapter module first, or "
            "pass backbone='<name>'"
        )
    return saved if get_backbone(saved).fit(vae).ok else None


def _ordered_names() -> list[str]:
    _read_entry_points()
    return list(_REGISTRY)


def _load(name: str, path: str) -> type[BackboneAdapter]:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise BackboneError(
            f"backbone {name!r}: cannot import {path!r} ({err}); fix or uninstall its package"
        ) from err
    _check_adapter(name, cls)
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def _read_entry_points() -> None:
    """Add the entry points of installed packages once; a name that is taken keeps its first owner."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _REGISTRY:
            if _same_adapter(_REGISTRY[point.name], point.value):
                continue
            logger.warning("ignoring entry point %s = %s: backbone name already registered", point.name, point.value)
            continue
        _REGISTRY[point.name] = point.value


def _check_adapter(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, BackboneAdapter)):
        raise BackboneError(f"backbone {name!r} must be a BackboneAdapter subclass, got {cls!r}")


def _same_adapter(entry: type[BackboneAdapter] | str, other: type[BackboneAdapter] | str) -> bool:
    """True when two registry entries (classes or ``"module:Class"`` paths) name the same adapter class."""
    return entry is other or _path(entry) == _path(other)


def _path(entry: type[BackboneAdapter] | str) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


def _describe(entry: type[BackboneAdapter] | str) -> str:
    return entry if isinstance(entry, str) else entry.__qualname__
