"""The backbone adapter contract: what a VAE family tells the generic RefDecoder components.

An adapter knows one VAE family: where its decoder stages are, how its frames and latents are laid out, how to
encode, and how to run its decoder on one window of latent frames while calling the hook points. The window loop
itself (window iteration, the :class:`~refdecoder.hooks.DecodeContext` bookkeeping, collecting the windows) lives
here, so an adapter writes only what is specific to its decoder:

- :meth:`BackboneAdapter.fit` (does it drive this VAE, and if not, why), :meth:`~BackboneAdapter.build_tiny`;
- the geometry (:attr:`~BackboneAdapter.latent_channels`, :attr:`~BackboneAdapter.spatial_factor`,
  :meth:`~BackboneAdapter.stages`); :meth:`~BackboneAdapter.encode` only when the VAE's posterior mode is not
  ``vae.encode(video).latent_dist.mode()`` (the diffusers convention, the default here);
- :meth:`~BackboneAdapter.decode_window`, calling :meth:`~BackboneAdapter.conditioned_stage` before each stage
  (plus :meth:`~BackboneAdapter.decoder_input` and :meth:`~BackboneAdapter.begin_decode` when the decoder has a
  stem to run once or caches to carry);
- :meth:`~BackboneAdapter.run_stage_on_reference` and :meth:`~BackboneAdapter.decoder_parameters`.

Backbones differ in what the contract must absorb, each through a class attribute or an overridable method here
rather than a special case in the generic code: :attr:`~BackboneAdapter.exact_streaming` (False: the base
:meth:`~BackboneAdapter.plan_windows` decodes the whole latent as one window, the backbone's own layout),
:attr:`~BackboneAdapter.output_clamp` (whether the backbone's decode clamps to [-1, 1]),
:attr:`~BackboneAdapter.decode_arguments` / :meth:`~BackboneAdapter.decode_inputs` (extra ``vae.decode`` inputs such
as LTX's ``temb``), the ``ctx`` of :meth:`~BackboneAdapter.run_stage_on_reference` (stage inputs beyond the hidden
state, derived for the reference branch) and :meth:`~BackboneAdapter.check_upscale` (patchified output heads).

``docs/backbones.md`` walks through writing one; :mod:`refdecoder.testing` checks it.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from refdecoder.errors import BackboneError, InputError
from refdecoder.frames import FrameRule
from refdecoder.hooks import DecodeContext, DecodeHooks, plan_windows

if TYPE_CHECKING:
    from refdecoder.tiling import TilePlan

__all__ = ["StageSpec", "Fit", "BackboneAdapter"]

Patch = tuple[int, int, int]


@dataclass(frozen=True)
class StageSpec:
    """One decoder up-sampling stage that components can attach before.

    Attributes:
        name: hook point name, ``stage{i}``.
        channels: channels of the features entering the stage.
        scale: spatial down-sampling of those features relative to the decoded pixels (8 means H/8).
        patch_size: default token patch ``(t, h, w)`` that brings every stage to the same token grid.
        time_factor: how many frames the stage makes of each input frame (2 for Wan's temporal up-sampling).
    """

    name: str
    channels: int
    scale: int
    patch_size: Patch
    time_factor: int = 1


@dataclass(frozen=True)
class Fit:
    """How far a VAE gets through an adapter's checks, and why it stops.

    Attributes:
        passed: checks that held, in the adapter's order; the registry names the adapter with the most as the
            nearest one when none fits.
        reasons: why the first failing check failed (e.g. ``"is_residual=True (wan2.1 needs False)"``); empty when
            the adapter drives the VAE.
    """

    passed: int
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reasons

    @classmethod
    def run(cls, *checks: Callable[[], str | Sequence[str] | None]) -> Fit:
        """Run ``checks`` in order (each returns None when it holds, else its reasons) up to the first that fails."""
        for passed, check in enumerate(checks):
            reasons = check()
            if reasons:
                return cls(passed, (reasons,) if isinstance(reasons, str) else tuple(reasons))
        return cls(len(checks))


class BackboneAdapter(abc.ABC):
    """Contract between a VAE family and the generic RefDecoder components.

    An instance wraps one VAE object; subclasses set the class attributes and implement the abstract methods.
    Class attributes are read without an instance (a training recipe asks ``get_backbone(name).frame_rule`` before
    a VAE exists), so a family whose variants differ in them needs one adapter per variant.
    """

    name: ClassVar[str] = ""
    frame_rule: ClassVar[FrameRule]
    # True when latent frame 0 skips the temporal up-sampling inside the decoder (it stays one frame through every
    # stage that expands time, as an image does: Wan, HunyuanVideo 1.5, LTX, CogVideoX); False when every latent
    # frame is expanded alike (VideoVAE+, frame-by-frame image VAEs). stage_frames and plan_windows follow it.
    causal_first_frame: ClassVar[bool] = True
    # Latent frames in the first decode window when the config does not say (the paper's chunk length).
    default_window: ClassVar[int] = 4
    # True when the backbone has its own spatially tiled decode (plain_tiled_decode) that refdecoder.tiling
    # reproduces; RefDecoder's tiled decode then equals it at initialisation.
    tiling: ClassVar[bool] = False
    # True when any window split decodes like the backbone's own decode (causal caches carry across windows). False
    # when the output depends on how frames are grouped (norms over time, attention over all frames, no cache): the
    # base plan_windows then decodes the whole latent as one window, the backbone's own layout; an adapter whose
    # backbone decodes in fixed groups of its own (CogVideoX's frame batches, VideoVAE+'s chunks) overrides
    # plan_windows with them. docs/backbones.md gives the memory it costs.
    exact_streaming: ClassVar[bool] = True
    # True when the backbone's own decode clamps its output to [-1, 1] (diffusers' Wan and Qwen-Image VAEs); False
    # when it does not (HunyuanVideo 1.5, LTX, CogVideoX, VideoVAE+). RefDecoder.decode clamps exactly when this is
    # True unless told otherwise, so that it equals vae.decode at initialisation.
    output_clamp: ClassVar[bool] = True
    # Names of the backbone's extra vae.decode inputs after the latents, in order (LTX: ("temb",)).
    decode_arguments: ClassVar[tuple[str, ...]] = ()
    # Name prefixes of parameters the decode uses that decoder_parameters() leaves out on purpose (VideoVAE+:
    # "decoder_temporal.", which its recipe keeps frozen); the conformance suite accepts exactly these gaps.
    decoder_exclusions: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_reference_branch(cls)

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae

    # --- identification -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def fit(cls, vae: nn.Module) -> Fit:
        """How well this adapter fits ``vae`` (``Fit.ok`` when it can drive it); see :meth:`Fit.run`."""

    @classmethod
    def matches(cls, vae: nn.Module) -> bool:
        """True when this adapter can drive ``vae`` (used by ``wrap()`` auto-detection)."""
        return cls.fit(vae).ok

    @classmethod
    @abc.abstractmethod
    def build_tiny(cls, **overrides: Any) -> nn.Module:
        """A small randomly initialised VAE of this family, for tests and demos."""

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latents ``decode`` accepts."""

    @property
    @abc.abstractmethod
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W."""

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (after the first, for causal backbones)."""
        return self.frame_rule.step

    @property
    def pixel_channels(self) -> int:
        """Channels of the decoded frames, the encoder's input and the pixel reference (3: RGB; Qwen-Image 2.1's
        VAE: 4, RGBA). Videos and references must have this many; the reference tokenizer reads this many."""
        return 3

    @property
    def output_patch(self) -> int:
        """Pixels per decoder output position along H and W (Wan2.2 writes 2x2 patches); tiles blend per patch."""
        return 1

    @abc.abstractmethod
    def stages(self) -> list[StageSpec]:
        """The decoder stages in call order (hook points ``stage0``, ``stage1``, ...)."""

    @property
    def reference_channels(self) -> int:
        """Channels the reference tokenizer must produce (those of the first stage)."""
        return self.stages()[0].channels

    @property
    def reference_scale(self) -> int:
        """Spatial down-sampling of the first stage, i.e. the reference tokenizer's patch size."""
        return self.stages()[0].scale

    def stage_frames(self, index: int, latent_frames: int, first_window: bool) -> int:
        """Frames entering stage ``index`` when a window of ``latent_frames`` latent frames is decoded.

        The model plans its token counts (``max_tokens_per_stage``) from it, and the conformance suite checks it
        against the tensors that reach the hooks. The default follows :attr:`StageSpec.time_factor` of the earlier
        stages and :attr:`causal_first_frame` (frame 0 of the first window stays one frame); a decoder that changes
        time before its first stage overrides it (VideoVAE+'s temporal decoder).
        """
        frames = latent_frames
        for spec in self.stages()[:index]:
            if self.causal_first_frame and first_window:
                frames = 1 + spec.time_factor * (frames - 1)
            else:
                frames = spec.time_factor * frames
        return frames

    def plan_windows(self, num_latent_frames: int, window: int) -> list[tuple[int, int]]:
        """Latent-frame windows for one decode: ``window`` frames first, then windows of equal pixel length.

        With a causal first frame, latent frame 0 yields one pixel frame and every later one ``step`` frames, so a
        first window of W latent frames spans ``1 + step*(W-1)`` pixel frames and later windows of ``W - 1``
        latent frames span ``step*(W-1)``: every decoder pass (and so its memory and attention span) is the same
        size, e.g. 17 then 16 pixel frames for Wan with W = 5. Without :attr:`exact_streaming`, one window over all
        ``num_latent_frames``, whatever ``window`` is asked.
        """
        if not self.exact_streaming:
            return [(0, num_latent_frames)]
        later = max(1, window - 1) if self.causal_first_frame else window
        return plan_windows(num_latent_frames, window, later)

    def check_latent_frames(self, latent_frames: int) -> None:
        """Raise :class:`~refdecoder.errors.InputError` unless the backbone decodes ``latent_frames`` frames."""
        self.frame_rule.pixel_frames(latent_frames)

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise :class:`~refdecoder.errors.InputError` for ``B, C, t, h, w`` latents the backbone cannot decode
        (channels and rank are checked before); the default checks the frame count."""
        self.check_latent_frames(latents.shape[2])

    def decode_inputs(self, latents: torch.Tensor, **inputs: Any) -> dict[str, Any]:
        """Check the backbone's extra decode inputs (named in :attr:`decode_arguments`) for ``latents``.

        Returns what :meth:`decode_window` and :meth:`run_stage_on_reference` read from ``ctx.decode_inputs`` (defaults
        filled in). The default accepts none.
        """
        unknown = sorted(set(inputs) - set(self.decode_arguments))
        if unknown:
            from refdecoder.errors import InputError

            accepted = ", ".join(self.decode_arguments) or "none"
            raise InputError(f"the {self.name} decode takes no input {unknown[0]!r} (extra decode inputs: {accepted})")
        return dict(inputs)

    def check_upscale(self, factor: int) -> None:
        """Raise :class:`~refdecoder.errors.ConfigError` when an upscale head of ``factor`` cannot sit on this decoder.

        The head replaces an RGB output conv (``decoder.conv_out`` with 3 channels); adapters whose decoder writes
        patchified channels refuse here with a reason instead of failing inside the head.
        """
        if factor > 1 and self.output_patch > 1:
            from refdecoder.errors import ConfigError

            raise ConfigError(
                f"upscale.factor={factor}: the {self.name} decoder writes {self.output_patch}x{self.output_patch} "
                "patchified output channels, which the upscale head (an RGB output conv) cannot replace; use factor 1"
            )

    # --- encode / latent conventions ------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``B, 3, T, H, W`` video in [-1, 1] -> raw latents (posterior mode) ``B, C, t, h, w``.

        The default is diffusers' convention, ``vae.encode(video).latent_dist.mode()``; override it for VAEs that
        encode otherwise.
        """
        posterior = getattr(self.vae.encode(video), "latent_dist", None)
        if posterior is None:
            raise BackboneError(
                f"the {self.name or type(self).__name__} adapter uses the default encode, which needs "
                f"vae.encode(video).latent_dist (diffusers' convention); {type(self.vae).__name__} has none: "
                "override encode()"
            )
        return posterior.mode()

    def encode_chunks(self, chunks: Iterable[torch.Tensor]) -> torch.Tensor:
        """Encode consecutive pixel pieces of one video (frame 0 alone, then groups; see ``RuleChunks``).

        The default joins the pieces and encodes once (memory grows with the length); causal backbones override it
        to carry their encoder caches from piece to piece, which equals one :meth:`encode` of the whole video.
        """
        return self.encode(torch.cat(list(chunks), dim=2))

    def to_backbone_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """A decoded [-1, 1] video in the backbone's own pixel convention, what its ``vae.decode`` returns (identity
        for all but MiniMax-H3, whose VAE works in ImageNet-normalised RGB); ``reference_decoding`` hands it on."""
        return video

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the normalised latents diffusion models work in (identity if the family has none)."""
        return latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents -> raw latents that ``decode`` accepts (identity if none)."""
        return latents

    # --- decoding -------------------------------------------------------------------------------------------
    def decoder_input(self, latents: torch.Tensor, windows: list[tuple[int, int]]) -> torch.Tensor:
        """What the ``latents`` hook sees, computed once per decode (Wan: ``post_quant_conv(latents)``)."""
        return latents

    def window_input(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The part of :meth:`decoder_input`'s output that latent frames ``[start, stop)`` decode from."""
        return x[:, :, start:stop]

    def begin_decode(self, x: torch.Tensor) -> Any:
        """Per-decode state handed to every :meth:`decode_window` call (a causal backbone's caches), or None."""
        return None

    @abc.abstractmethod
    def decode_window(self, x: torch.Tensor, state: Any, hooks: DecodeHooks, ctx: DecodeContext) -> torch.Tensor:
        """Decode one window: before stage ``i``, ``h, reference = self.conditioned_stage(i, h, reference, hooks,
        ctx)``, starting each window with ``reference = None``; then run stage ``i``'s block on ``h``.

        The loop carries two values from stage to stage: ``h``, the video's features, which the backbone's blocks
        take, and ``reference``, the reference's features, which the hook returns and the reference branch carries
        through each stage (:meth:`conditioned_stage`).

        Args:
            x: the window's slice of the decoder input (:meth:`window_input`).
            state: what :meth:`begin_decode` returned; causal backbones carry their caches in it.
            hooks: the hook points to call.
            ctx: the decode's context; ``ctx.first_window`` is True for the window holding latent frame 0.

        Returns:
            The window's unclamped pixel frames ``B, 3, t, H, W``.
        """

    def conditioned_stage(
        self,
        index: int,
        h: torch.Tensor,
        reference: torch.Tensor | None,
        hooks: DecodeHooks,
        ctx: DecodeContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hook point before stage ``index``, and the reference carried through the stage for the next one.

        Args:
            index: the stage.
            h: ``B, C_i, t_i, h_i, w_i`` video features entering it.
            reference: the reference's ``B, C_i, R, h_i, w_i`` features entering it; None at stage 0.
            hooks, ctx: what :meth:`decode_window` was handed.

        Returns:
            ``h`` after ``hooks.stage`` (the adapter's loop then runs the stage's block on it), and the reference's
            features entering stage ``index + 1``, ``B, C_(i+1), R, h_(i+1), w_(i+1)``: what the hook returned, passed
            through :meth:`run_stage_on_reference`; None when the hook returned none (no later stage needs it).
        """
        h, reference = hooks.stage(index, h, reference, ctx)
        if reference is not None:
            reference = self.run_stage_on_reference(index, reference, ctx)
        return h, reference

    def compile_window(self, **options: Any) -> bool:
        """``torch.compile(**options)`` :meth:`decode_window` in place; False when this adapter does not.

        The hooks are traced into the compiled pass. It must see inputs and state of the same shapes and strides in
        every window of one size, so that such windows reuse one graph.
        """
        return False

    def iter_decode_windows(
        self, latents: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext, windows: list[tuple[int, int]]
    ) -> Iterator[torch.Tensor]:
        """Decode raw latents over ``windows`` (from :meth:`plan_windows`), yielding each window's pixel frames.

        Calls ``hooks.latents`` once, then :meth:`decode_window` per window. Yields unclamped ``B, 3, t, H, W``
        chunks in time order; only one window's activations are alive at a time, so a consumer that streams the
        chunks (e.g. to a video file) decodes any length in constant memory.
        """
        x = hooks.latents(self.decoder_input(latents, windows), ctx)
        state = self.begin_decode(x)
        for index, (start, stop) in enumerate(windows):
            ctx.window_index, ctx.first_window, ctx.last_window = index, index == 0, index == len(windows) - 1
            part = self.decode_window(self.window_input(x, start, stop), state, hooks, ctx)
            self._check_window_frames(part, start, stop)
            yield part

    def window_frames(self, start: int, stop: int) -> int:
        """Pixel frames :meth:`decode_window` returns for latent frames ``[start, stop)``, by :attr:`frame_rule`."""
        rule = self.frame_rule
        return rule.pixel_frames(stop) - (rule.pixel_frames(start) if start else 0)

    def _check_window_frames(self, part: torch.Tensor, start: int, stop: int) -> None:
        try:
            expected = self.window_frames(start, stop)
        except InputError:  # a window edge the frame rule has no pixel count for (an odd-count rule): not checked
            return
        if part.ndim != 5 or part.shape[2] != expected:
            raise BackboneError(
                f"the {self.name or type(self).__name__} adapter's decode_window returned {tuple(part.shape)} for "
                f"latent frames [{start}, {stop}), but its frame_rule ({self.frame_rule.describe()}) makes "
                f"{expected} frame(s) of them: decode_window must return B, 3, {expected}, H, W (a frame drop or "
                "the causal first frame forgotten?)"
            )

    def decode_windows(
        self, latents: torch.Tensor, hooks: DecodeHooks, ctx: DecodeContext, windows: list[tuple[int, int]]
    ) -> torch.Tensor:
        """:meth:`iter_decode_windows` collected into one unclamped video ``B, 3, T, H, W``."""
        video, filled = None, 0
        for part in self.iter_decode_windows(latents, hooks, ctx, windows):
            if video is None:
                # Filled window by window rather than concatenated at the end, which would hold the video twice.
                frames = self.frame_rule.pixel_frames(latents.shape[2])
                video = part.new_empty(*part.shape[:2], frames, *part.shape[3:])
            video[:, :, filled : filled + part.shape[2]] = part
            filled += part.shape[2]
        return video

    @abc.abstractmethod
    def run_stage_on_reference(
        self, index: int, reference: torch.Tensor, ctx: DecodeContext | None = None
    ) -> torch.Tensor:
        """The reference branch: ``B, C_i, R, h_i, w_i`` reference features through stage ``index``, spatially only.

        Returns the next stage's reference input ``B, C_(i+1), R, h_(i+1), w_(i+1)``: each of the R frames passes the
        stage's pretrained modules on its own, as a one-frame image decode would pass it. At a stage that expands
        time, the result is the one frame the image path keeps (frame 0 with :attr:`causal_first_frame`, else the
        first of the frames the stage makes of it). The conformance suite checks this against an image decode.

        ``ctx`` is the decode's :class:`~refdecoder.hooks.DecodeContext` (None outside a decode). Stages that take
        more than the hidden state derive those inputs for the reference from it (LTX's ``temb`` from
        ``ctx.decode_inputs``, CogVideoX's ``zq`` from ``ctx.reference_pixels``), keeping what is made once per
        decode in ``ctx.reference_branch_inputs``, of a type the adapter documents (CogVideoX: the reference's latent).
        """

    def plain_decode(self, latents: torch.Tensor, window: int | None = None, **inputs: Any) -> torch.Tensor:
        """The backbone's own decode of raw latents (what RefDecoder must equal at initialisation).

        ``window`` matters only to backbones whose output depends on how frames are grouped (VideoVAE+);
        ``inputs`` are the extra decode inputs (:attr:`decode_arguments`). Returned as the backbone makes it:
        clamped to [-1, 1] only by backbones that clamp (:attr:`output_clamp`), as ``RefDecoder.decode`` is.
        """
        return self.vae.decode(latents, **inputs).sample

    def plain_tiled_decode(self, latents: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        """The backbone's own spatially tiled decode with ``plan``'s tiles (adapters with :attr:`tiling`)."""
        raise NotImplementedError(f"{type(self).__name__} has no tiled decode of its own (tiling = False)")

    # --- parameters -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decoder_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the decoder side (what ``train_decoder`` unfreezes); names as in ``vae``."""


# Members of earlier versions of the contract, and what replaced them.
_RETIRED = {
    "reference_stage": "merged into run_stage_on_reference(index, reference, ctx=None): rename it, and derive stage "
    "inputs from ctx",
    "one_window": "replaced by exact_streaming = False, with which the base plan_windows decodes one window",
}


def _check_reference_branch(cls: type[BackboneAdapter]) -> None:
    """Keep one signature for the reference branch: ``run_stage_on_reference(index, reference, ctx=None)``.

    A subclass written against the older contract keeps working when its method takes ``(index, reference)``; one
    that defines a retired member (``reference_stage``, ``one_window``) or adds parameters is refused with what to
    rename.
    """
    for retired, replacement in _RETIRED.items():
        if retired in vars(cls):
            raise BackboneError(f"{cls.__qualname__} defines {retired}, which the adapter contract {replacement}")
    method = vars(cls).get("run_stage_on_reference")
    if method is None or getattr(method, "__isabstractmethod__", False):
        return
    params = list(inspect.signature(method).parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if (len(params) == 3 and len(positional) == 3) or any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    if len(params) == 2 and len(positional) == 2:  # (index, reference): the contract before ctx was passed

        @functools.wraps(method)
        def with_context(self: BackboneAdapter, index: int, reference: torch.Tensor, ctx: Any = None) -> Any:
            return method(self, index, reference)

        cls.run_stage_on_reference = with_context
        return
    raise BackboneError(
        f"{cls.__qualname__}.run_stage_on_reference takes ({', '.join(p.name for p in params)}); the contract is "
        "run_stage_on_reference(index, reference, ctx=None): derive extra stage inputs from ctx "
        "(ctx.decode_inputs, ctx.reference_pixels, ctx.reference_branch_inputs) instead of adding parameters"
    )
