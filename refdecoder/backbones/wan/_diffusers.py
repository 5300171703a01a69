"""What the Wan-family adapters need from diffusers, checked when a VAE is wrapped.

The adapters drive diffusers' own decoder modules with diffusers' private cache protocol: the per-conv cache list
sized by ``vae._cached_conv_counts``, the ``feat_cache`` / ``feat_idx`` arguments of every cached module, the
``cache_x`` argument of the causal convs and the ``first_chunk`` argument of Wan's up-blocks. None of that is public
API, so :func:`check_internals` looks for each piece on the VAE being wrapped and refuses, naming the diffusers
range this library is tested with, instead of failing deep inside a decode. What every diffusers-based adapter
shares (is it that class, do config fields hold) is in :mod:`refdecoder.backbones._diffusers`.
"""

from __future__ import annotations

import inspect

from torch import nn

from refdecoder.errors import BackboneError

__all__ = ["SUPPORTED_DIFFUSERS", "check_internals"]

# Keep in step with the diffusers requirement in pyproject.toml (a test compares them).
SUPPORTED_DIFFUSERS = ">=0.35,<0.43"


def check_internals(vae: nn.Module, adapter: str, first_chunk: bool) -> None:
    """Raise :class:`BackboneError` unless ``vae``'s decoder offers the private protocol the adapter drives."""
    missing = _missing_internals(vae, first_chunk)
    if missing:
        import diffusers

        raise BackboneError(
            f"the installed diffusers {diffusers.__version__} lacks what the {adapter} adapter drives "
            f"({', '.join(missing)}); refdecoder supports diffusers{SUPPORTED_DIFFUSERS}: "
            f"pip install 'diffusers{SUPPORTED_DIFFUSERS}'"
        )


def _missing_internals(vae: nn.Module, first_chunk: bool) -> list[str]:
    counts = getattr(vae, "_cached_conv_counts", None)
    missing = [] if isinstance(counts, dict) and {"decoder", "encoder"} <= set(counts) else ["_cached_conv_counts"]
    decoder, cached = vae.decoder, ("feat_cache", "feat_idx")
    modules = {"decoder": (decoder, cached), "decoder.mid_block": (decoder.mid_block, cached)}
    up_args = cached + (("first_chunk",) if first_chunk else ())
    modules.update({f"decoder.up_blocks.{i}": (block, up_args) for i, block in enumerate(decoder.up_blocks)})
    modules["decoder.conv_in"] = (decoder.conv_in, ("cache_x",))
    for path, (module, names) in modules.items():
        params = inspect.signature(module.forward).parameters
        missing += [f"{path}.forward({name}=)" for name in names if name not in params]
    return missing
