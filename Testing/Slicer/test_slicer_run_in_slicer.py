"""Testing/Slicer/run_in_slicer.py's checks, run against the Slicer double in a fresh Slicer (nothing Med3D needs
installed but the PyTorch extension; chest_ct.nrrd stands in for the CTChest sample), so the script that CI runs
in a real Slicer is itself exercised here: the widget built by Slicer, the dependency flow with its question,
the classical lung method, a classification and a tiny real fine-tuning run, all through the panel."""
from __future__ import annotations

import sys

import pytest

from conftest import SLICER_VERSIONS


@pytest.mark.slow
@pytest.mark.parametrize("version", SLICER_VERSIONS)
def test_run_in_slicer_checks_pass_in_a_fresh_slicer(version, data_dir, monkeypatch, capsys) -> None:
    import slicer_double as double

    monkeypatch.setenv("MED3D_MODELS", "restored-after-the-test")
    double.install(version, missing=double.FRESH_SLICER_MISSING, samples={"CTChest": str(data_dir / "ct" / "chest_ct.nrrd")},
                   testing=True)
    try:
        double.load_module("Med3D")
        sys.modules.pop("run_in_slicer", None)
        import run_in_slicer

        run_in_slicer.run_checks()
    finally:
        double.uninstall()
    out = capsys.readouterr().out
    for step in ("module self-test", "lung segmentation", "nodule classification", "fine-tuning"):
        assert f"Med3D: {step} passed" in out
    assert "packages installed after asking: True" in out


def test_terminology_parser_of_the_double_rejects_what_slicer_rejects() -> None:
    import slicer_double as double
    from Med3DLib import segments

    logic, entry = double.TerminologiesLogic(), double.TerminologyEntry()
    assert logic.DeserializeTerminologyEntry(segments.terminology_string("SCT^39607008^Lung", "lung"), entry)
    assert entry.GetTypeObject().GetCodeValue() == "39607008"
    broken = segments.terminology_string("SCT^39607008^Lung", "lung") + "|"
    assert not logic.DeserializeTerminologyEntry(broken.replace("~^^~Anatomic", "~Anatomic"), entry)
    assert not logic.DeserializeTerminologyEntry("~".join(["ctx", "^^", "a^b^c", "^^", "", "^^", "^^"]), entry)
