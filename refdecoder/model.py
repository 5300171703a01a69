"""The wrapped model: a backbone VAE plus the modules that make its decoder reference-conditioned.

Lifecycle (peft-like): :func:`wrap` freezes the VAE and builds the new modules beside it, never inside it, so
``vae.state_dict()`` keeps its keys and values; at initialisation every stage update is zero, so decoding equals
the backbone's own decode; :meth:`RefDecoder.save_pretrained` writes only what the library added (and decoder
weights when they were trained); :meth:`RefDecoder.unwrap` hands the VAE back exactly as it was.
"""

from __future__ import annotations

import logging
import os
import tempfile
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
from refdecoder.blocks import LatentTokenDropout, ReferenceTokenizer, SharedTransformer, StageProjector
from refdecoder.blocks.correspondence import CorrespondenceField, correspondence_field
from refdecoder.blocks.latent_degradation import build_latent_components
from refdecoder.blocks.upscale_head import attach_upscale_head
from refdecoder.config import RefDecoderConfig, resolve_config
from refdecoder.errors import BackboneError, CheckpointError, ConfigError, InputError
from refdecoder.hooks import DecodeContext
from refdecoder.stages import ReferenceHooks, stage_indices, stage_patches
from refdecoder.validation import (
    FiniteOutput,
    check_finite_weights,
    check_latent_statistics,
    check_latents,
    check_reference,
    check_reference_index,
    check_video,
    check_window,
)

__all__ = ["RefDecoder", "RefDecoderOutput", "wrap", "load", "CONFIG_NAME", "WEIGHTS_NAME"]

logger = logging.getLogger("refdecoder")

CONFIG_NAME = "refdecoder_config.json"
WEIGHTS_NAME = "refdecoder.safetensors"
# Saved decoder weights carry this prefix so they can never be confused with the added modules.
_BASE_PREFIX = "vae."

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
        specs = adapter.stages()
        self.stage_indices = stage_indices(config, len(specs))
        tf, up = config.transformer, config.upscale
        tok = config.tokenizer

        def tokenizer(channels: int, scale: int) -> ReferenceTokenizer:
            # The reference comes at the output size; a larger patch lands it on the stage's grid.
            return ReferenceTokenizer(channels, scale * up.factor, tok.kind, tok.kernel_size, tok.norm)

        self.tokenizer = tokenizer(adapter.reference_channels, adapter.reference_scale)
        # tokenizer.per_stage: the pixel reference tokenized again for every later conditioned stage.
        self.stage_tokenizers = nn.ModuleDict(
            {specs[i].name: tokenizer(specs[i].channels, specs[i].scale) for i in self.stage_indices if i > 0}
            if tok.per_stage
            else {}
        )
        self.transformer = SharedTransformer(
            dim=tf.width,
            depth=tf.depth,
            num_heads=tf.num_heads,
            ffn_dim=tf.ffn_width,
            rope_theta=tf.rope_theta,
            attention_radius=tf.attention_radius,
            video_attention_radius=tf.video_attention_radius,
            locality_bias=tf.locality_bias,
            locality_bias_slope=tf.locality_bias_slope,
            locality_bias_extent=tf.locality_bias_extent,
        )
        self.transformer.gradient_checkpointing = tf.gradient_checkpointing
        patches = stage_patches(config, [specs[i] for i in self.stage_indices])
        self.projectors = nn.ModuleDict(
            {
                specs[i].name: StageProjector(
                    specs[i].channels,
                    tf.width,
                    patch,
                    residual=config.stages.residual,
                    residual_reference=config.stages.residual_reference,
                    input_norm=config.stages.input_norm,
                )
                for i, patch in zip(self.stage_indices, patches)
            }
        )
        if config.correspondence.enabled and (tf.attention_radius is None or any(p[0] != 1 for p in patches)):
            raise ConfigError(
                "correspondence.enabled needs a local transformer.attention_radius and temporal token patches of 1, "
                f"got radius {tf.attention_radius} and patches {patches}"
            )
        self.latent_components = nn.ModuleDict(
            build_latent_components(config.degradation, adapter.latent_channels, include_proxy)
        )
        if config.dropout.p_max > 0:
            self.latent_components["token_dropout"] = LatentTokenDropout(config.dropout.p_max, config.dropout.mode)
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
        displacements: torch.Tensor | None = None,
        **decode_inputs: Any,
    ) -> torch.Tensor:
        """Decode raw latents into video, conditioned on reference frames when given.

        Args:
            latents: raw VAE latents ``B, C, t, h, w`` (what ``vae.decode`` takes; de-normalise diffusion latents
                first with :meth:`denormalize`).
            reference: ``B, 3, H, W`` or ``B, 3, R, H, W`` in [-1, 1] at the decoded size, or None for the plain
                backbone decode.
            window: latent frames per decoder pass (joint attention span); default ``config.window``.
            clamp: clamp the output to [-1, 1]; default (None) exactly when the backbone's own decode clamps
                (``adapter.output_clamp``: Wan yes; HunyuanVideo 1.5, LTX, CogVideoX, VideoVAE+ no).
            resize_reference: resize a reference of another size instead of raising :class:`InputError`.
            generator: RNG for training-time components (token dropout), for reproducible draws.
            displacements: where each decoded pixel's content lies in the reference (e.g. an optical flow from
                each frame to the reference), ``B, 2, T, H, W`` (all reference frames) or ``B, R, 2, T, H, W``:
                ``(dy, dx)`` in output pixels, pixel ``(y, x)`` of frame ``t`` showing the reference at
                ``(y + dy, x + dx)``. The reference neighbourhoods of the attention are centred there (needs a
                local ``transformer.attention_radius``; replaces the ``correspondence`` estimate). Default: the
                estimate when ``config.correspondence.enabled``, else the query's own position.
            decode_inputs: the backbone's own extra decode inputs (``adapter.decode_arguments``, e.g. LTX's
                ``temb``), as ``vae.decode`` takes them.

        Returns:
            Video ``B, 3, T, H, W``, nominally in [-1, 1] (exactly so when clamped), ``T`` by the frame rule.
        """
        latents, ctx, windows = self._prepare_decode(
            latents, reference, window, resize_reference, generator, decode_inputs, displacements
        )
        finite = FiniteOutput(enabled=not self.training)  # one reduction per decode; training has its own guard
        video = self.adapter.decode_windows(latents, ReferenceHooks(self), ctx, windows)
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
        displacements: torch.Tensor | None = None,
        **decode_inputs: Any,
    ) -> Iterator[torch.Tensor]:
        """:meth:`decode`, yielding each window's frames ``B, 3, t, H, W`` as soon as they exist.

        Concatenated over time the chunks equal :meth:`decode`'s output; only one window is alive at a time, so a
        consumer that writes chunks away decodes videos of any length in constant memory.

        With an upscale head, ``depth_to_space=False`` yields the head's raw ``B, 3 * s**2, t, H/s, W/s`` output
        instead (tiles must be blended there, before the shuffle); ``upscale_head.apply`` finishes it.
        """
        latents, ctx, windows = self._prepare_decode(
            latents, reference, window, resize_reference, generator, decode_inputs, displacements
        )
        finite = FiniteOutput(enabled=not self.training)  # flags stay on the device; one host check at the end
        for part in self.adapter.iter_decode_windows(latents, ReferenceHooks(self), ctx, windows):
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
        displacements: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecodeContext, list[tuple[int, int]]]:
        """Check the inputs, cast them to the weights' dtype, tokenize the reference and plan the windows."""
        self._check_alive()
        check_latents(latents, self.adapter.latent_channels)
        self.adapter.check_latents(latents)
        # Like a diffusers pipeline casting latents to vae.dtype: a bf16 model decodes fp32 latents. Under
        # autocast the weights stay fp32, so nothing changes here and autocast picks each op's precision.
        base = next(self.vae.parameters()).dtype
        latents = latents.to(next((p.dtype for _, p in self.adapter.decoder_parameters()), base))
        inputs = self.adapter.decode_inputs(latents, **(decode_inputs or {}))
        ctx = DecodeContext(generator=generator, decode_inputs=inputs)
        if reference is not None:
            size = self.output_size(latents.shape[-2:])
            reference = check_reference(reference, latents.shape[0], size, resize_reference)
            ctx.reference = reference
            ctx.reference_tokens = self.tokenizer(reference.to(self.tokenizer.proj.weight.dtype))
            ctx.stage_reference_tokens = {
                name: tokenizer(reference.to(tokenizer.proj.weight.dtype))
                for name, tokenizer in self.stage_tokenizers.items()
            }
            ctx.num_reference = reference.shape[2]
        size = self.window_size(latents, ctx.num_reference, window)
        windows = self.adapter.plan_windows(latents.shape[2], size)
        if displacements is not None or (reference is not None and self.config.correspondence.enabled):
            ctx.correspondence = self._correspondence(latents, reference, windows, displacements)
        return latents, ctx, windows

    def _correspondence(
        self,
        latents: torch.Tensor,
        reference: torch.Tensor | None,
        windows: list[tuple[int, int]],
        displacements: torch.Tensor | None,
    ) -> CorrespondenceField:
        """The decode's correspondence field: the caller's ``displacements`` or the estimate (see ``decode``)."""
        temporal = {p.patch_size[0] for p in self.projectors.values()}
        if reference is None or self.config.transformer.attention_radius is None or temporal != {1}:
            raise InputError(
                "displacements need a reference, a local transformer.attention_radius and temporal token patches "
                "of 1; pass a reference, or leave displacements out"
            )
        c = self.config.correspondence
        search = (c.search_radius, c.temperature, c.match_radius)
        size = self.output_size(latents.shape[-2:])
        return correspondence_field(
            self.adapter, latents, reference, windows, size, search, displacements, c.snap, c.still_frames
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
        check_video(video, self.adapter.frame_rule, self.adapter.spatial_factor)
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
        specs, counts = self.adapter.stages(), []
        for i in self.stage_indices:
            # The first window and a later one (a backbone decoding in its own layout may plan just one).
            planned = self.adapter.plan_windows(2 * window + 1, window)[:2]
            frames = num_reference + max(
                self.adapter.stage_frames(i, stop - start, k == 0) for k, (start, stop) in enumerate(planned)
            )
            h, w = (s * self.adapter.spatial_factor // specs[i].scale for s in latent_size)
            counts.append(self.projectors[specs[i].name].token_count(frames, h, w))
        return max(counts)

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
            video: ``B, 3, T, H, W`` in [-1, 1], ``T`` valid for the backbone.
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
            if not name.startswith(_BASE_PREFIX):
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
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(_BASE_PREFIX)}
        if self.config.train_decoder:
            state.update({_BASE_PREFIX + name: p.detach() for name, p in self.adapter.decoder_parameters()})
        elif self.upscale_head is not None and self.config.upscale.train_head:
            state.update({_BASE_PREFIX + name: p.detach() for name, p in self.upscale_head.named_parameters()})
        return state

    def load_refdecoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`refdecoder_state_dict` strictly; mismatches raise :class:`CheckpointError`."""
        expected = self.refdecoder_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [
            f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"RefDecoder weights do not match the model: {len(missing)} missing {missing[:10]}, "
                f"{len(unexpected)} unexpected {unexpected[:10]}, {len(wrong)} with wrong shapes {wrong[:10]}"
            )
        check_finite_weights(state, "RefDecoder weights")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state[key])

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``refdecoder_config.json`` and ``refdecoder.safetensors`` (no frozen base weights) atomically."""
        from safetensors.torch import save_file

        from refdecoder._files import use_default_mode

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.refdecoder_state_dict().items()}
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            save_file(tensors, Path(tmp) / WEIGHTS_NAME, metadata={"format": "pt"})
            use_default_mode(Path(tmp) / WEIGHTS_NAME)  # safetensors writes 0600; the config gets the umask's mode
            self.config.save(Path(tmp) / CONFIG_NAME)
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(Path(tmp) / name, directory / name)
        return directory

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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from refdecoder.hub import resolve_path

        directory = resolve_path(directory, revision, subfolder, what="RefDecoder weights")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(f"{directory} is not a RefDecoder folder: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = RefDecoderConfig.load(config_path)
        backbone = backbone_to_load(vae, config.backbone, backbone)
        config.backbone = config.backbone if backbone is None else None  # the adapter named here wins
        model = wrap(vae, config, backbone=backbone, include_proxy=False)
        try:
            model.load_refdecoder_state_dict(load_file(weights_path, device="cpu"))
        except (SafetensorError, OSError) as err:
            model.unwrap()
            raise CheckpointError(f"cannot read {weights_path}: {err}") from err
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
