"""Med3DLib.dependencies (what to install and how), Med3DLib.models (the model list) and Med3DLib.finetune_job
(exported training cases that the real engine readers accept, and the background command line)."""
from __future__ import annotations

import csv
import importlib
import re
from pathlib import Path

import numpy as np
import pytest

from Med3DLib import dependencies, finetune_job, models
from med3dcore.errors import Med3DError
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume

ROOT = Path(__file__).resolve().parents[2]


def fake_installed(missing):
    return lambda module: module not in missing


def test_plan_routes_torch_to_the_pytorch_extension_and_the_rest_to_pip() -> None:
    plan = dependencies.plan_install(fake_installed({"torch", "nibabel"}), pytorch_extension=True)
    assert plan.torch and plan.pip == ["nibabel>=4.0"] and plan.protected_missing == []
    assert not plan.nothing_to_do
    question = plan.question()
    assert "PyTorch extension" in question and "nibabel>=4.0" in question
    assert "SimpleITK, numpy and VTK are left as they are" in question


def test_plan_without_the_pytorch_extension_says_to_install_it() -> None:
    plan = dependencies.plan_install(fake_installed({"torch"}), pytorch_extension=False)
    assert plan.torch and plan.pip == []
    assert "install the 'PyTorch' extension" in plan.question()


def test_slicers_own_packages_are_never_installed() -> None:
    plan = dependencies.plan_install(fake_installed({"SimpleITK", "numpy", "vtk"}), pytorch_extension=True)
    assert plan.protected_missing == ["SimpleITK", "numpy", "vtk"]
    assert plan.pip == [] and not plan.torch


def test_everything_installed_here_needs_nothing() -> None:
    plan = dependencies.plan_install(pytorch_extension=True)
    assert plan.nothing_to_do
    assert dependencies.after_install_message() is None
    message = dependencies.after_install_message(fake_installed({"skimage"}))
    assert "scikit-image>=0.19" in message and "restart Slicer" in message


def test_requirements_cover_the_engine_dependencies_with_the_same_lower_bounds() -> None:
    """Every dependency in Med3DCore/pyproject.toml is either installed by the module or one of Slicer's own."""
    text = (ROOT / "Med3DCore" / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    declared = re.findall(r'"([^"]+)"', block)
    ours = {req.pip_name for req in dependencies.REQUIREMENTS}
    for requirement in declared:
        name = re.split(r"[<>=!~ ]", requirement)[0]
        if name in dependencies.PROTECTED:
            continue
        assert requirement in ours, f"{requirement} from pyproject.toml is not in Med3DLib.dependencies"


# --------------------------------------------------------------------------------------------------- models

class Info:
    def __init__(self, name, task, path="/m/x.pt"):
        self.name, self.task, self.path = name, task, Path(path)


def test_model_choice_by_task_name_and_path(tmp_path: Path) -> None:
    found = [Info("lungA", {"type": "segmentation", "name": "lung"}, "/m/lungA.pt"),
             Info("nod", {"type": "classification", "name": "nodule"}, "/m/nod.pt"),
             Info("broken", {}, "/m/broken.pt")]
    assert [i.name for i in models.models_for_task(found, "lung")] == ["lungA"]
    assert models.pick_model(found, "nodule", None, "/m") == "/m/nod.pt"
    assert models.pick_model(found, "lung", "lungA", "/m") == "/m/lungA.pt"
    own = tmp_path / "own.pt"
    own.write_bytes(b"x")
    assert models.pick_model(found, "lung", str(own), "/m") == str(own)
    with pytest.raises(Med3DError, match="No liver segmentation model is in /m yet.*Add model file"):
        models.pick_model(found, "liver", None, "/m")
    with pytest.raises(Med3DError, match="neither a file nor a known model"):
        models.pick_model(found, "lung", "nope", "/m")
    # Lung segmentation works without weights: the engine's classical method, listed after trained models.
    assert models.model_choices(found, "lung") == [("lungA", "/m/lungA.pt"), (models.CLASSICAL_TITLE, "classical")]
    assert models.pick_model(found[1:], "lung", None, "/m") == models.CLASSICAL
    assert models.pick_model(found, "lung", "classical", "/m") == models.CLASSICAL
    with pytest.raises(Med3DError, match="classical method exists for lung only"):
        models.pick_model(found, "nodule", "classical", "/m")
    assert models.model_choices(found, "liver") == []
    assert models.CLASSICAL_TITLE == "Classical lung method (threshold, no weights)"
    assert models.task_from_title("Nodule classification") == "nodule"
    with pytest.raises(Med3DError, match="unknown task"):
        models.task_from_title("Brain")


# ------------------------------------------------------------------------------------------------ finetune

def test_class_from_roi_name() -> None:
    assert finetune_job.class_from_name("Nodule 3 malignant") == "malignant"
    assert finetune_job.class_from_name("benign_2") == "benign"
    with pytest.raises(Med3DError, match="exactly one of 'benign' or 'malignant'"):
        finetune_job.class_from_name("Nodule 3")
    with pytest.raises(Med3DError, match="exactly one"):
        finetune_job.class_from_name("benign or malignant?")


def test_export_segmentation_cases_round_trip(data_dir, tmp_path: Path) -> None:
    image = read_volume(data_dir / "ct" / "abdomen_ct_small.nii.gz")
    labels = read_volume(data_dir / "ct" / "abdomen_ct_small_multilabel.nii.gz")
    liver = labels.with_array((labels.array == 5).astype(np.uint8))
    table = finetune_job.export_segmentation_cases([finetune_job.SegmentationCase(image, liver, "p1")], str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    assert rows == [{"image": "images/case_000.nii.gz", "label": "labels/case_000.nii.gz", "patient_id": "p1"}]
    back = read_volume(tmp_path / rows[0]["image"])
    assert back.same_geometry(image) and np.array_equal(back.array, image.array)
    np.testing.assert_array_equal(read_volume(tmp_path / rows[0]["label"]).array, liver.array)
    # The engine's own data reader accepts the table.
    domains = importlib.import_module("med3dcore.domains")
    domain = domains.domain_from_dict({"name": "scene", "csv": str(table), "labels": {"1": "liver"}}, tmp_path)
    assert len(domain.cases) == 1


def test_export_refuses_mismatched_grids_and_empty_lists(tmp_path: Path) -> None:
    image = Volume(np.zeros((4, 5, 6), np.int16))
    shifted = Volume(np.zeros((4, 5, 6), np.uint8), origin=(1.0, 0, 0))
    with pytest.raises(Med3DError, match="grid differs"):
        finetune_job.export_segmentation_cases([finetune_job.SegmentationCase(image, shifted)], str(tmp_path))
    with pytest.raises(Med3DError, match="no training cases"):
        finetune_job.export_segmentation_cases([], str(tmp_path))
    with pytest.raises(Med3DError, match="no training nodules"):
        finetune_job.export_nodule_cases([], str(tmp_path))


def test_export_nodule_cases_is_read_by_the_engine(tmp_path: Path) -> None:
    from med3dcore.nodules import read_nodule_table

    image = Volume(np.full((8, 9, 10), -800, np.int16), spacing=(0.7, 0.7, 2.0), origin=(-20.0, 5.0, 30.0))
    cases = [finetune_job.NoduleCase(image, (-18.0, 7.0, 34.0), (5.0, 5.0, 6.0), "malignant", "patient-1"),
             finetune_job.NoduleCase(image, (-17.0, 8.0, 36.0), (4.0, 4.0, 4.0), "benign", "patient-1")]
    table = finetune_job.export_nodule_cases(cases, str(tmp_path))
    assert len(list((tmp_path / "images").iterdir())) == 1  # two ROIs on one volume: one image
    read = read_nodule_table(table)
    assert [c.label for c in read] == [1, 0]
    assert read[0].roi == (-18.0, 7.0, 34.0, 5.0, 5.0, 6.0)
    assert read[0].patient == "patient-1"


def test_model_name_and_command_line_parse_with_the_real_cli(tmp_path: Path) -> None:
    from med3dcore.cli import build_parser

    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(Med3DError, match="already exists"):
        finetune_job.model_name(str(tmp_path), "taken")
    assert finetune_job.model_name(str(tmp_path), "taken", resume=True) == "taken"
    assert finetune_job.model_name(str(tmp_path), "my lung/model") == "my_lung_model"
    table = tmp_path / "cases.csv"
    table.write_text("image,label\na.nii.gz,b.nii.gz\nc.nii.gz,d.nii.gz\ne.nii.gz,f.nii.gz\n")
    command = finetune_job.finetune_command("/s/PythonSlicer", "lung", str(table), "/m", "mine",
                                            init="/m/base.pt", steps=6, lr=0.0005, resume=True)
    assert command[:4] == ["/s/PythonSlicer", "-m", "med3dcore.cli", "finetune"]
    args = build_parser().parse_args(command[3:])
    assert (args.task, args.csv, args.out, args.name, args.init) == ("lung", str(table), "/m", "mine", "/m/base.pt")
    assert (args.steps, args.lr, args.resume, args.progress, args.device) == (6, 0.0005, True, "jsonl", "auto")
    assert build_parser().parse_args(finetune_job.finetune_command("p", "nodule", str(table), "/m", "n")[3:]).init \
        == "scratch"


def test_data_sources_case_counts_and_epochs(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("image,label\na,b\nc,d\ne,f\n")
    assert finetune_job.data_arguments(str(table)) == ["--csv", str(table)]
    assert finetune_job.count_cases(str(table)) == 3
    dataset = tmp_path / "dataset.json"
    dataset.write_text('{"training": [{"image": "a", "label": "b"}]}')
    assert finetune_job.data_arguments(str(dataset)) == ["--dataset", str(dataset)]
    assert finetune_job.count_cases(str(dataset)) == 1
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for n in range(5):
        (tmp_path / "images" / f"c{n}.nii.gz").write_bytes(b"")
    assert finetune_job.data_arguments(str(tmp_path))[0::2] == ["--images", "--labels"]
    assert finetune_job.count_cases(str(tmp_path)) == 5
    with pytest.raises(Med3DError, match="not a .csv table"):
        finetune_job.data_arguments(str(tmp_path / "images"))
    assert finetune_job.steps_for_epochs(10, 3, "lung") == 20     # batch 2: 2 steps per pass
    assert finetune_job.steps_for_epochs(4, 20, "nodule") == 12   # batch 8: 3 steps per pass
    with pytest.raises(Med3DError, match="at least 1"):
        finetune_job.steps_for_epochs(0, 3, "lung")


def test_every_third_party_import_of_the_engine_is_covered() -> None:
    """Each package med3dcore imports is either installed by the module or one of Slicer's own."""
    import ast
    import sys

    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        pytest.skip("needs Python 3.10+ to know the standard library's module names")
    imported = set()
    for path in (ROOT / "Med3DCore" / "med3dcore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(stdlib) - {"med3dcore", "__future__"}
    covered = {req.module for req in dependencies.REQUIREMENTS} | set(dependencies.PROTECTED)
    optional = {"yaml", "monai"}  # optional extras of the engine, imported only where used
    assert third_party - covered - optional == set()


def test_pip_arguments_pin_slicers_own_packages(tmp_path: Path) -> None:
    import numpy

    arguments = dependencies.pip_arguments(["nibabel>=4.0"], str(tmp_path))
    assert arguments[:2] == ["nibabel>=4.0", "-c"]
    lines = Path(arguments[2]).read_text().split()
    assert f"numpy=={numpy.__version__}" in lines
    assert all(line.split("==")[0] in dependencies.PROTECTED for line in lines)
