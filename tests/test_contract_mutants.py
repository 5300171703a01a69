"""The conformance suite fails each class of adapter mistake: mutated copies of several built-in adapters, each
caught by the check that holds that declaration, with a one-line reason that names what to fix."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import refdecoder
from refdecoder.backbones.base import BackboneAdapter
from refdecoder.errors import BackboneError
from refdecoder.testing import Conformance, checks_for

pytestmark = pytest.mark.usefixtures("one_thread")

DIFFUSERS_VIDEO = ("wan2.1", "hunyuan-video", "hunyuan-video-1.5", "ltx-video", "cogvideox")
IMAGE_AND_VIT = ("qwen-image-2.1", "minimax-h3")  # an RGBA image decoder; a transformer decoder


def _bad_conventions(base: type[BackboneAdapter]) -> dict[str, Any]:
    return {"normalize": lambda self, z: base.normalize(self, z) * 3, "denormalize": lambda self, z: z}


def _consistent_but_foreign_convention(base: type[BackboneAdapter]) -> dict[str, Any]:
    # Inverse of each other, but not what the family's diffusers pipelines do.
    return {"normalize": lambda self, z: z * 3, "denormalize": lambda self, z: z / 3}


def _no_time_factor(base: type[BackboneAdapter]) -> dict[str, Any]:
    return {"stages": lambda self: [dataclasses.replace(s, time_factor=1) for s in base.stages(self)]}


def _up_blocks_only(base: type[BackboneAdapter]) -> dict[str, Any]:
    keep = (".up_blocks.", ".up.")  # diffusers' up-blocks; VideoVAE+'s decoder levels
    return {
        "decoder_parameters": lambda self: (
            (n, p) for n, p in base.decoder_parameters(self) if any(k in n for k in keep)
        )
    }


def _zero_reference_branch(base: type[BackboneAdapter]) -> dict[str, Any]:
    def run_stage_on_reference(self, index, reference, ctx=None):
        return torch.zeros_like(base.run_stage_on_reference(self, index, reference, ctx))

    return {"run_stage_on_reference": run_stage_on_reference}


def _flipped_causal_first_frame(base: type[BackboneAdapter]) -> dict[str, Any]:
    return {"causal_first_frame": not base.causal_first_frame}


def _forgotten_frame_drop(base: type[BackboneAdapter]) -> dict[str, Any]:
    # The first window keeps the frames a causal decoder drops from frame 0: step frames of it instead of one.
    def decode_window(self, x, state, hooks, ctx):
        out = base.decode_window(self, x, state, hooks, ctx)
        extra = out[:, :, :1].expand(-1, -1, self.frame_rule.step - 1, -1, -1)
        return torch.cat([extra, out], dim=2) if ctx.first_window else out

    return {"decode_window": decode_window}


def _flipped_output_clamp(base: type[BackboneAdapter]) -> dict[str, Any]:
    return {"output_clamp": not base.output_clamp}


# (mutation, the built-in adapters it is applied to, the check that must fail, what its message says)
MUTANTS: list[tuple[Callable[[type[BackboneAdapter]], dict[str, Any]], tuple[str, ...], str, str]] = [
    (_bad_conventions, (*DIFFUSERS_VIDEO, *IMAGE_AND_VIT, "videovae+"), "check_latent_conventions", "must be inverse"),
    (
        _consistent_but_foreign_convention,
        (*DIFFUSERS_VIDEO, *IMAGE_AND_VIT),
        "check_latent_conventions",
        r"the convention of \w+Pipeline",
    ),
    (_no_time_factor, DIFFUSERS_VIDEO, "check_hook_shapes", r"receives \d+ frames .* but stage_frames\(\) plans"),
    (
        _up_blocks_only,
        (*DIFFUSERS_VIDEO, *IMAGE_AND_VIT, "videovae+"),
        "check_decoder_parameters",
        "decoder_parameters.. leaves out",
    ),
    (
        _zero_reference_branch,
        (*DIFFUSERS_VIDEO, *IMAGE_AND_VIT, "videovae+"),
        "check_reference_branch",
        "one-frame image decode",
    ),
    (
        _flipped_causal_first_frame,
        (*DIFFUSERS_VIDEO, "minimax-h3", "videovae+"),
        "check_hook_shapes",
        "set causal_first_frame =",
    ),
    (_forgotten_frame_drop, ("wan2.1", "hunyuan-video-1.5", "ltx-video"), "check_hook_shapes", "frame_rule"),
    (
        _flipped_output_clamp,
        ("wan2.1", "hunyuan-video-1.5", "cogvideox", "qwen-image-2.1", "videovae+"),
        "check_output_clamp",
        "set output_clamp =",
    ),
]


@pytest.fixture
def register(registered):
    """Register a mutant of a built-in adapter for one test (the registry is restored afterwards)."""

    def _register(base_name: str, mutation: Callable[[type[BackboneAdapter]], dict[str, Any]]) -> str:
        base = refdecoder.get_backbone(base_name)
        registered(f"{base_name}-mutant", type(f"{base.__name__}Mutant", (base,), mutation(base)))
        return f"{base_name}-mutant"

    return _register


def _check(name: str) -> Callable[[Conformance], None]:
    (found,) = [check for check in checks_for("wan2.1") if check.__name__ == name]
    return found


@pytest.mark.parametrize(
    "mutation, backbone, check, reason",
    [(m, b, check, reason) for m, backbones, check, reason in MUTANTS for b in backbones],
    ids=lambda value: value.__name__.strip("_") if callable(value) else value if "\\" not in value else None,
)
def test_each_mutant_is_caught(register, mutation, backbone, check, reason):
    name = register(backbone, mutation)
    with pytest.raises(AssertionError, match=reason) as err:
        _check(check)(Conformance(name))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize("backbone", ("wan2.1", "hunyuan-video-1.5", "ltx-video"))
def test_a_wrong_window_frame_count_is_one_line_naming_frame_rule(register, backbone):
    model = refdecoder.wrap(
        refdecoder.get_backbone(backbone).build_tiny(), "tiny", backbone=register(backbone, _forgotten_frame_drop)
    )
    z = torch.randn(1, model.adapter.latent_channels, 2, 2, 2)
    with torch.no_grad(), pytest.raises(BackboneError, match="frame_rule") as err:
        model.decode(z)
    assert "\n" not in str(err.value) and "decode_window returned" in str(err.value)
