"""The adapter conformance suite (refdecoder.testing): over every registered adapter, on an adapter written here
through the public API, and against broken adapters that it must catch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from einops import rearrange
from torch import nn

import refdecoder
from refdecoder.frames import FrameRule
from refdecoder.testing import Conformance, check_backbone, checks_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "backbone, check",
    [(name, check) for name in refdecoder.list_backbones() for check in checks_for(name)],
    ids=lambda value: value if isinstance(value, str) else value.__name__.removeprefix("check_"),
)
def test_registered_adapter_conforms(backbone, check):
    check(Conformance(backbone))


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame of ``B, C, T, H, W``."""
    out = module(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(out, "(b t) c h w -> b c t h w", b=x.shape[0])


class ToyVAE(nn.Module):
    """An image VAE applied frame by frame: 4x spatial, 4 latent channels, two 2x up-sampling decoder stages."""

    def __init__(self, width: int = 16, latent: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, latent, 3, 2, 1)
        )  # fmt: skip
        self.conv_in = nn.Conv2d(latent, 2 * width, 3, padding=1)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c, width, 3, padding=1), nn.SiLU())
            for c in (2 * width, width)
        )
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return _per_frame(self.encoder, video)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = _per_frame(self.conv_in, z)
        for up in self.ups:
            h = _per_frame(up, h)
        return _per_frame(self.conv_out, h).clamp(-1.0, 1.0)


class ToyAdapter(refdecoder.BackboneAdapter):
    """What an adapter author writes for ToyVAE: everything the contract asks, nothing more."""

    frame_rule = FrameRule(first=1, step=1)  # frames are independent images
    causal_first_frame = False
    default_window = 2

    @classmethod
    def fit(cls, vae: nn.Module) -> refdecoder.Fit:
        return refdecoder.Fit.run(lambda: None if isinstance(vae, ToyVAE) else "it drives ToyVAE only")

    @classmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        return ToyVAE(**overrides)

    @property
    def latent_channels(self) -> int:
        return self.vae.conv_in.in_channels

    @property
    def spatial_factor(self) -> int:
        return 4

    def stages(self) -> list[refdecoder.StageSpec]:
        return [
            refdecoder.StageSpec(f"stage{i}", up[1].in_channels, scale, (1, 8 // scale, 8 // scale))
            for i, (up, scale) in enumerate(zip(self.vae.ups, (4, 2)))
        ]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    def decode_window(self, x, state, hooks, ctx):
        h, reference = _per_frame(self.vae.conv_in, x), None
        for i, up in enumerate(self.vae.ups):
            h, reference = self.conditioned_stage(i, h, reference, hooks, ctx)
            h = _per_frame(up, h)
        return _per_frame(self.vae.conv_out, h)

    def run_stage_on_reference(self, index, reference):
        return _per_frame(self.vae.ups[index], reference)

    def plain_decode(self, latents, window=None):
        return self.vae.decode(latents)

    def decoder_parameters(self):
        for prefix in ("conv_in", "ups", "conv_out"):
            for name, param in getattr(self.vae, prefix).named_parameters():
                yield f"{prefix}.{name}", param


def test_an_adapter_written_in_a_test_file_conforms(registered):
    registered("toy", ToyAdapter)
    assert "toy" in refdecoder.list_backbones()
    ran = check_backbone("toy", latent_frames=(1, 2, 3), windows=(1, 2))
    assert "check_identity_at_init" in ran and "check_tiling" not in ran  # no tiled decode of its own
    assert len(ran) == len(checks_for("wan2.1")) - 1


class _SkipsStage1(ToyAdapter):
    def decode_window(self, x, state, hooks, ctx):  # forgets the hook before the second stage
        h = _per_frame(self.vae.conv_in, x)
        h, _ = self.conditioned_stage(0, h, None, hooks, ctx)
        h = _per_frame(self.vae.ups[0], h)
        return _per_frame(self.vae.conv_out, _per_frame(self.vae.ups[1], h))


class _NoDecoderParameters(ToyAdapter):
    def decoder_parameters(self):
        return iter(())


class _OffByALittle(ToyAdapter):
    def plain_decode(self, latents, window=None):
        return super().plain_decode(latents) + 1e-3


class _TouchesTheVAE(ToyAdapter):
    def __init__(self, vae):
        super().__init__(vae)
        vae.register_buffer("window_scratch", torch.zeros(1))  # adapters must never add to (or rename in) the VAE


@pytest.mark.parametrize(
    "adapter, check, reason",
    [
        (
            _SkipsStage1,
            "check_training_step",
            r"(stage_tokenizers|projectors)\.stage1 has parameters without gradients",
        ),
        (_NoDecoderParameters, "check_training_step", "no decoder parameter receives a gradient"),
        (_OffByALittle, "check_identity_at_init", "max diff 0.001"),
        (_TouchesTheVAE, "check_save_load_unwrap", "the VAE's state_dict changed"),
    ],
)
def test_broken_adapters_are_caught(registered, adapter, check, reason):
    registered("toy", adapter)
    (found,) = [c for c in checks_for("toy") if c.__name__ == check]
    with pytest.raises(AssertionError, match=reason):
        found(Conformance("toy"))


class _OldStageHook(ToyAdapter):
    def decode_window(self, x, state, hooks, ctx):  # written for the old hook, hooks.stage(i, h, ctx) -> h
        h = _per_frame(self.vae.conv_in, x)
        for i, up in enumerate(self.vae.ups):
            h = _per_frame(up, hooks.stage(i, h, ctx))
        return _per_frame(self.vae.conv_out, h)


class _DropsTheReference(ToyAdapter):
    def decode_window(self, x, state, hooks, ctx):  # never carries the reference the hook returns
        h = _per_frame(self.vae.conv_in, x)
        for i, up in enumerate(self.vae.ups):
            h, _ = self.conditioned_stage(i, h, None, hooks, ctx)
            h = _per_frame(up, h)
        return _per_frame(self.vae.conv_out, h)


@pytest.mark.parametrize(
    "adapter, with_reference, reason",
    [
        (_OldStageHook, False, "the hook is now stage(index, x, reference, ctx) -> (x, reference)"),
        (_OldStageHook, True, "the hook is now stage(index, x, reference, ctx) -> (x, reference)"),
        (_DropsTheReference, True, "hooks.stage(1) got no reference features"),
    ],
)
def test_a_loop_that_does_not_carry_the_reference_says_how_to_fix_it(registered, adapter, with_reference, reason):
    """A decode_window of the old hook contract (three arguments, one return value), in the plain decode and the
    conditioned one, or one that drops the reference the hook returns: one BackboneError line, not a TypeError."""
    registered("toy", adapter)
    model = refdecoder.wrap(ToyVAE(), "tiny", backbone="toy")
    assert tuple(model.stage_indices) == (0, 1)  # stage 1 needs the reference the loop carries
    z = torch.randn(1, 4, 2, 4, 4)
    reference = torch.rand(1, 3, 1, 16, 16) * 2 - 1 if with_reference else None
    with pytest.raises(refdecoder.BackboneError) as err, torch.no_grad():
        model.decode(z, reference=reference)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert "conditioned_stage(i, h, reference, hooks, ctx)" in str(err.value)
