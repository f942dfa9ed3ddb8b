"""Which Python packages Med3D needs in Slicer and how each one is installed.

Checked on first use, never at import. torch is installed through the PyTorch extension (it picks the CUDA
build that fits the GPU driver); the other packages through pip, after the user agreed. Slicer's own
SimpleITK, numpy and VTK are never installed or replaced: pip would put a second, incompatible copy next to
the one Slicer was built with.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, List, NamedTuple, Optional

# Packages that come with Slicer: required, never installed by Med3D.
PROTECTED = ("SimpleITK", "numpy", "vtk")


class Requirement(NamedTuple):
    module: str        # import name
    pip_name: str      # what pip installs, with the lower bound of Med3DCore's pyproject.toml
    via_pytorch_extension: bool = False


REQUIREMENTS = (
    Requirement("torch", "torch>=1.13", via_pytorch_extension=True),
    Requirement("nibabel", "nibabel>=4.0"),
    Requirement("skimage", "scikit-image>=0.19"),
    Requirement("scipy", "scipy>=1.7"),      # the engine imports it directly (it also comes with scikit-image)
    Requirement("PIL", "Pillow>=8.0"),
    Requirement("tqdm", "tqdm>=4.60"),       # the engine's terminal progress bars (small, pure Python)
)


def protected_constraints() -> List[str]:
    """pip constraint lines (``numpy==1.26.4``) pinning the installed versions of Slicer's own packages, so
    that installing a package that wants another version fails instead of replacing Slicer's copy."""
    from importlib import metadata

    lines = []
    for name in PROTECTED:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue  # built into Slicer without pip metadata; nothing Med3D installs requires it
    return lines


def pip_arguments(requirements: List[str], folder: str) -> List[str]:
    """Arguments for ``pip install``: the requirements plus a constraints file (written to ``folder``)."""
    import os

    path = os.path.join(folder, "med3d-constraints.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(protected_constraints()) + "\n")
    return list(requirements) + ["-c", path]


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class InstallPlan(NamedTuple):
    """What to do about missing packages; empty lists mean nothing to do."""
    torch: bool                 # torch missing: install through the PyTorch extension
    pip: List[str]              # pip requirement strings to install
    protected_missing: List[str]  # Slicer's own packages missing: a broken Slicer, not something to pip-fix
    pytorch_extension: bool     # whether the PyTorch extension is there to install torch

    @property
    def nothing_to_do(self) -> bool:
        return not (self.torch or self.pip or self.protected_missing)

    def question(self) -> str:
        """The text of the confirmation dialog, listing what will be installed and how."""
        lines = ["Med3D needs Python packages that are not installed yet:"]
        if self.torch:
            # PyTorchUtilsLogic.installTorch installs torchvision along with torch (SlicerPyTorch).
            lines.append("- PyTorch and torchvision, installed by the PyTorch extension (it picks the build for "
                         "your GPU; a large download)" if self.pytorch_extension else
                         "- PyTorch: install the 'PyTorch' extension from the Extensions Manager first")
        if self.pip:
            lines.append("- " + ", ".join(self.pip) + " (from pip)")
        lines.append("Slicer's own SimpleITK, numpy and VTK are left as they are. Install now?")
        return "\n".join(lines)


def plan_install(installed: Optional[Callable[[str], bool]] = None,
                 pytorch_extension: Optional[bool] = None) -> InstallPlan:
    """Check every requirement; ``installed`` (default :func:`is_installed`) is injectable for tests."""
    installed = installed or is_installed
    if pytorch_extension is None:
        pytorch_extension = installed("PyTorchUtils")
    missing = [req for req in REQUIREMENTS if not installed(req.module)]
    return InstallPlan(
        torch=any(req.via_pytorch_extension for req in missing),
        pip=[req.pip_name for req in missing if not req.via_pytorch_extension],
        protected_missing=[name for name in PROTECTED if not installed(name)],
        pytorch_extension=bool(pytorch_extension),
    )


def after_install_message(installed: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """None when everything imports now; otherwise what is still missing and that Slicer must restart.

    Python caches what it found on its path at start-up, so a package installed into a folder it had
    already scanned may only import after a restart.
    """
    importlib.invalidate_caches()
    after = plan_install(installed, pytorch_extension=True)
    if after.nothing_to_do:
        return None
    missing = (["torch"] if after.torch else []) + after.pip + after.protected_missing
    return (f"still not importable after the install: {', '.join(missing)}; restart Slicer and try again "
            "(if it persists, see the Python console for the installer's output)")
