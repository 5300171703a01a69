"""Decoding diffusion-pipeline latents through RefDecoder, with the generation's conditioning image as reference.

Two ways, which give the same frames (``tests/test_pipelines.py``):

- by hand: ``pipe(..., output_type="latent")`` returns *normalised* latents; :func:`decode_with_reference`
  de-normalises them (``z * std + mean`` with the VAE config's statistics) and decodes with the reference;
- in place: inside ``with reference_decoding(pipe, model):`` a diffusers ``WanImageToVideoPipeline`` decodes
  through RefDecoder with the image it was called with, and returns frames as usual.

Why not ``pipe.vae = model``: the pipeline reads ``pipe.vae.config``, ``.dtype``, calls ``.encode`` for the image
condition and ``.decode(z, return_dict=False)[0]``, and its CPU offload moves ``vae`` as a unit; assigning a foreign
object also rewrites the pipeline config's (library, class) entry for ``vae``. So ``pipe.vae`` stays the
``AutoencoderKLWan`` it was: the context manager only shadows its ``decode`` with an instance attribute (the class
is untouched) and records what the pipeline's ``video_processor.preprocess`` made of the conditioning image (the
exact tensor the generation was conditioned on); both are removed on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from refdecoder.errors import InputError
from refdecoder.inference.streaming import decode_video
from refdecoder.tiling import TilePlan, plan_tiles, token_alignment

__all__ = ["decode_with_reference", "reference_decoding", "reference_tensor", "vae_tiles"]


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


def vae_tiles(vae: nn.Module, model: nn.Module, latent_size: tuple[int, int]) -> TilePlan | None:
    """The tile plan matching a diffusers VAE's ``enable_tiling`` settings, or None when it would not tile.

    Like diffusers, a frame is tiled only when it is larger than one tile.
    """
    if not getattr(vae, "use_tiling", False):
        return None
    factor = model.adapter.spatial_factor
    tile = (vae.tile_sample_min_height, vae.tile_sample_min_width)
    if latent_size[0] * factor <= tile[0] and latent_size[1] * factor <= tile[1]:
        return None
    overlap = (tile[0] - vae.tile_sample_stride_height, tile[1] - vae.tile_sample_stride_width)
    return plan_tiles(latent_size, factor, tile, overlap, token_alignment(model))


def _decode(
    model: nn.Module, latents: torch.Tensor, reference: torch.Tensor, window: int | None, resize: bool
) -> torch.Tensor:
    tiles = vae_tiles(model.vae, model, tuple(latents.shape[-2:]))
    if tiles is None:
        return model.decode(latents, reference=reference, window=window, resize_reference=resize)
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
        latents: ``B, C, t, h, w``; normalised (what ``pipe(..., output_type="latent")`` returns) when
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
    size = tuple(s * model.adapter.spatial_factor for s in latents.shape[-2:])
    reference = reference_tensor(image, size, getattr(pipe_or_vae, "video_processor", None)).to(param.device)
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
    """Make ``pipe`` (e.g. a ``WanImageToVideoPipeline``) decode through RefDecoder while the block runs.

    ``pipe.vae`` stays the pipeline's own VAE object; its ``decode`` is shadowed for the duration and restored on
    exit (also on errors). The reference is ``image`` when given, else the conditioning image of each pipeline
    call, as the pipeline preprocessed it (for first-last-frame calls, the first image).

    Args:
        pipe: a diffusers pipeline whose ``vae`` is wrapped by ``model`` and whose ``video_processor`` prepares the
            conditioning image.
        model: the RefDecoder wrapping ``pipe.vae``.
        image: a fixed reference (see :func:`reference_tensor`), or None to use each call's conditioning image.
        window: latent frames per decoder pass (default: the model's).
        resize_reference: resize a reference of another size instead of raising :class:`InputError`.

    Raises:
        InputError: ``model`` does not wrap ``pipe.vae``, the pipeline is already inside this context, or a decode
            happens without a conditioning image.
    """
    model, vae = _model_and_vae(pipe, model)
    if "decode" in vars(vae):
        raise InputError("pipe.vae.decode is already replaced (nested reference_decoding on the same pipeline?)")
    processor, seen = pipe.video_processor, []

    def preprocess(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(type(processor).preprocess(processor, *args, **kwargs))
        return seen[-1]

    def decode(z: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)  # what diffusers' apply_forward_hook does for CPU offload
        size = tuple(s * model.adapter.spatial_factor for s in z.shape[-2:])
        if image is None and not seen:
            raise InputError("the pipeline decoded without preprocessing a conditioning image; pass image=")
        reference = reference_tensor(image, size, processor) if image is not None else seen[0]
        seen.clear()
        video = _decode(model.to(z.device), z, reference.to(z.device), window, resize_reference)
        return DecoderOutput(sample=video) if return_dict else (video,)

    vae.decode = decode
    if image is None:
        processor.preprocess = preprocess
    try:
        yield
    finally:
        del vae.decode
        if "preprocess" in vars(processor):
            del processor.preprocess
