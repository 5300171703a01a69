"""Full (non-causal) multi-head attention with one dispatch point.

xformers' memory-efficient attention is used when xformers is installed and the tensors are on CUDA; otherwise
PyTorch's ``scaled_dot_product_attention`` (which picks flash / memory-efficient / math kernels itself). Global
attention builds no mask, so memory stays linear in the token count on the fused kernels. Restricted scopes
(per position, neighbourhoods, a locality bias) are in :mod:`refdecoder.blocks.attention_scope`.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_backend"]

logger = logging.getLogger("refdecoder")


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
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if attention_backend(q.device) == "xformers":
        # xformers wants B, N, heads, D.
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
