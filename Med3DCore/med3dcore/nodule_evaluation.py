"""How good a nodule classifier is on labelled cases: AUC, accuracy, sensitivity at 90 % specificity, Brier score
and expected calibration error, each with a 95 % confidence interval from a bootstrap over patients, and whether
the cases come from patients the model was fine-tuned on (then the figures are optimistic).

A patient's nodules are not independent, so whole patients are resampled. The bootstrap is stratified (patients
with a malignant nodule and patients without are resampled separately, as two samples of
``scipy.stats.bootstrap``), so every resample holds both classes and AUC is always defined; the percentile
interval with a fixed seed makes the output the same on every run. Torch-free: it scores probabilities.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .errors import Med3DError
from .metrics import accuracy, auc, brier, expected_calibration_error, sensitivity_at_specificity

RESAMPLES = 2000
SEED = 0
MIN_PATIENTS_PER_CLASS = 5  # patients with and without a malignant nodule each, for an interval worth printing

# name -> (metric of malignant probabilities p and 0/1 truth y, needs both classes)
METRICS: Dict[str, Any] = {
    "auc": (lambda p, y: auc(p, y), True),
    "accuracy": (lambda p, y: accuracy((p >= 0.5).astype(int), y), False),
    "sensitivity_at_90_specificity": (lambda p, y: sensitivity_at_specificity(p, y, 0.9), True),
    "brier": (lambda p, y: brier(p, y), False),
    "ece": (lambda p, y: expected_calibration_error(p, y), False),
}
LABELS = {"auc": "AUC", "accuracy": "accuracy", "sensitivity_at_90_specificity": "sensitivity at 90% specificity",
          "brier": "Brier score", "ece": "ECE"}


def _members(groups: Sequence[str], keep: Callable[[np.ndarray], bool]) -> List[np.ndarray]:
    """Case indices of each patient (sorted by name) for which ``keep(its case indices)``."""
    order: Dict[str, List[int]] = {}
    for case, g in enumerate(groups):
        order.setdefault(g, []).append(case)
    out = [np.array(order[g]) for g in sorted(order)]
    return [m for m in out if keep(m)]


def patient_interval(statistic: Callable[[np.ndarray], float], truth: Sequence[int], groups: Sequence[str],
                     resamples: int = RESAMPLES, seed: int = SEED) -> Optional[List[float]]:
    """95 % percentile interval of ``statistic(case_indices)`` from a patient bootstrap stratified by "has a
    malignant nodule"; None with fewer than :data:`MIN_PATIENTS_PER_CLASS` patients on either side."""
    from scipy.stats import bootstrap

    y = np.asarray(truth).astype(int)
    with_malignant = _members(groups, lambda m: bool(y[m].any()))
    without = _members(groups, lambda m: not y[m].any())
    if min(len(with_malignant), len(without)) < MIN_PATIENTS_PER_CLASS:
        return None

    def on_patients(a: np.ndarray, b: np.ndarray) -> float:
        return statistic(np.concatenate([without[int(i)] for i in a] + [with_malignant[int(i)] for i in b]))

    strata = (np.arange(len(without)), np.arange(len(with_malignant)))
    with warnings.catch_warnings():  # a resample where every case is right gives a degenerate interval
        warnings.simplefilter("ignore")
        options = dict(n_resamples=resamples, vectorized=False, paired=False, method="percentile")
        try:  # SciPy 1.15+ names the generator rng; older ones (Slicer 5.8's Python 3.9) random_state
            result = bootstrap(strata, on_patients, rng=np.random.default_rng(seed), **options)
        except TypeError:
            result = bootstrap(strata, on_patients, random_state=np.random.default_rng(seed), **options)
    low, high = result.confidence_interval
    return [float(low), float(high)]


def score_with_intervals(probabilities: Sequence[float], truth: Sequence[int], groups: Sequence[str],
                         resamples: int = RESAMPLES, seed: int = SEED) -> Dict[str, Any]:
    """Every metric of :data:`METRICS` on all cases (``value``) with its 95 % interval (``ci95``, [low, high],
    :func:`patient_interval`). With fewer than :data:`MIN_PATIENTS_PER_CLASS` patients on either side ``ci95``
    is None and ``note`` says what is needed; metrics that need both classes are None when the cases hold one."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(truth).astype(int)
    if p.shape != y.shape or len(groups) != len(y) or not len(y):
        raise Med3DError(f"need one probability, label and patient per case (got {p.size}, {y.size}, {len(groups)})")
    both = len(set(y.tolist())) == 2
    with_malignant = len(_members(groups, lambda m: bool(y[m].any())))
    without = len(set(groups)) - with_malignant
    out: Dict[str, Any] = {"metrics": {}, "patients": with_malignant + without}
    for name, (f, two) in METRICS.items():
        value = f(p, y) if both or not two else None
        interval = patient_interval(lambda idx, f=f: f(p[idx], y[idx]), y, groups, resamples, seed)
        out["metrics"][name] = {"value": value, "ci95": interval}
    if min(with_malignant, without) < MIN_PATIENTS_PER_CLASS:
        out["note"] = (f"a 95% interval needs at least {MIN_PATIENTS_PER_CLASS} patients with a malignant nodule and "
                       f"{MIN_PATIENTS_PER_CLASS} without; these cases have {with_malignant} and {without}, "
                       "so only the values are given")
    else:
        out["bootstrap"] = {"unit": "patient", "stratified": "has a malignant nodule", "resamples": int(resamples),
                            "seed": int(seed), "method": "percentile"}
    return out


def format_scores(scored: Mapping[str, Any]) -> List[str]:
    """One plain line per metric: ``AUC 0.912 (95% CI 0.870-0.948)``; the note when there is no interval."""
    lines = []
    for name, item in scored["metrics"].items():
        if item["value"] is None:
            lines.append(f"{LABELS[name]}: undefined (the cases hold one class)")
        elif item["ci95"] is None:
            lines.append(f"{LABELS[name]}: {item['value']:.3f}")
        else:
            lines.append(f"{LABELS[name]}: {item['value']:.3f} (95% CI {item['ci95'][0]:.3f}-{item['ci95'][1]:.3f})")
    if scored.get("note"):
        lines.append(scored["note"])
    return lines


def patient_id(case: Any) -> Optional[str]:
    """A nodule table case's patient id from its ``patient_id`` column; None without one (the table reader then
    groups the case by its image path, which names no patient)."""
    return case.patient if case.patient and case.patient != case.image else None


def patient_digest(patient: str) -> str:
    """What a bundle records of a patient id: a SHA-256 digest, so that a model file shared outside the clinic
    does not carry the ids themselves, while the same id still matches at evaluation."""
    return hashlib.sha256(("med3d-patient:" + patient).encode("utf-8")).hexdigest()


def _recorded(value: Any, where: str) -> Optional[set]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise Med3DError(f"{where}: its recorded fine-tuning patients are not a list of ids; the file is damaged")
    return set(value)


def training_overlap(patients: Sequence[Optional[str]], provenance: Mapping[str, Any],
                     where: str = "the model") -> Dict[str, Any]:
    """How many evaluated cases (``patients``: each case's patient id, None where the table gives none) come from
    patients the model saw in fine-tuning: training (``train_patient_sha256``) or validation (model choice and
    calibration, ``validation_patient_sha256``), both digests (:func:`patient_digest`) in the bundle's
    ``provenance["data"]``. ``checked`` is False
    when the model records no patients or the table gives no patient ids."""
    data = provenance.get("data") if isinstance(provenance, Mapping) else None
    data = data if isinstance(data, Mapping) else {}
    train = _recorded(data.get("train_patient_sha256"), where)
    validation = _recorded(data.get("validation_patient_sha256"), where) or set()
    given = [patient_digest(p) for p in patients if p]
    if train is None or not given:
        reason = ("the model records no fine-tuning patients (fine-tuned before they were recorded)" if train is None
                  else "the table has no patient_id column")
        return {"checked": False, "reason": reason}
    seen = train | validation
    cases = [p for p in given if p in seen]
    return {"checked": True, "cases": len(cases), "of_cases": len(patients),
            "patients": len(set(cases)), "of_patients": len(set(given)),
            "training_patients": len(set(cases) & train), "validation_patients": len(set(cases) & validation - train)}


def overlap_warning(overlap: Mapping[str, Any]) -> Optional[str]:
    """The one warning line when evaluated cases come from patients seen in fine-tuning, else None."""
    if not overlap.get("checked") or not overlap.get("cases"):
        return None
    return (f"{overlap['cases']} of {overlap['of_cases']} cases ({overlap['patients']} of {overlap['of_patients']} "
            f"patients) come from patients this model was fine-tuned on ({overlap['training_patients']} in training, "
            f"{overlap['validation_patients']} in validation): these figures are optimistic, not what new patients "
            "would get")
