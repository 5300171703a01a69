"""Timing and memory on CUDA (events, the caching allocator's peak) with CPU stand-ins, and device peak FLOP rates."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import LiveTensorMeter

# Dense bf16 tensor-core peak in TFLOP/s (NVIDIA datasheets: the "with sparsity" figure halved). Matched in order
# against torch.cuda.get_device_name(), case-insensitively, so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM5 (the name reads e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.05),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak from :data:`BF16_PEAK_TFLOPS`, or None for a device not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, memory, software versions and the bf16 peak of ``device`` (CPU: its name only)."""
    if device.type != "cuda":
        return {"name": "cpu", "bf16_peak_tflops": None}
    name = torch.cuda.get_device_name(device)
    return {
        "name": name,
        "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_peak_tflops": bf16_peak_tflops(name),
    }


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` (>= 1) times, then time ``repeats`` runs; report the median and the peak memory.

    CUDA: each run between two CUDA events; ``peak_gib`` is ``torch.cuda.max_memory_allocated`` over the timed
    runs (weights and inputs included) and ``above_resident_gib`` that peak less what was allocated before them.
    CPU (dry runs): ``time.perf_counter``, and the peak of live tensors one extra run creates
    (:class:`~refdecoder.profiling.LiveTensorMeter`), in ``above_resident_gib``.
    The first warm-up run's wall time is ``first_s`` (for a compiled model: tracing and code generation).
    """
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    times = [_timed(fn, device) for _ in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_gib": peak / 2**30, "above_resident_gib": (peak - resident) / 2**30}
    else:
        with LiveTensorMeter() as meter:
            fn()
        memory = {"peak_gib": None, "above_resident_gib": meter.peak / 2**30}
    return {"median_s": statistics.median(times), "runs_s": times, "first_s": first, **memory}


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a run that does not fit raises (CUDA's, plus the CPU allocator's)."""
    return (torch.cuda.OutOfMemoryError, MemoryError)


def free_cached(device: torch.device) -> None:
    """Return cached blocks to the device, so one contender's cache does not count against the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
