"""Cost of reference conditioning on the video VAE decoders: wall time, FLOPs at the real size, memory vs length.

    python benchmarks/decode_overhead.py [--skip-time] [--out results.json]

1. Wall time of ``model.decode`` (presets paper, small) vs ``vae.decode`` on the same latents: full Wan2.1 width
   (random weights), a small spatial size, median of several runs, measured side by side in one process.
2. FLOPs, counted with ``FlopCounterMode`` on the meta device (nothing runs): Wan2.1 at 480x832 for 17 and 81
   frames; Wan2.2 (the TI2V-5B VAE config) at its default 17 frames, 704x1280, also with ``small``'s last stage on
   the same token grid as the others (``stages.patch_multipliers = (1, 1, 1)``). Added parameters per preset.
   HunyuanVideo 1.5, LTX-Video (0.9.0 and the 0.9.1 decoder), CogVideoX, HunyuanVideo (v1) and Stable Video
   Diffusion at their released configs (the diffusers class defaults; LTX 0.9.1's decoder from its published config)
   at 480x832 with the frame counts their image-to-video pipelines default to (121, 121, 49, 129, 25), Qwen-Image 2.1
   at 1 frame 1024x1024 and MiniMax-H3 (untiled) at 124 frames 768x1344: plain vs ``small`` (and ``paper``).
   ``--backbones NAME ...`` recomputes only those rows into ``results/decode_overhead_backbones.json``.
3. Peak live-tensor memory of decoding 21 vs 5 latent frames with the same window (meta device at 480x832, and
   real tensors at a small size): the window bounds memory, not the video length. The same for the video backbones
   above (meta device, 480x832), which decode in their own temporal layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import RESULTS, LiveTensorMeter, median_time, write_json  # noqa: E402
from refdecoder.backbones.registry import find_backbone  # noqa: E402

PRESETS = ("small", "paper")


def build_wan(device: str | torch.device = "cpu"):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        return AutoencoderKLWan().eval()  # Wan2.1 config: base_dim 96, z_dim 16


def build_wan22(device: str | torch.device = "meta"):
    """The Wan2.2 TI2V-5B VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json; statistics do not change FLOPs)."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan(
            base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
            out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        ).eval()  # fmt: skip


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_row(vae, frames: int, size: tuple[int, int], configs: dict) -> dict:
    """Plain decoder FLOPs and, per config, RefDecoder FLOPs (ratio to plain) and added parameters.

    Latent shape and the plain decode (``vae.decode``, with the adapter's default extra inputs such as LTX's
    ``temb``) come from the VAE's adapter.
    """
    adapter = find_backbone(vae)(vae)
    factor, latent_frames = adapter.spatial_factor, adapter.frame_rule.latent_frames(frames)
    z = torch.empty(1, adapter.latent_channels, latent_frames, size[0] // factor, size[1] // factor, device="meta")
    ref = torch.empty(1, adapter.pixel_channels, 1, *size, device="meta")
    base = count_flops(lambda: adapter.plain_decode(z))
    row = {"plain_decoder_tflop": base / 1e12}
    for name, config in configs.items():
        model = refdecoder.wrap(vae, config)
        total = count_flops(lambda m=model: m.decode(z, reference=ref))
        added = sum(p.numel() for _, p in model.added_parameters())
        row[name] = {"tflop": total / 1e12, "ratio_to_plain": total / base, "added_params_m": added / 1e6}
        model.unwrap()
    return row


def flops_table(frames_list=(17, 81), size=(480, 832)) -> dict:
    vae, configs = build_wan("meta"), {name: name for name in PRESETS}
    return {f"{frames}f_{size[0]}x{size[1]}": flops_row(vae, frames, size, configs) for frames in frames_list}


def wan22_flops(frames: int = 17, size: tuple[int, int] = (704, 1280)) -> dict:
    even = refdecoder.preset("small")
    even.stages.patch_multipliers = (1, 1, 1)  # stage 2 on the same H/32 grid as stages 0 and 1
    configs = {"small": "small", "small_even_grid": even, "paper": "paper"}
    return {f"{frames}f_{size[0]}x{size[1]}": flops_row(build_wan22(), frames, size, configs)}


# Released layouts: the diffusers class defaults are HunyuanVideo 1.5, LTX-Video 0.9.0, CogVideoX (2b/5b) and
# HunyuanVideo (v1); for the first three, as the
# reference notes measured (decoder 871.3 M, 238.8 M, 123.4 M parameters); LTX 0.9.1's decoder (754.6 M) is its
# published config.
LTX_091_DECODER = dict(
    decoder_block_out_channels=(256, 512, 1024), decoder_layers_per_block=(5, 6, 7, 8),
    decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(True, True, True, False),
    upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
)  # fmt: skip
# The published SVD VAE config (the AutoencoderKLTemporalDecoder class default is a one-level toy).
SVD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2
)
VIDEO_BACKBONES = {  # name -> (diffusers class, config overrides, pipeline default frames)
    "hunyuan-video-1.5": ("AutoencoderKLHunyuanVideo15", {}, 121),
    "ltx-video-0.9.0": ("AutoencoderKLLTXVideo", {}, 121),
    "ltx-video-0.9.1": ("AutoencoderKLLTXVideo", LTX_091_DECODER, 121),
    "cogvideox": ("AutoencoderKLCogVideoX", {}, 49),
    "hunyuan-video": ("AutoencoderKLHunyuanVideo", {}, 129),  # HunyuanVideoImageToVideoPipeline's default
    "stable-video-diffusion": ("AutoencoderKLTemporalDecoder", SVD_VAE, 25),  # the SVD-XT UNet's num_frames
    "qwen-image-2.1": ("AutoencoderKLQwenImage21", {}, 1),  # an image VAE: QwenImage21Pipeline decodes one frame
    "minimax-h3": ("AutoencoderKLMiniMaxH3", {}, 124),  # the modular pipeline's default num_frames (17 * 7 + 5)
}
# Sizes other than 480x832: each family's common one (QwenImage21Pipeline's default 1024x1024 output; MiniMax-H3's
# canvas, short edge 768 at 16:9).
SIZES = {"qwen-image-2.1": (1024, 1024), "minimax-h3": (768, 1344)}
# Latent frame counts of the memory comparison where 5 and 21 are off the frame rule (MiniMax-H3: 5n + 2).
MEMORY_FRAMES = {"minimax-h3": (7, 22)}


# Families whose `small` costs more than 1.3x their plain decoder, and the scaled `small` the docs recommend (label ->
# `stages` fields): SVD's per-frame 2D decoder is cheap, so `small`'s stage transformers weigh more; coarser tokens
# (H/32) bring it down. Qwen-Image 2.1 decodes one frame, so the reference branch (the reference through
# up_blocks.1 and .2 to reach stages 1 and 2) costs as much as the image's own pass through them; conditioning
# stage 0 (H/8) only drops it.
SCALED_SMALL = {
    "stable-video-diffusion": {"small_grid_x2": {"patch_multipliers": (2, 2, 2)}},
    "qwen-image-2.1": {"small_stage0": {"indices": (0,), "patch_multipliers": None}},
}


def _meta(vae: torch.nn.Module) -> torch.nn.Module:
    """The VAE wholly on the meta device: tensors made with the legacy ``torch.Tensor([...])`` constructor (SVD's
    ``AlphaBlender.mix_factor``) ignore ``torch.device("meta")`` and land on the CPU.

    MiniMax-H3 ships with its spatial tiling on (256-pixel tiles), which its adapter does not reproduce: it is
    counted untiled, plain and RefDecoder alike (``vae.disable_tiling()``)."""
    if type(vae).__name__ == "AutoencoderKLMiniMaxH3":
        vae.disable_tiling()
    return vae.to("meta")


def _selected(only: tuple[str, ...] | None) -> dict:
    return {k: v for k, v in VIDEO_BACKBONES.items() if only is None or k in only}


def video_backbone_flops(size: tuple[int, int] = (480, 832), only: tuple[str, ...] | None = None) -> dict:
    """Plain vs ``small`` / ``paper`` at each video backbone's released config (meta device), at ``size`` or the
    family's own (:data:`SIZES`)."""
    import diffusers

    rows = {}
    for name, (cls, overrides, frames) in _selected(only).items():
        with torch.device("meta"):
            vae = _meta(getattr(diffusers, cls)(**overrides).eval())
        configs: dict = {preset: preset for preset in PRESETS}
        for label, fields in SCALED_SMALL.get(name, {}).items():
            configs[label] = refdecoder.preset("small")
            for field, value in fields.items():
                setattr(configs[label].stages, field, value)
        own = SIZES.get(name, size)
        row = flops_row(vae, frames, own, configs)
        rows[name] = {"frames": frames, "size": list(own), **row}
        if name in SCALED_SMALL and "indices" in next(iter(SCALED_SMALL[name].values())):
            rows[name]["plain_up_block_tflop"] = up_block_flops(vae, frames, own)  # where the reference branch runs
        print(name, row, flush=True)
    return rows


def up_block_flops(vae, frames: int, size: tuple[int, int]) -> dict:
    """TFLOP of each ``decoder.up_blocks.N`` in the plain decode (``FlopCounterMode``'s per-module counts)."""
    adapter = find_backbone(vae)(vae)
    factor, latent_frames = adapter.spatial_factor, adapter.frame_rule.latent_frames(frames)
    z = torch.empty(1, adapter.latent_channels, latent_frames, size[0] // factor, size[1] // factor, device="meta")
    with FlopCounterMode(display=False) as counter:
        adapter.plain_decode(z)
    counts = counter.get_flop_counts()
    return {
        key.split(".", 1)[1]: sum(counts[key].values()) / 1e12
        for key in counts
        if key.count(".") == 2 and ".up_blocks." in key
    }


def video_backbone_memory(
    size: tuple[int, int] = (480, 832), preset: str = "small", only: tuple[str, ...] | None = None
) -> dict:
    """Peak live-tensor bytes (meta device) decoding 5 vs 21 latent frames (:data:`MEMORY_FRAMES` where those are
    off the rule) at each video backbone's released config, at ``size`` or the family's own (:data:`SIZES`).

    These backbones decode in their own temporal layout (one window, or CogVideoX's frame batches), so the ratio
    shows what that costs in length.
    """
    import diffusers

    rows = {}
    for name, (cls, overrides, _) in _selected(only).items():
        with torch.device("meta"):
            vae = _meta(getattr(diffusers, cls)(**overrides).eval())
        model = refdecoder.wrap(vae, preset)
        adapter, peaks, own = model.adapter, {}, SIZES.get(name, size)
        ref = torch.empty(1, adapter.pixel_channels, 1, *own, device="meta")
        short, long = MEMORY_FRAMES.get(name, (5, 21))
        for latent_frames in (short, long):
            shape = (1, adapter.latent_channels, latent_frames, *(s // adapter.spatial_factor for s in own))
            with torch.inference_mode(), LiveTensorMeter() as meter:
                model.decode(torch.empty(shape, device="meta"), reference=ref)
            peaks[latent_frames] = meter.peak
        rows[name] = {
            f"peak_bytes_{short}_latent": peaks[short],
            f"peak_bytes_{long}_latent": peaks[long],
            f"ratio_{long}_over_{short}": peaks[long] / peaks[short],
        }
        print(name, rows[name], flush=True)
    return {"size": list(size), "preset": preset, "backbones": rows}


def wall_times(latent_shape=(1, 16, 2, 8, 8), repeats: int = 3) -> dict:
    """Interleaved rounds (every contender once per round) so machine noise hits all of them alike."""
    vae = build_wan()
    z = torch.randn(*latent_shape)
    ref = torch.rand(1, 3, 1, latent_shape[-2] * 8, latent_shape[-1] * 8) * 2 - 1
    models = {name: refdecoder.wrap(build_wan(), name).eval() for name in PRESETS}
    contenders = {"vae.decode": lambda: vae.decode(z), "plain_windowed_loop": lambda: models["small"].decode(z)}
    contenders.update({name: (lambda m=m: m.decode(z, reference=ref)) for name, m in models.items()})
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in contenders.items():
                runs[name].append(median_time(fn, repeats=1, warmup=0)[0])
    medians = {name: statistics.median(times) for name, times in runs.items()}
    base = medians["vae.decode"]
    return {
        "latent_shape": list(latent_shape),
        "repeats": repeats,
        "runs_s": runs,
        "median_s": medians,
        "ratio_to_vae_decode": {name: t / base for name, t in medians.items()},
    }


def peak_memory(device: str, size: tuple[int, int], preset: str = "small") -> dict:
    vae = build_wan(device)
    model = refdecoder.wrap(vae, preset).eval()
    ref = (
        torch.zeros(1, 3, 1, *size, device=device) if device != "meta" else torch.empty(1, 3, 1, *size, device="meta")
    )
    peaks = {}
    for latent_frames in (5, 21):
        z = torch.zeros(1, 16, latent_frames, size[0] // 8, size[1] // 8, device=device)
        with torch.inference_mode(), LiveTensorMeter() as meter:
            model.decode(z, reference=ref, window=5)
        peaks[latent_frames] = meter.peak
    return {
        "device": device,
        "size": list(size),
        "preset": preset,
        "window": 5,
        "peak_bytes_5_latent": peaks[5],
        "peak_bytes_21_latent": peaks[21],
        "ratio_21_over_5": peaks[21] / peaks[5],
    }


def update_backbone_rows(names: tuple[str, ...], path: Path) -> None:
    """Recompute the video-backbone FLOP and memory rows of ``names`` and write them into the JSON at ``path``."""
    unknown = sorted(set(names) - set(VIDEO_BACKBONES))
    if unknown:
        raise SystemExit(f"unknown video backbone(s) {unknown}; known: {sorted(VIDEO_BACKBONES)}")
    doc = json.loads(path.read_text())
    doc["video_backbone_flops"].update(video_backbone_flops(only=names))
    doc["video_backbone_memory"]["backbones"].update(video_backbone_memory(only=names)["backbones"])
    payload = {k: v for k, v in doc.items() if k not in ("benchmark", "machine")}
    print("wrote", write_json(doc["benchmark"], payload, path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-time", action="store_true", help="skip the (slow on CPU) wall-time part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--backbones", nargs="+", default=None, help="only these video backbones' rows, merged into --out's JSON"
    )
    args = parser.parse_args()
    if args.backbones:
        update_backbone_rows(tuple(args.backbones), args.out or RESULTS / "decode_overhead_backbones.json")
        return
    result = {"flops": flops_table(), "wan22_flops": wan22_flops()}
    print("FLOPs:", result["flops"])
    print("Wan2.2 FLOPs:", result["wan22_flops"])
    result["video_backbone_flops"] = video_backbone_flops()
    result["memory"] = [peak_memory("meta", (480, 832)), peak_memory("cpu", (64, 64))]
    result["video_backbone_memory"] = video_backbone_memory()
    print("memory:", result["memory"])
    if not args.skip_time:
        result["wall_time"] = wall_times(repeats=args.repeats)
        print("wall time:", result["wall_time"])
    print("wrote", write_json("decode_overhead", result, args.out))


if __name__ == "__main__":
    main()
