"""The hostile inputs of issue 11 as data: every case is a real ``med3d`` command line on real files, run in a
subprocess, with the exit status and the words its one error line must hold.

Run by ``hostile_runner.py`` for ``test_hostile_inputs.py`` (assertions: exit status, one line, no traceback, every
file the user had byte-identical) and for ``Testing/benchmarks/bench_hostile_memory.py`` (peak memory of each case
under ``/usr/bin/time -v``). ``make_shared(folder)`` writes the files most cases share (a small CT, two ResNet-10
bundles with random weights, a tiny pretraining set); each case's ``setup`` writes its own hostile files into its
own folder. The helpers for scans and bundles come from ``test_new_user_errors.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from med3dcore.bundle_checks import CHECKSUM_KEY, content_digest
from med3dcore.preprocess import PreprocessSpec
from test_new_user_errors import SERIES_UIDS, _bundle, _image, _write_dicom_series

Files = Dict[str, Path]


# ------------------------------------------------------------------------------------------------ shared files

def make_shared(base: Path) -> Files:
    """A CT (12x20x20, HU), a lung and a nodule bundle, a nodule table, a pretraining config and its data."""
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ct = rng.normal(-300, 200, (12, 20, 20)).astype(np.int16)
    ct[:, :3] = -1000
    f: Files = {"base": base, "ct": base / "ct.nii.gz"}
    sitk.WriteImage(_image(ct), str(f["ct"]))
    f["lung"] = _bundle(base / "lung.pt", {"type": "coarse_seg", "num_classes": 2},
                        {"type": "segmentation", "name": "lung"}, [{"value": 1, "name": "lung"}],
                        PreprocessSpec(spacing=(3.0, 3.0, 3.0), window=(-1000.0, 400.0), modality="CT"))
    f["nodule"] = _bundle(base / "nodule.pt", {"type": "classifier", "num_classes": 2},
                          {"type": "classification", "name": "nodule"},
                          [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}],
                          extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    mask = np.zeros(ct.shape, np.uint8)
    mask[4:8, 8:12, 8:12] = 1
    f["mask"] = base / "mask.nii.gz"
    sitk.WriteImage(_image(mask), str(f["mask"]))
    rows = "".join(f"ct.nii.gz,mask.nii.gz,{label},p{i}\n"
                   for i, label in enumerate(("benign", "malignant", "malignant", "benign")))
    f["nodules_csv"] = base / "nodules.csv"
    f["nodules_csv"].write_text("image,mask,label,patient_id\n" + rows)
    for sub in ("images", "labels"):
        (base / sub).mkdir(exist_ok=True)
    for name in ("a", "b"):
        sitk.WriteImage(_image(ct), str(base / "images" / f"{name}.nii.gz"))
        sitk.WriteImage(_image(mask), str(base / "labels" / f"{name}.nii.gz"))
    f["config"] = base / "pretrain.json"
    f["config"].write_text(json.dumps(pretrain_config()))
    return f


def pretrain_config(**domain: object) -> dict:
    entry = {"name": "a", "images": "images", "masks": "labels", "labels": {"1": "nodule"}}
    entry.update(domain)
    return {"name": "t", "domains": [entry], "model": {"depth": 10},
            "training": {"steps": 1, "batch_size": 1, "patch_size": [8, 8, 8]}}


# ------------------------------------------------------------------------------------------------ hostile makers

def tiny_bundle(path: Path, checksum: bool = True, **fields: object) -> Path:
    """A bundle dict with one small tensor and the given fields replaced, saved with torch.save; its checksum is
    recomputed (a stranger can do that too), so refusals come from the field checks, not from the checksum."""
    bundle: Dict[str, object] = {
        "format": "med3d-bundle", "format_version": 1,
        "architecture": {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
                         "head": {"type": "coarse_seg", "num_classes": 2}},
        "task": {"type": "segmentation", "name": "lung"}, "labels": [{"value": 1, "name": "lung"}],
        "preprocessing": {}, "provenance": {}, "state_dict": {"encoder.conv1.weight": torch.zeros(2)}, "extra": {}}
    bundle.update(fields)
    if checksum:
        bundle[CHECKSUM_KEY] = content_digest(bundle)
    torch.save(bundle, path)
    return path


def zip_bomb(model: Path, path: Path, gib: int = 1) -> Path:
    """``model`` with its first data record replaced by ``gib`` GiB of deflated zeros (a few MB on disk)."""
    with zipfile.ZipFile(model) as source, zipfile.ZipFile(path, "w") as out:
        names = source.namelist()
        target = next(n for n in names if "/data/" in n and not n.endswith(".pkl"))
        for name in names:
            if name == target:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with out.open(info, "w", force_zip64=True) as member:
                    zeros = bytes(1 << 24)
                    for _ in range(64 * gib):
                        member.write(zeros)
            else:
                out.writestr(source.getinfo(name), source.read(name))
    return path


def flip_weight_bytes(model: Path, path: Path) -> Path:
    """A copy of ``model`` with 16 bytes flipped in the middle of its largest tensor (stored, uncompressed)."""
    data = bytearray(model.read_bytes())
    with zipfile.ZipFile(model) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    header = info.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), \
        int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def nrrd_header(path: Path, data_file: str, sizes: str = "8 8 8", encoding: str = "raw",
                directions: str = "(1,0,0) (0,1,0) (0,0,1)") -> Path:
    path.write_text(f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
                    f"space directions: {directions}\nspace origin: (0,0,0)\nendian: little\nencoding: {encoding}\n"
                    + (f"data file: {data_file}\n" if data_file else "\n"))
    return path


def dicom_series(folder: Path, patch: Callable[[bytearray], bytes]) -> Path:
    """A 3-slice series (GDCM-written, implicit VR) whose first file is changed by ``patch``."""
    _write_dicom_series(folder, SERIES_UIDS[0], "hostile")
    first = sorted(folder.iterdir())[0]
    first.write_bytes(patch(bytearray(first.read_bytes())))
    return folder


def short_pixel_data(data: bytearray) -> bytes:
    start = data.rfind(b"\xe0\x7f\x10\x00") + 8  # implicit VR: tag, 4-byte length, value
    data[start - 4:start] = (20).to_bytes(4, "little")
    return bytes(data[:start + 20])


def orientation(value: bytes) -> Callable[[bytearray], bytes]:
    def patch(data: bytearray) -> bytes:
        return bytes(data).replace(b"1\\0\\0\\0\\1\\0", value)
    return patch


def sheared_nifti(path: Path) -> Path:
    affine = np.array([[2.0, 1.2, 0, 0], [0, 1.6, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # y axis leans 37 degrees
    image = nib.Nifti1Image(np.zeros((20, 20, 12), np.int16), affine)
    image.set_qform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def shared_list_bomb(levels: int = 12, width: int = 8) -> list:
    value: list = ["x"] * width
    for _ in range(levels):
        value = [value] * width  # pickled once per level (memo), 8^12 items when walked
    return value


def alias_bomb(path: Path) -> Path:
    """Nine levels of nine aliases (9^10 strings once expanded) under keys a config may have."""
    lines = ["env_defaults:", '  a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines += ["name: *a8", "domains: [{name: a}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ cases

@dataclass
class Case:
    """``argv`` is a template ({ct}, {lung}, ... shared files; {d} the case's folder); ``setup(d, files)`` makes
    the case's own files. ``words``: what the single error line must hold (lower-case compare)."""
    id: str
    argv: str
    words: Sequence[str] = ()
    code: int = 2
    setup: Optional[Callable[[Path, Files], None]] = None
    env: Dict[str, str] = field(default_factory=dict)
    stdout: Optional[str] = None   # a file to send stdout to (e.g. /dev/full)
    new_files: Sequence[str] = ()  # files a successful case may create in its folder
    real: bool = False             # tests run it through the installed console script, not the fork server


def _link(target: str, name: str) -> Callable[[Path, Files], None]:
    return lambda d, f: os.symlink(target, d / name)


def _tiny(name: str, **fields: object) -> Callable[[Path, Files], None]:
    return lambda d, f: tiny_bundle(d / name, **fields)


def _write(name: str, data: bytes) -> Callable[[Path, Files], None]:
    return lambda d, f: (d / name).write_bytes(data)


def _steps(*steps: Callable[[Path, Files], None]) -> Callable[[Path, Files], None]:
    def run(d: Path, f: Files) -> None:
        for step in steps:
            step(d, f)
    return run


def _config(**domain: object) -> Callable[[Path, Files], None]:
    def make(d: Path, f: Files) -> None:
        for sub in ("images", "labels"):
            shutil.copytree(f["base"] / sub, d / sub)
        (d / "pretrain.json").write_text(json.dumps(pretrain_config(**domain)))
    return make


def _raw_config(text: str) -> Callable[[Path, Files], None]:
    return _steps(_config(), _write("pretrain.json", text.encode()))


SEGMENT = "segment {ct} {d}/{out} --model {lung} --progress none --device cpu"
PRETRAIN = "pretrain --config {d}/pretrain.json --out {d}/run --progress none --device cpu"
NODULE = "finetune --task nodule --csv {nodules_csv} --out {d}/o --steps 1 --batch-size 2 --cube 16 --device cpu " \
         "--progress none"
LABELS_A = [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}]

CASES: List[Case] = [
    # 1: detached formats, links
    Case("01-nhdr-keeps-existing-raw-gz", SEGMENT.replace("{out}", "lab.nhdr"), ["lab.raw.gz", "already exists"],
         setup=_write("lab.raw.gz", b"the user's own data file"), real=True),
    Case("01-mhd-keeps-existing-zraw", SEGMENT.replace("{out}", "lab.mhd"), ["lab.zraw", "already exists"],
         setup=_write("lab.zraw", b"the user's own data file")),
    Case("01-overwrite-never-writes-through-a-link", SEGMENT.replace("{out}", "lab.nhdr") + " --overwrite",
         ["symbolic link", "real path"],
         setup=_steps(_write("target.nhdr", b"NRRD0004\n"), _link("target.nhdr", "lab.nhdr"))),
    Case("01-dangling-link-creates-nothing", SEGMENT.replace("{out}", "lab.nhdr") + " --overwrite",
         ["symbolic link"], setup=_link("missing.nhdr", "lab.nhdr")),
    # 2: full devices
    Case("02-stdout-on-dev-full", "inspect {lung}", ["no space left on device"], stdout="/dev/full", real=True),
    Case("02-json-on-dev-full", "classify {ct} --model {nodule} --device cpu --json", ["no space left"],
         stdout="/dev/full", real=True),
    Case("02-output-linked-to-dev-full", SEGMENT.replace("{out}", "lab.nii.gz") + " --overwrite",
         ["symbolic link"], setup=_link("/dev/full", "lab.nii.gz")),
    # 3: finetune --name
    Case("03-name-dot-deletes-nothing", NODULE + " --name . --overwrite", ["--name", "plain file name"],
         setup=_steps(lambda d, f: (d / "o" / "other" / "checkpoints").mkdir(parents=True),
                      _write("o/other/checkpoints/last.pt", b"another run's checkpoint"))),
    Case("03-name-escapes-out", NODULE + " --name ../../escaped", ["--name", "no folders"]),
    Case("03-overwrite-validates-first", NODULE.replace("{nodules_csv}", "{d}/cases.csv") + " --overwrite",
         ["notes.nii.gz", "not a nifti image"],
         setup=_steps(lambda d, f: (d / "o" / "nodule" / "checkpoints").mkdir(parents=True),
                      _write("o/nodule/checkpoints/last.pt", b"the earlier run's checkpoint"),
                      _write("notes.nii.gz", b"patient 12: follow-up in 3 months\n"),
                      _write("cases.csv", b"image,label,patient_id\nnotes.nii.gz,benign,p1\n"
                                          b"notes.nii.gz,malignant,p2\n"))),
    # 4: pretrain exports
    Case("04-pretrain-keeps-exports", PRETRAIN, ["encoder_bundle.pt exists", "--overwrite"],
         setup=_steps(_config(), lambda d, f: (d / "run").mkdir(), _write("run/encoder_bundle.pt", b"earlier"),
                      _write("run/medicalnet_resnet10.pth", b"earlier"))),
    # 6: what a header may make Med3D read
    Case("06-nhdr-data-file-climbs-out", SEGMENT.replace("{ct}", "{d}/x.nhdr").replace("{out}", "o.nii.gz"),
         ["outside the header's folder"], setup=lambda d, f: nrrd_header(d / "x.nhdr", "../../../../etc/passwd")),
    Case("06-nhdr-absolute-data-file", SEGMENT.replace("{ct}", "{d}/x.nhdr").replace("{out}", "o.nii.gz"),
         ["absolute path"], setup=lambda d, f: nrrd_header(d / "x.nhdr", "/etc/passwd")),
    Case("06-mhd-reads-dev-urandom", SEGMENT.replace("{ct}", "{d}/x.mhd").replace("{out}", "o.nii.gz"),
         ["absolute path"], setup=_write("x.mhd", b"NDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                                                  b"ElementDataFile = /dev/urandom\n")),
    Case("06-data-file-link-leaves-folder", SEGMENT.replace("{ct}", "{d}/x.nhdr").replace("{out}", "o.nii.gz"),
         ["leads outside the header's folder"],
         setup=_steps(_link("/dev/urandom", "x.raw"), lambda d, f: nrrd_header(d / "x.nhdr", "x.raw"))),
    Case("06-data-file-is-a-fifo", SEGMENT.replace("{ct}", "{d}/x.nhdr").replace("{out}", "o.nii.gz"),
         ["fifo"], setup=lambda d, f: (os.mkfifo(d / "x.raw"), nrrd_header(d / "x.nhdr", "x.raw"))),
    Case("06-data-file-list-climbs-out", SEGMENT.replace("{ct}", "{d}/x.nhdr").replace("{out}", "o.nii.gz"),
         ["outside the header's folder"],
         setup=lambda d, f: nrrd_header(d / "x.nhdr", "LIST\n../secret.raw\nok.raw")),
    Case("06-fifo-named-nii-gz", "classify {d}/scan.nii.gz --model {nodule} --device cpu", ["fifo"],
         setup=lambda d, f: os.mkfifo(d / "scan.nii.gz"), real=True),
    Case("06-fifo-in-dicom-folder", SEGMENT.replace("{ct}", "{d}/dicom").replace("{out}", "o.nii.gz"),
         ["fifo", "remove it"], setup=lambda d, f: (_write_dicom_series(d / "dicom", SERIES_UIDS[0], "x"),
                                                    os.mkfifo(d / "dicom" / "zz.dcm"))),
    # 7: sizes from untrusted metadata
    Case("07-yaml-alias-bomb", PRETRAIN.replace("pretrain.json", "bomb.yaml"), ["aliases"],
         setup=lambda d, f: alias_bomb(d / "bomb.yaml")),
    Case("07-pt-zip-bomb-segment", SEGMENT.replace("{lung}", "{d}/bomb.pt").replace("{out}", "o.nii.gz"),
         ["zip bomb"], setup=lambda d, f: zip_bomb(f["lung"], d / "bomb.pt"), real=True),
    Case("07-pt-zip-bomb-classify", "classify {ct} --model {d}/bomb.pt --device cpu", ["zip bomb"],
         setup=lambda d, f: zip_bomb(f["nodule"], d / "bomb.pt")),
    Case("07-bundle-1e9-classes", "classify {ct} --model {d}/m.pt --device cpu", ["num_classes", "1 to 256"],
         setup=_tiny("m.pt", architecture={"backbone": {"depth": 10}, "head": {"type": "classifier",
                                                                               "num_classes": 10 ** 9}},
                     task={"type": "classification", "name": "nodule"}, labels=LABELS_A)),
    Case("07-bundle-huge-channels", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["channels", "4096"], setup=_tiny("m.pt", architecture={"backbone": {"depth": 10}, "head": {
             "type": "lung_decoder", "num_classes": 2, "channels": [10 ** 6, 10 ** 6, 10 ** 6]}})),
    Case("07-bundle-huge-coarse-input", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["input size", "1024"], setup=_tiny("m.pt", extra={"coarse": {
             "architecture": {"backbone": {"depth": 10}, "head": {"type": "coarse_seg", "num_classes": 2}},
             "preprocessing": {}, "state_dict": {"w": torch.zeros(1)}, "input_size": [4096, 4096, 4096]}})),
    Case("07-bundle-huge-nodule-cube", "classify {ct} --model {d}/m.pt --device cpu", ["cube", "8 to 256"],
         setup=_tiny("m.pt", architecture={"backbone": {"depth": 10}, "head": {"type": "classifier",
                                                                               "num_classes": 2}},
                     task={"type": "classification", "name": "nodule"}, labels=LABELS_A,
                     extra={"nodule_input": {"cube": 4096}})),
    Case("07-bundle-spacing-0.01", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["spacing", "0.05"], setup=_tiny("m.pt", preprocessing={"spacing": [0.01, 0.01, 0.01]})),
    Case("07-header-declares-1e15-voxels", SEGMENT.replace("{ct}", "{d}/x.nrrd").replace("{out}", "o.nii.gz"),
         ["voxels", "limit"], setup=lambda d, f: nrrd_header(d / "x.nrrd", "", "100000 100000 100000", "gzip")),
    Case("07-bundle-shared-list-bomb", "inspect {d}/m.pt --json", ["more than", "values"],
         setup=_tiny("m.pt", checksum=False, task={"type": "segmentation", "name": "lung",
                                                   "notes": shared_list_bomb()})),
    # 8: checksum
    Case("08-flipped-weight-bytes", SEGMENT.replace("{lung}", "{d}/flipped.pt").replace("{out}", "o.nii.gz"),
         ["checksum", "changed after saving"], real=True,
         setup=lambda d, f: flip_weight_bytes(f["lung"], d / "flipped.pt")),
    # 9: silently wrong answers
    Case("09-all-nan-scan", "classify {d}/nan.nrrd --model {nodule} --device cpu --json", ["nan"],
         setup=lambda d, f: sitk.WriteImage(_image(np.full((12, 20, 20), np.nan, np.float32)),
                                            str(d / "nan.nrrd")), real=True),
    Case("09-nan-nifti-not-read-as-zeros", "classify {d}/nan.nii.gz --model {nodule} --device cpu --json", ["nan"],
         setup=lambda d, f: sitk.WriteImage(_image(np.full((12, 20, 20), np.nan, np.float32)),
                                            str(d / "nan.nii.gz"))),
    Case("09-dicom-short-pixel-data", SEGMENT.replace("{ct}", "{d}/dicom").replace("{out}", "o.nii.gz"),
         ["20 bytes of pixel data", "truncated"], setup=lambda d, f: dicom_series(d / "dicom", short_pixel_data)),
    Case("09-dicom-zero-orientation", SEGMENT.replace("{ct}", "{d}/dicom").replace("{out}", "o.nii.gz"),
         ["imageorientationpatient", "zero"],
         setup=lambda d, f: dicom_series(d / "dicom", orientation(b"0\\0\\0\\0\\0\\0"))),
    Case("09-dicom-parallel-orientation", SEGMENT.replace("{ct}", "{d}/dicom").replace("{out}", "o.nii.gz"),
         ["imageorientationpatient", "parallel"],
         setup=lambda d, f: dicom_series(d / "dicom", orientation(b"1\\0\\0\\1\\0\\0"))),
    Case("09-sheared-nrrd", SEGMENT.replace("{ct}", "{d}/s.nhdr").replace("{out}", "o.nii.gz"),
         ["not perpendicular", "sheared"], setup=_steps(_write("s.raw", bytes(8 * 8 * 8 * 2)), lambda d, f: nrrd_header(
             d / "s.nhdr", "s.raw", directions="(2,0,0) (1.2,1.6,0) (0,0,3)"))),
    Case("09-sheared-nifti-sform", SEGMENT.replace("{ct}", "{d}/s.nii.gz").replace("{out}", "o.nii.gz"),
         ["not perpendicular"], setup=lambda d, f: sheared_nifti(d / "s.nii.gz")),
    Case("09-evaluate-negative-reference", "evaluate --model {lung} --images {d}/i --labels {d}/l --device cpu",
         ["negative values"], setup=lambda d, f: _pair(d, f, -1)),
    Case("09-evaluate-fractional-reference", "evaluate --model {lung} --images {d}/i --labels {d}/l --device cpu",
         ["fractional values"], setup=lambda d, f: _pair(d, f, 0.5)),
    Case("09-duplicate-label-names", "classify {ct} --model {d}/m.pt --device cpu", ["name 'benign' is used twice"],
         setup=_tiny("m.pt", task={"type": "classification", "name": "nodule"},
                     architecture={"backbone": {"depth": 10}, "head": {"type": "classifier", "num_classes": 2}},
                     labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "benign"}])),
    # 10: training settings
    Case("10-pretrain-lr-inf", PRETRAIN + " --set lr=inf", ["lr must be a finite number"], setup=_config()),
    # 11: one line instead of a traceback
    Case("11-input-is-a-link-loop", SEGMENT.replace("{ct}", "{d}/loop.nii.gz").replace("{out}", "o.nii.gz"),
         ["symbolic link loop"], setup=_link("loop.nii.gz", "loop.nii.gz"), real=True),
    Case("11-output-is-a-link-loop", SEGMENT.replace("{out}", "loop.nii.gz"), ["symbolic link"],
         setup=_link("loop.nii.gz", "loop.nii.gz")),
    Case("11-bad-bundle-in-models-folder", "segment {ct} {d}/o.nii.gz --task lung --method model --progress none "
         "--device cpu", [], code=0, env={"MED3D_MODELS": "{d}/models"}, new_files=["o.nii.gz"],
         setup=lambda d, f: ((d / "models").mkdir(), os.symlink(f["lung"], d / "models" / "lung.pt"),
                             tiny_bundle(d / "models" / "a_task_string.pt", task="lung"),
                             tiny_bundle(d / "models" / "b_labels_dict.pt", labels={"1": "lung"}))),
    Case("11-bundle-task-not-a-mapping", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["'task' must be a mapping"], setup=_tiny("m.pt", task="lung")),
    Case("11-bundle-labels-not-a-list", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["labels must be a list"], setup=_tiny("m.pt", labels={"1": "lung"})),
    Case("11-bundle-depth-ten", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["depth 'ten'"], setup=_tiny("m.pt", architecture={"backbone": {"depth": "ten"},
                                                           "head": {"type": "coarse_seg", "num_classes": 2}})),
    Case("11-bundle-negative-classes", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["num_classes", "-3"], setup=_tiny("m.pt", architecture={"backbone": {"depth": 10},
                                                                  "head": {"type": "coarse_seg", "num_classes": -3}})),
    Case("11-bundle-colour-strings", SEGMENT.replace("{lung}", "{d}/m.pt").replace("{out}", "o.nii.gz"),
         ["colour", "0-255"], setup=_tiny("m.pt", labels=[{"value": 1, "name": "lung", "color": "red"}])),
    Case("11-config-case-is-a-string", PRETRAIN, ["case 0", "mapping with 'image'"],
         setup=_raw_config(json.dumps({"domains": [{"name": "a", "labels": {"1": "x"}, "cases": ["a.nii.gz"]}]}))),
    Case("11-config-label-map-abc", PRETRAIN, ["label_map", "whole"], setup=_config(label_map={"abc": 1})),
    Case("11-config-spacing-a", PRETRAIN, ["spacing must be three positive numbers"], setup=_config(spacing="a")),
    Case("11-config-training-a-list", PRETRAIN, ["'training' must be a mapping"],
         setup=_raw_config(json.dumps(dict(pretrain_config(), training=[1, 2])))),
    Case("11-config-msd-item-without-label", PRETRAIN, ["training entry 0", "'label'"],
         setup=_steps(_write("dataset.json", b'{"training": [{"image": "images/a.nii.gz"}]}'),
                      _raw_config(json.dumps({"domains": [{"name": "a", "labels": {"1": "x"},
                                                           "dataset_json": "dataset.json"}]})))),
    Case("11-config-dataset-json-is-dev-zero", PRETRAIN, ["character device"],
         setup=_raw_config(json.dumps({"domains": [{"name": "a", "labels": {"1": "x"},
                                                    "dataset_json": "/dev/zero"}]}))),
    Case("11-evaluate-csv-row-without-mask", "evaluate --model {lung} --csv {d}/cases.csv --device cpu",
         ["line 3", "image and a label"], setup=lambda d, f: (d / "cases.csv").write_text(
             f"image,mask\n{f['ct']},{f['mask']}\n{f['ct']}\n")),
    # 12: leftovers and strangers' strings
    Case("12-fifo-as-checkpoint", "inspect {d}/model.pt", ["fifo", "not a checkpoint file"],
         setup=lambda d, f: os.mkfifo(d / "model.pt")),
    Case("12-dev-zero-as-checkpoint", "inspect /dev/zero", ["character device", "not a checkpoint file"], real=True),
]


def _pair(d: Path, f: Files, value: float) -> None:
    (d / "i").mkdir()
    (d / "l").mkdir()
    shutil.copy(f["ct"], d / "i" / "c.nii.gz")
    reference = np.zeros((12, 20, 20), np.float32)
    reference[4:8, 4:8, 4:8] = value
    sitk.WriteImage(_image(reference), str(d / "l" / "c.nii.gz"))


if __name__ == "__main__":  # list the cases
    for c in CASES:
        print(c.id, "|", c.argv)
