"""`python -m hypernet …` / `lorarar …`.

Each subcommand lives in its own module with `add_parser(subparsers)`; that function sets
`func` on the parser. Command modules import only argparse at module level so that `--help`
is instant; the heavy work is imported inside the command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

from ..errors import LoraRarError

# module name (inside hypernet.cli) for each subcommand, in help order
COMMAND_MODULES = ("demo", "merge", "inspect", "probe", "convert", "bench", "judge", "ziplora", "train", "testbed")

log = logging.getLogger("hypernet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorarar",
        description="LoRA.rar: merge a subject LoRA and a style LoRA with a hypernetwork.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue  # a command whose module is not part of this build
        module.add_parser(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds exactly like Ctrl-C: every
    `finally` runs and atomic writes remove their temporary files."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_os_error(exc: OSError) -> str:
    """`path: reason` for the file-system errors a user can fix (read-only folder, full disk,
    too-long name), without Python's `[Errno N]` noise."""
    reason = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except LoraRarError as exc:
        # One clear line for expected failures (bad files, mismatches); tracebacks with -v.
        if args.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The file system said no (read-only folder, full disk, name too long): as clear as above.
        if args.verbose:
            log.exception("failed")
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
