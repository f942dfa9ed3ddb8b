"""What a mask tells about a nodule beyond the image, and how a classifier's probability uses it.

On the 823 LIDC crops a logistic regression on a few numbers measured from the mask (size, density, shape) beats
the CNN alone (patient-grouped CV AUC about 0.91 against 0.84; Testing/benchmarks/RESULTS.md, nodule section).
So when every training case has a mask, fine-tuning fits two small logistic regressions and the bundle stores them
as ``extra["measured_fusion"]``:

1. on every labelled case (training and validation: six weights need no held-out cases), malignancy from the
   standardised :data:`MEASURE_NAMES` (:func:`measure_features`);
2. on the validation cases (which the CNN never trained on), malignancy from two numbers: stage 1's logit and the
   CNN's logit, with weights kept non-negative (:func:`fit_nonnegative`). This weighs the image against the
   measures and calibrates the result, as temperature scaling does for the image alone.

``classify`` with a mask then gives stage 2's probability; with an ROI only, the temperature-scaled CNN's. The
measures depend only on the voxels inside the mask, never on the box around it, so a crop and a whole CT agree.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
from scipy.special import expit

from . import limits
from .errors import Med3DError
from .nodule_size import measure_nodule
from .volume import Volume

MEASURE_NAMES = ("log diameter (mm)", "mean HU", "SD of HU", "fraction above 200 HU", "fraction below -400 HU",
                 "sphericity")
RIDGE = 1.0  # penalty 0.5 * RIDGE * |w|^2 on the summed log-loss (standardised inputs), scikit-learn's C = 1


def measure_features(image: Volume, mask: Union[Volume, np.ndarray]) -> np.ndarray:
    """The :data:`MEASURE_NAMES` of the nodule in ``mask`` (non-zero voxels on ``image``'s grid), float64.

    Diameter is the equivalent-sphere one (:func:`med3dcore.nodule_size.measure_nodule`); the HU numbers are of the
    voxels inside the mask (above 200 HU: calcification; below -400 HU: ground glass); sphericity is the area of the
    sphere of the mask's volume over the mask's voxel-face area: lower for lobulated or flat shapes, but faces
    overstate a smooth surface (a voxelised ball scores about 2/3, not 1), so read it as a relative number.
    """
    size = measure_nodule(image, mask)  # checks the grid and that the mask is not empty
    inside = np.asarray(mask.array if isinstance(mask, Volume) else mask) != 0
    hu = np.asarray(image.array, dtype=np.float64)[inside]
    sx, sy, sz = (float(s) for s in image.spacing)  # arrays are (z, y, x)
    padded = np.pad(inside, 1)
    area = (np.count_nonzero(np.diff(padded, axis=0)) * sx * sy + np.count_nonzero(np.diff(padded, axis=1)) * sx * sz
            + np.count_nonzero(np.diff(padded, axis=2)) * sy * sz)
    volume_mm3 = size["volume_ml"] * 1000.0
    sphericity = math.pi ** (1.0 / 3.0) * (6.0 * volume_mm3) ** (2.0 / 3.0) / area
    return np.array([math.log(size["diameter_mm"]), hu.mean(), hu.std(), np.mean(hu > 200.0), np.mean(hu < -400.0),
                     sphericity], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: Sequence[int], ridge: float = RIDGE, iterations: int = 50) -> Dict[str, Any]:
    """A ridge-penalised logistic regression on standardised columns of ``x`` (Newton's method; the product needs no
    scikit-learn). Returns ``{"mean", "scale", "weights", "bias"}``, plain floats, for :func:`logistic_logit`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(set(y.tolist())) != 2:
        raise Med3DError(f"a logistic regression needs (N, k) inputs and N labels of both classes, got {x.shape} "
                         f"and {sorted(set(y.tolist()))}")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a constant column carries nothing; keep it harmless
    design = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    penalty = np.diag([0.0] + [ridge] * x.shape[1])  # the bias is not penalised
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = expit(design @ beta)
        gradient = design.T @ (p - y) + penalty @ beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(beta)), gradient)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return {"mean": mean.tolist(), "scale": scale.tolist(), "weights": beta[1:].tolist(), "bias": float(beta[0])}


def logistic_logit(model: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """The logit of :func:`fit_logistic`'s model for each row of ``x``."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    z = (x - np.asarray(model["mean"])) / np.asarray(model["scale"])
    return z @ np.asarray(model["weights"]) + float(model["bias"])


def fit_fusion(stage1_measures: np.ndarray, stage1_labels: Sequence[int], val_measures: np.ndarray,
               val_image_logits: np.ndarray, val_labels: Sequence[int]) -> Dict[str, Any]:
    """Stage 1 on ``stage1_*`` cases, stage 2 on the validation cases (see the module docstring). The image logit
    is the CNN's malignant-minus-benign logit. Returns the record stored as ``extra["measured_fusion"]``."""
    measures = fit_logistic(stage1_measures, stage1_labels)
    stage2 = np.column_stack([logistic_logit(measures, val_measures), np.asarray(val_image_logits, np.float64)])
    return {"features": list(MEASURE_NAMES), "measures": measures, "combine": fit_nonnegative(stage2, val_labels)}


def fit_nonnegative(x: np.ndarray, y: Sequence[int]) -> Dict[str, Any]:
    """:func:`fit_logistic` with no negative weight (non-negative stacking): both inputs are logits for
    malignancy, so one that would vote against it once the other is known carries noise or collinearity, not
    signal. The most negative input is dropped (weight 0) and the rest refitted, until none is negative."""
    x = np.asarray(x, dtype=np.float64)
    keep = list(range(x.shape[1]))
    while True:
        model = fit_logistic(x[:, keep], y)
        if not keep or min(model["weights"]) >= 0:
            break
        keep.pop(int(np.argmin(model["weights"])))
    full = {"mean": [0.0] * x.shape[1], "scale": [1.0] * x.shape[1], "weights": [0.0] * x.shape[1],
            "bias": model["bias"]}
    for column, k in enumerate(keep):
        for key in ("mean", "scale", "weights"):
            full[key][k] = model[key][column]
    return full


def fused_probability(record: Mapping[str, Any], measures: np.ndarray, image_logits: np.ndarray) -> np.ndarray:
    """Malignant probability of each case from its measures (rows) and the CNN's malignant-minus-benign logit."""
    stage2 = np.column_stack([logistic_logit(record["measures"], measures),
                              np.atleast_1d(np.asarray(image_logits, np.float64))])
    return expit(logistic_logit(record["combine"], stage2))


def _numbers(value: Any, count: int, what: str, low: float, high: float) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise Med3DError(f"{what} must be {count} numbers")
    for item in value:
        limits.number(item, what, low, high)


def check_fusion(value: Any, where: str) -> Dict[str, Any]:
    """A bundle's ``extra["measured_fusion"]`` from a stranger's file: the features this version measures, finite
    bounded numbers of the right lengths; else one line naming the file."""
    try:
        if not isinstance(value, Mapping) or list(value.get("features") or []) != list(MEASURE_NAMES):
            raise Med3DError("its measured-size model names other measures than this version of med3d takes")
        for key, count in (("measures", len(MEASURE_NAMES)), ("combine", 2)):
            part = value.get(key)
            if not isinstance(part, Mapping):
                raise Med3DError(f"its measured-size model lacks '{key}'")
            _numbers(part.get("mean"), count, f"'{key}' means", -1e6, 1e6)
            _numbers(part.get("scale"), count, f"'{key}' scales", 1e-12, 1e6)
            _numbers(part.get("weights"), count, f"'{key}' weights", -1e4, 1e4)
            limits.number(part.get("bias"), f"'{key}' bias", -1e4, 1e4)
    except Med3DError as exc:
        raise Med3DError(f"{where}: {exc}; the file is damaged or was not written by med3d finetune "
                         "(fine-tune again)") from None
    return dict(value)


def measure_cases(cases: Sequence[Any]) -> Optional[np.ndarray]:
    """:func:`measure_features` of every case of a nodule table (rows in its order), or None when any case has no
    mask (the fusion needs all of them)."""
    from .volume_files import read_volume

    if not cases or any(getattr(c, "mask", None) is None for c in cases):
        return None
    return np.array([measure_features(read_volume(c.image), read_volume(c.mask)) for c in cases])
