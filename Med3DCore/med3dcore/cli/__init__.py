"""The ``med3d`` command. Each subcommand lives in its own module of this package, which provides
``add_parser(subparsers)``; the parser it adds sets ``func`` to a callable taking the parsed args and returning an
exit code. A :class:`Med3DError` is printed as one line, without a traceback, with exit status 2."""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import List, Optional

from .. import __version__
from ..errors import Med3DError

# Order is the order of `med3d --help`.
COMMANDS = ("demo", "inspect", "pretrain", "finetune", "segment", "classify", "evaluate")


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = _join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Med3DError as exc:
        print(f"med3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"med3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
