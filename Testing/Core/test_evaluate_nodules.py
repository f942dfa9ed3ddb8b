"""`med3d evaluate --csv` on real LIDC nodule crops: AUC, accuracy, sensitivity at 90 % specificity, Brier and
ECE equal to the metrics module's values on the printed probabilities, 95 % intervals from a stratified bootstrap
over patients (deterministic; the point value alone when there are too few patients), the bundle's temperature
applied, and one plain warning when the cases come from patients the model was fine-tuned on."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from med3dcore.bundles import save_bundle
from med3dcore.cli import main
from med3dcore.infer import classify
from med3dcore.metrics import accuracy, auc, brier, expected_calibration_error, sensitivity_at_specificity
from med3dcore.nets import build_model
from med3dcore.nodule_evaluation import MIN_PATIENTS_PER_CLASS, RESAMPLES, SEED, patient_digest
from med3dcore.volume_files import read_volume

torch.set_num_threads(2)
ARCH = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
        "head": {"type": "classifier", "num_classes": 2}}


def _rows(data_dir, malignant_patients: int, benign_patients: int):
    """Whole patients (every nodule of each) from the shared table, in its order: the first patients with a
    malignant nodule and the first without, so some patients bring several nodules."""
    table = data_dir / "nodules" / "labels.csv"
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    chosen, counts = [], {True: 0, False: 0}
    wanted = {True: malignant_patients, False: benign_patients}
    for patient, nodules in by_patient.items():
        kind = any(r["label"] == "malignant" for r in nodules)
        if counts[kind] < wanted[kind]:
            counts[kind] += 1
            chosen += [{"image": str(table.parent / r["image"]), "mask": str(table.parent / r["mask"]),
                        "patient_id": r["patient_id"], "label": r["label"]} for r in nodules]
        if counts == wanted:
            break
    return chosen


def _table(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def real(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate_nodules")
    rows = _rows(data_dir, MIN_PATIENTS_PER_CLASS + 1, MIN_PATIENTS_PER_CLASS + 1)
    trained_on = sorted({r["patient_id"] for r in rows})[:3]
    torch.manual_seed(3)
    model = folder / "nodule.pt"
    save_bundle(model, build_model(ARCH), architecture=ARCH, task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
                provenance={"data": {"train_patient_sha256": [patient_digest(p) for p in trained_on],
                                              "validation_patient_sha256": []}},
                extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}, "temperature": 0.05})
    return {"folder": folder, "rows": rows, "model": model, "trained_on": trained_on}


def _evaluate(capsys, model, table, *extra):
    code = main(["evaluate", "--model", str(model), "--csv", str(table), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_metrics_and_intervals_on_real_nodules(capsys, real):
    rows = real["rows"]
    assert len(rows) > len({r["patient_id"] for r in rows})  # some patients bring several nodules
    table = _table(real["folder"] / "all.csv", rows)
    code, out, err = _evaluate(capsys, real["model"], table, "--json")
    assert code == 0
    result = json.loads(out)
    p = np.array([r["probability"] for r in result["per_case"]])
    y = np.array([int(r["label"] == "malignant") for r in rows])
    assert result["cases"] == len(rows) and result["patients"] == 2 * (MIN_PATIENTS_PER_CLASS + 1)
    # the printed probabilities are the engine's, with the bundle's temperature
    first = classify(read_volume(rows[0]["image"]), str(real["model"]), mask=read_volume(rows[0]["mask"]),
                     device="cpu")
    assert p[0] == pytest.approx(first.probabilities["malignant"], abs=1e-6)
    assert result["temperature"] == 0.05
    assert result["probability_from"] == {"image": len(rows)}  # no measured-size model in this bundle
    assert 0.0 < p.min() < p.max() < 1.0 and len(set(np.round(p, 6))) > 1
    assert result["auc"] == pytest.approx(auc(p, y))
    assert result["accuracy"] == pytest.approx(accuracy((p >= 0.5).astype(int), y))
    assert result["sensitivity_at_90_specificity"] == pytest.approx(sensitivity_at_specificity(p, y, 0.9))
    assert result["brier"] == pytest.approx(brier(p, y))
    assert result["ece"] == pytest.approx(expected_calibration_error(p, y))
    # intervals: a percentile bootstrap over whole patients, stratified by "has a malignant nodule", fixed seed
    from scipy.stats import bootstrap

    patients = sorted({r["patient_id"] for r in rows})
    members = {q: np.array([i for i, r in enumerate(rows) if r["patient_id"] == q]) for q in patients}
    with_m = [members[q] for q in patients if y[members[q]].any()]
    without = [members[q] for q in patients if not y[members[q]].any()]

    def auc_of(a, b):
        idx = np.concatenate([without[int(i)] for i in a] + [with_m[int(i)] for i in b])
        return auc(p[idx], y[idx])

    expected = bootstrap((np.arange(len(without)), np.arange(len(with_m))), auc_of, n_resamples=RESAMPLES,
                         vectorized=False, method="percentile", rng=np.random.default_rng(SEED)).confidence_interval
    assert result["ci95"]["auc"] == pytest.approx([expected.low, expected.high], abs=1e-6)
    for name, (low, high) in result["ci95"].items():
        assert 0.0 <= low <= high <= 1.0, name
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["seed"] == SEED
    # deterministic: the same command prints the same intervals
    code, again, _ = _evaluate(capsys, real["model"], table, "--json")
    assert json.loads(again)["ci95"] == result["ci95"]
    # three of these patients were recorded as training patients: one plain warning line on stderr
    n_seen = sum(r["patient_id"] in real["trained_on"] for r in rows)
    assert result["training_overlap"]["cases"] == n_seen and result["training_overlap"]["patients"] == 3
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"med3d evaluate: warning: {n_seen} of {len(rows)} cases (3 of {len(patients)} patients) come "
                        "from patients this model was fine-tuned on (3 in training, 0 in validation): these figures "
                        "are optimistic, not what new patients would get"]
    # without --json the scores are also said in plain words on stderr
    code, _, err = _evaluate(capsys, real["model"], table)
    lo, hi = result["ci95"]["auc"]
    assert f"med3d evaluate: AUC: {result['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})" in err.splitlines()


def test_unseen_patients_and_too_few_for_an_interval(capsys, real):
    unseen = [r for r in real["rows"] if r["patient_id"] not in real["trained_on"]]
    malignant = sorted({r["patient_id"] for r in unseen if r["label"] == "malignant"})[:2]
    few = [r for r in unseen if r["patient_id"] in malignant or r["label"] == "benign"][:6]
    assert {r["label"] for r in few} == {"benign", "malignant"}
    code, out, err = _evaluate(capsys, real["model"], _table(real["folder"] / "few.csv", few), "--json")
    assert code == 0 and "warning" not in err
    result = json.loads(out)
    assert result["training_overlap"] == {**result["training_overlap"], "checked": True, "cases": 0}
    p = np.array([r["probability"] for r in result["per_case"]])
    y = np.array([int(r["label"] == "malignant") for r in few])
    assert result["auc"] == pytest.approx(auc(p, y)) and result["brier"] == pytest.approx(brier(p, y))
    assert all(v is None for v in result["ci95"].values())
    assert f"needs at least {MIN_PATIENTS_PER_CLASS} patients with a malignant nodule" in result["bootstrap"]["note"]
    # a table without patient ids cannot be checked against the training patients: no warning, said in the JSON
    anonymous = [{k: v for k, v in r.items() if k != "patient_id"} for r in real["rows"][:4]]
    code, out, err = _evaluate(capsys, real["model"], _table(real["folder"] / "anon.csv", anonymous), "--json")
    assert code == 0 and "warning" not in err
    overlap = json.loads(out)["training_overlap"]
    assert overlap["checked"] is False and "no patient_id column" in overlap["reason"]
