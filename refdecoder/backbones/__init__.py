"""Backbone adapters: the registry and the built-in VAE families."""

from refdecoder.backbones.registry import (
    BackboneAdapter,
    StageSpec,
    find_backbone,
    get_backbone,
    list_backbones,
    register_backbone,
)

__all__ = ["BackboneAdapter", "StageSpec", "find_backbone", "get_backbone", "list_backbones", "register_backbone"]
