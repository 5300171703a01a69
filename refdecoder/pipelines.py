"""Decoding diffusion-pipeline latents through RefDecoder, with the generation's conditioning image as reference.

Two ways, which give the same frames (``tests/test_pipelines.py``):

- by hand: ``pipe(..., output_type="latent")`` returns *normalised* latents; :func:`decode_with_reference`
  de-normalises them (``z * std + mean`` with the VAE config's statistics) and decodes with the reference;
- in place: inside ``with reference_decoding(pipe, model):`` a diffusers pipeline whose VAE a registered adapter
  drives decodes through RefDecoder with the image it was called with, and returns its output as usual. Tested
  with ``WanImageToVideoPipeline`` (Wan2.1 and Wan2.2 TI2V), ``SkyReelsV2ImageToVideoPipeline``, the Qwen-Image
  edit and image-to-image pipelines, ``HunyuanVideo15ImageToVideoPipeline``, ``LTXImageToVideoPipeline`` (its
  decode timestep goes on as the adapter's ``temb``) and ``CogVideoXImageToVideoPipeline``.

Why not ``pipe.vae = model``: the pipeline reads ``pipe.vae.config``, ``.dtype``, calls ``.encode`` for the image
condition and ``.decode(z, return_dict=False)[0]``, and its CPU offload moves ``vae`` as a unit; assigning a foreign
object also rewrites the pipeline config's (library, class) entry for ``vae``. So ``pipe.vae`` stays the VAE it
was: the context manager only shadows its ``decode`` with an instance attribute, and records what the pipeline's
pixel processor (``video_processor``, else a diffusers ``VaeImageProcessor`` at ``image_processor``) made of the
conditioning image, the exact tensor the generation was conditioned on. Each pipeline call keeps its own record:
for the duration, ``pipe``'s class is shadowed by a subclass whose ``__call__`` starts and ends every call with an
empty record, so a call that returns latents or raises leaves no image for the next one. Everything is restored on
exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from refdecoder.errors import ConfigError, InputError
from refdecoder.inference.streaming import decode_video
from refdecoder.tiling import TilePlan, plan_tiles, token_alignment

__all__ = ["decode_with_reference", "reference_decoding", "reference_tensor", "pixel_processor", "vae_tiles"]


def _model_and_vae(pipe_or_vae: Any, model: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    from refdecoder.model import RefDecoder

    if isinstance(pipe_or_vae, RefDecoder):
        model, vae = model or pipe_or_vae, pipe_or_vae.vae
    else:
        vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
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
    from diffusers.image_processor import VaeImageProcessor

    for name in ("video_processor", "image_processor"):
        processor = getattr(pipe, name, None)
        if isinstance(processor, VaeImageProcessor):
            return processor
    return None


def vae_tiles(vae: nn.Module, model: nn.Module, latent_size: tuple[int, int]) -> TilePlan | None:
    """The tile plan matching a diffusers VAE's ``enable_tiling`` settings, or None when it would not tile.

    Like diffusers, a frame is tiled only when it is larger than one tile; blend ramps follow the adapter's output
    patch, as diffusers blends Wan2.2 tiles in its patch grid.
    """
    if not getattr(vae, "use_tiling", False):
        return None
    adapter = model.adapter
    if not adapter.tiling:
        raise ConfigError(
            f"vae.enable_tiling() is on, but the {adapter.name} adapter has no tiled decode that RefDecoder "
            "reproduces; call vae.disable_tiling()"
        )
    tile = (vae.tile_sample_min_height, vae.tile_sample_min_width)
    stride = (vae.tile_sample_stride_height, vae.tile_sample_stride_width)
    if latent_size[0] * adapter.spatial_factor <= tile[0] and latent_size[1] * adapter.spatial_factor <= tile[1]:
        return None
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


@contextlib.contextmanager
def reference_decoding(
    pipe: Any,
    model: nn.Module,
    image: Any | None = None,
    *,
    window: int | None = None,
    resize_reference: bool = False,
) -> Iterator[None]:
    """Make ``pipe`` decode through RefDecoder while the block runs.

    ``pipe.vae`` stays the pipeline's own VAE object; its ``decode`` is shadowed for the duration and restored on
    exit (also on errors). The reference is ``image`` when given, else the conditioning image of each pipeline
    call, as the pipeline preprocessed it (the first image a call preprocesses: for first-last-frame calls the
    first frame, for Qwen-Image edit the edit source, for image-to-image its input).

    Args:
        pipe: a diffusers pipeline with a ``vae`` wrapped by ``model`` and, unless ``image`` is given, a pixel
            processor (``video_processor`` or a ``VaeImageProcessor`` at ``image_processor``) that prepares its
            conditioning image.
        model: the RefDecoder wrapping ``pipe.vae``.
        image: a fixed reference (see :func:`reference_tensor`), or None to use each call's conditioning image.
        window: latent frames per decoder pass (default: the model's).
        resize_reference: resize a reference of another size instead of raising :class:`InputError`.

    Raises:
        InputError: ``pipe`` has no ``vae`` or no pixel processor, ``model`` does not wrap ``pipe.vae``, the
            pipeline is already inside this context, or a call decodes without a conditioning image.
    """
    if getattr(pipe, "vae", None) is None:
        raise InputError(f"{type(pipe).__name__} has no .vae to decode with; pass a diffusers pipeline with a VAE")
    model, vae = _model_and_vae(pipe, model)
    if "decode" in vars(vae):
        raise InputError("pipe.vae.decode is already replaced (nested reference_decoding on the same pipeline?)")
    processor = pixel_processor(pipe)
    if processor is None and image is None:
        raise InputError(
            f"{type(pipe).__name__} has no video_processor or image_processor (a diffusers VaeImageProcessor) that "
            "prepares a conditioning image; pass the reference as image="
        )
    seen: list[torch.Tensor] = []  # what the current call preprocessed

    def preprocess(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(type(processor).preprocess(processor, *args, **kwargs))
        return seen[-1]

    def decode(z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        # Extra inputs the pipeline hands vae.decode (LTX: the decode timestep) go on by the adapter's names.
        inputs = {**dict(zip(model.adapter.decode_arguments, args)), **kwargs}
        from diffusers.models.autoencoders.vae import DecoderOutput

        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)  # what diffusers' apply_forward_hook does for CPU offload
        if image is None and not seen:
            raise InputError("the pipeline call decoded without preprocessing a conditioning image; pass image=")
        size = model.output_size(z.shape[-2:])
        reference = reference_tensor(image, size, processor) if image is not None else seen[0]
        video = _decode(model.to(z.device), z, reference.to(z.device), window, resize_reference, inputs)
        return DecoderOutput(sample=video) if return_dict else (video,)

    with _each_call(pipe, seen.clear):
        vae.decode = decode
        if image is None:
            processor.preprocess = preprocess
        try:
            yield
        finally:
            del vae.decode
            if processor is not None and "preprocess" in vars(processor):
                del processor.preprocess


@contextlib.contextmanager
def _each_call(pipe: Any, reset: Callable[[], None]) -> Iterator[None]:
    """Run ``reset`` before and after every ``pipe(...)`` call while the block runs.

    ``pipe(...)`` looks ``__call__`` up on the class, never the instance, so the instance's class is swapped for a
    subclass with a wrapping ``__call__`` (same name and module) and swapped back on exit.
    """
    base = type(pipe)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        reset()
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            reset()

    scoped = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
    scoped.__qualname__ = base.__qualname__
    object.__setattr__(pipe, "__class__", scoped)
    try:
        yield
    finally:
        object.__setattr__(pipe, "__class__", base)
