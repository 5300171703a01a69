"""The ``refdecoder`` command line.

Each module in this package (other than those starting with ``_``) is one sub-command and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable ``(args) -> int``. Modules are
discovered at start-up, so adding a command means adding a file. Heavy imports happen inside the command's
``run`` function, never at module level, so ``refdecoder --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from refdecoder.errors import RefDecoderError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every discovered sub-command registered."""
    parser = argparse.ArgumentParser(prog="refdecoder", description="Reference-conditioned video VAE decoders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RefDecoderError as err:
        # Library errors already explain themselves; a traceback would only bury the message.
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
