"""Backbone registry: registration forms, lookups, auto-detection, and generic checks over every backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import refdecoder
from refdecoder import BackboneError
from refdecoder.backbones.registry import _REGISTRY, BackboneAdapter, find_backbone


class _Dummy(BackboneAdapter):
    @classmethod
    def matches(cls, vae):
        return False


@pytest.fixture
def clean_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_builtin_backbones_listed():
    assert "wan2.1" in refdecoder.list_backbones()


def test_register_forms_and_override(clean_registry):
    refdecoder.register_backbone("dummy", _Dummy)
    assert refdecoder.get_backbone("dummy") is _Dummy

    with pytest.raises(BackboneError, match="override=True"):

        @refdecoder.register_backbone("dummy")
        class Other(_Dummy):
            pass

    @refdecoder.register_backbone("dummy", override=True)
    class Replacement(_Dummy):
        pass

    assert refdecoder.get_backbone("dummy") is Replacement


def test_lookup_miss_lists_names():
    with pytest.raises(BackboneError, match="wan2.1"):
        refdecoder.get_backbone("no-such-vae")


def test_register_rejects_non_adapters(clean_registry):
    with pytest.raises(BackboneError):
        refdecoder.register_backbone("bad", object)


def test_autodetect_and_unknown_vae():
    from tests.helpers import tiny_wan

    assert find_backbone(tiny_wan()).name == "wan2.1"
    with pytest.raises(BackboneError, match="no registered backbone adapter matches a Linear"):
        refdecoder.wrap(nn.Linear(2, 2))


@pytest.mark.parametrize("name", refdecoder.list_backbones())
def test_every_backbone_wraps_to_identity(name):
    """Generic contract check: a tiny instance wraps, decodes to its own decode at init, and unwraps."""
    adapter_cls = refdecoder.get_backbone(name)
    torch.manual_seed(0)
    vae = adapter_cls.build_tiny().eval()
    assert adapter_cls.matches(vae)
    model = refdecoder.wrap(vae, "tiny", backbone=name).eval()
    frames = adapter_cls.frame_rule.pixel_frames(2)
    video = torch.rand(1, 3, frames, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(video)
        expected = model.adapter.plain_decode(z)
        out = model.decode(z, reference=video[:, :, :1])
    assert out.shape == video.shape
    assert (out - expected).abs().max().item() <= 1e-5
    assert model.unwrap() is vae
