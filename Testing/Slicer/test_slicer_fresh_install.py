"""A freshly installed Slicer (5.8 and 5.10 modes of the double): numpy, scipy, Pillow and SimpleITK only, the
PyTorch extension installed but not torch. The panel must build, the first Apply must ask before installing
(not fail on a missing import), installs must be reported clearly when they fail, and the device list must
follow an install without a restart."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import SLICER_VERSIONS, run_events
from med3dcore.errors import Med3DError


@pytest.fixture(params=SLICER_VERSIONS)
def fresh(request, models_dir):
    import slicer_double as double

    slicer = double.install(request.param, missing=double.FRESH_SLICER_MISSING)
    try:
        double.load_module("Med3D")
        yield slicer
    finally:
        double.uninstall()


def fresh_panel(slicer):
    widget = slicer.util.getModuleWidget("Med3D")
    run_events(slicer, lambda: getattr(widget, "_probe", None) is None, 60)
    return widget


def med3d_folders() -> set:
    import tempfile

    """Work folders in the temp folder; tests assert that a run leaves none of its own behind (a subset check,
    so another process's folder appearing or going meanwhile cannot fail them)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("Med3D-*")}


def test_first_apply_asks_before_installing_instead_of_failing_on_an_import(fresh, data_dir) -> None:
    """Item 1: the volume used to be read (importing nibabel) before the install question; now the question
    comes first, a "no" leaves the scene and the disk as they were, and a "yes" installs and runs."""
    slicer = fresh
    widget = fresh_panel(slicer)
    assert "until PyTorch is installed" in widget.ui.deviceInfoLabel.text
    node = slicer.util.loadVolume(str(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    widget._parameterNode.inputVolume = node
    nodes, folders = slicer.mrmlScene.GetNumberOfNodes(), med3d_folders()
    with pytest.raises(Med3DError, match="needs these packages to run: torch, nibabel>=4.0, scikit-image"):
        widget.ui.applyButton.click()
    (question,) = slicer.util.confirmations
    assert "nibabel>=4.0" in question and "torchvision" in question  # installTorch also installs torchvision
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and not med3d_folders() - folders
    assert widget.ui.applyButton.text == "Apply"

    slicer.util.confirmAnswer = True
    widget.ui.applyButton.click()
    assert sys.modules["PyTorchUtils"].installs == [["install", "torch>=1.13", "torchvision"]]
    run_events(slicer, lambda: widget._job is None and widget._probe is None)
    assert widget.ui.statusLabel.text == "Done.", widget.ui.statusLabel.text
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")
    # Item 10: the device check ran again after the install: it now knows this PyTorch build.
    assert "until PyTorch is installed" not in widget.ui.deviceInfoLabel.text


def test_the_self_test_needs_neither_torch_nor_nibabel(fresh) -> None:
    """Item 1: "Reload and Test" and the py_Med3D CTest run before anything is installed."""
    import Med3D

    Med3D.Med3DTest().runTest()
    assert "nibabel" not in sys.modules and "torch" not in sys.modules


def test_a_failed_torch_install_is_a_clear_error(fresh, data_dir) -> None:
    """Item 9: installTorch raises CalledProcessError when light-the-torch fails (it never returns None)."""
    slicer = fresh
    logic = sys.modules["Med3D"].Med3DLogic()
    sys.modules["PyTorchUtils"].fails = True
    with pytest.raises(Med3DError, match=r"installing PyTorch failed \(light-the-torch exited with code 1\)"):
        logic.ensureDependencies(ask=False)
    slicer.util.pipFails = True
    sys.modules["PyTorchUtils"].fails = False
    with pytest.raises(Med3DError, match=r"pip could not install nibabel>=4.0, scikit-image>=0.19 \(exit code 1\)"):
        logic.ensureDependencies(ask=False)


def test_without_the_pytorch_extension_the_user_is_sent_to_the_extensions_manager(models_dir) -> None:
    import slicer_double as double

    double.install("5.8", missing=double.FRESH_SLICER_MISSING, pytorch_extension=False)
    try:
        double.load_module("Med3D")
        with pytest.raises(Med3DError, match="install the 'PyTorch' extension from the Extensions Manager"):
            sys.modules["Med3D"].Med3DLogic().ensureDependencies()
    finally:
        double.uninstall()


@pytest.mark.parametrize("version", SLICER_VERSIONS)
def test_the_panel_builds_when_torch_is_half_installed(version, models_dir) -> None:
    """Item 4: ``import torch`` failing with a DLL error (found, but does not load) used to stop setup()."""
    import slicer_double as double

    slicer = double.install(version, broken={"torch": OSError("[WinError 126] fbgemm.dll not found")})
    try:
        double.load_module("Med3D")
        widget = fresh_panel(slicer)
        assert [text for text, _ in widget.ui.taskComboBox.items][0] == "Lung segmentation"
        assert "PyTorch is installed but does not load" in widget.ui.deviceInfoLabel.text
        assert "fbgemm.dll" in widget.ui.deviceInfoLabel.text
        assert [data for _, data in widget.ui.deviceComboBox.items] == ["auto", "cpu"]
        widget.cleanup()
    finally:
        double.uninstall()


def test_the_device_list_is_checked_again_when_the_module_is_shown(fresh, monkeypatch) -> None:
    """Item 10: PyTorch installed elsewhere (the PyTorch module) shows up when the panel is shown again."""
    import double_imports

    slicer = fresh
    widget = fresh_panel(slicer)
    assert "until PyTorch is installed" in widget.ui.deviceInfoLabel.text
    double_imports.make_installed("torch")
    slicer.util.selectModule("Data")
    slicer.util.selectModule("Med3D")
    run_events(slicer, lambda: getattr(widget, "_probe", None) is None, 60)
    assert "until PyTorch is installed" not in widget.ui.deviceInfoLabel.text
