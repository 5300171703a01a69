"""Full (non-causal) multi-head attention with one dispatch point.

xformers' memory-efficient attention is used when xformers is installed and the tensors are on CUDA; otherwise
PyTorch's ``scaled_dot_product_attention`` (which picks flash / memory-efficient / math kernels itself). Global
attention builds no mask, so memory stays linear in the token count on the fused kernels. Restricted scopes
(per position, neighbourhoods, a locality bias) are in :mod:`refdecoder.blocks.attention_scope`.

The kernel that runs is logged once per device, dtype and head size (:func:`note_kernel`); on CUDA the math
kernel, which materialises the ``N x N`` logits, is logged as a warning.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

__all__ = ["attention", "attention_backend", "note_kernel", "kernels_used", "sdpa_kernel_name"]

logger = logging.getLogger("refdecoder")

# Kernels logged so far: (kernel, device type, dtype, head_dim) -> the logged line.
_KERNELS: dict[tuple[str, str, torch.dtype, int], str] = {}
# SDPA inputs already asked about: (device type, dtype, head_dim, mask dtype or None).
_SDPA_SEEN: set[tuple] = set()


@functools.cache
def _xformers_ops() -> ModuleType | None:
    """``xformers.ops`` or None; imported once, because a failed import is slow to repeat on every call."""
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:
        return None
    except Exception as err:  # a broken xformers build raises anything at import; fall back, but say why once
        logger.warning("xformers is installed but failed to import (%s); using PyTorch SDPA", err)
        return None


def attention_backend(device: torch.device | str) -> str:
    """``"xformers"`` when xformers is importable and ``device`` is CUDA, else ``"sdpa"``."""
    if torch.device(device).type == "cuda" and _xformers_ops() is not None:
        return "xformers"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` over all tokens, or over those ``mask`` allows (non-causal).

    Args:
        q, k, v: ``B, heads, N, head_dim`` (same dtype and device; k and v may have another N than q).
        mask: optional, broadcastable to ``B, heads, N_q, N_k``: bool (True = attend; every query must allow at
            least one key) or additive float logits in q's dtype (``-inf`` = never attend).

    Returns:
        ``B, heads, N_q, head_dim`` in q's dtype.
    """
    if mask is not None or attention_backend(q.device) == "sdpa":
        _note_sdpa(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    note_kernel("xformers:memory_efficient_attention", q)
    # xformers wants B, N, heads, D.
    out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def sdpa_kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """The kernel ``scaled_dot_product_attention`` dispatches these inputs to (``flash_attention``, ``math``, ...).

    Asks PyTorch's own dispatcher (``torch._fused_sdp_choice``); ``"unknown"`` when this PyTorch lacks it.
    """
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False)
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    return SDPBackend(choice).name.lower()


def _note_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if torch.compiler.is_compiling():
        return
    key = (q.device.type, q.dtype, q.shape[-1], None if mask is None else mask.dtype)
    if key not in _SDPA_SEEN:
        _SDPA_SEEN.add(key)
        note_kernel(f"sdpa:{sdpa_kernel_name(q, k, v, mask)}" + ("" if mask is None else " with mask"), q)


def note_kernel(kernel: str, q: torch.Tensor) -> None:
    """Log ``kernel`` the first time it runs on q's device type, dtype and head size; silent while compiling.

    A compiled graph runs the kernel its trace dispatched to, so the eager call before it (or a first decode
    without compiling) is where the choice is seen. The math SDPA kernel on CUDA is logged as a warning: it
    materialises the logits, which is what the fused kernels and flex_attention exist to avoid.
    """
    if torch.compiler.is_compiling():
        return
    key = (kernel, q.device.type, q.dtype, int(q.shape[-1]))
    if key in _KERNELS:
        return
    _KERNELS[key] = f"{kernel} ({key[1]}, {str(q.dtype).removeprefix('torch.')}, head_dim {key[3]})"
    level = logging.WARNING if kernel.startswith("sdpa:math") and key[1] == "cuda" else logging.INFO
    logger.log(level, "attention kernel: %s", _KERNELS[key])


def kernels_used() -> list[str]:
    """Every attention kernel logged so far, as ``"kernel (device, dtype, head_dim N)"`` lines, in first-use order."""
    return list(_KERNELS.values())
