"""``refdecoder encode``: encode a video dataset into latent shards once, for latent finetuning and the proxy.

refdecoder encode videos/ --out latents/ --vae Wan2.1-I2V-14B-480P-Diffusers/vae --frames 17 --size 480x832
refdecoder encode train.csv --out latents/ --vae vae/ --frames 17 --stride 8 --posterior sample --seed 3
torchrun --nproc-per-node 8 -m refdecoder encode "shards/{000000..000099}.tar" --out latents/ --vae vae/

INPUT is a folder of videos (recursively), a dataset CSV with a ``path`` column (and ``caption``), or WebDataset
shards (a folder of ``.tar`` files, one ``.tar`` or a brace pattern). Every video is cut into clips of ``--frames``
frames starting every ``--stride`` frames; each clip is encoded by the frozen encoder (``--posterior mode``, or a
sample seeded by ``--seed`` and the clip) and written with its reference frame (``--reference-index`` of the
clip) into ``latents-r<RANK>-<INDEX>.tar`` shards; ``index.json`` lists the finished shards. ``LatentDataset`` and
the latent finetuning config (``latent_finetune.path``) read the folder as it is.

Under torchrun or accelerate launch each process encodes its share of the videos (balanced by frame count) on its
own device. A rerun with the same settings skips the clips already in finished shards; a folder made with other
settings is refused. A video that fails is reported on one line and makes the exit code 1 at the end.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``encode`` command."""
    from refdecoder.cli import add_command
    from refdecoder.cli.reconstruct import parse_size, positive_int

    parser = add_command(subparsers, "encode", __doc__, "encode a video dataset into latent shards (WebDataset)")
    parser.add_argument("input", metavar="INPUT", help="folder of videos, dataset CSV, or WebDataset shards")
    parser.add_argument("--out", required=True, help="folder of the latent shards (a rerun resumes it)")
    parser.add_argument("--vae", required=True, help="VAE folder, VideoVAE+ checkpoint, run folder or Hub id")
    parser.add_argument("--backbone", help="force a backbone adapter (default: detected from the VAE)")
    parser.add_argument("--frames", type=positive_int, default=17, help="frames per clip (the VAE's frame rule)")
    parser.add_argument("--stride", type=positive_int, help="frames between clip starts (default: --frames)")
    parser.add_argument("--size", type=parse_size, help="HxW, scaled and centre-cropped (default: source size)")
    parser.add_argument("--posterior", choices=("mode", "sample"), default="mode", help="posterior mode or a draw")
    parser.add_argument("--seed", type=int, default=0, help="base seed of --posterior sample")
    parser.add_argument("--reference-index", type=int, default=0, help="clip frame stored as the reference image")
    parser.add_argument("--normalize", action="store_true", help="store latents in the diffusion (normalised) space")
    parser.add_argument("--maxcount", type=positive_int, default=100, help="clips per shard")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="VAE precision")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    parser.add_argument("--all-ranks", action="store_true", help="progress lines from every rank, not only rank 0")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Encode INPUT into --out; returns 1 if a video failed, else 0."""
    from refdecoder.cli._ranks import main_first
    from refdecoder.inference import DTYPES, load_decoder
    from refdecoder.inference.distributed import close_distributed, init_distributed, rank_context
    from refdecoder.inference.encode import EncodeOptions, encode_dataset
    from refdecoder.inference.outfolder import ensure_writable

    ctx = rank_context()
    device = init_distributed(ctx, args.device)
    main_first(ctx, lambda: ensure_writable(args.out))
    try:
        decoder = load_decoder(args.vae, None, args.backbone, device, DTYPES[args.dtype])
        options = EncodeOptions(
            frames=args.frames,
            stride=args.stride,
            size=args.size,
            posterior=args.posterior,
            seed=args.seed,
            reference_index=args.reference_index,
            normalize=args.normalize,
            maxcount=args.maxcount,
        )
        quiet = True if args.no_progress else (False if args.all_ranks else None)
        report = encode_dataset(decoder, args.input, args.out, options, ctx, str(args.vae), quiet)
    finally:
        close_distributed()
    who = f"{ctx.label}: " if ctx.distributed else ""
    failed = f", {len(report.failed)} video(s) failed (see above; a rerun retries them)" if report.failed else ""
    if ctx.is_main or args.all_ranks:
        done = f"{report.encoded} clips into {len(report.shards)} shard(s), {report.skipped} already done"
        print(f"{who}encoded {done}{failed}")
    if ctx.is_main:
        print(f"{args.out}: {report.clips_total} clips in all, index {report.index}")
    return 1 if report.failed else 0
