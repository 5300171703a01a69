"""Flags and start-up shared by the commands that run on several processes (``torchrun`` / ``accelerate launch``).

``start_ranks`` reads the rank from the launcher's environment, creates the process group when there are
several processes, puts this rank on its device (``cuda:LOCAL_RANK``) and quiets every rank but 0 (their
warnings and errors still show, prefixed by nothing: each line names its file) unless ``--all-ranks``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["add_rank_arguments", "start_ranks", "unfinished", "main_first"]


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--all-ranks``."""
    parser.add_argument(
        "--resume", action="store_true", help="skip clips already finished in --out (a rerun after a stop or crash)"
    )
    parser.add_argument("--all-ranks", action="store_true", help="print from every rank, not only rank 0")


def start_ranks(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(RankContext, device)`` of this process; see the module docstring."""
    from refdecoder.inference.distributed import init_distributed, rank_context

    ctx = rank_context()
    device = init_distributed(ctx, args.device)
    if not ctx.is_main and not args.all_ranks:
        logging.getLogger("refdecoder").setLevel(logging.WARNING)
    return ctx, device


def unfinished(out: str, names: list[str], resume: bool) -> list[str]:
    """``names`` without the clips finished in ``out`` when resuming (they are skipped, not refused)."""
    if not resume or not Path(out).is_dir():
        return names
    from refdecoder.inference.outfolder import OutputFolder

    done = OutputFolder(out).finished()
    return [name for name in names if name not in done]


def main_first(ctx: Any, check: Callable[[], T]) -> T:
    """Run ``check`` on rank 0, then on the other ranks (after a barrier).

    The ``--out`` checks create the folder to prove it writable and remove what they created; run on all ranks at
    once, one rank would remove the folder another is testing. If rank 0's check fails, it exits and the
    launcher stops the others.
    """
    from refdecoder.inference.distributed import barrier

    result = check() if ctx.is_main else None
    barrier(ctx)
    return result if ctx.is_main else check()
