"""The anatomical clean-up of a segmentation network's label map (``infer.segment`` applies it by default): what
anatomy says a label map must be, whatever a network made of the scan.

- Lungs: nothing outside the body, each boundary on the scan's own air/tissue boundary (the classical method's
  steps, ``classical_lung.clean_up_model_labels``), then the two largest components (one per lung label).
- Liver: the largest component of the foreground (tumours inside it stay).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .volume import Volume

if TYPE_CHECKING:  # the classical lung method imports this module without torch
    from .bundles import Bundle

# Anatomy-driven clean-up, by task name: keep this many largest connected components, either of each label
# ("per_label") or of the whole foreground ("foreground"). Lungs: two (left and right) when there is one lung
# label, one per label when each lung has its own; liver: one organ (tumours inside it stay).
KEEP_COMPONENTS: Dict[str, Tuple[str, int]] = {"lung": ("per_label", 2), "liver": ("foreground", 1)}
# A second lung component smaller than this fraction of the first is noise (a scan may show one lung only).
MIN_SECOND_FRACTION = 0.05


def bounding_box(mask: np.ndarray, margin: Sequence[int] = (0, 0, 0)) -> Optional[Tuple[slice, ...]]:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped to the array), or None when the
    mask is empty. Work that cannot leave it runs on a fraction of a whole CT's voxels."""
    hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]
    if not hits[0].size:
        return None
    return tuple(slice(max(0, int(h[0]) - m), min(n, int(h[-1]) + m + 1)) for h, m, n in zip(hits, margin, mask.shape))


def keep_largest_components(labels: np.ndarray, mode: str, count: int) -> np.ndarray:
    """Keep the ``count`` largest 26-connected components of each label (``per_label``) or of the foreground
    (``foreground``, whole components kept with all their labels); the rest becomes background. Components
    after the first that are smaller than :data:`MIN_SECOND_FRACTION` of it are dropped too."""
    out = labels.copy()
    foreground = labels > 0
    box = bounding_box(foreground, (0,) * labels.ndim)  # components never leave it: label only inside
    if box is None:
        return out
    inside, kept = labels[box], out[box]
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    present = np.flatnonzero(np.bincount(inside.ravel())) if inside.dtype.kind == "u" else np.unique(inside)
    groups = [foreground[box]] if mode == "foreground" else [inside == v for v in present if v != 0]
    for mask in groups:
        components, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        keep = [order[0]] + [c for c in order[1:count] if sizes[c] >= MIN_SECOND_FRACTION * sizes[order[0]]]
        drop = np.ones(n + 1, dtype=bool)
        drop[0] = False
        drop[np.asarray(keep) + 1] = False
        kept[drop[components]] = 0
    return out


def clean_up(volume: Volume, labels: np.ndarray, bundle: "Bundle") -> np.ndarray:
    """The anatomical clean-up :func:`segment` applies by default to a label map on ``volume``'s grid made by
    ``bundle``: for lungs everything outside the body dropped and each boundary moved onto the scan's own air
    (``classical_lung.clean_up_model_labels``), then the largest components (:data:`KEEP_COMPONENTS`)."""
    name = str(bundle.task.get("name", "segmentation"))
    if name == "lung":
        from .classical_lung import clean_up_model_labels

        labels = clean_up_model_labels(volume, labels)
    rule = KEEP_COMPONENTS.get(name)
    if rule is None:
        return labels
    per_label, count = rule
    if per_label == "per_label" and len(bundle.labels) > 1:
        count = 1  # one label per lung: the largest of each
    return keep_largest_components(labels, per_label, count)
