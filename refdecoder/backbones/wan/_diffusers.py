"""What the Wan-family adapters need from diffusers, checked when a VAE is wrapped.

The adapters drive diffusers' own decoder modules with diffusers' private cache protocol: the per-conv cache list
sized by ``vae._cached_conv_counts``, the ``feat_cache`` / ``feat_idx`` arguments of every cached module, the
``cache_x`` argument of the causal convs and the ``first_chunk`` argument of Wan's up-blocks. None of that is public
API, so :func:`check_internals` looks for each piece on the VAE being wrapped and refuses, naming the diffusers
range this library is tested with, instead of failing deep inside a decode.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from refdecoder.errors import BackboneError

__all__ = ["SUPPORTED_DIFFUSERS", "class_reason", "config_reasons", "check_internals"]

# Keep in step with the diffusers requirement in pyproject.toml (a test compares them).
SUPPORTED_DIFFUSERS = ">=0.35,<0.43"


def class_reason(vae: nn.Module, class_name: str, explain_cache: bool = True) -> str | None:
    """None when ``vae`` is an instance of ``diffusers.<class_name>``, else why not (with ``explain_cache``, also
    that its decoder lacks the Wan family's per-conv cache, when it does)."""
    try:
        import diffusers
    except ImportError:
        return f"it drives diffusers {class_name}, and diffusers is not installed (pip install 'diffusers')"
    if isinstance(vae, getattr(diffusers, class_name)):
        return None
    reason = f"it drives diffusers {class_name} only, not {type(vae).__name__}"
    decoder = getattr(vae, "decoder", None)
    if (
        explain_cache
        and isinstance(decoder, nn.Module)
        and "feat_cache" not in inspect.signature(decoder.forward).parameters
    ):
        reason += ", whose decoder has no per-conv causal cache (feat_cache) to decode window by window with"
    return reason


def config_reasons(vae: nn.Module, expected: dict[str, Any], adapter: str) -> list[str]:
    """One ``field=value (adapter needs X)`` entry per config field of ``vae`` that differs from ``expected``."""
    return [
        f"{key}={vae.config.get(key)!r} ({adapter} needs {value!r})"
        for key, value in expected.items()
        if vae.config.get(key) != value
    ]


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
