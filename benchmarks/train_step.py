"""Cost of a RefDecoder training step vs a plain decoder fine-tuning step on the same VAE, batch and clip.

    python benchmarks/train_step.py [--vae wan2.1|tiny] [--size 64] [--frames 9] [--batch 1] [--repeats 3]
                                    [--threads N] [--skip-paper-size] [--out results.json]

Both steps: frozen encoder (no gradients), decoder trained, L1 loss, backward, AdamW step. The plain step decodes
through the same windowed loop with identity hooks (the backbone's own decode, unclamped), so the ratio isolates
what RefDecoder adds: reference tokenizer, shared transformer, stage projectors (trained, at ``--lr``) and token
dropout. Presets ``tiny`` and ``small``.

1. CPU wall time: median over ``--repeats`` steps after a warm-up step, the variants interleaved so that load on a
   shared machine hits them alike; also the time of the AdamW step (+ zeroing gradients), which grows with the
   number of trained parameters but not with the clip size, and the ratio without it.
2. Memory: weights + AdamW states + the peak of live tensors during one step (activations, gradients, temporaries).
   At this small clip size the parameter-bound terms dominate, so see 3. for memory at a real training size.
3. At the paper's clip size, 17 x 480 x 832, on the meta device (nothing runs): FLOPs of one training step
   (encoder forward, decoder forward + backward; ``FlopCounterMode``, optimizer not counted) and memory (weights and
   AdamW states + peak live activations and gradients), with math attention (CPU) and with a stand-in for GPU
   memory-efficient attention.

Writes ``benchmarks/results/train_step.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import LiveTensorMeter, write_json  # noqa: E402
from refdecoder.backbones.wan import WanAdapter  # noqa: E402
from refdecoder.hooks import DecodeContext, IdentityHooks  # noqa: E402

PRESETS = ("tiny", "small")
TARGET = {"small": 1.5}  # RefDecoder step time / plain step time, from the issue


def build_vae(kind: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        if kind == "wan2.1":
            return AutoencoderKLWan()  # Wan2.1 width: base_dim 96, z_dim 16 (random weights)
        return WanAdapter.build_tiny(base_dim=16, z_dim=8)


class PlainStep:
    """Decoder fine-tuning of the backbone alone."""

    def __init__(self, vae: torch.nn.Module, lr: float) -> None:
        self.adapter = WanAdapter(vae)
        vae.requires_grad_(False).train()
        params = [p.requires_grad_(True) for _, p in self.adapter.decoder_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def __call__(self, video: torch.Tensor) -> float:
        with torch.no_grad():
            latents = self.adapter.encode(video)
        windows = self.adapter.plan_windows(latents.shape[2], self.adapter.default_window)
        out = self.adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)
        return _finish(out, video, self.optimizer)


class RefDecoderStep:
    """The recipe's video step: the clip's own frame as reference, decoder trained at 0.1 x lr."""

    def __init__(self, vae: torch.nn.Module, preset: str | refdecoder.RefDecoderConfig, lr: float) -> None:
        config = refdecoder.preset(preset) if isinstance(preset, str) else preset.copy()
        config.train_decoder = True
        self.model = refdecoder.wrap(vae, config).train()
        self.optimizer = torch.optim.AdamW(self.model.param_groups(lr), lr=lr)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, video: torch.Tensor) -> float:
        out = self.model(video, generator=self.generator).sample
        return _finish(out, video, self.optimizer)


def _finish(out: torch.Tensor, video: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """Loss, backward, AdamW step; returns the time of the optimizer step and of zeroing the gradients, which
    depends on the number of trained parameters only (not on the clip size)."""
    (out - video).abs().mean().backward()
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )


def measure(args: argparse.Namespace) -> dict:
    video = torch.rand(args.batch, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(1))
    video = video * 2 - 1
    steps: dict[str, Callable[[torch.Tensor], float]] = {"plain": PlainStep(build_vae(args.vae), args.lr)}
    for name in PRESETS:
        steps[name] = RefDecoderStep(build_vae(args.vae), name, args.lr)
    for step in steps.values():  # warm-up: allocator, AdamW states
        step(video)
    times: dict[str, list[float]] = {name: [] for name in steps}
    optimizer_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            optimizer_times[name].append(step(video))
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, step in steps.items():
        module = step.adapter.vae if name == "plain" else step.model
        with LiveTensorMeter() as meter:
            step(video)
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        optimizer = _optimizer_bytes(step.optimizer)
        rows[name] = {
            "step_s": statistics.median(times[name]),
            "step_s_all": times[name],
            "optimizer_s": statistics.median(optimizer_times[name]),
            "weights_mb": weights / 2**20,
            "trained_params_m": sum(p.numel() for g in step.optimizer.param_groups for p in g["params"]) / 1e6,
            "adamw_states_mb": optimizer / 2**20,
            "step_peak_live_mb": meter.peak / 2**20,
            "peak_total_mb": (weights + optimizer + meter.peak) / 2**20,
        }
    for name in PRESETS:
        rows[name]["time_ratio_to_plain"] = rows[name]["step_s"] / rows["plain"]["step_s"]
        compute = rows[name]["step_s"] - rows[name]["optimizer_s"]
        rows[name]["compute_ratio_to_plain"] = compute / (rows["plain"]["step_s"] - rows["plain"]["optimizer_s"])
        rows[name]["memory_ratio_to_plain"] = rows[name]["peak_total_mb"] / rows["plain"]["peak_total_mb"]
    return rows


def paper_size_costs(frames: int = 17, size: tuple[int, int] = (480, 832)) -> dict:
    """FLOPs and memory of one training step of each variant at the paper's clip size, on the meta device.

    Memory = weights + AdamW states of the trained parameters (counted from the parameters) + the peak of live
    tensors (activations, gradients) during forward and backward, measured twice: with PyTorch's math attention
    (what CPUs run: the attention matrices are materialised and kept for backward) and with a stand-in for
    memory-efficient attention (GPU flash / xformers kernels keep only q, k, v and the output). AdamW's own
    temporaries are not included.
    """
    out = {}
    for name in ("plain", *PRESETS):
        module, forward = _variant(name, frames)
        with FlopCounterMode(display=False) as counter, LiveTensorMeter() as math_meter:
            forward().abs().mean().backward()
        module.zero_grad(set_to_none=True)
        with _memory_efficient_attention(), LiveTensorMeter() as efficient_meter:
            forward().abs().mean().backward()
        trained = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
        weights = sum(p.numel() * 4 for p in module.parameters())
        static = (weights + 2 * trained) / 2**30  # gradients are created during backward: in the live peak
        out[name] = {
            "tflop": counter.get_total_flops() / 1e12,
            "weights_adamw_gb": static,
            "memory_gb_math_attention": static + math_meter.peak / 2**30,
            "memory_gb_efficient_attention": static + efficient_meter.peak / 2**30,
        }
    for name in PRESETS:
        for key in ("tflop", "memory_gb_math_attention", "memory_gb_efficient_attention"):
            out[name][f"{key}_ratio_to_plain"] = out[name][key] / out["plain"][key]
    return {f"{frames}f_{size[0]}x{size[1]}": out}


def _variant(name: str, frames: int, size: tuple[int, int] = (480, 832)) -> tuple[torch.nn.Module, Callable]:
    vae = build_vae("wan2.1", "meta")
    video = torch.empty(1, 3, frames, *size, device="meta")
    if name == "plain":
        return vae, _plain_forward(vae, video)
    config = refdecoder.preset(name)
    config.train_decoder = True
    model = refdecoder.wrap(vae, config).train()
    index = torch.tensor([frames // 2])
    return model, lambda: model(video, reference_index=index).sample


class _EfficientAttention(torch.autograd.Function):
    """Memory stand-in for flash attention: keeps q, k, v and the output for backward, never the attention matrix.
    Its values are meaningless (meta tensors only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _memory_efficient_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: _EfficientAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _plain_forward(vae: torch.nn.Module, video: torch.Tensor) -> Callable[[], torch.Tensor]:
    adapter = WanAdapter(vae)
    vae.requires_grad_(False)
    for _, p in adapter.decoder_parameters():
        p.requires_grad_(True)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            latents = adapter.encode(video)
        windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
        return adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=("wan2.1", "tiny"), default="wan2.1", help="Wan2.1 width or a tiny VAE")
    parser.add_argument("--size", type=int, default=64, help="frame height = width")
    parser.add_argument("--frames", type=int, default=9, help="clip length (1 + 4k)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-paper-size", action="store_true", help="skip the meta-device FLOP/memory count")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "cpu_step": measure(args),
    }
    if not args.skip_paper_size:
        payload["paper_size"] = paper_size_costs()
    for name in PRESETS:
        row = payload["cpu_step"][name]
        target = TARGET.get(name)
        verdict = (
            ""
            if target is None
            else f" (target <= {target}x: {'met' if row['time_ratio_to_plain'] <= target else 'MISSED'})"
        )
        print(
            f"{name:>5}: step {row['step_s']:.2f}s vs plain {payload['cpu_step']['plain']['step_s']:.2f}s = "
            f"{row['time_ratio_to_plain']:.2f}x{verdict} (without the optimizer step "
            f"{row['compute_ratio_to_plain']:.2f}x; AdamW {row['optimizer_s']:.2f}s vs "
            f"{payload['cpu_step']['plain']['optimizer_s']:.2f}s); memory {row['memory_ratio_to_plain']:.2f}x "
            f"({row['peak_total_mb']:.0f} vs {payload['cpu_step']['plain']['peak_total_mb']:.0f} MiB)"
        )
    for shape, rows in payload.get("paper_size", {}).items():
        for name in PRESETS:
            row = rows[name]
            print(
                f"{name:>5} at {shape}: FLOPs {row['tflop_ratio_to_plain']:.2f}x ({row['tflop']:.0f} TFLOP); "
                f"memory {row['memory_gb_efficient_attention_ratio_to_plain']:.2f}x with memory-efficient "
                f"attention, {row['memory_gb_math_attention_ratio_to_plain']:.2f}x with math attention"
            )
    print(f"wrote {write_json('train_step', payload, args.out)}")


if __name__ == "__main__":
    main()
