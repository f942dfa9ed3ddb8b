"""The ``med3d`` command. Each subcommand lives in its own module of this package, which provides
``add_parser(subparsers)``; the parser it adds sets ``func`` to a callable taking the parsed args and returning an
exit code. A :class:`Med3DError` is printed as one line, without a traceback, with exit status 2."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import sys
from typing import List, Optional

from .. import __version__
from ..errors import Med3DError
from ..safe_io import os_reason

# Order is the order of `med3d --help`.
COMMANDS = ("demo", "models", "inspect", "pretrain", "finetune", "segment", "classify", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="med3d",
        description="Med3D: transfer learning for 3D medical imaging (MedicalNet-exact 3D-ResNets).")
    parser.add_argument("--version", action="version", version=f"med3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


_NEGATIVE = re.compile(r"^-\d")


def _join_negative_values(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """``--roi -12.5,3,...`` -> ``--roi=-12.5,3,...``: argparse takes a value that starts with '-' and is not a
    plain number (a comma list) for an option and says "expected one argument"; join such values to their option
    when the option takes one."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(argv[0]) if sub is not None and argv else None
    if command is None:
        return argv
    out: List[str] = []
    for token in argv:
        action = command._option_string_actions.get(out[-1]) if out else None
        if action is not None and action.nargs is None and _NEGATIVE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with control characters, ANSI escapes and bidirectional overrides shown as escapes (``\\x1b``,
    ``\\n``): strings from a stranger's file must not drive the terminal or break a one-line message."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def dump_json(value: object, indent: Optional[int] = None) -> str:
    """Strict JSON (NaN and infinity are not JSON): a result holding one is an error, never invalid output."""
    try:
        return json.dumps(value, indent=indent, allow_nan=False)
    except ValueError:
        raise Med3DError("the result holds a value that is not a finite number (NaN or infinity), which usually "
                         "means the input holds NaN or infinite voxels; check the scan") from None


def _silence_stdout() -> None:
    # What is still buffered for a full or closed stdout would fail again (with a traceback) at exit.
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _error(command: Optional[str], message: object) -> None:
    try:
        print(f"med3d{' ' + command if command else ''}: error: {printable(message)}", file=sys.stderr)
    except OSError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    command: Optional[str] = None
    try:  # everything, the parser's imports included: Ctrl-C in the first second is one line too
        parser = build_parser()
        argv = _join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)
        command = getattr(args, "command", None)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except Med3DError as exc:
        _error(command, exc)
        return 2
    except KeyboardInterrupt:
        try:
            print(f"med3d{' ' + command if command else ''}: interrupted", file=sys.stderr)
        except OSError:
            pass
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT):
            raise
        _silence_stdout()  # output to a full device (/dev/full) or a closed pipe
        if exc.errno != errno.EPIPE:
            _error(command, f"cannot write the output: {os_reason(exc)}")
        return 2 if exc.errno != errno.EPIPE else 0


if __name__ == "__main__":
    sys.exit(main())
