"""Decoding diffusion-pipeline latents through RefDecoder, with the generation's conditioning image as reference.

Two ways, which give the same frames (``tests/test_pipelines.py``):

- by hand: ``pipe(..., output_type="latent")`` returns *normalised* latents; :func:`decode_with_reference`
  de-normalises them (``z * std + mean`` with the VAE config's statistics) and decodes with the reference;
- in place: inside ``with reference_decoding(pipe, model):`` a diffusers pipeline whose VAE a registered adapter
  drives decodes through RefDecoder with the image it was called with, and returns its output as usual. Tested
  with ``WanImageToVideoPipeline`` (Wan2.1 and Wan2.2 TI2V), ``SkyReelsV2ImageToVideoPipeline``, the Qwen-Image
  edit and image-to-image pipelines, ``HunyuanVideo15ImageToVideoPipeline``, ``HunyuanVideoImageToVideoPipeline``,
  ``HunyuanSkyreelsImageToVideoPipeline``, ``HunyuanVideoFramepackPipeline`` (several decodes per call),
  ``Kandinsky5I2VPipeline``, ``StableVideoDiffusionPipeline`` (frames folded into the batch, one video per chunk),
  ``LTXImageToVideoPipeline`` (its decode timestep goes on as the adapter's ``temb``),
  ``CogVideoXImageToVideoPipeline``, ``QwenImage21Pipeline`` (RGBA images and references) and the MiniMax-H3
  modular pipeline's ``MiniMaxH3VideoDecodeStep`` (with a fixed ``image=``; the stand-in hands the step the VAE's
  own ImageNet-normalised pixels, ``adapter.to_backbone_pixels``).

Why not ``pipe.vae = model``: the pipeline reads ``pipe.vae.config``, ``.dtype``, calls ``.encode`` for the image
condition and ``.decode(z, return_dict=False)[0]``. So for the block ``pipe.vae`` is a :class:`ReferenceDecodingVAE`:
a module that answers every attribute with the VAE's and decodes through RefDecoder. The reference is what the
pipeline's pixel processor (``video_processor``, else a diffusers ``VaeImageProcessor`` at ``image_processor``) made
of the conditioning image, the exact tensor the generation was conditioned on; the processor is stood in for by a
recorder for the block. Each generation keeps its own record, told apart by the VAE encode that follows the
preprocessing (see :class:`_ConditioningRecord`). Nothing is patched on the pipeline's class or on the VAE;
everything is put back on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import nn

from refdecoder.errors import ConfigError, InputError
from refdecoder.inference.streaming import decode_video
from refdecoder.tiling import TilePlan, plan_tiles, token_alignment

__all__ = [
    "ReferenceDecodingVAE",
    "decode_with_reference",
    "pixel_processor",
    "reference_decoding",
    "reference_tensor",
    "vae_tiles",
]


def _model_and_vae(pipe_or_vae: Any, model: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    from refdecoder.model import RefDecoder

    if isinstance(pipe_or_vae, RefDecoder):
        model, vae = model or pipe_or_vae, pipe_or_vae.vae
    else:
        vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
        vae = vae.vae if isinstance(vae, ReferenceDecodingVAE) else vae
    if not isinstance(model, RefDecoder):
        raise InputError(
            "decoding with a reference needs the RefDecoder wrapping this VAE: pass model=refdecoder.load(vae, dir) "
            f"(got model={type(model).__name__})"
        )
    if model.vae is not vae:
        raise InputError("model wraps a different VAE object than the one given; wrap pipe.vae itself")
    return model, vae


def reference_tensor(image: Any, size: tuple[int, int], processor: Any | None = None) -> torch.Tensor:
    """The conditioning image as a reference tensor.

    Args:
        image: a tensor ``3, H, W`` / ``B, 3, H, W`` / ``B, 3, R, H, W`` in [-1, 1] (used as is), or a PIL image,
            numpy array or list of them, which go through the pipeline's own preprocessing (``processor``, default
            a diffusers ``VideoProcessor``) to ``size`` exactly as the pipeline conditions on them.
        size: (H, W) of the decoded video.
        processor: the pipeline's ``video_processor``.

    Returns:
        ``B, 3, H, W`` (or ``B, 3, R, H, W``) in [-1, 1].
    """
    if isinstance(image, torch.Tensor):
        return image[None] if image.ndim == 3 else image
    if processor is None:
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor()
    return processor.preprocess(image, height=size[0], width=size[1])


def pixel_processor(pipe: Any) -> Any | None:
    """The pipeline's pixel pre-processor (``video_processor``, else a ``VaeImageProcessor`` at ``image_processor``).

    Wan pipelines keep a CLIP processor at ``image_processor`` (for image embeddings), so that one is skipped.
    """
    name = _pixel_processor_name(pipe)
    processor = getattr(pipe, name) if name else None
    return processor.processor if isinstance(processor, _RecordingProcessor) else processor


def _pixel_processor_name(pipe: Any) -> str | None:
    from diffusers.image_processor import VaeImageProcessor

    for name in ("video_processor", "image_processor"):
        processor = getattr(pipe, name, None)
        if isinstance(getattr(processor, "processor", processor), VaeImageProcessor):
            return name
    return None


def vae_tiles(vae: nn.Module, model: nn.Module, latent_size: tuple[int, int]) -> TilePlan | None:
    """The tile plan matching a diffusers VAE's ``enable_tiling`` settings, or None when it would not tile.

    Like diffusers, a frame is tiled only when it is larger than one tile; blend ramps follow the adapter's output
    patch, as diffusers blends Wan2.2 tiles in its patch grid.
    """
    if not getattr(vae, "use_tiling", False):
        return None
    adapter = model.adapter
    tile = (vae.tile_sample_min_height, vae.tile_sample_min_width)
    if latent_size[0] * adapter.spatial_factor <= tile[0] and latent_size[1] * adapter.spatial_factor <= tile[1]:
        return None  # one tile: diffusers decodes it whole (MiniMax-H3 ships with tiling on)
    if not adapter.tiling:
        raise ConfigError(
            f"vae.enable_tiling() is on, but the {adapter.name} adapter has no tiled decode that RefDecoder "
            "reproduces; call vae.disable_tiling()"
        )
    stride = (vae.tile_sample_stride_height, vae.tile_sample_stride_width)
    overlap = (tile[0] - stride[0], tile[1] - stride[1])
    try:
        return plan_tiles(
            latent_size, adapter.spatial_factor, tile, overlap, token_alignment(model), adapter.output_patch
        )
    except ConfigError as err:
        raise ConfigError(
            f"vae.enable_tiling(tile_sample_min_height={tile[0]}, tile_sample_min_width={tile[1]}, "
            f"tile_sample_stride_height={stride[0]}, tile_sample_stride_width={stride[1]}) cannot tile this "
            f"RefDecoder: {err}"
        ) from err


def _decode(
    model: nn.Module,
    latents: torch.Tensor,
    reference: torch.Tensor,
    window: int | None,
    resize: bool,
    inputs: dict[str, Any] | None = None,
) -> torch.Tensor:
    tiles = vae_tiles(model.vae, model, tuple(latents.shape[-2:]))
    if tiles is None:
        return model.decode(latents, reference=reference, window=window, resize_reference=resize, **(inputs or {}))
    if inputs:
        raise ConfigError(f"tiled decoding takes no extra decode inputs ({sorted(inputs)}); vae.disable_tiling()")
    return decode_video(model, latents, reference=reference, window=window, resize_reference=resize, tiles=tiles)


@torch.no_grad()
def decode_with_reference(
    pipe_or_vae: Any,
    latents: torch.Tensor,
    image: Any,
    normalized: bool = True,
    *,
    model: nn.Module | None = None,
    window: int | None = None,
    resize_reference: bool = False,
) -> torch.Tensor:
    """Decode diffusion latents with RefDecoder, using the generation's conditioning image as reference.

    Args:
        pipe_or_vae: a RefDecoder, or a diffusers pipeline / VAE together with ``model``.
        latents: ``B, C, t, h, w``; normalised (what ``pipe(..., output_type="latent")`` returns for video
            pipelines; Qwen-Image pipelines return packed latents, unpack them with ``pipe._unpack_latents``) when
            ``normalized``, else raw VAE latents.
        image: the conditioning image (see :func:`reference_tensor`).
        normalized: de-normalise first (``z * std + mean`` with the VAE config's statistics).
        model: the RefDecoder wrapping the pipeline's VAE (needed unless ``pipe_or_vae`` is one).
        window: latent frames per decoder pass (default: the model's).
        resize_reference: resize a reference tensor of another size instead of raising :class:`InputError`.

    Returns:
        Video ``B, 3, T, H, W`` in [-1, 1] (``T = 1 + 4(t - 1)`` for Wan). The VAE's ``enable_tiling`` settings
        are honoured (tiles with their reference crops).
    """
    model, _ = _model_and_vae(pipe_or_vae, model)
    param = next(model.vae.parameters())
    latents = latents.to(param.device, param.dtype)
    raw = model.denormalize(latents) if normalized else latents
    size = model.output_size(latents.shape[-2:])
    reference = reference_tensor(image, size, pixel_processor(pipe_or_vae)).to(param.device)
    return _decode(model, raw, reference, window, resize_reference)


class _ConditioningRecord:
    """The conditioning images of the current generation, in the order the pipeline preprocessed them.

    Calls are told apart by the VAE: every covered pipeline preprocesses its conditioning image, then encodes it
    with ``pipe.vae.encode`` before denoising. An encode closes the record and drops the images preprocessed before
    the one it encodes (those of a call that raised before encoding); the next preprocess (the next call's) starts
    a new record, and a decode takes the record and empties it. So a call that returns latents or raises leaves
    nothing the next call could decode with. A call that decodes several times (FramePack's sections) decodes them
    all with the image its first decode took, until the call ends (``pipe.maybe_free_model_hooks()``, which
    diffusers pipelines call last) or the next call preprocesses.
    """

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.encoded = False
        self.decoding: torch.Tensor | None = None  # the image this call's earlier decodes took

    def preprocessed(self, image: torch.Tensor) -> None:
        if self.encoded:
            self.images, self.encoded = [], False
        self.images.append(image)
        self.decoding = None

    def call_ended(self) -> None:
        self.decoding = None

    def encoding(self, pixels: torch.Tensor) -> None:
        """The pipeline encodes ``pixels`` (``B, 3, [T,] H, W``; the conditioning image is frame 0)."""
        if not self.encoded:
            first = pixels[:, :, 0] if pixels.ndim == 5 else pixels
            encoded = [i for i, image in enumerate(self.images) if _holds(image, first)]
            if encoded:
                del self.images[: encoded[-1]]
        self.encoded = True

    def take_first(self) -> torch.Tensor | None:
        """The call's first image (a first-last-frame call: its first frame), emptying the record."""
        if not self.images:
            return self.decoding
        self.decoding = self.images[0]
        self.images, self.encoded = [], False
        return self.decoding


def _holds(image: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``rows`` (``b, 3, H, W``) are rows of the preprocessed ``image`` as the pipeline cast them."""
    image = image[:, :, 0] if image.ndim == 5 else image
    if image.shape[1:] != rows.shape[1:]:
        return False
    image = image.to(rows.device, rows.dtype)
    return all(any(torch.equal(row, candidate) for candidate in image) for row in rows)


class _RecordingProcessor:
    """Stands in the pipeline's pixel processor: every attribute is the processor's, ``preprocess`` is recorded."""

    def __init__(self, processor: Any, record: _ConditioningRecord) -> None:
        self.processor = processor
        self._record = record

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "processor" not in self.__dict__:
            raise AttributeError(name)  # dunder lookups (copy, pickle) and a half-built object
        return getattr(self.__dict__["processor"], name)

    def preprocess(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        image = self.processor.preprocess(*args, **kwargs)
        self._record.preprocessed(image)
        return image


class ReferenceDecodingVAE(nn.Module):
    """Stands in ``pipe.vae``'s place inside :func:`reference_decoding`.

    Every attribute the pipeline reads (``config``, ``dtype``, ``enable_tiling``, ...) is the wrapped VAE's, which
    is a registered child, so ``pipe.to(device)`` moves it. ``encode`` is the VAE's (and marks the call's
    conditioning as encoded); ``decode`` decodes through the RefDecoder with the call's conditioning image (or the
    fixed ``image``) and answers like the VAE's (``DecoderOutput``, or a tuple with ``return_dict=False``).
    """

    def __init__(
        self,
        model: nn.Module,
        record: _ConditioningRecord,
        image: Any | None,
        processor: Any | None,
        decode_options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.vae = model.vae
        self.training = model.vae.training
        # Plain attributes, not submodules: the RefDecoder is moved to the latents' device when it decodes.
        object.__setattr__(self, "_model", model)
        self._record, self._image, self._processor, self._options = record, image, processor, decode_options

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "vae" not in self.__dict__.get("_modules", {}):
                raise  # dunder lookups (copy, pickle) and a half-built object answer for themselves
            return getattr(self._modules["vae"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.vae(*args, **kwargs)

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._record.encoding(x)
        return self.vae.encode(x, *args, **kwargs)

    def decode(self, z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        model = self._model
        folded = z.ndim == 4  # frames folded into the batch (StableVideoDiffusionPipeline's decode_chunk_size chunks)
        frames = kwargs.pop("num_frames", args[0] if folded and args else len(z)) if folded else None
        args = args[1:] if folded else args
        # Extra inputs the pipeline hands vae.decode (LTX: the decode timestep) go on by the adapter's names.
        inputs = {**dict(zip(model.adapter.decode_arguments, args)), **kwargs}
        first = self._record.take_first()
        if self._image is not None:
            reference = reference_tensor(self._image, model.output_size(z.shape[-2:]), self._processor)
        elif first is None:
            raise InputError("the pipeline call decoded without preprocessing a conditioning image; pass image=")
        else:
            reference = first
        if folded:
            return self._decode_folded(z, frames, reference, inputs, return_dict)
        video = _decode(model.to(z.device), z, reference.to(z.device), inputs=inputs, **self._options)
        video = model.adapter.to_backbone_pixels(video)  # what the pipeline expects of vae.decode
        return DecoderOutput(sample=video) if return_dict else (video,)

    def _decode_folded(
        self, z: torch.Tensor, frames: int, reference: torch.Tensor, inputs: dict[str, Any], return_dict: bool
    ) -> Any:
        """``vae.decode(z, num_frames)`` of ``(B*F), C, h, w`` latents: each chunk one video of ``F`` frames, as
        diffusers' ``AutoencoderKLTemporalDecoder`` decodes it; the window is the chunk, whatever the block's."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        if len(z) % frames or reference.shape[0] not in (1, len(z) // frames):
            raise InputError(
                f"vae.decode got {len(z)} folded latent frames with num_frames={frames} and a reference of batch "
                f"{reference.shape[0]}: decode one video per chunk (batch 1, or decode_chunk_size dividing num_frames)"
            )
        options = {**self._options, "window": frames}
        latents = rearrange(z, "(b t) c h w -> b c t h w", t=frames)
        video = _decode(self._model.to(z.device), latents, reference.to(z.device), inputs=inputs, **options)
        video = rearrange(video, "b c t h w -> (b t) c h w")
        return DecoderOutput(sample=video) if return_dict else (video,)


@contextlib.contextmanager
def reference_decoding(
    pipe: Any,
    model: nn.Module,
    image: Any | None = None,
    *,
    window: int | None = None,
    resize_reference: bool = False,
) -> Iterator[ReferenceDecodingVAE]:
    """Make ``pipe`` decode through RefDecoder while the block runs.

    For the block ``pipe.vae`` is a :class:`ReferenceDecodingVAE` around the pipeline's VAE, and the pixel
    processor records what it preprocesses; both are put back on exit (also on errors), with the pipeline's config
    entry for ``vae``. The reference is ``image`` when given, else the conditioning image of each pipeline call, as
    the pipeline preprocessed it (the first image a call preprocesses: for first-last-frame calls the first frame,
    for Qwen-Image edit the edit source, for image-to-image its input).

    Args:
        pipe: a diffusers pipeline with a ``vae`` wrapped by ``model`` and, unless ``image`` is given, a pixel
            processor (``video_processor`` or a ``VaeImageProcessor`` at ``image_processor``) that prepares its
            conditioning image, which the pipeline then encodes with ``pipe.vae``.
        model: the RefDecoder wrapping ``pipe.vae``.
        image: a fixed reference (see :func:`reference_tensor`), or None to use each call's conditioning image.
        window: latent frames per decoder pass (default: the model's).
        resize_reference: resize a reference of another size instead of raising :class:`InputError`.

    Yields:
        The stand-in now at ``pipe.vae``.

    Raises:
        InputError: ``pipe`` has no ``vae`` or no pixel processor, ``model`` does not wrap ``pipe.vae``, the
            pipeline is already inside this context, a call decodes without a conditioning image, or the pipeline
            has model CPU offload on.
    """
    if getattr(pipe, "vae", None) is None:
        raise InputError(f"{type(pipe).__name__} has no .vae to decode with; pass a diffusers pipeline with a VAE")
    if isinstance(pipe.vae, ReferenceDecodingVAE):
        raise InputError("pipe.vae is already replaced by reference_decoding (nested on the same pipeline?)")
    if getattr(pipe, "_all_hooks", None):  # diffusers' record of enable_model_cpu_offload()
        raise InputError(
            "reference_decoding does not combine with enable_model_cpu_offload(); call pipe.remove_all_hooks() and "
            "pipe.to(device), or decode pipe(..., output_type='latent') with decode_with_reference"
        )
    model, vae = _model_and_vae(pipe, model)
    processor_name = _pixel_processor_name(pipe)
    if processor_name is None and image is None:
        raise InputError(
            f"{type(pipe).__name__} has no video_processor or image_processor (a diffusers VaeImageProcessor) that "
            "prepares a conditioning image; pass the reference as image="
        )
    processor = getattr(pipe, processor_name) if processor_name else None
    record = _ConditioningRecord()
    options = {"window": window, "resize": resize_reference}
    stand_in = ReferenceDecodingVAE(model, record, image, processor, options)
    config_entry = pipe.config["vae"]
    pipe.vae = stand_in  # the pipeline's own __setattr__, which also records the stand-in's class in its config
    if image is None:
        setattr(pipe, processor_name, _RecordingProcessor(processor, record))
    # diffusers pipelines call maybe_free_model_hooks last (modular pipelines have none): an instance attribute,
    # removed on exit, that ends the call's record.
    free_hooks = getattr(pipe, "maybe_free_model_hooks", None)

    def end_of_call() -> None:
        record.call_ended()
        free_hooks()

    if free_hooks is not None:
        pipe.maybe_free_model_hooks = end_of_call
    try:
        yield stand_in
    finally:
        if free_hooks is not None:
            del pipe.maybe_free_model_hooks
        pipe.vae = vae
        pipe.register_to_config(vae=config_entry)
        if image is None:
            setattr(pipe, processor_name, processor)
