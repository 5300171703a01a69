"""The ``refdecoder`` command line.

Each module in this package (other than those starting with ``_``) is one sub-command and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable ``(args) -> int``. Modules are
discovered at start-up, so adding a command means adding a file. Heavy imports happen inside the command's
``run`` function, never at module level, so ``refdecoder --help`` stays fast. Parsers use :class:`HelpFormatter`
and :func:`plain` descriptions: help shows defaults and no reStructuredText markup.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import re
import sys

from refdecoder import __version__
from refdecoder.errors import RefDecoderError

__all__ = ["main", "build_parser", "HelpFormatter", "plain", "add_command", "Interrupted", "debug_enabled"]

DEBUG_ENV = "REFDECODER_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what finished and what did not."""


_debug_flag = False  # --debug of the running command


def debug_enabled() -> bool:
    """True with ``--debug`` or ``REFDECODER_DEBUG=1``: errors show their traceback."""
    return _debug_flag or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`~?([^`]+)`")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (examples stay on their lines); each option's default appended to its help
    when it has one worth showing (not None, not False, not already mentioned)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def plain(doc: str | None) -> str:
    """A module docstring as plain help text: ``code`` and :func:`role` markup removed, ``::`` to ``:``."""
    text = _ROLE.sub(lambda m: m.group(1), doc or "")
    return text.replace("``", "").replace("::", ":")


def add_command(
    subparsers: argparse._SubParsersAction, name: str, doc: str | None, help: str
) -> argparse.ArgumentParser:
    """A sub-command parser with the shared formatter and ``doc`` (a module docstring) as its description."""
    return subparsers.add_parser(name, help=help, description=plain(doc), formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every discovered sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="refdecoder", description="Reference-conditioned video VAE decoders.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"refdecoder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of errors (also {DEBUG_ENV}=1); implies -v"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code: 0 done, 1 an error (one line on stderr), 2 a usage
    error, 130 interrupted (Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    global _debug_flag
    _debug_flag = args.debug  # also read by the commands, for their per-file errors
    debug = debug_enabled()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or debug else logging.INFO, format="%(levelname)s %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        _show(err, debug, f"interrupted: {err}" if str(err) else "interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except RefDecoderError as err:
        # Library errors already explain themselves; a traceback would only bury the message.
        _show(err, debug, f"error: {_one_line(err)}")
        return EXIT_ERROR
    except OSError as err:  # the environment: a full disk, a read-only or vanished folder, permissions
        where = f": {err.filename}" if err.filename else ""
        _show(err, debug, f"error: {err.strerror or _one_line(err)}{where}")
        return EXIT_ERROR
    except Exception as err:  # a bug or an input nothing checked: still one line, the traceback on request
        _show(
            err,
            debug,
            f"error: {type(err).__name__}: {_one_line(err)} (unexpected; rerun with --debug for the traceback)",
        )
        return EXIT_ERROR


def _show(err: BaseException, debug: bool, line: str) -> None:
    if debug:
        import traceback

        traceback.print_exception(err)
    print(line, file=sys.stderr)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
