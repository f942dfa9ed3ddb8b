"""Installing what Med3D needs inside Slicer, after asking: torch through the PyTorch extension, the other
packages with pip (constrained so Slicer's own numpy, SimpleITK and VTK stay). Called on first use, never at
import; see :mod:`dependencies` for what is needed."""
from __future__ import annotations

import subprocess
import tempfile

from med3dcore.errors import Med3DError

from . import dependencies


def ensure_dependencies(ask: bool = True) -> bool:
    """Install what is missing (after asking when ``ask``); True when something was installed.

    Raises :class:`Med3DError` when Med3D cannot go on: the user declined, an install failed, or a package
    still does not import (then Slicer must restart).
    """
    import slicer

    plan = dependencies.plan_install()
    if plan.nothing_to_do:
        return False
    if plan.protected_missing:
        raise Med3DError(f"Slicer's own {', '.join(plan.protected_missing)} cannot be imported; this Slicer "
                         "installation is damaged: reinstall Slicer (Med3D never replaces these packages)")
    if plan.torch and not plan.pytorch_extension:
        raise Med3DError("PyTorch is not installed: install the 'PyTorch' extension from the Extensions "
                         "Manager, restart Slicer, and try again (it picks the right build for your GPU)")
    if ask and not slicer.util.confirmOkCancelDisplay(plan.question(), "Med3D: install packages"):
        raise Med3DError("Med3D needs these packages to run: " + ", ".join(
            (["torch"] if plan.torch else []) + plan.pip) + "; install them (Apply again and confirm)")
    if plan.torch:
        _install_torch()
    if plan.pip:
        # One pip call, constrained to the installed numpy/SimpleITK/VTK versions so none is replaced.
        with tempfile.TemporaryDirectory(prefix="Med3D-pip-") as folder:
            try:
                slicer.util.pip_install(dependencies.pip_arguments(plan.pip, folder))
            except subprocess.CalledProcessError as error:
                raise Med3DError(f"pip could not install {', '.join(plan.pip)} (exit code {error.returncode}); "
                                 "see the Python console for pip's output, check the internet connection (or "
                                 "a proxy), then try again") from None
    message = dependencies.after_install_message()
    if message:
        raise Med3DError(message)
    return True


def _install_torch() -> None:
    import PyTorchUtils

    try:
        # Raises CalledProcessError when light-the-torch fails; returns the imported torch otherwise.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=">=1.13")
    except subprocess.CalledProcessError as error:
        raise Med3DError(f"installing PyTorch failed (light-the-torch exited with code {error.returncode}); see "
                         "the Python console for its output, check the internet connection, then try again or "
                         "install PyTorch in the PyTorch module") from None
    except (ImportError, OSError) as error:
        raise Med3DError(f"PyTorch was installed but does not import ({error}); restart Slicer and try again") \
            from None
    if torch is None:
        raise Med3DError("PyTorch was not installed; install it in the PyTorch module, then try again")
