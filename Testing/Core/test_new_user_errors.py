"""The bad inputs a new user plausibly gives `med3d`, each through the real command line: one clear line on stderr
(``med3d <command>: error: ...`` saying what is wrong and what to do), no traceback, exit status 2, and nothing lost
(no user file changed or deleted, no half-written output left behind).

Most cases call ``med3dcore.cli.main`` in-process (fast); a representative handful run the installed ``med3d``
command in a subprocess, where a traceback would really show. Inputs are tiny synthetic files (SimpleITK, numpy,
ResNet-10 bundles with random weights); the cases about real scans use ``../shared/data`` (``data_dir``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from med3dcore.bundles import save_bundle
from med3dcore.cli import main
from med3dcore.errors import Med3DError
from med3dcore.nets import build_model, resnet3d
from med3dcore.preprocess import PreprocessSpec

torch.set_num_threads(2)

BACKBONE = {"depth": 10, "shortcut_type": "B", "preact": False}
SPACING = (2.0, 2.0, 3.0)  # I, J, K mm of the synthetic scans
SERIES_UIDS = ("1.2.826.0.1.3680043.2.1125.101", "1.2.826.0.1.3680043.2.1125.202")


# ------------------------------------------------------------------------------------------------ the user's files

def _image(array: np.ndarray, spacing: Sequence[float] = SPACING, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    return image


def _write_dicom_series(folder: Path, uid: str, description: str, slices: int = 3) -> None:
    """A tiny CT series (8x8 pixels, 2 mm slices) written with SimpleITK's GDCM writer, keeping our UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        image = sitk.GetImageFromArray(np.full((8, 8), -500 + 10 * k, dtype=np.int16))
        image.SetSpacing((1.0, 1.0))
        for tag, value in (("0008|0060", "CT"), ("0008|103e", description),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", uid), ("0020|0013", str(k + 1)), ("0020|0032", f"0\\0\\{2.0 * k}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "1\\1"), ("0018|0050", "2"),
                           ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|0018", f"{uid}.{k + 1}")):
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[1]}_{k}.dcm"))
        writer.Execute(image)


def _bundle(path: Path, head: Dict, task: Dict, labels: List[Dict], preprocessing=None, extra=None) -> Path:
    torch.manual_seed(0)
    arch = {"backbone": dict(BACKBONE), "head": head}
    return save_bundle(path, build_model(arch), architecture=arch, task=task, labels=labels,
                       preprocessing=preprocessing or {}, provenance={"data": "random weights (test)"}, extra=extra)


class _Evil:
    """Pickles to a call of os.system: loading it unsafely would create the file named in the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, Path]:
    """Every input file once, in one folder ``base`` (outputs go to ``base/results``, which exists and is empty)."""
    base = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    ct = (rng.normal(-300, 200, (12, 20, 20))).astype(np.int16)
    ct[:, :3] = -1000  # some air: a CT in Hounsfield units
    f: Dict[str, Path] = {"base": base, "results": base / "results"}
    f["results"].mkdir()
    f["ct"] = base / "ct.nii.gz"
    sitk.WriteImage(_image(ct), str(f["ct"]))
    f["mr"] = base / "mr.nii.gz"
    sitk.WriteImage(_image(rng.uniform(0, 500, ct.shape).astype(np.float32)), str(f["mr"]))
    f["png"] = base / "scan.png"
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(f["png"])
    f["slice2d"] = base / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct[0]), str(f["slice2d"]))
    f["series4d"] = base / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([_image(ct), _image(ct)]), str(f["series4d"]))
    raw = f["ct"].read_bytes()
    f["truncated"] = base / "cut.nii.gz"
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    metaimage = base / "full.mha"
    sitk.WriteImage(_image(ct), str(metaimage), False)
    f["truncated_mha"] = base / "cut.mha"
    f["truncated_mha"].write_bytes(metaimage.read_bytes()[: int(metaimage.stat().st_size * 0.7)])
    metaimage.unlink()
    f["text"] = base / "notes.nii.gz"
    f["text"].write_text("patient 12: follow-up in 3 months\n")
    f["empty_dir"] = base / "empty_folder"
    f["empty_dir"].mkdir()
    f["dicom2"] = base / "two_series"
    for uid, description in zip(SERIES_UIDS, ("arterial", "venous")):
        _write_dicom_series(f["dicom2"], uid, description)
    f["dicom_file"] = sorted(f["dicom2"].iterdir())[0]

    mask = np.zeros(ct.shape, np.uint8)
    mask[4:8, 8:12, 8:12] = 1
    f["mask"] = base / "nodule_mask.nrrd"
    sitk.WriteImage(_image(mask), str(f["mask"]))
    f["mask_size"] = base / "mask_other_size.nrrd"
    sitk.WriteImage(_image(np.ascontiguousarray(mask[:, :, :10])), str(f["mask_size"]))
    f["mask_spacing"] = base / "mask_other_spacing.nrrd"
    sitk.WriteImage(_image(mask, spacing=(1.0, 1.0, 1.0)), str(f["mask_spacing"]))
    f["mask_empty"] = base / "mask_empty.nrrd"
    sitk.WriteImage(_image(np.zeros_like(mask)), str(f["mask_empty"]))

    # segmentation cases: a_bad's label map is shifted 5 mm, b_good's lies on its image
    for sub in ("images", "labels", "pretrain_images", "pretrain_labels"):
        (base / sub).mkdir()
    for name in ("a_bad", "b_good"):
        sitk.WriteImage(_image(ct), str(base / "images" / f"{name}.nii.gz"))
        sitk.WriteImage(_image(mask, origin=(5.0, 0.0, 0.0) if name == "a_bad" else (0.0, 0.0, 0.0)),
                        str(base / "labels" / f"{name}.nii.gz"))
        sitk.WriteImage(_image(ct), str(base / "pretrain_images" / f"{name}.nii.gz"))
        sitk.WriteImage(_image(mask), str(base / "pretrain_labels" / f"{name}.nii.gz"))
    f["images"], f["labels"] = base / "images", base / "labels"

    rows = "".join(f"ct.nii.gz,nodule_mask.nrrd,{label},p{i}\n"
                   for i, label in enumerate(("benign", "malignant", "malignant", "benign")))
    f["nodules_csv"] = base / "nodules.csv"
    f["nodules_csv"].write_text("image,mask,label,patient_id\n" + rows)
    f["nodules_bad_mask_csv"] = base / "nodules_bad_mask.csv"
    f["nodules_bad_mask_csv"].write_text("image,mask,label,patient_id\n" + rows.replace(
        "nodule_mask.nrrd,malignant,p1", "mask_other_spacing.nrrd,malignant,p1"))
    f["nodules_bom_csv"] = base / "nodules_excel.csv"  # "CSV UTF-8" from a spreadsheet starts with a BOM
    f["nodules_bom_csv"].write_bytes(b"\xef\xbb\xbf" + f["nodules_csv"].read_bytes())
    f["nodules_latin1_csv"] = base / "nodules_latin1.csv"
    f["nodules_latin1_csv"].write_bytes(f["nodules_csv"].read_bytes().replace(b"p3", b"J\xfcrgen"))
    f["seg_latin1_csv"] = base / "cases_latin1.csv"
    f["seg_latin1_csv"].write_bytes(b"image,label\nimages/b_good.nii.gz,labels/b_good.nii.gz\n"
                                    b"images/b_good.nii.gz,labels/J\xfcrgen.nii.gz\n")

    good = {"name": "t", "domains": [{"name": "a", "images": "pretrain_images", "masks": "pretrain_labels",
                                      "labels": {"1": "nodule"}}], "model": {"depth": 10},
            "training": {"steps": 1, "batch_size": 1, "patch_size": [8, 8, 8]}}

    def config(name: str, change) -> Path:
        data = json.loads(json.dumps(good))
        change(data)
        path = base / name
        path.write_text(json.dumps(data))
        return path

    f["cfg_ok"] = config("pretrain.json", lambda d: None)
    f["cfg_missing_file"] = config("pretrain_missing.json", lambda d: d["domains"][0].update(
        images="pretrain_images", masks="labels_typo"))
    f["cfg_top_typo"] = config("pretrain_top_typo.json", lambda d: d.update(trainig=d.pop("training")))
    f["cfg_domain_typo"] = config("pretrain_domain_typo.json", lambda d: d["domains"][0].update(modalty="MR"))
    f["cfg_model_typo"] = config("pretrain_model_typo.json", lambda d: d.update(model={"depht": 18}))
    f["cfg_training_typo"] = config("pretrain_training_typo.json", lambda d: d["training"].update(stpes=5))
    f["cfg_bad_yaml"] = base / "pretrain.yaml"
    f["cfg_bad_yaml"].write_text("name: t\ndomains:\n  - name: a\n    images: pretrain_images\n   masks: labels\n")
    f["earlier_run"] = base / "pretrain_run"
    (f["earlier_run"] / "checkpoints").mkdir(parents=True)
    (f["earlier_run"] / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 a checkpoint of an earlier run")
    f["a_file"] = base / "notes.txt"
    f["a_file"].write_text("not a folder\n")

    f["lung"] = _bundle(base / "lung.pt", {"type": "coarse_seg", "num_classes": 2},
                        {"type": "segmentation", "name": "lung"}, [{"value": 1, "name": "lung"}],
                        PreprocessSpec(spacing=(3.0, 3.0, 3.0), window=(-1000.0, 400.0), modality="CT"))
    f["nodule"] = _bundle(base / "nodule.pt", {"type": "classifier", "num_classes": 2},
                          {"type": "classification", "name": "nodule"},
                          [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}],
                          extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    encoder = resnet3d(10, "B", num_seg_classes=None)
    f["medicalnet"] = base / "resnet_10.pth"  # a MedicalNet release: backbone only, no task
    torch.save({"state_dict": {f"module.{k}": v for k, v in encoder.state_dict().items()}}, f["medicalnet"])
    f["marker"] = base / "PWNED"
    f["evil"] = base / "model_from_a_forum.pt"
    torch.save({"state_dict": _Evil(f["marker"])}, f["evil"])
    raw = f["lung"].read_bytes()
    f["cut_model"] = base / "lung_cut.pt"
    f["cut_model"].write_bytes(raw[: len(raw) // 2])
    return f


def _snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time: what 'nothing lost or left' compares."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            stat = path.stat()
            out[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


def _argv(template: str, files: Dict[str, Path]) -> List[str]:
    return [token.format(**{k: str(v) for k, v in files.items()}) for token in template.split()]


def _check_error(command: str, code: int, err: str, keywords: Sequence[str]) -> str:
    assert code == 2, f"exit status {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith(f"med3d {command}: error: "), lines[0]
    message = lines[0].lower()
    for word in keywords:
        assert word.lower() in message, f"{word!r} not in: {lines[0]}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ in-process cases
# (template, keywords the message must hold); {name} is a path from the fixture.
CASES = [
    # scans that are not 3D volumes
    pytest.param("segment {png} {results}/lung.nii.gz --model {lung}", ["'.png' is not a volume format", "NIfTI"],
                 id="png-as-scan"),
    pytest.param("segment {slice2d} {results}/lung.nii.gz --model {lung}", ["2D image", "3D volume"], id="2d-image"),
    pytest.param("classify {series4d} --model {nodule}", ["4D image", "extract one 3D volume"], id="4d-image"),
    pytest.param("segment {truncated} {results}/lung.nii.gz --model {lung}", ["truncated", "export the file again"],
                 id="truncated-nifti"),
    pytest.param("classify {text} --model {nodule}", ["cannot read", "not a NIfTI image"],
                 id="text-renamed-nii-gz"),
    pytest.param("segment {empty_dir} {results}/lung.nii.gz --model {lung}", ["is empty", "DICOM series"],
                 id="empty-folder"),
    pytest.param("segment {dicom2} {results}/lung.nii.gz --model {lung}",
                 ["holds 2 DICOM series", "--series-uid", SERIES_UIDS[0], "venous"], id="several-dicom-series"),
    pytest.param("classify {dicom2} --model {nodule} --series-uid 1.2.3", ["'1.2.3' is not in folder", SERIES_UIDS[1]],
                 id="unknown-series-uid"),
    pytest.param("classify {dicom_file} --model {nodule}", ["one DICOM file", "give the folder"],
                 id="one-dicom-file"),
    pytest.param("segment {base}/scan_typo.nii.gz {results}/lung.nii.gz --model {lung}", ["does not exist"],
                 id="missing-input"),
    # outputs
    pytest.param("segment {ct} {base}/no_such_folder/lung.nii.gz --model {lung}", ["does not exist", "create it"],
                 id="output-in-missing-folder"),
    pytest.param("segment {ct} {results}/lung.png --model {lung}", ["end the name in", ".nii.gz"],
                 id="output-not-a-volume-name"),
    pytest.param("segment {ct} {ct} --model {lung} --overwrite", ["input scan"], id="output-is-the-input"),
    pytest.param("segment {ct} {lung} --model {lung}", ["already exists", "--overwrite"],
                 id="model-given-as-output"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {lung} --overlay {png}",
                 ["already exists", "--overwrite"], id="existing-overlay"),
    # masks and ROIs
    pytest.param("classify {ct} --model {nodule} --mask {mask_size}", ["mask", "size", "image"],
                 id="mask-of-other-size"),
    pytest.param("classify {ct} --model {nodule} --mask {mask_spacing}", ["geometry differs", "resample the mask"],
                 id="mask-of-other-spacing"),
    pytest.param("classify {ct} --model {nodule} --mask {mask_empty}", ["no voxels", "ROI"], id="empty-mask"),
    pytest.param("classify {ct} --model {nodule} --roi 5000,5000,5000,10,10,10", ["outside the scan", "LPS"],
                 id="roi-outside-scan"),
    pytest.param("classify {ct} --model {nodule} --roi 10,10,10,0,0,0", ["positive size"], id="empty-roi"),
    pytest.param("classify {ct} --model {nodule} --roi 1,2,3", ["CX,CY,CZ,SX,SY,SZ"], id="roi-three-numbers"),
    pytest.param("classify {ct} --model {nodule} --roi -5000,0,0,10,10,10", ["outside the scan"],
                 id="roi-negative-first-number"),
    pytest.param("finetune --task segmentation --images {images} --labels {labels} --label-names 1:nodule "
                 "--out {results} --steps 1 --device cpu --progress none",
                 ["a_bad", "label grid differs", "resample"], id="finetune-label-geometry"),
    pytest.param("finetune --task nodule --csv {nodules_bad_mask_csv} --out {results} --steps 1 --device cpu "
                 "--progress none --cube 16", ["geometry differs", "resample the mask"],
                 id="finetune-nodule-mask-geometry"),
    pytest.param("evaluate --model {lung} --images {images} --labels {labels} --device cpu",
                 ["does not lie on the grid", "resample"], id="evaluate-label-geometry"),
    pytest.param("finetune --task nodule --csv {nodules_csv} --out {results} --steps 1 --device cpu --progress none "
                 "--cube 16 --amp fp16", ["amp 'fp16' needs a CUDA device", "bf16"], id="finetune-fp16-on-cpu"),
    # models
    pytest.param("classify {ct} --model {lung}", ["segmentation model", "med3d segment"], id="seg-model-to-classify"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {nodule}", ["classification model", "med3d classify"],
                 id="cls-model-to-segment"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {medicalnet}",
                 ["MedicalNet backbone", "med3d finetune --init"], id="medicalnet-to-segment"),
    pytest.param("classify {ct} --model {medicalnet}", ["MedicalNet backbone", "finetune"],
                 id="medicalnet-to-classify"),
    pytest.param("evaluate --model {medicalnet} --images {images} --labels {labels}",
                 ["MedicalNet backbone", "finetune"], id="medicalnet-to-evaluate"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {evil}", ["refused to load", "could run code"],
                 id="malicious-pickle-model"),
    pytest.param("finetune --task nodule --csv {nodules_csv} --init {evil} --out {results} --device cpu "
                 "--progress none --cube 16", ["refused to load", "trusted sources"], id="malicious-pickle-init"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {cut_model}", ["damaged or truncated", "again"],
                 id="truncated-checkpoint"),
    pytest.param("classify {ct} --model {ct}", ["not a PyTorch checkpoint", ".nii.gz volume"],
                 id="scan-given-as-model"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {base}/lung_typo.pt", ["does not exist"],
                 id="missing-model"),
    pytest.param("segment {ct} {results}/lung.nii.gz", ["--model", "--task"], id="no-model"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {lung} --task liver", ["'lung' model", "'liver'"],
                 id="model-of-another-task"),
    pytest.param("segment {ct} {results}/lung.nii.gz --model {base}", ["folder"], id="models-folder-as-model"),
    pytest.param("finetune --task nodule --csv {nodules_csv} --init {base}/resnet_typo.pth --out {results} "
                 "--progress none", ["no such file", "scratch"], id="missing-init"),
    pytest.param("inspect {png}", ["not a PyTorch checkpoint", "PNG"], id="inspect-png"),
    # pretraining configs
    pytest.param("pretrain --config {base}/pretrain_typo.yaml --out {results}/run --progress none",
                 ["does not exist"], id="pretrain-missing-config"),
    pytest.param("pretrain --config {cfg_missing_file} --out {results}/run --progress none --device cpu",
                 ["labels_typo", "does not exist"], id="pretrain-config-missing-folder"),
    pytest.param("pretrain --config {cfg_bad_yaml} --out {results}/run --progress none",
                 ["cannot parse config", "line 5"], id="pretrain-bad-yaml"),
    pytest.param("pretrain --config {cfg_top_typo} --out {results}/run --progress none",
                 ["unknown key", "trainig", "training"], id="pretrain-unknown-section"),
    pytest.param("pretrain --config {cfg_domain_typo} --out {results}/run --progress none",
                 ["unknown key", "modalty", "modality"], id="pretrain-unknown-domain-key"),
    pytest.param("pretrain --config {cfg_model_typo} --out {results}/run --progress none --device cpu",
                 ["unknown model setting", "depht"], id="pretrain-unknown-model-key"),
    pytest.param("pretrain --config {cfg_training_typo} --out {results}/run --progress none",
                 ["unknown training setting", "stpes"], id="pretrain-unknown-training-key"),
    pytest.param("pretrain --config {cfg_ok} --out {results}/run --progress none --set stpes=3",
                 ["unknown training setting", "stpes"], id="pretrain-set-typo"),
    pytest.param("pretrain --config {cfg_ok} --out {a_file} --progress none --device cpu",
                 ["is a file", "folder"], id="pretrain-out-is-a-file"),
    pytest.param("pretrain --config {cfg_ok} --out {results}/run --resume --progress none --device cpu",
                 ["--resume", "does not exist"], id="pretrain-resume-without-a-run"),
    pytest.param("pretrain --config {cfg_ok} --out {earlier_run} --progress none --device cpu",
                 ["earlier run", "--resume"], id="pretrain-into-an-earlier-run"),
    # tables
    pytest.param("finetune --task nodule --csv {base}/nodules_typo.csv --out {results} --progress none",
                 ["does not exist"], id="finetune-missing-csv"),
    pytest.param("evaluate --model {lung} --csv {seg_latin1_csv} --device cpu", ["not UTF-8", "CSV UTF-8"],
                 id="evaluate-latin1-csv"),
    pytest.param("finetune --task nodule --csv {nodules_latin1_csv} --out {results} --progress none --device cpu",
                 ["UTF-8"], id="finetune-latin1-csv"),
    # devices: this machine has no CUDA
    pytest.param("segment {ct} {results}/lung.nii.gz --model {lung} --device cuda", ["cuda", "--device cpu"],
                 id="cuda-segment"),
    pytest.param("classify {ct} --model {nodule} --device cuda", ["cuda", "--device cpu"], id="cuda-classify"),
    pytest.param("pretrain --config {cfg_ok} --out {results}/run --progress none --device cuda",
                 ["cuda", "--device cpu"], id="cuda-pretrain"),
    pytest.param("finetune --task nodule --csv {nodules_csv} --out {results} --steps 1 --device cuda "
                 "--progress none --cube 16", ["cuda", "--device cpu"], id="cuda-finetune"),
    pytest.param("evaluate --model {nodule} --csv {nodules_csv} --device cuda", ["cuda", "--device cpu"],
                 id="cuda-evaluate"),
    pytest.param("demo --out {results}/demo --quick --device cuda --progress none", ["cuda", "--device cpu"],
                 id="cuda-demo"),
    pytest.param("demo --out {a_file} --quick --device cpu --progress none", ["file", "folder"],
                 id="demo-out-is-a-file"),
]


@pytest.mark.parametrize("template, keywords", CASES)
def test_bad_input_gives_one_clear_line(template, keywords, files, capsys):
    argv = _argv(template, files)
    before = _snapshot(files["base"])
    try:
        code = main(argv)
        captured = capsys.readouterr()
        _check_error(argv[0], code, captured.err, keywords)
        assert captured.out == "", captured.out
        assert _snapshot(files["base"]) == before, "files were created, changed or deleted"
        assert not files["marker"].exists(), "the malicious pickle ran code"
    finally:
        _remove_new(files["base"], before)


def _remove_new(folder: Path, before: Dict[str, Tuple[int, int]]) -> None:
    """Delete what a failing case left behind, so the next cases start from the same files."""
    for name in sorted(set(_snapshot(folder)) - set(before), key=len):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def test_existing_output_is_kept_without_overwrite(files, capsys):
    target = files["results"] / "kept.nrrd"
    shutil.copy(files["mask"], target)
    content = target.read_bytes()
    before = _snapshot(files["base"])
    try:
        code = main(["segment", str(files["ct"]), str(target), "--model", str(files["lung"]), "--device", "cpu"])
        _check_error("segment", code, capsys.readouterr().err, ["already exists", "--overwrite"])
        assert target.read_bytes() == content and _snapshot(files["base"]) == before
    finally:
        target.unlink()


def test_finetune_does_not_replace_an_existing_model(files, capsys):
    model = files["nodule"]
    content = model.read_bytes()
    before = _snapshot(files["base"])
    code = main(["finetune", "--task", "nodule", "--csv", str(files["nodules_csv"]), "--out", str(model.parent),
                 "--name", "nodule", "--steps", "1", "--device", "cpu", "--progress", "none", "--cube", "16"])
    _check_error("finetune", code, capsys.readouterr().err, ["exists", "--overwrite"])
    assert model.read_bytes() == content and _snapshot(files["base"]) == before


def test_finetune_resume_without_a_run(files, capsys):
    out = files["results"] / "fresh"
    code = main(["finetune", "--task", "nodule", "--csv", str(files["nodules_csv"]), "--out", str(out), "--resume",
                 "--steps", "1", "--device", "cpu", "--progress", "none", "--cube", "16"])
    _check_error("finetune", code, capsys.readouterr().err, ["--resume", "does not exist"])
    shutil.rmtree(out, ignore_errors=True)


class _ReachedTraining(Med3DError):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Stop fine-tuning where the training loop would start (the cases below are about what comes before)."""
    import med3dcore.train

    def stop(*args, **kwargs):
        raise _ReachedTraining("reached the training loop")
    monkeypatch.setattr(med3dcore.train, "train", stop)


def test_finetune_init_of_another_depth_than_asked(files, capsys, no_training):
    code = main(["finetune", "--task", "nodule", "--csv", str(files["nodules_csv"]), "--init", str(files["medicalnet"]),
                 "--depth", "18", "--out", str(files["results"]), "--steps", "1", "--device", "cpu",
                 "--progress", "none", "--cube", "16", "--batch-size", "2"])
    _check_error("finetune", code, capsys.readouterr().err, ["depth", "10", "18"])


def test_finetune_reads_a_spreadsheet_csv(files, capsys, no_training):
    code = main(["finetune", "--task", "nodule", "--csv", str(files["nodules_bom_csv"]), "--out", str(files["results"]),
                 "--steps", "1", "--device", "cpu", "--progress", "none", "--cube", "16", "--batch-size", "2"])
    _check_error("finetune", code, capsys.readouterr().err, ["reached the training loop"])


def test_demo_overwrite_runs_again(tmp_path, capsys, monkeypatch):
    import med3dcore.pretrain

    def stop(*args, **kwargs):
        raise _ReachedTraining("reached the training loop")
    monkeypatch.setattr(med3dcore.pretrain, "train", stop)
    (tmp_path / "pretrain" / "checkpoints").mkdir(parents=True)
    (tmp_path / "pretrain" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 the earlier demo's checkpoint")
    (tmp_path / "report.md").write_text("# the earlier demo\n")
    code = main(["demo", "--out", str(tmp_path), "--quick", "--overwrite", "--device", "cpu", "--progress", "none"])
    _check_error("demo", code, capsys.readouterr().err, ["reached the training loop"])


def test_written_files_are_readable_like_any_other(tmp_path):
    """Label maps and models are written through a temporary file (mkstemp, owner-only 0600); the result must get
    the permissions of a plainly created file, or a colleague (or Slicer run by another user) cannot read it."""
    from med3dcore.volume import Volume
    from med3dcore.volume_files import write_volume
    from med3dcore.checkpoint_files import atomic_save

    umask = os.umask(0o022)
    try:
        labels = write_volume(Volume(np.zeros((2, 3, 4), np.uint8)), tmp_path / "labels.nii.gz")
        model = atomic_save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.pt")
    finally:
        os.umask(umask)
    if os.name == "posix":
        assert oct(labels.stat().st_mode & 0o777) == oct(0o644)
        assert oct(model.stat().st_mode & 0o777) == oct(0o644)


# ------------------------------------------------------------------------------------------------ warnings

def test_mr_given_to_a_ct_model_warns_with_progress_bar(files, capsys):
    out = files["results"] / "mr_lung.nii.gz"
    try:
        assert main(["segment", str(files["mr"]), str(out), "--model", str(files["lung"]), "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert "warning: " in err and "does not look like a CT" in err and "Traceback" not in err
    finally:
        out.unlink(missing_ok=True)


def test_mr_given_to_a_ct_model_warns_without_progress(files, capsys):
    out = files["results"] / "mr_lung_quiet.nii.gz"
    try:
        assert main(["segment", str(files["mr"]), str(out), "--model", str(files["lung"]), "--device", "cpu",
                     "--progress", "none"]) == 0
        captured = capsys.readouterr()
        assert "does not look like a CT" in captured.err + captured.out
    finally:
        out.unlink(missing_ok=True)


def test_mr_given_to_classify_warns(files, capsys):
    assert main(["classify", str(files["mr"]), "--model", str(files["nodule"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("warning: ") and "does not look like a CT" in out


# ------------------------------------------------------------------------------------------------ real scans

REAL_CASES = [
    pytest.param("classify {data}/ct/chest_ct.nrrd --model {nodule} --mask {data}/ct/abdomen_ct_liver.nii.gz",
                 ["mask", "image"], id="real-mask-of-another-scan"),
    pytest.param("segment {data}/dicom/ct_3slice/01.dcm {results}/x.nii.gz --model {lung}",
                 ["one DICOM file", "ct_3slice"], id="real-single-dicom-file"),
    pytest.param("segment {data}/dicom/abdomen_ct_series {results}/x.nii.gz --model {lung} --series-uid 1.2.3",
                 ["is not in folder", "leave out the series uid"], id="real-wrong-series-uid"),
    pytest.param("segment {data}/dicom {results}/x.nii.gz --model {lung}", ["no DICOM series", "subfolders"],
                 id="real-parent-of-dicom-folders"),
]


@pytest.mark.parametrize("template, keywords", REAL_CASES)
def test_bad_input_with_real_scans(template, keywords, files, data_dir, capsys):
    argv = _argv(template, dict(files, data=data_dir))
    before = _snapshot(files["base"])
    code = main(argv)
    _check_error(argv[0], code, capsys.readouterr().err, keywords)
    assert _snapshot(files["base"]) == before


def test_mr_scan_given_to_ct_lung_model_warns(files, data_dir, capsys):
    out = files["results"] / "real_mr_lung.nii.gz"
    try:
        assert main(["segment", str(data_dir / "mr/abdomen_mr_small.nii.gz"), str(out), "--model", str(files["lung"]),
                     "--device", "cpu", "--tile", "whole"]) == 0
        assert "does not look like a CT" in capsys.readouterr().err
    finally:
        out.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ real subprocesses

def _med3d() -> List[str]:
    found = shutil.which("med3d")
    return [found] if found else [sys.executable, "-m", "med3dcore.cli"]


SUBPROCESS_CASES = [
    pytest.param("segment {png} {results}/lung.nii.gz --model {lung}", ["not a volume format"], id="png-as-scan"),
    pytest.param("classify {ct} --model {evil} --roi 10,10,10,5,5,5", ["refused to load", "could run code"],
                 id="malicious-pickle"),
    pytest.param("inspect {cut_model}", ["damaged or truncated"], id="truncated-checkpoint"),
    pytest.param("classify {truncated_mha} --model {nodule}", ["truncated", "data not read completely"],
                 id="truncated-metaimage"),  # MetaIO prints to the process's stderr itself
    pytest.param("classify {ct} --model {nodule} --roi -5000,0,0,10,10,10", ["outside the scan"],
                 id="negative-roi-value"),
]


@pytest.mark.parametrize("template, keywords", SUBPROCESS_CASES)
def test_real_command(template, keywords, files):
    argv = _argv(template, files)
    before = _snapshot(files["base"])
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run(_med3d() + argv, capture_output=True, text=True, timeout=120, env=env)
    _check_error(argv[0], done.returncode, done.stderr, keywords)
    assert done.stdout == ""
    assert _snapshot(files["base"]) == before
    assert not files["marker"].exists(), "the malicious pickle ran code"


def test_real_command_overwrite_refused_keeps_the_file(files):
    target = files["results"] / "labels.nii.gz"
    shutil.copy(files["ct"], target)
    content = target.read_bytes()
    before = _snapshot(files["base"])
    try:
        done = subprocess.run(_med3d() + ["segment", str(files["ct"]), str(target), "--model", str(files["lung"])],
                              capture_output=True, text=True, timeout=120)
        _check_error("segment", done.returncode, done.stderr, ["already exists", "--overwrite"])
        assert target.read_bytes() == content and _snapshot(files["base"]) == before
    finally:
        target.unlink()
