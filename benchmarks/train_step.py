"""Cost of a RefDecoder training step vs a plain decoder fine-tuning step on the same VAE, batch and clip.

    python benchmarks/train_step.py [--vae wan2.1|tiny] [--size 64] [--frames 9] [--batch 1] [--repeats 3]
                                    [--skip-flops] [--out results.json]

Both steps: frozen encoder (no gradients), decoder trained, L1 loss, backward, AdamW step. The plain step decodes
through the same windowed loop with identity hooks (the backbone's own decode, unclamped), so the ratio isolates
what RefDecoder adds: reference tokenizer, shared transformer, stage projectors (trained, at ``--lr``) and token
dropout. Presets ``tiny`` and ``small``.

1. CPU wall time: median over ``--repeats`` steps after a warm-up step, the variants interleaved so that load on a
   shared machine hits them alike.
2. Memory: weights + AdamW states + the peak of live tensors during one step (activations, gradients, temporaries).
3. FLOPs of one training step (encoder forward, decoder forward + backward) at 17 x 480 x 832, counted on the meta
   device with ``FlopCounterMode`` (the optimizer's element-wise work is not counted).

Writes ``benchmarks/results/train_step.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks._common import LiveTensorMeter, write_json  # noqa: E402
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

    def __init__(self, vae: torch.nn.Module, preset: str, lr: float) -> None:
        config = refdecoder.preset(preset)
        config.train_decoder = True
        self.model = refdecoder.wrap(vae, config).train()
        self.optimizer = torch.optim.AdamW(self.model.param_groups(lr), lr=lr)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, video: torch.Tensor) -> float:
        out = self.model(video, generator=self.generator).sample
        return _finish(out, video, self.optimizer)


def _finish(out: torch.Tensor, video: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    loss = (out - video).abs().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


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
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(video)
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
            "weights_mb": weights / 2**20,
            "trained_params_m": sum(p.numel() for g in step.optimizer.param_groups for p in g["params"]) / 1e6,
            "adamw_states_mb": optimizer / 2**20,
            "step_peak_live_mb": meter.peak / 2**20,
            "peak_total_mb": (weights + optimizer + meter.peak) / 2**20,
        }
    for name in PRESETS:
        rows[name]["time_ratio_to_plain"] = rows[name]["step_s"] / rows["plain"]["step_s"]
        rows[name]["memory_ratio_to_plain"] = rows[name]["peak_total_mb"] / rows["plain"]["peak_total_mb"]
    return rows


def flops_at_paper_size(frames: int = 17, size: tuple[int, int] = (480, 832)) -> dict:
    """Forward + backward FLOPs of one training step of each variant at the paper's clip size (meta device)."""
    video = torch.empty(1, 3, frames, *size, device="meta")
    out = {}
    for name in ("plain", *PRESETS):
        vae = build_vae("wan2.1", "meta")
        with FlopCounterMode(display=False) as counter:
            if name == "plain":
                adapter = WanAdapter(vae)
                vae.requires_grad_(False)
                for _, p in adapter.decoder_parameters():
                    p.requires_grad_(True)
                with torch.no_grad():
                    latents = adapter.encode(video)
                windows = adapter.plan_windows(latents.shape[2], adapter.default_window)
                sample = adapter.decode_windows(latents, IdentityHooks(), DecodeContext(), windows)
            else:
                config = refdecoder.preset(name)
                config.train_decoder = True
                sample = (
                    refdecoder.wrap(vae, config).train()(video, reference_index=torch.tensor([frames // 2])).sample
                )
            sample.abs().mean().backward()
        out[name] = {"tflop": counter.get_total_flops() / 1e12}
    for name in PRESETS:
        out[name]["ratio_to_plain"] = out[name]["tflop"] / out["plain"]["tflop"]
    return {f"{frames}f_{size[0]}x{size[1]}": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=("wan2.1", "tiny"), default="wan2.1", help="Wan2.1 width or a tiny VAE")
    parser.add_argument("--size", type=int, default=64, help="frame height = width")
    parser.add_argument("--frames", type=int, default=9, help="clip length (1 + 4k)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "cpu_step": measure(args),
    }
    if not args.skip_flops:
        payload["flops"] = flops_at_paper_size()
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
            f"{row['time_ratio_to_plain']:.2f}x{verdict}; memory {row['memory_ratio_to_plain']:.2f}x "
            f"({row['peak_total_mb']:.0f} vs {payload['cpu_step']['plain']['peak_total_mb']:.0f} MiB)"
        )
    for shape, rows in payload.get("flops", {}).items():
        print(
            f"FLOPs at {shape}: "
            + ", ".join(f"{n} {r['tflop']:.1f} TFLOP" for n, r in rows.items())
            + "; ratios "
            + ", ".join(f"{n} {rows[n]['ratio_to_plain']:.2f}x" for n in PRESETS)
        )
    print(f"wrote {write_json('train_step', payload, args.out)}")


if __name__ == "__main__":
    main()
