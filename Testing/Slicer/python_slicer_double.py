"""``PythonSlicer`` of the Slicer double: the Python that Slicer starts for background work, with the same
packages as the double's Slicer (missing and broken ones read from the state file that ``slicer_double``
keeps up to date, so a package "installed" in Slicer imports in the next child too). Runs ``-c CODE`` and
``-m MODULE`` like ``python``."""
from __future__ import annotations

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import double_imports

    with open(os.environ["MED3D_DOUBLE_STATE"]) as handle:
        state = json.load(handle)
    double_imports.install(state["missing"], {name: OSError(text) for name, text in state["broken"].items()})
    sys.path.pop(0)  # the double's folder is not on a real PythonSlicer's path
    args = sys.argv[1:]
    if args[:1] == ["-c"]:
        sys.argv = ["-c"] + args[2:]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    elif args[:1] == ["-m"]:
        sys.argv = [args[1]] + args[2:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
