"""``headstart`` command line: a thin skin over :mod:`headstart.api`.

Every subcommand parses its arguments and calls one public function. Humans get progress bars and
messages on stderr; ``--json`` prints one machine-readable object on stdout. Exit codes: 0 success,
1 failure (one-line reason on stderr), 2 usage error, 130 interrupted.

Every failure is one line on stderr: a :class:`~headstart.errors.HeadstartError` says what was wrong and
the fix; any other exception says its type and first line and "run with --debug for the traceback"
(``--debug`` or ``$HEADSTART_DEBUG=1`` re-raise it). Every warning, the library's own (an image with
corrupt EXIF data, a damaged cache shard) and those of the libraries below it, is one line too:
``headstart <command>: warning: <message>``.

:mod:`.parser` builds the argument parser (no heavy imports, so ``--help`` and ``--version`` are
quick); :mod:`.commands` holds the handlers, which import the library when they run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TextIO

from .commands import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, parse_aug_params, parse_grid
from .parser import build_parser

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "one_line",
           "one_line_warnings", "parse_aug_params", "parse_grid"]


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
    with one_line_warnings(args.command):
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


def one_line(text: str, *, first_only: bool = False) -> str:
    """``text`` on one line: its lines joined, or (``first_only``) the first with " ..." when more followed."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if first_only and len(lines) > 1:
        return lines[0] + " ..."
    return " ".join(lines)


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show every warning raised while ``command`` runs as ``headstart <command>: warning: <message>``.

    The filters are Python's (``-W``, ``$PYTHONWARNINGS``); only the display changes, and it is put
    back afterwards. DataLoader workers started by ``fork`` inherit it; the image decoder names the file
    in its own warnings (:class:`~headstart.data.decode.ImageWarning`), so they read the same anywhere.
    """
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        stream = file if file is not None else sys.stderr
        here = os.getpid() == owner  # not in a DataLoader worker, whose copies of the bars are not on screen
        bars = sys.modules.get("tqdm") if here else None  # cleared, then redrawn below the line
        try:
            with bars.tqdm.external_write_mode(file=stream) if bars else nullcontext():
                start = "" if here else "\r"  # from a worker: over the bar the parent is drawing
                stream.write(f"{start}headstart {command}: warning: {one_line(str(message))}\n")
                stream.flush()
        except (OSError, ValueError):  # stderr closed: a warning is not worth failing over
            pass

    owner = os.getpid()
    with warnings.catch_warnings():  # restores showwarning and the filters on the way out
        warnings.showwarning = show
        yield


def _debug(args: argparse.Namespace) -> bool:
    """``--debug`` or ``$HEADSTART_DEBUG`` set to anything but empty or 0: unexpected errors show their traceback."""
    return bool(getattr(args, "debug", False)) or os.environ.get("HEADSTART_DEBUG", "").strip() not in ("", "0")


def _dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand; map errors to exit codes with a one-line reason on stderr."""
    from ..errors import HeadstartError, UsageError

    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        _say(args, f"usage error: {one_line(str(exc))}")
        return EXIT_USAGE
    except HeadstartError as exc:
        _say(args, f"error: {one_line(str(exc))}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _say(args, "interrupted; cached features are kept, re-run to resume")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. ``headstart predict ... | head``: the reader has gone, nothing to tell it
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as exc:  # one line for users; --debug or HEADSTART_DEBUG=1 shows the traceback
        if _debug(args):
            raise
        _say(args, f"failed: {_describe(exc)} (run with --debug for the traceback)")
        return EXIT_FAILURE


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of an unexpected exception (just the type when it has no message)."""
    text = one_line(str(exc), first_only=True)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _say(args: argparse.Namespace, text: str) -> None:
    print(f"headstart {args.command}: {text}", file=sys.stderr)

