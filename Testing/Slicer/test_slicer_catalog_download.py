"""The fine-tuning panel's published starting points: MedicalNet encoders of the engine's catalog listed with
their download size, a Download button that asks first, runs ``med3d models pull`` in the background (a real
engine process, against a local HTTP server on 127.0.0.1 acting as a site's mirror), shows progress, and chooses
the checked file as the starting model; a failed download is shown and changes nothing."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_events

NAME = "medicalnet-resnet18-23datasets"  # the catalog publishes no size or checksum for it: the network is checked


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A folder served on 127.0.0.1: a real MedicalNet-layout ResNet-18 (shortcut A) and a short resnet_10.pth."""
    import torch

    from med3dcore.nets import resnet3d
    from med3dcore.medicalnet import export_medicalnet

    folder = tmp_path_factory.mktemp("mirror")
    torch.manual_seed(0)
    export_medicalnet(resnet3d(18, "A", num_seg_classes=None), folder / "resnet_18_23dataset.pth")
    (folder / "resnet_10.pth").write_bytes(b"\0" * 1000)  # the catalog says 57456599 bytes

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def panel_with_mirror(panel, mirror, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MED3D_CATALOG_MIRROR", mirror[1])
    return panel


def choose_start(widget, value: str) -> None:
    combo = widget.ui.startModelComboBox
    combo.currentIndex = combo.findData(value)  # as a user's click


def test_catalog_encoders_are_listed_and_download_is_offered_only_for_them(panel) -> None:
    _, _, widget = panel
    combo = widget.ui.startModelComboBox
    titles = [combo.itemText(i) for i in range(combo.count)]
    assert "MedicalNet ResNet-50 (23 datasets) - not downloaded (185 MB)" in titles
    choose_start(widget, "")
    assert widget.ui.startModelComboBox.currentIndex == 0 and not widget.ui.downloadModelButton.enabled
    choose_start(widget, "catalog:" + NAME)
    assert widget.ui.downloadModelButton.enabled and widget.ui.downloadModelButton.text == "Download"


def test_download_asks_first_and_a_no_downloads_nothing(panel_with_mirror, models_dir) -> None:
    slicer, _, widget = panel_with_mirror
    slicer.app._testing = False  # a real user's Slicer: the question is shown
    slicer.util.confirmAnswer = False
    choose_start(widget, "catalog:" + NAME)
    widget.ui.downloadModelButton.click()
    question = slicer.util.confirmations[-1]
    assert "MedicalNet ResNet-18 (23 datasets) (132 MB)" in question and "Licence: MIT" in question
    assert str(models_dir) in question
    assert widget._downloads.job is None and list(models_dir.iterdir()) == []


def test_download_runs_in_the_background_and_becomes_the_starting_model(panel_with_mirror, models_dir) -> None:
    slicer, _, widget = panel_with_mirror
    slicer.app._testing = False
    slicer.util.confirmAnswer = True  # the user agrees
    choose_start(widget, "catalog:" + NAME)
    widget.ui.downloadModelButton.click()
    assert "MedicalNet ResNet-18 (23 datasets)" in slicer.util.confirmations[-1]
    assert widget.ui.downloadModelButton.text == "Cancel download"
    fractions = []
    run_events(slicer, lambda: fractions.append(widget._downloads.job and widget._downloads.job.state.fraction)
               or widget._downloads.job is None, 120)
    assert 1.0 in fractions  # the progress reached the panel
    path = models_dir / "resnet_18_23dataset.pth"
    assert "Downloaded and checked" in widget.ui.finetuneStatusLabel.text
    record = json.loads((models_dir / ".med3d-models.json").read_text())
    assert record[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    combo = widget.ui.startModelComboBox
    assert combo.itemData(combo.currentIndex) == NAME  # the checked file is now the starting model
    assert not widget.ui.downloadModelButton.enabled and widget.ui.downloadModelButton.text == "Download"


def test_a_failed_download_is_shown_and_leaves_nothing(panel_with_mirror, models_dir) -> None:
    slicer, _, widget = panel_with_mirror
    slicer.app._testing = False
    slicer.util.confirmAnswer = True
    choose_start(widget, "catalog:medicalnet-resnet10")
    widget.ui.downloadModelButton.click()
    run_events(slicer, lambda: widget._downloads.job is None, 120)
    assert "Download failed:" in widget.ui.finetuneStatusLabel.text
    assert "offers 1000 bytes, but resnet_10.pth has 57456599" in slicer.util.errors[-1]
    assert not (models_dir / "resnet_10.pth").exists()
    assert widget.ui.downloadModelButton.text == "Download" and widget.ui.downloadModelButton.enabled
