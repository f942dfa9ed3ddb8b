"""The ``med3d`` command. Each subcommand lives in its own module of this package, which provides
``add_parser(subparsers)``; the parser it adds sets ``func`` to a callable taking the parsed args and returning an
exit code. A :class:`Med3DError` is printed as one line, without a traceback, with exit status 2."""
from __future__ import annotations

import argparse
import importlib
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
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue  # a subcommand not built yet
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
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
