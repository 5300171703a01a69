"""Backbone adapters: the contract (:mod:`.base`), the registry (:mod:`.registry`) and the built-in VAE families."""

from refdecoder.backbones.base import BackboneAdapter, Fit, StageSpec
from refdecoder.backbones.registry import (
    find_backbone,
    get_backbone,
    list_backbones,
    register_backbone,
    resolve_backbone,
)

__all__ = [
    "BackboneAdapter",
    "Fit",
    "StageSpec",
    "find_backbone",
    "get_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_backbone",
]
