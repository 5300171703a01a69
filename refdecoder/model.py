"""The wrapped model: a backbone VAE plus the modules that make its decoder reference-conditioned.

Lifecycle (peft-like): :func:`wrap` freezes the VAE and builds the new modules beside it, never inside it, so
``vae.state_dict()`` keeps its keys and values; at initialisation every stage update is zero, so decoding equals
the backbone's own decode; :meth:`RefDecoder.save_pretrained` writes only what the library added (and decoder
weights when they were trained); :meth:`RefDecoder.unwrap` hands the VAE back exactly as it was.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refdecoder.backbones.base import BackboneAdapter
from refdecoder.backbones.registry import backbone_to_load, resolve_backbone
from refdecoder.blocks import LatentTokenDropout
from refdecoder.blocks.correspondence import (
    CorrespondenceEstimate,
    CorrespondenceField,
    correspondence_field,
    estimate_correspondence,
)
from refdecoder.blocks.latent_degradation import build_latent_components
from refdecoder.blocks.upscale_head import attach_upscale_head
from refdecoder.conditioning import ReferenceFeatures, StageConditioner
from refdecoder.config import RefDecoderConfig, resolve_config
from refdecoder.errors import BackboneError, CheckpointError, ConfigError, InputError
from refdecoder.hooks import DecodeContext
from refdecoder.pretrained import (
    BASE_PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_into,
    read_config,
    read_weights,
    write_folder,
)
from refdecoder.stages import build_stage_modules, largest_stage_token_count, stage_indices
from refdecoder.validation import (
    FiniteOutput,
    check_latent_statistics,
    check_latents,
    check_reference,
    check_reference_index,
    check_video,
    check_window,
)

__all__ = ["RefDecoder", "RefDecoderOutput", "wrap", "load", "CONFIG_NAME", "WEIGHTS_NAME"]

logger = logging.getLogger("refdecoder")


# VAEs currently wrapped; weak so that a dropped model does not keep its VAE alive.
_WRAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class RefDecoderOutput:
    """Result of a training forward pass.

    Attributes:
        sample: reconstructed video ``B, 3, T, H, W`` (unclamped, ~[-1, 1]).
        reference_index: ``(B,)`` index of the clip frame used as each sample's reference (-1: an explicit one).
        latents: ``B, C, t, h, w`` raw latents of the frozen encoder.
    """

    sample: torch.Tensor
    reference_index: torch.Tensor
    latents: torch.Tensor


class RefDecoder(nn.Module):
    """A backbone VAE whose decoder attends to reference frames at each up-sampling stage.

    Build it with :func:`refdecoder.wrap` rather than directly. Attributes: ``vae`` (the backbone, frozen except
    for decoder parameters when ``config.train_decoder``), ``adapter`` (its :class:`BackboneAdapter`),
    ``tokenizer``, ``stage_tokenizers`` (``tokenizer.per_stage``: one per later conditioned stage, keyed
    ``stage{i}``), ``transformer`` (shared by all stages), ``projectors`` (one per conditioned stage, keyed
    ``stage{i}``) and ``latent_components`` (training-time modules at the ``latents`` hook point).
    """

    def __init__(
        self, vae: nn.Module, config: RefDecoderConfig, adapter: BackboneAdapter, include_proxy: bool = True
    ) -> None:
        super().__init__()
        check_latent_statistics(adapter)
        self.config = config
        self.adapter = adapter
        self.vae = vae
        self.stage_indices = stage_indices(config, len(adapter.stages()))
        modules = build_stage_modules(config, adapter, self.stage_indices)
        self.tokenizer, self.stage_tokenizers = modules.tokenizer, modules.stage_tokenizers
        self.transformer, self.projectors = modules.transformer, modules.projectors
        self.latent_components = nn.ModuleDict(
            build_latent_components(config.degradation, adapter.latent_channels, include_proxy)
        )
        if config.dropout.p_max > 0:
            self.latent_components["token_dropout"] = LatentTokenDropout(config.dropout.p_max, config.dropout.mode)
        up = config.upscale
        adapter.check_upscale(up.factor)
        # Last, so that no error above leaves the VAE modified. A plain attribute, not a submodule: the head conv
        # lives inside the VAE, where diffusers expects it.
        self.upscale_head = attach_upscale_head(vae, up.factor, up.order) if up.factor > 1 else None
        self._base_state = _freeze(vae, adapter, config.train_decoder)
        if self.upscale_head is not None and up.train_head:
            for _, param in self.upscale_head.named_parameters():
                param.requires_grad_(True)
        self._alive = True

    # --- inference ------------------------------------------------------------------------------------------
    def decode(
        self,
        latents: torch.Tensor,
        reference: torch.Tensor | None = None,
        window: int | None = None,
        clamp: bool | None = None,
        resize_reference: bool = False,
        generator: torch.Generator | None = None,
        displacements: torch.Tensor | CorrespondenceEstimate | None = None,
        **decode_inputs: Any,
    ) -> torch.Tensor:
        """Decode raw latents into video, conditioned on reference frames when given.

        Args:
            latents: raw VAE latents ``B, C, t, h, w`` (what ``vae.decode`` takes; de-normalise diffusion latents
                first with :meth:`denormalize`).
            reference: ``B, 3, H, W`` or ``B, 3, R, H, W`` in [-1, 1] at the decoded size (``adapter.pixel_channels``
                channels: 4 for Qwen-Image 2.1's RGBA VAE), or None for the plain backbone decode.
            window: latent frames per decoder pass (joint attention span); default ``config.window``.
            clamp: clamp the output to [-1, 1]; default (None) exactly when the backbone's own decode clamps
                (``adapter.output_clamp``: Wan yes; HunyuanVideo 1.5, LTX, CogVideoX, VideoVAE+ no).
            resize_reference: resize a reference of another size instead of raising :class:`InputError`.
            generator: RNG for training-time components (token dropout), for reproducible draws.
            displacements: where each decoded pixel's content lies in the reference (e.g. an optical flow from
                each frame to the reference), ``B, 2, T, H, W`` (all reference frames) or ``B, R, 2, T, H, W``:
                ``(dy, dx)`` in output pixels, pixel ``(y, x)`` of frame ``t`` showing the reference at
                ``(y + dy, x + dx)``. The reference neighbourhoods of the attention are centred there (needs a
                local ``transformer.attention_radius``; replaces the ``correspondence`` estimate). Or an estimate
                made before for these latents and reference (:meth:`estimate_correspondence`), which skips the
                encoder passes. Default: the estimate when ``config.correspondence.enabled``, else the query's own
                position.
            decode_inputs: the backbone's own extra decode inputs (``adapter.decode_arguments``, e.g. LTX's
                ``temb``), as ``vae.decode`` takes them.

        Returns:
            Video ``B, 3, T, H, W``, nominally in [-1, 1] (exactly so when clamped), ``T`` by the frame rule.
        """
        latents, conditioner, ctx, windows = self._prepare_decode(
            latents, reference, window, resize_reference, generator, decode_inputs, displacements
        )
        finite = FiniteOutput(enabled=not self.training)  # one reduction per decode; training has its own guard
        video = self.adapter.decode_windows(latents, conditioner, ctx, windows)
        video = finite.add(self._upscale(video))
        finite.check(latents, self.named_parameters())
        return self._clamp(video, clamp)

    def iter_decode(
        self,
        latents: torch.Tensor,
        reference: torch.Tensor | None = None,
        window: int | None = None,
        clamp: bool | None = None,
        resize_reference: bool = False,
        generator: torch.Generator | None = None,
        depth_to_space: bool = True,
        displacements: torch.Tensor | CorrespondenceEstimate | None = None,
        **decode_inputs: Any,
    ) -> Iterator[torch.Tensor]:
        """:meth:`decode`, yielding each window's frames ``B, 3, t, H, W`` as soon as they exist.

        Concatenated over time the chunks equal :meth:`decode`'s output; only one window is alive at a time, so a
        consumer that writes chunks away decodes videos of any length in constant memory.

        With an upscale head, ``depth_to_space=False`` yields the head's raw ``B, 3 * s**2, t, H/s, W/s`` output
        instead (tiles must be blended there, before the shuffle); ``upscale_head.apply`` finishes it.
        """
        latents, conditioner, ctx, windows = self._prepare_decode(
            latents, reference, window, resize_reference, generator, decode_inputs, displacements
        )
        finite = FiniteOutput(enabled=not self.training)  # flags stay on the device; one host check at the end
        for part in self.adapter.iter_decode_windows(latents, conditioner, ctx, windows):
            part = finite.add(self._upscale(part, depth_to_space))
            yield self._clamp(part, clamp)
        finite.check(latents, self.named_parameters())

    def _prepare_decode(
        self,
        latents: torch.Tensor,
        reference: torch.Tensor | None,
        window: int | None,
        resize_reference: bool,
        generator: torch.Generator | None,
        decode_inputs: dict[str, Any] | None = None,
        displacements: torch.Tensor | CorrespondenceEstimate | None = None,
    ) -> tuple[torch.Tensor, StageConditioner, DecodeContext, list[tuple[int, int]]]:
        """Check the inputs, cast the latents to the weights' dtype, tokenize the reference, plan the windows and
        make what the adapter's window loop takes: the hooks (the stage modules and the reference) and the context."""
        latents, reference = self._checked_inputs(latents, reference, resize_reference)
        inputs = self.adapter.decode_inputs(latents, **(decode_inputs or {}))
        reference_features = None
        if reference is not None:
            reference_features = ReferenceFeatures.tokenize(reference, self.tokenizer, self.stage_tokenizers)
        ctx = DecodeContext(decode_inputs=inputs, reference_pixels=reference, generator=generator)
        num_reference = 0 if reference_features is None else reference_features.num_frames
        windows = self.adapter.plan_windows(latents.shape[2], self.window_size(latents, num_reference, window))
        correspondence = None
        if displacements is not None or (reference is not None and self.config.correspondence.enabled):
            correspondence = self._correspondence(latents, reference, windows, displacements)
        conditioner = StageConditioner(
            latent_components=self.latent_components,
            projectors=self.projectors,
            transformer=self.transformer,
            last_stage=max(self.stage_indices, default=-1),
            reference_features=reference_features,
            correspondence=correspondence,
        )
        return latents, conditioner, ctx, windows

    def _checked_inputs(
        self, latents: torch.Tensor, reference: torch.Tensor | None, resize_reference: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latents checked and cast to the decoder's dtype, the reference checked (``B, C, R, H, W``) or None."""
        self._check_alive()
        check_latents(latents, self.adapter.latent_channels)
        self.adapter.check_latents(latents)
        # Like a diffusers pipeline casting latents to vae.dtype: a bf16 model decodes fp32 latents. Under
        # autocast the weights stay fp32, so nothing changes here and autocast picks each op's precision.
        base = next(self.vae.parameters()).dtype
        latents = latents.to(next((p.dtype for _, p in self.adapter.decoder_parameters()), base))
        if reference is not None:
            size = self.output_size(latents.shape[-2:])
            reference = check_reference(
                reference, latents.shape[0], size, resize_reference, channels=self.adapter.pixel_channels
            )
        return latents, reference

    def estimate_correspondence(
        self, latents: torch.Tensor, reference: torch.Tensor, resize_reference: bool = False
    ) -> CorrespondenceEstimate:
        """The correspondence estimate :meth:`decode` would make for ``latents`` and ``reference``, to be reused.

        It depends on the frozen encoder and ``config.correspondence``'s estimate settings (``search``,
        ``frame_spaces``, ``still_frames``, ``half_cell``) only, not on trained weights, so it can be made once per
        clip, e.g. beside the latents a training loop caches, and passed as ``decode(displacements=estimate)``:
        the decode is then the same bit for bit and skips the estimate's encoder passes (four per reference frame
        with ``half_cell``).

        Args:
            latents: raw VAE latents ``B, C, t, h, w``, as for :meth:`decode`.
            reference: ``B, 3, H, W`` or ``B, 3, R, H, W`` in [-1, 1] at the decoded size, as for :meth:`decode`.
            resize_reference: resize a reference of another size instead of raising :class:`InputError`.

        Returns:
            A :class:`~refdecoder.blocks.CorrespondenceEstimate`: ``pixels``, ``B, R, 2, t, h, w`` float32,
            ``(dy, dx)`` in output pixels per latent frame and latent cell.
        """
        if reference is None:
            raise InputError("estimate_correspondence needs a reference: it estimates where content lies in it")
        latents, reference = self._checked_inputs(latents, reference, resize_reference)
        c = self.config.correspondence
        size = self.output_size(latents.shape[-2:])
        return estimate_correspondence(
            self.adapter, latents, reference, size, c.search, c.still_frames, c.frame_spaces, c.half_cell
        )

    def _correspondence(
        self,
        latents: torch.Tensor,
        reference: torch.Tensor | None,
        windows: list[tuple[int, int]],
        displacements: torch.Tensor | CorrespondenceEstimate | None,
    ) -> CorrespondenceField:
        """The decode's correspondence field: the caller's ``displacements`` or the estimate (see ``decode``)."""
        temporal = {p.patch_size[0] for p in self.projectors.values()}
        if reference is None or self.config.transformer.attention_radius is None or temporal != {1}:
            raise InputError(
                "displacements need a reference, a local transformer.attention_radius and temporal token patches "
                "of 1; pass a reference, or leave displacements out"
            )
        c = self.config.correspondence
        size = self.output_size(latents.shape[-2:])
        return correspondence_field(
            self.adapter,
            latents,
            reference,
            windows,
            size,
            c.search,
            displacements,
            snap=c.snap,
            still_frames=c.still_frames,
            frame_spaces=c.frame_spaces,
            per_frame=c.per_frame,
            sub_token_shift=c.sub_token_shift,
            half_cell=c.half_cell,
        )

    def output_size(self, latent_size: Sequence[int]) -> tuple[int, int]:
        """(H, W) of the decoded video (and of the reference) for latents of spatial size ``latent_size``."""
        scale = self.adapter.spatial_factor * self.config.upscale.factor
        return latent_size[0] * scale, latent_size[1] * scale

    def _upscale(self, video: torch.Tensor, depth_to_space: bool = True) -> torch.Tensor:
        if self.upscale_head is not None and depth_to_space:
            video = self.upscale_head.apply(video)
        return video

    def _clamp(self, video: torch.Tensor, clamp: bool | None) -> torch.Tensor:
        clamp = self.adapter.output_clamp if clamp is None else clamp  # decode like the backbone by default
        return video.clamp(-1.0, 1.0) if clamp else video

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: ``B, 3, T, H, W`` video in [-1, 1] -> raw latents (posterior mode), without gradients."""
        self._check_alive()
        check_video(video, self.adapter.frame_rule, self.adapter.spatial_factor, self.adapter.pixel_channels)
        return self.adapter.encode(video.to(next(self.vae.parameters()).dtype))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the normalised space diffusion pipelines work in."""
        return self.adapter.normalize(latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents -> raw latents for :meth:`decode`."""
        return self.adapter.denormalize(latents)

    def window_size(self, latents: torch.Tensor, num_reference: int = 1, window: int | None = None) -> int:
        """Latent frames per decoder pass: ``window`` or the config's, shrunk to fit ``max_tokens_per_stage``."""
        default = self.config.window.latent_frames or self.adapter.default_window
        size = default if window is None else check_window(window)
        budget = self.config.window.max_tokens_per_stage
        while budget is not None and size > 1 and self.stage_tokens(latents.shape[-2:], size, num_reference) > budget:
            size -= 1
        return size

    def stage_tokens(self, latent_size: tuple[int, int], window: int, num_reference: int = 1) -> int:
        """Largest token count any conditioned stage attends over for a window of ``window`` latent frames."""
        return largest_stage_token_count(
            self.adapter, self.projectors, self.stage_indices, latent_size, window, num_reference
        )

    def compile(self, decoder: bool = True, **options: Any) -> None:
        """``torch.compile(**options)`` the transformer blocks and, with ``decoder``, the backbone's window pass.

        In place; state-dict keys do not change. The compiled window pass (Wan) traces hooks and transformer into one
        graph per window shape (the first window, then each later size); torch keeps a bounded number of graphs per
        function (``torch._dynamo.config.recompile_limit``, 8). Replaces :meth:`nn.Module.compile`, which would
        compile :meth:`forward` (the training pass).
        """
        for block in self.transformer.blocks:
            block.compile(**options)
        if decoder and not self.adapter.compile_window(**options):
            logger.info("the %s adapter has no window pass to compile; compiled the transformer", self.adapter.name)

    # --- training -------------------------------------------------------------------------------------------
    def forward(
        self,
        video: torch.Tensor,
        reference_index: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
        reference: torch.Tensor | None = None,
    ) -> RefDecoderOutput:
        """Training pass: encode without gradients, then decode with a reference (by default a clip frame).

        Args:
            video: ``B, 3, T, H, W`` in [-1, 1] (``adapter.pixel_channels`` channels), ``T`` valid for the backbone.
            reference_index: per-sample frame index (``(B,)`` or an int); drawn uniformly when None.
            generator: RNG for the reference draw and the training-time components.
            reference: an explicit ``B, 3, H, W`` / ``B, 3, R, H, W`` reference instead of a clip frame (e.g. a
                frame from outside the clip); ``reference_index`` is then reported as -1.
        """
        factor = self.config.upscale.factor
        # With an upscale head the clip is the high-resolution target; the encoder sees it downsampled.
        latents = self.encode(video if factor == 1 else F.avg_pool3d(video, (1, factor, factor)))
        b, t = video.shape[0], video.shape[2]
        if reference is not None:
            if reference_index is not None:
                raise InputError("give reference or reference_index, not both")
            reference_index = torch.full((b,), -1, dtype=torch.long)
        else:
            if reference_index is None:
                reference_index = torch.randint(0, t, (b,), generator=generator)
            reference_index = check_reference_index(reference_index, b, t)
            batch = torch.arange(b, device=video.device)
            reference = video[batch, :, reference_index.to(video.device)].unsqueeze(2)
        sample = self.decode(latents, reference, clamp=False, generator=generator)
        return RefDecoderOutput(sample=sample, reference_index=reference_index, latents=latents)

    def added_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the modules RefDecoder added (never the backbone's)."""
        for name, param in self.named_parameters():
            if not name.startswith(BASE_PREFIX):
                yield name, param

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that receives gradients: the added modules, plus the decoder if ``train_decoder``."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, decoder_lr_ratio: float = 0.1) -> list[dict[str, Any]]:
        """Optimizer groups: added modules at ``lr``; unfrozen decoder parameters at ``lr * decoder_lr_ratio``."""
        groups = [
            {"name": "refdecoder", "params": [p for _, p in self.added_parameters() if p.requires_grad], "lr": lr}
        ]
        decoder = [p for _, p in self.adapter.decoder_parameters() if p.requires_grad]
        if decoder:
            groups.append({"name": "decoder", "params": decoder, "lr": lr * decoder_lr_ratio})
        return groups

    # --- checkpoints ----------------------------------------------------------------------------------------
    def refdecoder_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`save_pretrained` stores: the added modules, plus decoder weights when they are trained."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(BASE_PREFIX)}
        if self.config.train_decoder:
            state.update({BASE_PREFIX + name: p.detach() for name, p in self.adapter.decoder_parameters()})
        elif self.upscale_head is not None and self.config.upscale.train_head:
            state.update({BASE_PREFIX + name: p.detach() for name, p in self.upscale_head.named_parameters()})
        return state

    def load_refdecoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`refdecoder_state_dict` strictly; mismatches raise :class:`CheckpointError`."""
        load_into(self.refdecoder_state_dict(), state)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``refdecoder_config.json`` and ``refdecoder.safetensors`` (no frozen base weights) atomically."""
        return write_folder(directory, self.refdecoder_state_dict(), self.config)

    @classmethod
    def from_pretrained(
        cls,
        vae: nn.Module,
        directory: str | os.PathLike,
        backbone: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> RefDecoder:
        """Wrap ``vae`` with the config saved in ``directory`` and load its weights strictly.

        The adapter is the one the config was saved with (its ``backbone``), so a VAE that several registered
        adapters fit loads without ``backbone=``; an explicit ``backbone`` wins over the saved one.

        ``directory`` is a local folder or a Hugging Face repo id (``org/name``, ``org/name@rev/subfolder``; see
        :mod:`refdecoder.hub`), read from the Hub cache first and downloaded when online; ``revision`` and
        ``subfolder`` work as in diffusers' ``from_pretrained``.
        """
        from refdecoder.hub import resolve_path

        directory = resolve_path(directory, revision, subfolder, what="RefDecoder weights")
        config = read_config(directory)
        backbone = backbone_to_load(vae, config.backbone, backbone)
        config.backbone = config.backbone if backbone is None else None  # the adapter named here wins
        model = wrap(vae, config, backbone=backbone, include_proxy=False)
        try:
            model.load_refdecoder_state_dict(read_weights(directory))
        except CheckpointError:
            model.unwrap()
            raise
        return model

    # --- lifecycle ------------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Detach from the VAE and return it with its original trainability and mode; this model is then unusable."""
        self._check_alive()
        if self.upscale_head is not None:
            self.upscale_head.restore()
        flags, training = self._base_state
        for name, param in self.vae.named_parameters():
            param.requires_grad_(flags[name])
        self.vae.train(training)
        _WRAPPED.discard(self.vae)
        self._alive = False
        return self.vae

    def _check_alive(self) -> None:
        if not self._alive:
            raise BackboneError("this RefDecoder was unwrapped; wrap the VAE again to use it")

    def extra_repr(self) -> str:
        added = sum(p.numel() for _, p in self.added_parameters())
        return f"backbone={self.adapter.name!r}, stages={list(self.stage_indices)}, added_params={added:,}"


def _freeze(vae: nn.Module, adapter: BackboneAdapter, train_decoder: bool) -> tuple[dict[str, bool], bool]:
    """Freeze the VAE (decoder trainable if asked); return what :meth:`RefDecoder.unwrap` must restore."""
    state = ({n: p.requires_grad for n, p in vae.named_parameters()}, vae.training)
    vae.requires_grad_(False)
    if train_decoder:
        for _, param in adapter.decoder_parameters():
            param.requires_grad_(True)
    return state


def wrap(
    vae: nn.Module,
    config: str | RefDecoderConfig | None = None,
    backbone: str | None = None,
    include_proxy: bool = True,
) -> RefDecoder:
    """Make ``vae``'s decoder reference-conditioned.

    Args:
        vae: a VAE of a registered family (e.g. diffusers ``AutoencoderKLWan``); it is frozen, not copied.
        config: a preset name (``"paper"``, ``"small-local"``, ``"small"``, ``"tiny"``, ...) or a
            :class:`RefDecoderConfig`; default ``"small-local"``, what the quality benchmark recommends for
            fine-tuning (local attention with the locality prior, per-stage tokenizers, no token dropout).
        backbone: force an adapter by name instead of auto-detection.
        include_proxy: load ``config.degradation.proxy`` (a training tool; :meth:`RefDecoder.from_pretrained` skips
            it, as it stores no weights and is the identity in eval).

    Returns:
        A :class:`RefDecoder` in eval mode (call ``.train()`` to train) whose ``decode`` equals ``vae.decode``
        until its new modules are trained.
    """
    if vae in _WRAPPED:
        raise BackboneError("this VAE is already wrapped by a RefDecoder; call unwrap() on it first")
    config = resolve_config(config)
    adapter_cls = resolve_backbone(vae, backbone)
    if config.backbone not in (None, adapter_cls.name):
        raise ConfigError(f"config was made for backbone {config.backbone!r}, but this VAE is {adapter_cls.name!r}")
    config.backbone = adapter_cls.name
    base = next(vae.parameters())
    # Build the new modules where the VAE lives (also the meta device, for FLOP counting without memory), in its
    # dtype, so a decode never mixes devices or precisions.
    with torch.device(base.device):
        model = RefDecoder(vae, config, adapter_cls(vae), include_proxy)
    model.to(dtype=base.dtype)
    # Ready for inference like a from_pretrained model: training-time components (token dropout, degradations)
    # stay off until the caller asks for model.train().
    model.eval()
    _WRAPPED.add(vae)
    logger.debug("wrapped a %s as %s", type(vae).__name__, adapter_cls.name)
    return model


def load(
    vae: nn.Module,
    directory: str | os.PathLike,
    backbone: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> RefDecoder:
    """Wrap ``vae`` and load RefDecoder weights saved with :meth:`RefDecoder.save_pretrained`, from a folder or a
    Hugging Face repo id (see :meth:`RefDecoder.from_pretrained`)."""
    return RefDecoder.from_pretrained(vae, directory, backbone=backbone, revision=revision, subfolder=subfolder)
