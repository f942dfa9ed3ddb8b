"""checkpoint_files.py and medicalnet.py: safe loading of untrusted files, atomic saving, architecture detection,
MedicalNet import/export."""
from __future__ import annotations

import collections
import os
import pickle
import re
import signal

import pytest
import torch

from med3dcore import safe_io
from med3dcore.checkpoint_files import atomic_save, safe_load
from med3dcore.errors import Med3DError
from med3dcore.medicalnet import LoadReport, detect_architecture, export_medicalnet, load_medicalnet
from med3dcore.nets import build_model, resnet3d

torch.set_num_threads(2)


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct values everywhere (BN statistics included) so a load that skips a tensor is noticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5 if name.endswith("running_var")
                             else 0.05 * torch.randn(tensor.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def encoder10():
    return _randomise(resnet3d(10, "B", num_seg_classes=None), seed=1).eval()


@pytest.fixture(scope="module")
def release10(encoder10, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "resnet_10.pth"
    export_medicalnet(encoder10, path)
    return path


def _states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ safe_load

class _RunsCode:
    """A pickle payload that would create ``marker`` when unpickled by a careless loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_reads_a_checkpoint(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 4}, path)
    loaded = safe_load(path)
    assert loaded["epoch"] == 4 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_safe_load_refuses_code_and_never_runs_it(tmp_path, writer, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path, pickle_protocol=protocol)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=protocol)
    with pytest.raises(Med3DError) as info:
        safe_load(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "refused to load" in message and "'posix.system'" in message and "nothing from it was run" in message
    assert not marker.exists()
    # the payload really is live: a careless load would have run it
    assert pickle.loads(pickle.dumps(_RunsCode(marker))) == 0 and marker.exists()


def test_safe_load_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"a": [1, 2, 3]}, fh, protocol=4)
    with pytest.raises(Med3DError, match="is a Python pickle that is not a PyTorch checkpoint"):
        safe_load(path)


def test_safe_load_refuses_foreign_objects_in_a_checkpoint(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "numpy.pth"
    torch.save({"metric": np.float64(0.5)}, path)
    with pytest.raises(Med3DError, match=r"refused to load .*numpy"):
        safe_load(path)


def test_safe_load_missing_and_folder(tmp_path):
    with pytest.raises(Med3DError, match=r"nope\.pth does not exist; check the path"):
        safe_load(tmp_path / "nope.pth")
    with pytest.raises(Med3DError, match="is a folder, not a checkpoint file"):
        safe_load(tmp_path)


@pytest.mark.parametrize("content,what", [
    (b"", "is empty \\(0 bytes\\)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch checkpoint \\(it looks like a PNG image\\)"),
    (b"hello, this is a text file\n", "not a PyTorch checkpoint \\(it looks like a text file\\)"),
    (b"\x1f\x8b\x08\x00" + bytes(40), "gzip file"),
    (bytes(128) + b"DICM" + bytes(16), "a DICOM file"),
])
def test_safe_load_names_what_a_foreign_file_is(tmp_path, content, what):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(Med3DError, match=what):
        safe_load(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_load_truncated_file(tmp_path, zip_format):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Med3DError) as info:
        safe_load(path)
    assert "is damaged or truncated" in str(info.value) and "get the file again" in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ atomic_save

class _CtrlCWhilePickled:
    """Sends this process a SIGINT while torch.save pickles it, as a user's Ctrl-C during a checkpoint write."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (collections.OrderedDict, ())  # unpickles as an empty OrderedDict, which weights-only loading allows


@pytest.fixture()
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test, also when this process was started with SIGINT ignored (a
    background job)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_a_save_publishes_the_file_then_interrupts(tmp_path, ctrl_c_raises):
    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": _CtrlCWhilePickled(), "w": torch.ones(3)}, path)
    assert safe_load(path)["step"] == collections.OrderedDict() and torch.equal(safe_load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back


def test_an_ignored_ctrl_c_stays_ignored_during_a_save(tmp_path):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        atomic_save({"step": _CtrlCWhilePickled()}, tmp_path / "last.pt")  # no KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert safe_load(tmp_path / "last.pt")["step"] == collections.OrderedDict()


def test_atomic_save_writes_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.pt"
    assert atomic_save({"x": torch.ones(2)}, path) == path
    assert torch.equal(safe_load(path)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_atomic_save_failure_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"version": 1}, path)
    before = path.read_bytes()

    def disk_full(fd):  # the data is written, the flush to disk fails (e.g. the disk is full)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safe_io.os, "fsync", disk_full)
    with pytest.raises(Med3DError, match="cannot save .*No space left on device; check free disk space"):
        atomic_save({"version": 2, "w": torch.randn(10000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_save_unpicklable_object_keeps_old_file_and_raises(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"version": 1}, path)
    with pytest.raises(Exception) as info:
        atomic_save({"w": torch.randn(100), "f": lambda: 1}, path)
    assert not isinstance(info.value, Med3DError)  # a programming error, not the user's
    assert safe_load(path) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_save_into_missing_folder(tmp_path):
    with pytest.raises(Med3DError, match="folder .*missing does not exist; create it first"):
        atomic_save({}, tmp_path / "missing" / "x.pt")


# ------------------------------------------------------------------------------------------------ detect_architecture

def test_detect_architecture_reads_prefixed_keys(encoder10):
    state = {"module." + k: v for k, v in encoder10.state_dict().items()}
    assert detect_architecture(state) == {"depth": 10, "shortcut_type": "B", "preact": False}
    model = build_model({"backbone": {"depth": 18, "shortcut_type": "A", "preact": True},
                         "head": {"type": "coarse_seg", "num_classes": 2}})
    assert detect_architecture(model.state_dict()) == {"depth": 18, "shortcut_type": "A", "preact": True}


@pytest.mark.parametrize("state,message", [
    ({}, "holds no 3D-ResNet weights \\(no conv1.weight\\)"),
    ({"conv1.weight": torch.zeros(64, 1, 7, 7)}, "this is a 2D network, not a 3D-ResNet"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7, 7)}, "takes 3 input channels; Med3D networks take one channel"),
])
def test_detect_architecture_rejects_other_networks(state, message):
    with pytest.raises(Med3DError, match=message):
        detect_architecture(state)


def test_detect_architecture_rejects_missing_layer_and_odd_block_counts(encoder10):
    state = dict(encoder10.state_dict())
    no_layer3 = {k: v for k, v in state.items() if not k.startswith("layer3.")}
    with pytest.raises(Med3DError, match="layer3 of the 3D-ResNet is missing or incomplete"):
        detect_architecture(no_layer3)
    extra = dict(state)
    extra.update({k.replace("layer1.0.", "layer1.1."): v for k, v in state.items() if k.startswith("layer1.0.")})
    with pytest.raises(Med3DError, match=r"basic blocks per layer \(2, 1, 1, 1\) match no ResNet depth"):
        detect_architecture(extra)


# ------------------------------------------------------------------------------------------------ MedicalNet files

def test_export_writes_medicalnet_layout(encoder10, release10):
    raw = safe_load(release10)
    assert list(raw) == ["state_dict"]
    assert list(raw["state_dict"]) == ["module." + k for k in encoder10.state_dict()]
    assert _states_equal({k[len("module."):]: v for k, v in raw["state_dict"].items()}, encoder10.state_dict())


def test_export_skips_conv_seg_and_head_and_refuses_overwrite(tmp_path):
    net = resnet3d(10, "B", num_seg_classes=2)
    path = tmp_path / "seg.pth"
    export_medicalnet(net, path)
    keys = list(safe_load(path)["state_dict"])
    assert not any("conv_seg" in k for k in keys) and len(keys) == len(resnet3d(10, "B", None).state_dict())
    with pytest.raises(Med3DError, match="already exists; choose another name or allow overwriting"):
        export_medicalnet(net, path)
    model = build_model({"backbone": {"depth": 10}, "head": {"type": "coarse_seg", "num_classes": 2}})
    export_medicalnet(model, path, overwrite=True)
    assert _states_equal({k[len("module."):]: v for k, v in safe_load(path)["state_dict"].items()},
                         model.encoder.state_dict())


def test_load_roundtrip_into_resnet_leaves_conv_seg(encoder10, release10):
    net = resnet3d(10, "B", num_seg_classes=2)
    report = load_medicalnet(net, release10)
    assert isinstance(report, LoadReport)
    assert report.left == [k for k in net.state_dict() if k.startswith("conv_seg.")]
    assert len(report.loaded) == len(encoder10.state_dict())
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("conv_seg.")}
    assert _states_equal(backbone, encoder10.state_dict())


def test_load_full_medicalnet_model_takes_conv_seg_when_it_fits(tmp_path):
    source = _randomise(resnet3d(10, "B", num_seg_classes=3), seed=5)
    path = tmp_path / "trained.pth"
    # MedicalNet's training script saves the whole model (conv_seg included) beside the optimizer state
    torch.save({"ecpoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    same = resnet3d(10, "B", num_seg_classes=3)
    assert load_medicalnet(same, path).left == []
    assert _states_equal(same.state_dict(), source.state_dict())
    other = resnet3d(10, "B", num_seg_classes=2)
    assert load_medicalnet(other, path).left == [k for k in other.state_dict() if k.startswith("conv_seg.")]


def test_load_bare_state_dict(encoder10, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(encoder10.state_dict(), bare)
    net = resnet3d(10, "B", None)
    assert load_medicalnet(net, bare).left == []
    assert _states_equal(net.state_dict(), encoder10.state_dict())


def test_load_missing_tensor_is_refused_and_model_untouched(encoder10, tmp_path):
    state = {"module." + k: v for k, v in encoder10.state_dict().items() if k != "layer1.0.bn1.running_var"}
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    net = resnet3d(10, "B", None)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(Med3DError, match=r"lacks 1 backbone tensor\(s\) of ResNet-10, shortcut B "
                                         r"\(e\.g\. layer1\.0\.bn1\.running_var\)"):
        load_medicalnet(net, path)
    assert _states_equal(net.state_dict(), before)


def test_load_wrong_shape_is_refused(encoder10, tmp_path):
    state = {"module." + k: v for k, v in encoder10.state_dict().items()}
    state["module.layer3.0.conv2.weight"] = torch.zeros(256, 256, 3, 3, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(Med3DError, match=r"tensor layer3\.0\.conv2\.weight has shape \(256, 256, 3, 3, 1\), "
                                         r"the model needs \(256, 256, 3, 3, 3\)"):
        load_medicalnet(resnet3d(10, "B", None), path)


def test_load_preact_mismatch_names_preactivation(release10):
    with pytest.raises(Med3DError, match="holds ResNet-10, shortcut B; model is pre-activation ResNet-10, "
                                         "shortcut B; build the model with depth=10, shortcut_type='B', "
                                         "preact=False"):
        load_medicalnet(resnet3d(10, "B", None, preact=True), release10)


def test_load_file_without_weights_and_wrong_target(tmp_path, release10):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "note": "no tensors"}, path)
    with pytest.raises(Med3DError, match="holds no network weights"):
        load_medicalnet(resnet3d(10, "B", None), path)
    with pytest.raises(Med3DError, match="needs a resnet3d network or a Med3DNet, got Linear"):
        load_medicalnet(torch.nn.Linear(2, 2), release10)


def test_messages_are_single_lines(tmp_path, release10):
    for make in (lambda: safe_load(tmp_path / "x.pth"),
                 lambda: load_medicalnet(resnet3d(18, "A", None), release10)):
        with pytest.raises(Med3DError) as info:
            make()
        assert "\n" not in str(info.value) and re.search(r"\S", str(info.value))
