"""The deterministic fill rule of the official-checkpoint fixtures (``shared/fixtures/official/README.md`` §2).

Regenerates the synthetic weights of a fixture from its manifest so that no weights need to be stored: the
seed of each tensor is the CRC32 of its full checkpoint key, and the value range depends on the key's suffix.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["fill_tensor", "fill_state_dict", "load_manifest"]


def fill_tensor(name: str, shape: Iterable[int], gain: float = 1.0) -> torch.Tensor:
    """Return the float32 tensor the fill rule gives checkpoint key ``name``."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    if name.endswith("bias"):
        value = 0.02 * u
    elif name.endswith("gamma") or (len(shape) <= 1 and name.endswith(("weight", "scale"))):
        value = 1 + 0.1 * u
    elif len(shape) >= 2 and name.endswith("weight"):
        value = u * gain / math.sqrt(math.prod(shape[1:]))
    else:
        value = 0.1 * u
    return value.to(torch.float32)


def load_manifest(path: Path) -> list[dict]:
    """Tensor entries (``name``, ``shape``, ...) of a fixture manifest JSON."""
    return json.loads(Path(path).read_text())["tensors"]


def fill_state_dict(entries: list[dict], prefix: str = "", gain: float = 1.0) -> dict[str, torch.Tensor]:
    """Filled tensors for every manifest entry whose name starts with ``prefix`` (keys keep the full name)."""
    return {e["name"]: fill_tensor(e["name"], e["shape"], gain) for e in entries if e["name"].startswith(prefix)}
