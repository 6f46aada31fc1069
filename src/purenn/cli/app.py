"""The ``purenn`` command: purify a ResNet, inspect, export, probe, draw, unlearn and report.

Each sub-command is a module of :mod:`purenn.cli` (``purify``, ``inspect``, ``export``, ``probe``,
``show``, ``unlearn``, ``report``) with ``add_parser`` and ``run``; this module builds the parser
and maps errors to exit codes.

Run ``purenn --help`` or ``purenn <command> --help``. The same entry point is
``python -m purenn``. :func:`main` returns the exit code instead of exiting, for use from Python.

Exit codes: 0 success; 1 unexpected error (a bug: rerun with ``--traceback`` and report it);
2 usage error (unknown option, missing or malformed argument); 3 bad input (missing or unreadable
file, wrong architecture, unusable data, an option value purenn refuses, a failed ONNX
verification); 4 an optional dependency is missing (the message names the ``pip install``);
130 interrupted.

Example:
    >>> from purenn.cli import main
    >>> main(["--version"])                                   # doctest: +SKIP
    purenn 0.1.0
    0
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from purenn._version import __version__
from purenn.cli import export, inspect, probe, purify, report, show, unlearn
from purenn.cli.common import (
    EXIT_CODES,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    check_ranges,
)
from purenn.errors import PurennError

__all__ = ["main", "build_parser", "EXIT_CODES"]

#: optional or easily missing modules -> how to install them
_INSTALL = {"matplotlib": 'pip install "purenn[viz]"', "timm": 'pip install "purenn[timm]"',
            "onnx": "pip install onnx", "onnxruntime": "pip install "
            "onnxruntime (or onnxruntime-gpu)", "sklearn": "pip install scikit-learn", "PIL": "pip install pillow"}


_EPILOG = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())
_DESCRIPTION = ("Split polysemantic ResNet neurons into pure virtual neurons (PURE), inspect them, export the model "
                "to ONNX, probe its pure features and draw figures.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``purenn`` command.

    Example:
        >>> build_parser().parse_args(["inspect", "pure.safetensors", "--top", "3"]).top
        3
    """
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="purenn", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"purenn {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for command in (purify, inspect, export, probe, show, unlearn, report):  # one module per command
        command.add_parser(sub, _EPILOG, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``purenn`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Example:
        >>> main(["inspect", "purified.safetensors", "--top", "5"])      # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    prefix = f"purenn {args.command}: error:"
    try:
        check_ranges(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as e:
        name = (getattr(e, "name", None) or "").split(".")[0]
        if isinstance(e, PurennError) or name in _INSTALL:
            hint = "" if isinstance(e, PurennError) else f" Install it: {_INSTALL[name]}."
            print(f"{prefix} {e}{hint}", file=sys.stderr)
            return EXIT_MISSING_DEPENDENCY
        return _unexpected(args, prefix, e)
    except (PurennError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:
        print(f"{prefix} {e.strerror or e}{': ' + repr(e.filename) if e.filename else ''}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        return _unexpected(args, prefix, e)


def _unexpected(args: argparse.Namespace, prefix: str, e: BaseException) -> int:
    if args.traceback:
        traceback.print_exc()
    print(f"{prefix} unexpected {type(e).__name__}: {e}", file=sys.stderr)
    if not args.traceback:
        print("rerun with `purenn --traceback ...` for details, and please report it.", file=sys.stderr)
    return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
