"""Shared test fixtures: deterministic seeds, one intra-op thread for tiny models, the official fixture folder, GPU
skipping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# oneDNN's AMX bf16 convolutions in torch 2.14.1 give wrong results for some shapes (measured on an Intel Xeon with
# AMX: 16 input channels, 4x4 kernel at stride 4, relative error 1.2 against fp32; a correct kernel gives 0.003), so
# every bf16 test failed there for a reason outside this project. The tests run on oneDNN's AVX-512 bf16 kernels
# instead (a no-op on CPUs without AMX); tests/test_precision.py checks that the convolution is then correct. Read
# when oneDNN creates its first primitive, so it must be set before any test runs; a value set by the caller wins.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import torch  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# CI clones the project with shared/ beside it; REFDECODER_SHARED overrides for other layouts.
SHARED_DIR = Path(os.environ.get("REFDECODER_SHARED", PROJECT_ROOT.parent / "shared"))
OFFICIAL_FIXTURES = SHARED_DIR / "fixtures" / "official"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests: a second thread costs more than it brings there (badly
    so on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """Folder of the paper-implementation fixtures; skips (visibly) when it is absent."""
    if not OFFICIAL_FIXTURES.is_dir():
        pytest.skip(f"official fixtures not found at {OFFICIAL_FIXTURES} (set REFDECODER_SHARED)")
    return OFFICIAL_FIXTURES


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch):
    """``refdecoder.register_backbone`` on a copy of the registry, restored after the test."""
    import refdecoder
    from refdecoder.backbones import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return refdecoder.register_backbone
