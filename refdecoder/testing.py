"""Conformance checks for backbone adapters: what every adapter must satisfy for RefDecoder to work on it.

Run them all on a registered adapter (each check builds fresh tiny models; a failure raises ``AssertionError``)::

    from refdecoder.testing import check_backbone
    check_backbone("my-vae")                                  # on MyAdapter.build_tiny()
    check_backbone("my-vae", make_vae=lambda: MyVAE(width=8))  # on VAEs of your own

or one pytest case per check, so each failure shows on its own::

    @pytest.mark.parametrize("check", checks_for("my-vae"), ids=lambda check: check.__name__)
    def test_my_adapter(check):
        check(Conformance("my-vae"))

The checks compare against independent computations: the backbone's own decode (``adapter.plain_decode``, which
for diffusers VAEs is ``vae.decode``, unclamped where the backbone does not clamp), its own tiled decode, a snapshot
of the VAE taken before wrapping, the fp32 decode for bf16, and what the backbone actually does against what the
adapter declares (:mod:`refdecoder.contract_checks`: latent conventions, the shapes reaching the hooks, the decoder's
parameters, the reference branch against an image decode, clamping). Tolerances: 1e-5 (max abs) against the
backbone's own decodes; streamed and whole decodes must be bit-equal.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

import refdecoder
from refdecoder.backbones.base import BackboneAdapter
from refdecoder.backbones.registry import find_backbone, get_backbone, list_backbones
from refdecoder.config import CorrespondenceConfig, TokenizerConfig
from refdecoder.contract_checks import (
    TOLERANCE,
    check_decoder_parameters,
    check_hook_shapes,
    check_latent_conventions,
    check_output_clamp,
    check_reference_branch,
    max_diff,
)
from refdecoder.errors import InputError

__all__ = ["Conformance", "checks_for", "check_backbone", "randomize_"]


def randomize_(params: nn.Module | Iterable[nn.Parameter], scale: float = 0.05, seed: int = 1) -> None:
    """Add ``scale``-sized random values to every parameter (of a module) to leave the zero-init identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters() if isinstance(params, nn.Module) else params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@dataclass
class Conformance:
    """One adapter under test and how to make its inputs.

    Attributes:
        backbone: the registered name.
        make_vae: builds a VAE of the family (default: the adapter's ``build_tiny``); called under a fixed seed, so
            two calls give the same weights.
        latent_frames: latent frame counts the identity check decodes; default the backbone's three shortest
            (1, 2, 3 for Wan; 1, 3, 5 for CogVideoX, which decodes odd counts only).
        windows: decode windows (latent frames per pass) the identity and streaming checks use.
        pixel_size: (H, W) of the decoded frames; must be a multiple of the adapter's spatial factor.
        preset: the RefDecoder preset to wrap with.
    """

    backbone: str
    make_vae: Callable[[], nn.Module] | None = None
    latent_frames: tuple[int, ...] | None = None
    windows: tuple[int, ...] = (1, 2)
    pixel_size: tuple[int, int] = (32, 32)
    preset: str = "tiny"

    def __post_init__(self) -> None:
        if self.latent_frames is None:
            rule = self.adapter_cls.frame_rule
            self.latent_frames = tuple(rule.latent_frames(rule.first + rule.step * k) for k in range(3))

    @property
    def adapter_cls(self) -> type[BackboneAdapter]:
        return get_backbone(self.backbone)

    @property
    def short(self) -> int:
        """The second-shortest latent count: more than one latent frame, cheap to decode."""
        return self.latent_frames[1]

    def vae(self) -> nn.Module:
        """A fresh VAE in eval mode, the same weights every call (the global RNG is seeded for it)."""
        torch.manual_seed(0)
        return (self.make_vae or self.adapter_cls.build_tiny)().eval()

    def wrap(self, perturb: bool = False, **config: object) -> nn.Module:
        """``refdecoder.wrap`` of a fresh VAE (``config`` overrides the preset's fields), optionally with its added
        weights moved off the zero-init identity."""
        settings = refdecoder.preset(self.preset)
        for key, value in config.items():
            setattr(settings, key, value)
        model = refdecoder.wrap(self.vae(), settings, backbone=self.backbone)
        if perturb:
            randomize_(_added_parameters(model), scale=0.1)
        return model

    def latents(self, model: nn.Module, frames: int, seed: int = 0) -> torch.Tensor:
        adapter = model.adapter
        h, w = (s // adapter.spatial_factor for s in self.pixel_size)
        return torch.randn(1, adapter.latent_channels, frames, h, w, generator=torch.Generator().manual_seed(seed))

    def reference(self, model: nn.Module, latents: torch.Tensor, seed: int = 1) -> torch.Tensor:
        size = model.output_size(latents.shape[-2:])
        channels = model.adapter.pixel_channels
        return torch.rand(latents.shape[0], channels, 1, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def video(self, model: nn.Module, latent_frames: int | None = None, seed: int = 2) -> torch.Tensor:
        frames = model.adapter.frame_rule.pixel_frames(latent_frames or self.short)
        channels = model.adapter.pixel_channels
        return torch.rand(1, channels, frames, *self.pixel_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _added_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules RefDecoder added, one per stage projector and latent component (``projectors.stage1``)."""
    for name, module in model.named_children():
        if isinstance(module, nn.ModuleDict):
            yield from ((f"{name}.{key}", part) for key, part in module.items())
        elif name != "vae":
            yield name, module


def _added_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, module in _added_modules(model) for p in module.parameters()]


def _per_stage_tokenizer(c: Conformance) -> TokenizerConfig:
    """The preset's tokenizer settings with ``per_stage`` on."""
    return replace(refdecoder.preset(c.preset).tokenizer, per_stage=True)


# The correspondence options a check runs with besides the defaults: each only moves which reference keys are seen
# or, with the sub-token shift, what the zero-init update is resampled from; one run covers both.
CORRESPONDENCE_OPTIONS = ({}, {"per_frame": True, "sub_token_shift": True})


def _with_correspondence(c: Conformance, frame_spaces: str = "still_clip", **options: bool) -> dict[str, object]:
    """Config overrides: the preset with a radius-1 scope and correspondence-guided reference attention on (with
    ``options``, fields of :class:`~refdecoder.config.CorrespondenceConfig`)."""
    transformer = replace(refdecoder.preset(c.preset).transformer, attention_radius=1, locality_bias=True)
    correspondence = CorrespondenceConfig(enabled=True, search_radius=2, frame_spaces=frame_spaces, **options)
    return {"transformer": transformer, "correspondence": correspondence}


# --- the checks ---------------------------------------------------------------------------------------------------
def check_detection(c: Conformance) -> None:
    """``wrap()`` finds the adapter on its own VAEs (a variant that another registered adapter's VAEs also fit is
    chosen with ``backbone=``, and by the saved name when loading)."""
    vae = c.vae()
    fit = c.adapter_cls.fit(vae)
    assert fit.ok, f"{c.backbone}: the adapter does not fit its own VAE: {'; '.join(fit.reasons)}"
    others = [name for name in list_backbones() if name != c.backbone and get_backbone(name).fit(vae).ok]
    if others:
        assert refdecoder.wrap(vae, c.preset, backbone=c.backbone).adapter.name == c.backbone
        return
    assert find_backbone(vae) is c.adapter_cls, f"{c.backbone}: find_backbone picked {find_backbone(vae).name}"
    assert refdecoder.wrap(vae, c.preset).adapter.name == c.backbone


@torch.no_grad()
def check_identity_at_init(c: Conformance) -> None:
    """At init, with or without a reference, the decode equals the backbone's own, for every length and window."""
    model = c.wrap()
    for frames in c.latent_frames:
        z = c.latents(model, frames)
        ref = c.reference(model, z)
        for window in c.windows:
            stock = model.adapter.plain_decode(z, window)
            for reference in (ref, None):
                out = model.decode(z, reference=reference, window=window)
                assert out.shape == stock.shape, f"{c.backbone}: shape {tuple(out.shape)} != {tuple(stock.shape)}"
                diff = max_diff(out, stock)
                assert diff <= TOLERANCE, f"{c.backbone}: {frames} latent frames, window {window}: max diff {diff}"
    # Per-stage tokenizers only change the reference features, which the zero-init stage updates do not pass on.
    model = c.wrap(tokenizer=_per_stage_tokenizer(c))
    z = c.latents(model, c.short)
    diff = max_diff(model.decode(z, reference=c.reference(model, z)), model.adapter.plain_decode(z))
    assert diff <= TOLERANCE, f"{c.backbone}: per-stage tokenizers: max diff {diff} at init"
    # Correspondence-guided attention only moves which reference keys are seen, and the sub-token shift what the
    # update is resampled from: zero-init updates hide both (also with a displacement per frame).
    for options in CORRESPONDENCE_OPTIONS:
        model = c.wrap(**_with_correspondence(c, **options))
        for window in c.windows:
            out = model.decode(z, reference=c.reference(model, z), window=window)
            diff = max_diff(out, model.adapter.plain_decode(z, window))
            assert diff <= TOLERANCE, (
                f"{c.backbone}: correspondence {options}, window {window}: max diff {diff} at init"
            )
    # The fitted frame spaces encode the reference as the shortest clip the frame rule allows and fit maps on the
    # video's own latent frames: they run on every frame rule.
    model = c.wrap(**_with_correspondence(c, frame_spaces="fitted"))
    z = c.latents(model, max(c.latent_frames))
    diff = max_diff(model.decode(z, reference=c.reference(model, z)), model.adapter.plain_decode(z))
    assert diff <= TOLERANCE, f"{c.backbone}: correspondence with fitted frame spaces: max diff {diff} at init"


@torch.no_grad()
def check_streaming(c: Conformance) -> None:
    """``iter_decode`` concatenated equals ``decode`` exactly, with trained-looking weights, for every window."""
    model = c.wrap(perturb=True)
    z = c.latents(model, max(c.latent_frames))
    ref = c.reference(model, z)
    for window in c.windows:
        whole = model.decode(z, reference=ref, window=window)
        streamed = torch.cat(list(model.iter_decode(z, reference=ref, window=window)), dim=2)
        # Both run the same windows through the same loop: anything but bit-equality is a bug.
        assert torch.equal(streamed, whole), f"{c.backbone}: window {window}: streamed != whole"
    # With correspondence each window takes its own frames of the field (per frame: in time between the window's
    # own latent frames; with the sub-token shift, its own remainders): the same holds.
    for options in CORRESPONDENCE_OPTIONS:
        model = c.wrap(perturb=True, **_with_correspondence(c, **options))
        for window in c.windows:
            whole = model.decode(z, reference=ref, window=window)
            streamed = torch.cat(list(model.iter_decode(z, reference=ref, window=window)), dim=2)
            assert torch.equal(streamed, whole), (
                f"{c.backbone}: correspondence {options}, window {window}: streamed != whole"
            )


@torch.no_grad()
def check_reference_matters(c: Conformance) -> None:
    """Once the added weights move, the reference changes the output, and which reference matters."""
    model = c.wrap(perturb=True)
    z = c.latents(model, c.short)
    a = model.decode(z, reference=c.reference(model, z, seed=1))
    b = model.decode(z, reference=c.reference(model, z, seed=2))
    plain = model.decode(z)
    assert max_diff(a, plain) > 1e-3, f"{c.backbone}: the reference does not change the output"
    assert max_diff(a, b) > 1e-4, f"{c.backbone}: two references give the same output"
    assert max_diff(plain, model.adapter.plain_decode(z)) <= TOLERANCE, f"{c.backbone}: no reference != plain"


def check_training_step(c: Conformance) -> None:
    """A training step reaches every added module, and the decoder (only) when ``train_decoder`` is set."""
    # With per-stage tokenizers on (their parameters must be reached too); the preset's tokenizer otherwise.
    tokenizer = _per_stage_tokenizer(c)
    for train_decoder in (False, True):
        model = c.wrap(perturb=True, train_decoder=train_decoder, tokenizer=tokenizer).train()
        video = c.video(model)
        (model(video, reference_index=0).sample - video).abs().mean().backward()
        for name, module in _added_modules(model):
            grads = [p.grad for p in module.parameters() if p.requires_grad]
            if grads:  # parameter-free components (token dropout) have nothing to train
                assert all(g is not None for g in grads), f"{c.backbone}: {name} has parameters without gradients"
                assert sum(g.abs().sum() for g in grads) > 0, f"{c.backbone}: {name} receives zero gradients"
        decoder = dict(model.adapter.decoder_parameters())
        got = [n for n, p in decoder.items() if p.grad is not None and p.grad.abs().sum() > 0]
        if train_decoder:
            assert got, f"{c.backbone}: train_decoder=True but no decoder parameter receives a gradient"
        else:
            assert not got and not any(p.requires_grad for p in decoder.values()), f"{c.backbone}: decoder trained"
        others = [n for n, p in model.vae.named_parameters() if n not in decoder and p.grad is not None]
        assert not others, f"{c.backbone}: frozen VAE parameters got gradients: {others[:3]}"


@torch.no_grad()
def check_save_load_unwrap(c: Conformance) -> None:
    """Saved weights (decoder deltas included) restore the same decode; ``unwrap`` gives the VAE back unchanged."""
    model = c.wrap(perturb=True, train_decoder=True)
    randomize_([p for _, p in model.adapter.decoder_parameters()], scale=0.01, seed=3)
    z = c.latents(model, c.short)
    ref = c.reference(model, z)
    expected = model.decode(z, reference=ref)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = refdecoder.load(c.vae(), folder)  # a fresh VAE: the decoder deltas must come from the file
    assert max_diff(loaded.decode(z, reference=ref), expected) <= TOLERANCE, f"{c.backbone}: load != saved model"

    vae = c.vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    flags, stock = {n: p.requires_grad for n, p in vae.named_parameters()}, c.adapter_cls(vae).plain_decode(z)
    model = refdecoder.wrap(vae, c.preset, backbone=c.backbone)
    randomize_(_added_parameters(model), scale=0.1)
    model.train()
    model.decode(z, reference=ref)
    assert model.unwrap() is vae and not vae.training, f"{c.backbone}: unwrap did not restore the VAE's mode"
    after = vae.state_dict()
    same = after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert same, f"{c.backbone}: the VAE's state_dict changed"
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags, f"{c.backbone}: requires_grad changed"
    unwrapped = c.adapter_cls(vae).plain_decode(z)
    assert max_diff(unwrapped, stock) == 0, f"{c.backbone}: the unwrapped VAE decodes differently"


@torch.no_grad()
def check_tiling(c: Conformance) -> None:
    """At init, RefDecoder's tiled decode (reference crops per tile) equals the backbone's own tiled decode."""
    from refdecoder.inference import decode_video
    from refdecoder.tiling import plan_tiles, token_alignment

    model = c.wrap()
    adapter, align = model.adapter, token_alignment(model)
    stride, overlap = align, adapter.spatial_factor
    latent = (2 * stride // adapter.spatial_factor,) * 2  # 2 x 2 tiles
    z = torch.randn(1, adapter.latent_channels, 2, *latent, generator=torch.Generator().manual_seed(0))
    tile = (stride + overlap,) * 2
    plan = plan_tiles(latent, adapter.spatial_factor, tile, (overlap,) * 2, align, adapter.output_patch)
    tiled = decode_video(model, z, reference=c.reference(model, z), tiles=plan)
    # Clamped like RefDecoder's decode (and the backbone's untiled one): diffusers' Qwen-Image tiled decode, unlike
    # its untiled one, does not clamp.
    stock = adapter.plain_tiled_decode(z, plan)
    stock = stock.clamp(-1.0, 1.0) if adapter.output_clamp else stock
    assert plan.num_tiles == 4 and max_diff(tiled, stock) <= TOLERANCE, f"{c.backbone}: tiled != backbone's tiled"
    # With correspondence each tile estimates from its own reference crop; at init the decode is still the stock one.
    guided = decode_video(c.wrap(**_with_correspondence(c)), z, reference=c.reference(model, z), tiles=plan)
    assert max_diff(guided, stock) <= TOLERANCE, f"{c.backbone}: tiled with correspondence != backbone's tiled"


@torch.no_grad()
def check_bf16(c: Conformance) -> None:
    """The whole model in bf16 decodes, in bf16, close to the fp32 decode (mean abs diff <= 0.02, max <= 0.15)."""
    model = c.wrap(perturb=True)
    z = c.latents(model, c.short)
    ref = c.reference(model, z)
    fp32 = model.decode(z, reference=ref)
    out = model.to(torch.bfloat16).decode(z.bfloat16(), reference=ref.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), f"{c.backbone}: bf16 decode is not finite"
    diff = (out.float() - fp32).abs()
    mean, worst = diff.mean().item(), diff.max().item()
    assert mean <= 0.02 and worst <= 0.15, f"{c.backbone}: bf16 is {mean:.4f} mean, {worst:.4f} max from fp32"


def check_bad_inputs(c: Conformance) -> None:
    """Wrong channels or sizes raise :class:`InputError`, not a deep torch error."""
    model = c.wrap()
    z = c.latents(model, 1)
    ref = c.reference(model, z)
    video, rule = c.video(model), model.adapter.frame_rule
    bad = {
        "latent channels": lambda: model.decode(torch.cat([z, z[:, :1]], dim=1)),
        "latent rank": lambda: model.decode(z[:, :, 0]),
        "reference size": lambda: model.decode(z, reference=ref[..., :-1]),
        "reference channels": lambda: model.decode(z, reference=ref[:, :2]),
        "video size": lambda: model.encode(video[..., : model.adapter.spatial_factor + 1]),
    }
    invalid = [n for n in range(1, rule.first + rule.step) if not rule.is_valid(n)]  # none when every count is valid
    if invalid:
        bad["video frames"] = lambda: model.encode(video[:, :, :1].expand(-1, -1, invalid[0], -1, -1))
    refused = [n for n in range(1, 5) if not _accepts(model.adapter, n)]  # latent counts the backbone cannot decode
    if refused:
        bad["latent frames"] = lambda: model.decode(z[:, :, :1].expand(-1, -1, refused[0], -1, -1))
    for what, call in bad.items():
        try:
            call()
        except InputError:
            continue
        except Exception as err:  # noqa: BLE001 - the point is to name what else was raised
            raise AssertionError(f"{c.backbone}: bad {what} raised {type(err).__name__}, not InputError") from err
        raise AssertionError(f"{c.backbone}: bad {what} was accepted")


def _accepts(adapter: BackboneAdapter, latent_frames: int) -> bool:
    try:
        adapter.check_latent_frames(latent_frames)
    except InputError:
        return False
    return True


_CHECKS = (
    check_detection,
    check_latent_conventions,
    check_hook_shapes,
    check_decoder_parameters,
    check_reference_branch,
    check_identity_at_init,
    check_output_clamp,
    check_streaming,
    check_reference_matters,
    check_training_step,
    check_save_load_unwrap,
    check_tiling,
    check_bf16,
    check_bad_inputs,
)


def checks_for(backbone: str) -> list[Callable[[Conformance], None]]:
    """The checks that apply to ``backbone`` (the tiling check only where the adapter declares ``tiling``)."""
    tiling = get_backbone(backbone).tiling
    return [check for check in _CHECKS if tiling or check is not check_tiling]


def check_backbone(backbone: str, make_vae: Callable[[], nn.Module] | None = None, **options: object) -> list[str]:
    """Run every applicable check on ``backbone`` (``options`` are :class:`Conformance` fields); returns their names.

    Raises:
        AssertionError: the first check that fails, with a one-line reason.
    """
    conformance = Conformance(backbone, make_vae, **options)
    checks = checks_for(backbone)
    for check in checks:
        check(conformance)
    return [check.__name__ for check in checks]
