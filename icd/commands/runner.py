"""The one wrapper of every command: one-line errors, --debug, exit statuses, a prompt exit.

A command is a parser and a function of the parsed arguments. `run` parses, calls it and turns
whatever goes wrong into one line on stderr, `error: <file or flag>: <problem>` (the traceback
too with --debug), and an exit status: 0 done, 1 error, 2 bad arguments, 3 training diverged
(see `statuses`), 130 interrupted.

Prompt exit: an error can leave work queued in MXNet's engine (the rest of a step). At exit
MXNet's atexit hook (MXNotifyShutdown) first stops the custom-operator worker threads, then waits
for the engine; a queued step that reaches a custom operator (sign flip, superpixel pooling)
after that is never run, and the wait never ends (about 1 run in 3 of a training with two
devices whose data loader fails). So after an error the engine is drained while those workers
still run.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
import traceback
from typing import Callable, Mapping, Optional, Sequence, Tuple, Type

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A bad command line (argparse's message, e.g. `--batch-size: expected an integer`)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are raised (not printed and exited), with --debug, and help
    that shows the command's whole module docstring, laid out as written, before the options,
    and every default."""

    def __init__(self, doc: str, **kwargs):
        super().__init__(description=inspect.cleandoc(doc), formatter_class=_Formatter, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the traceback of an error (default: one line)")

    def error(self, message: str):
        raise UsageError(message.replace("argument ", "", 1))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` to a flag's help unless it says its default or has none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
            else action.default
        return f"{text} (default: {default})"


def add_classes_argument(parser: argparse.ArgumentParser) -> None:
    """`--classes FILE`: the dataset's class list (icd.data.classes), VOC's 20 by default."""
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="class-list file of the dataset, one name per line (default: "
                             "PASCAL VOC's 20 classes)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: v > 0, "a positive number")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def shard(text: str) -> Tuple[int, int]:
    """argparse type of `--shard I/N`: (I, N) with 0 <= I < N (icd.devices.shard_names)."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or \
            not 0 <= int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(parts[0]), int(parts[1])


def _number(text: str, kind: type, valid: Callable[[float], bool], expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or value in (float("inf"), float("-inf")) or \
            not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def describe(error: BaseException) -> str:
    """One line for an error: our errors already read `<file or flag>: <problem>`."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    if isinstance(error, (ValueError, OSError, RuntimeError)) and str(error):
        return " ".join(str(error).split())
    return f"{type(error).__name__}: {' '.join(str(error).split())} (a bug? --debug shows where)"


def settle_engine() -> None:
    """Let MXNet's engine finish the work queued before an error (see the module docstring)."""
    mx = sys.modules.get("mxnet")
    if mx is not None:
        try:
            mx.nd.waitall()
        except Exception:   # the queued work failed as well; the first error is reported
            pass


def run(parser: Parser, command: Callable[[argparse.Namespace], Optional[int]],
        argv: Optional[Sequence[str]] = None,
        statuses: Mapping[Type[BaseException], int] = {}) -> int:
    """Parse `argv` (default sys.argv[1:]), run `command(args)`; returns the exit status.

    `statuses` maps exception types to their own exit status (default 1).
    """
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e} (see {parser.prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:   # --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return command(args) or 0
    except KeyboardInterrupt as e:   # training's says which checkpoint and --begin-epoch resume
        print(f"error: {e}" if str(e) else "error: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        status = next((s for kind, s in statuses.items() if isinstance(e, kind)), EXIT_ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    settle_engine()
    return status
