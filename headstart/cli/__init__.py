"""``headstart`` command line: a thin skin over :mod:`headstart.api`.

Every subcommand parses its arguments and calls one public function. Humans get progress bars and
messages on stderr; ``--json`` prints one machine-readable object on stdout. Exit codes: 0 success,
1 failure (one-line reason on stderr), 2 usage error, 130 interrupted.

:mod:`.parser` builds the argument parser (no heavy imports, so ``--help`` and ``--version`` are
quick); :mod:`.commands` holds the handlers, which import the library when they run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence

from .commands import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, parse_aug_params, parse_grid
from .parser import build_parser

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "parse_aug_params",
           "parse_grid"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console-script entry point).

    Without ``argv`` (the console script, ``python -m headstart``) the process ends next: the objects
    left are frozen out of the garbage collector, so the interpreter's final collections skip the
    hundreds of thousands that torch and scikit-learn create (about 1 s of every command's exit).
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and --version exit here, before the library is imported
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _printable_file_names()
    code = _dispatch(args)
    if argv is None:
        gc.freeze()
    return code


def _printable_file_names() -> None:
    """File names that are not valid UTF-8 (Linux hands them over as bytes) print with a replacement
    character instead of failing the command; ``--json`` output escapes them anyway."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand; map errors to exit codes with a one-line reason on stderr."""
    from ..errors import HeadstartError, UsageError

    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"headstart {args.command}: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HeadstartError as exc:
        print(f"headstart {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"headstart {args.command}: interrupted; cached features are kept, re-run to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for users; HEADSTART_DEBUG=1 shows the traceback
        if os.environ.get("HEADSTART_DEBUG"):
            raise
        print(f"headstart {args.command}: failed: {type(exc).__name__}: {exc} "
              "(set HEADSTART_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
