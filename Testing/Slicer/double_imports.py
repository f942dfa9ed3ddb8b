"""Which Python packages the double's Slicer has: an import hook in front of ``sys.meta_path``.

A *missing* package fails as it does in a Slicer that lacks it: ``import x`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec("x")`` finds nothing. A *broken* package is found but fails while importing (a
half-installed torch whose DLL does not load). Modules already imported by the test process are hidden from
``sys.modules`` while the hook is installed (and so are the engine's modules that imported them), so cached
copies cannot bypass the hook; everything is restored by :func:`remove`. :func:`make_installed` models a
successful install: the package imports again (the same module objects come back, nothing is re-initialised).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Dict, Iterable, Optional

# Engine modules that a missing package would stop from importing are hidden with it; these import nothing
# outside the standard library and stay (so ``Med3DError`` keeps its identity across the test).
STANDARD_LIBRARY_ONLY = ("med3dcore", "med3dcore.errors")


def _root(name: str) -> str:
    return name.split(".")[0]


class _FailingLoader(importlib.abc.Loader):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return None

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        raise self.error


class PackageHook(importlib.abc.MetaPathFinder):
    def __init__(self, missing: Iterable[str] = (), broken: Optional[Dict[str, BaseException]] = None) -> None:
        self.missing = set(missing)
        self.broken = dict(broken or {})
        self.hidden: Dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        root = _root(fullname)
        if root in self.missing:
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        if root in self.broken:
            return importlib.machinery.ModuleSpec(fullname, _FailingLoader(self.broken[root]))
        return None

    def blocked(self, name: str) -> bool:
        return _root(name) in self.missing or _root(name) in self.broken


HOOK: Optional[PackageHook] = None


def install(missing: Iterable[str] = (), broken: Optional[Dict[str, BaseException]] = None) -> PackageHook:
    global HOOK
    remove()
    HOOK = PackageHook(missing, broken)
    if HOOK.missing or HOOK.broken:
        for name in list(sys.modules):
            engine = (_root(name) in ("med3dcore", "Med3DLib", "Med3D") and name not in STANDARD_LIBRARY_ONLY)
            if HOOK.blocked(name) or engine:
                HOOK.hidden[name] = sys.modules.pop(name)
    sys.meta_path.insert(0, HOOK)
    return HOOK


def make_installed(package: str) -> None:
    """A successful install of ``package``: it imports from now on (its hidden modules come back)."""
    if HOOK is None:
        return
    HOOK.missing.discard(package)
    HOOK.broken.pop(package, None)
    for name in [n for n in HOOK.hidden if _root(n) == package]:
        sys.modules.setdefault(name, HOOK.hidden.pop(name))
    if "slicer_double" in sys.modules:  # the next PythonSlicer child has it too
        sys.modules["slicer_double"].write_python_slicer_state()


def remove() -> None:
    """Take the hook out and put back every module it hid (engine modules imported meanwhile are dropped)."""
    global HOOK
    if HOOK is None:
        return
    if HOOK in sys.meta_path:
        sys.meta_path.remove(HOOK)
    if HOOK.hidden:
        for name in list(sys.modules):
            if _root(name) in ("med3dcore", "Med3DLib", "Med3D") and name not in STANDARD_LIBRARY_ONLY:
                sys.modules.pop(name)
        sys.modules.update(HOOK.hidden)
    HOOK = None
