"""Conformance checks that hold an adapter to what it declares (run by :mod:`refdecoder.testing`).

Each compares a declaration of the adapter with what its backbone actually does, on any adapter:

- :func:`check_latent_conventions`: ``normalize`` and ``denormalize`` are inverse, and ``denormalize`` is the rule of
  the diffusers pipelines of the VAE's class, where diffusers ships one (:mod:`refdecoder.latent_conventions`);
- :func:`check_hook_shapes`: the tensors that reach each stage hook during decodes agree with ``stages()``
  (channels, scale, time factor) and with the frames the model plans tokens for (``stage_frames``), and each window
  decodes to the frames of ``frame_rule``;
- :func:`check_decoder_parameters`: every parameter the decode uses is in ``decoder_parameters()``, or in the
  adapter's deliberate ``decoder_exclusions``;
- :func:`check_reference_branch`: at init, the reference branch after each stage equals what a one-frame image
  decode makes of the same features;
- :func:`check_output_clamp`: ``output_clamp`` says whether the backbone's decode clamps, and with the decoder's
  output layer scaled so that decoded values leave [-1, 1], ``RefDecoder.decode`` still equals the backbone's.

Shapes are recorded with identity hooks (:class:`RecordingHooks`); a failure is an ``AssertionError`` of one line.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

import refdecoder
from refdecoder.backbones.base import BackboneAdapter, StageSpec
from refdecoder.errors import BackboneError
from refdecoder.hooks import DecodeContext, IdentityHooks
from refdecoder.latent_conventions import pipeline_convention

__all__ = [
    "TOLERANCE",
    "RecordingHooks",
    "amplify_output_",
    "check_latent_conventions",
    "check_hook_shapes",
    "check_decoder_parameters",
    "check_reference_branch",
    "check_output_clamp",
]

# Max abs difference allowed against the backbone's own computations (fp32).
TOLERANCE = 1e-5
# Peak |value| the amplified output layer gives decoded videos (well outside [-1, 1]).
AMPLIFIED_PEAK = 2.0


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class RecordingHooks(IdentityHooks):
    """Identity hooks that record ``(window index, stage index, features)`` at every stage hook.

    ``cut_at``: a stage whose features are cut to their first frame before they continue (the image path of frame
    0 from there on: the rest of the decoder then runs on one frame, as an image decode does).
    """

    def __init__(self, cut_at: int | None = None) -> None:
        self.seen: list[tuple[int, int, torch.Tensor]] = []
        self.cut_at = cut_at

    def stage(
        self, index: int, x: torch.Tensor, reference: torch.Tensor | None, ctx: DecodeContext | None = None
    ) -> tuple[torch.Tensor, None]:
        x, _ = super().stage(index, x, reference, ctx)
        if index == self.cut_at:
            x = x[:, :, :1]
        self.seen.append((ctx.window_index, index, x))
        return x, None


class ConformanceCase(Protocol):
    """What the checks read of the case under test (a :class:`refdecoder.testing.Conformance`; typed here by what it
    provides, so that this module does not depend on the suite that runs it)."""

    backbone: str
    latent_frames: tuple[int, ...]
    windows: tuple[int, ...]
    pixel_size: tuple[int, int]
    preset: str

    @property
    def adapter_cls(self) -> type[BackboneAdapter]: ...

    @property
    def short(self) -> int: ...

    def vae(self) -> nn.Module: ...

    def reference(self, model: nn.Module, latents: torch.Tensor, seed: int = 1) -> torch.Tensor: ...


def _fresh(c: ConformanceCase) -> BackboneAdapter:
    return c.adapter_cls(c.vae())


def _latents(c: ConformanceCase, adapter: BackboneAdapter, frames: int, seed: int = 0) -> torch.Tensor:
    h, w = (s // adapter.spatial_factor for s in c.pixel_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, adapter.latent_channels, frames, h, w, generator=generator)


def _context(adapter: BackboneAdapter, latents: torch.Tensor, reference: torch.Tensor | None = None) -> DecodeContext:
    """A plain decode's context (the backbone's default extra inputs), with the pixel ``reference`` if given."""
    return DecodeContext(decode_inputs=adapter.decode_inputs(latents), reference_pixels=reference)


def _plain(adapter: BackboneAdapter, latents: torch.Tensor, hooks: Any = None) -> torch.Tensor:
    """The adapter's own loop with identity (or given) hooks: the unclamped plain decode."""
    windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
    return adapter.decode_windows(latents, hooks or IdentityHooks(), _context(adapter, latents), windows)


# --- latent conventions -------------------------------------------------------------------------------------------
@torch.no_grad()
def check_latent_conventions(c: ConformanceCase) -> None:
    """``denormalize(normalize(z)) == z`` and back; ``denormalize`` is the diffusers pipelines' rule for the VAE."""
    adapter = _fresh(c)
    z = _latents(c, adapter, c.short) * 2 + 0.5
    for name, there, back in (("denormalize(normalize(z))", adapter.normalize, adapter.denormalize),
                              ("normalize(denormalize(z))", adapter.denormalize, adapter.normalize)):  # fmt: skip
        diff = max_diff(back(there(z)), z)
        assert diff <= TOLERANCE * (1 + z.abs().max().item()), (
            f"{c.backbone}: {name} differs from z by {diff:.3g}: normalize and denormalize must be inverse"
        )
    convention = pipeline_convention(adapter.vae)
    if convention is not None:
        expected = convention.denormalize(adapter.vae, z)
        diff = max_diff(adapter.denormalize(z), expected)
        assert diff <= TOLERANCE * (1 + expected.abs().max().item()), (
            f"{c.backbone}: denormalize differs by {diff:.3g} from the convention of {convention.pipelines} "
            f"({type(adapter.vae).__name__}): raw = {convention.formula}"
        )


# --- shapes at the hooks ------------------------------------------------------------------------------------------
@torch.no_grad()
def check_hook_shapes(c: ConformanceCase) -> None:
    """What reaches each stage hook agrees with ``stages()`` and ``stage_frames()``; windows follow ``frame_rule``."""
    adapter = _fresh(c)
    _check_first_frame(c.backbone, adapter)
    plans = {
        (frames, tuple(adapter.plan_windows(frames, window)))
        for frames in c.latent_frames
        for window in (*c.windows, adapter.default_window)
    }
    for frames, windows in sorted(plans):
        z, hooks = _latents(c, adapter, frames), RecordingHooks()
        try:
            parts = list(adapter.iter_decode_windows(z, hooks, _context(adapter, z), list(windows)))
        except BackboneError as err:  # the loop's own frame_rule check
            raise AssertionError(f"{c.backbone}: {err}") from None
        for k, ((start, stop), part) in enumerate(zip(windows, parts)):
            expected = adapter.window_frames(start, stop)
            assert part.shape[2] == expected, (
                f"{c.backbone}: decode_window returned {part.shape[2]} frames for latent frames [{start}, {stop}), "
                f"but frame_rule ({adapter.frame_rule.describe()}) makes {expected}"
            )
            seen = [(index, x) for window, index, x in hooks.seen if window == k]
            _check_window_stages(c.backbone, adapter, seen, (k, start, stop), z.shape[-2:])


def _check_first_frame(name: str, adapter: BackboneAdapter) -> None:
    """``causal_first_frame`` agrees with ``frame_rule``: with temporal up-sampling (``step > 1``), latent frame 0
    makes one pixel frame exactly when it skips that up-sampling."""
    rule = adapter.frame_rule
    if rule.step > 1 and adapter.causal_first_frame != (rule.first == 1):
        made = f"latent frame 0 makes {rule.first} pixel frame{'s' if rule.first > 1 else ''}"
        raise AssertionError(
            f"{name}: causal_first_frame={adapter.causal_first_frame}, but frame_rule ({rule.describe()}) says "
            f"{made}: frame 0 {'is' if rule.first > 1 else 'is not'} up-sampled in time like the others; set "
            f"causal_first_frame = {rule.first == 1}"
        )


def _check_window_stages(
    name: str,
    adapter: BackboneAdapter,
    seen: list[tuple[int, torch.Tensor]],
    window: tuple[int, int, int],
    latent_size: torch.Size,
) -> None:
    """One window's stage inputs against the specs: order, channels, scale, planned and grown frame counts."""
    k, start, stop = window
    specs, where = adapter.stages(), f"window {k} (latent frames [{start}, {stop}))"
    called = [index for index, _ in seen]
    assert called == list(range(len(specs))), (
        f"{name}: {where} called the stage hooks {called}, but stages() declares {len(specs)}: each once, in order"
    )
    height, width = (s * adapter.spatial_factor for s in latent_size)
    previous: tuple[StageSpec, int] | None = None
    for (index, x), spec in zip(seen, specs):
        _, channels, frames, h, w = x.shape
        assert channels == spec.channels, (
            f"{name}: {spec.name} receives {channels} channels, StageSpec says {spec.channels}"
        )
        assert (h * spec.scale, w * spec.scale) == (height, width), (
            f"{name}: {spec.name} receives {h}x{w} features of a {height}x{width} decode, but StageSpec says "
            f"scale={spec.scale} ({height // spec.scale}x{width // spec.scale})"
        )
        planned = adapter.stage_frames(index, stop - start, k == 0)
        assert frames == planned, (
            f"{name}: {spec.name} receives {frames} frames in {where}, but stage_frames() plans {planned} (from "
            f"time_factor {[s.time_factor for s in specs]} and causal_first_frame={adapter.causal_first_frame})"
        )
        if previous is not None:
            before, made = previous
            causal = adapter.causal_first_frame and k == 0
            grown = 1 + before.time_factor * (made - 1) if causal else before.time_factor * made
            assert frames == grown, (
                f"{name}: {before.name} makes {frames} frames of {made} in {where}, but its time_factor="
                f"{before.time_factor} (causal_first_frame={adapter.causal_first_frame}) gives {grown}"
            )
        previous = (spec, frames)


# --- decoder parameters -------------------------------------------------------------------------------------------
def check_decoder_parameters(c: ConformanceCase) -> None:
    """Every VAE parameter the decode uses is in ``decoder_parameters()`` (named as in the VAE) or excluded."""
    adapter = _fresh(c)
    own = dict(adapter.vae.named_parameters())
    declared = dict(adapter.decoder_parameters())
    strangers = [name for name, param in declared.items() if own.get(name) is not param]
    assert not strangers, (
        f"{c.backbone}: decoder_parameters() yields {strangers[0]!r}, not the VAE's parameter of that name"
    )
    adapter.vae.requires_grad_(True)
    out = _plain(adapter, _latents(c, adapter, c.short))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    used = [name for name, param in own.items() if param.grad is not None and param.grad.abs().sum() > 0]
    excluded = tuple(adapter.decoder_exclusions)
    missing = [name for name in used if name not in declared and not name.startswith(excluded)]
    assert not missing, (
        f"{c.backbone}: the decode uses {len(missing)} parameters that decoder_parameters() leaves out "
        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): yield them, or name deliberate exclusions "
        "in decoder_exclusions"
    )
    stale = [prefix for prefix in excluded if not any(name.startswith(prefix) for name in used)]
    assert not stale, f"{c.backbone}: decoder_exclusions {stale} match no parameter the decode uses"


# --- the reference branch -----------------------------------------------------------------------------------------
@torch.no_grad()
def check_reference_branch(c: ConformanceCase) -> None:
    """At init, ``run_stage_on_reference(i, f)`` equals what the one-frame image decode makes of ``f`` at stage i+1.

    The image decode is the decode of the reference image's own latent (one latent frame), with the features
    entering stage ``i`` cut to one frame; the reference branch must give the features entering stage ``i + 1``
    (its first frame where the stage expands time).
    """
    adapter = _fresh(c)
    rule, specs = adapter.frame_rule, adapter.stages()
    channels = adapter.pixel_channels
    image = torch.rand(1, channels, 1, *c.pixel_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = adapter.encode(image.expand(-1, -1, rule.first, -1, -1))[:, :, :1]
    for index in range(len(specs) - 1):  # after the last stage the reference branch is not used
        hooks = RecordingHooks(cut_at=index)
        _image_decode(adapter, z, hooks, _context(adapter, z, image))
        entering = {stage: x for _, stage, x in hooks.seen}
        got = adapter.run_stage_on_reference(index, entering[index], _context(adapter, z, image))
        expected = entering[index + 1][:, :, :1]
        assert got.shape == expected.shape, (
            f"{c.backbone}: run_stage_on_reference({index}) returns {tuple(got.shape)}, but the image decode enters "
            f"{specs[index + 1].name} with {tuple(expected.shape)}"
        )
        diff = max_diff(got, expected)
        assert diff <= TOLERANCE * (1 + expected.abs().max().item()), (
            f"{c.backbone}: at init, the reference branch after {specs[index].name} differs by {diff:.3g} from the "
            "one-frame image decode of the reference: run_stage_on_reference must pass each frame through the "
            "stage's own modules as an image (at a stage that expands time, the frame the image path keeps)"
        )


def _image_decode(adapter: BackboneAdapter, z: torch.Tensor, hooks: RecordingHooks, ctx: DecodeContext) -> None:
    """One window over one latent frame, without the loop's frame check (the cut stage shortens the output)."""
    x = hooks.latents(adapter.decoder_input(z, [(0, 1)]), ctx)
    ctx.window_index, ctx.first_window, ctx.last_window = 0, True, True
    adapter.decode_window(adapter.window_input(x, 0, 1), adapter.begin_decode(x), hooks, ctx)


# --- clamping -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_output_clamp(c: ConformanceCase) -> None:
    """``output_clamp`` matches the backbone's decode, and with decoded values beyond [-1, 1] the decode still equals
    the backbone's (every length, with and without a reference)."""
    adapter = _fresh(c)
    z = _latents(c, adapter, c.short)
    raw = amplify_output_(adapter, z)
    if raw is not None and raw > 1.5:
        peak = adapter.plain_decode(z).abs().max().item()
        if adapter.output_clamp:
            assert peak <= 1.0, (
                f"{c.backbone}: the backbone's decode (plain_decode) reaches {peak:.3g}, but output_clamp=True clamps "
                "RefDecoder.decode to [-1, 1]: set output_clamp = False"
            )
        else:
            assert peak > 1.0, (
                f"{c.backbone}: the backbone's decode clamps to [-1, 1] (its decoder reaches {raw:.3g}), but "
                "output_clamp=False leaves RefDecoder.decode unclamped: set output_clamp = True"
            )
    model = refdecoder.wrap(adapter.vae, c.preset, backbone=c.backbone)
    for frames in c.latent_frames:
        z = _latents(c, adapter, frames)
        stock = model.adapter.plain_decode(z)
        for reference in (c.reference(model, z), None):
            diff = max_diff(model.decode(z, reference=reference), stock)
            assert diff <= TOLERANCE, (
                f"{c.backbone}: decoded values up to {stock.abs().max().item():.3g}: {frames} latent frames, "
                f"{'with' if reference is not None else 'without'} a reference: max diff {diff:.3g} to the backbone"
            )
    model.unwrap()


@torch.no_grad()
def amplify_output_(adapter: BackboneAdapter, latents: torch.Tensor, peak: float = AMPLIFIED_PEAK) -> float | None:
    """Scale the decoder's output layer in place so that the unclamped decode of ``latents`` peaks at ``peak``.

    The output layer is the module with parameters that starts last during a decode among those whose output has
    as many values as the decoded video (``conv_out``, or its inner conv). Returns the new unclamped peak, or None
    when no such layer is found (nothing is changed then).
    """
    layer = _output_layer(adapter, latents)
    if layer is None:
        return None
    factor = peak / _plain(adapter, latents).abs().max().item()
    for param in layer.parameters():
        param.mul_(factor)
    return _plain(adapter, latents).abs().max().item()


def _output_layer(adapter: BackboneAdapter, latents: torch.Tensor) -> nn.Module | None:
    started: list[nn.Module] = []  # in the order their forward began: an inner conv after its wrapper
    sizes: dict[int, set[int]] = {}  # id(module) -> numel of its outputs

    def on_end(module: nn.Module, args: Any, out: Any) -> None:
        out = out[0] if isinstance(out, (tuple, list)) and out else out  # CogVideoX's convs return (h, cache)
        if isinstance(out, torch.Tensor):
            sizes.setdefault(id(module), set()).add(out.numel())

    modules = [m for m in adapter.vae.modules() if next(m.parameters(), None) is not None]
    handles = [m.register_forward_pre_hook(lambda m, args: started.append(m)) for m in modules]
    handles += [m.register_forward_hook(on_end) for m in modules]
    try:
        video = _plain(adapter, latents)
    finally:
        for handle in handles:
            handle.remove()
    candidates = [m for m in started if video.numel() in sizes.get(id(m), ())]
    return candidates[-1] if candidates else None
