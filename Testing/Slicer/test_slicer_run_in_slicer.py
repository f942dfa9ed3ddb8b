"""Testing/Slicer/run_in_slicer.py's checks, run against the Slicer double (chest_ct.nrrd stands in for the CTChest
sample), so the script that CI runs in a real Slicer is itself exercised here: segmentation, terminology that
Slicer's parser accepts, classification into a table, and a tiny real fine-tuning run in the background."""
from __future__ import annotations

import sys

import pytest


@pytest.mark.slow
def test_run_in_slicer_checks_pass_against_the_double(data_dir, monkeypatch, capsys) -> None:
    import slicer_double as double

    monkeypatch.setenv("MED3D_MODELS", "restored-after-the-test")
    double.install({"CTChest": str(data_dir / "ct" / "chest_ct.nrrd")})
    try:
        sys.modules.pop("Med3D", None)
        import run_in_slicer

        run_in_slicer.run_checks()
    finally:
        double.uninstall()
    out = capsys.readouterr().out
    for step in ("module self-test", "lung segmentation", "nodule classification", "fine-tuning"):
        assert f"Med3D: {step} passed" in out


def test_terminology_parser_of_the_double_rejects_what_slicer_rejects() -> None:
    import slicer_double as double
    from Med3DLib import segments

    logic, entry = double.TerminologiesLogic(), double.TerminologyEntry()
    assert logic.DeserializeTerminologyEntry(segments.terminology_string("SCT^39607008^Lung", "lung"), entry)
    assert entry.GetTypeObject().GetCodeValue() == "39607008"
    broken = segments.terminology_string("SCT^39607008^Lung", "lung") + "|"
    assert not logic.DeserializeTerminologyEntry(broken.replace("~^^~Anatomic", "~Anatomic"), entry)
    assert not logic.DeserializeTerminologyEntry("~".join(["ctx", "^^", "a^b^c", "^^", "", "^^", "^^"]), entry)
