"""Where a model's training labels came from, and classical lung labels for fine-tuning on unlabelled CT.

Every segmentation bundle records, per training case, the kind of its labels (``provenance["data"]
["label_sources"]``):

- ``"real"``: a label map the user gave (drawn by hand, or by another tool);
- ``"classical"``: made by the weight-free classical lung method (``classical_lung.py``), a pseudo-label;
- ``"synthetic"``: a phantom's own label map (``phantoms.py``; the offline demo) - image and label are drawn.

A model that saw nothing but phantoms says so when applied to a scan (:data:`SYNTHETIC_MODEL_WARNING`).
:func:`classical_lung_domain` turns a folder of unlabelled CTs into a lung fine-tuning domain: the classical
masks (right and left lung merged into the lung preset's one label) where a case has no real mask, the real mask
where it has one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .errors import Med3DError
from .progress import Reporter, make_event, null_reporter

LABEL_SOURCES = ("real", "classical", "synthetic")
SYNTHETIC_MODEL_WARNING = ("this model was trained only on synthetic phantoms (the offline demo's), not on real "
                           "scans, so its result on a real CT is unreliable; for lungs use the classical method "
                           "(med3d segment --method classical; Python: method=\"classical\") or a model fine-tuned "
                           "on real CT (med3d finetune --task lung --labels classical)")
PSEUDO_FOLDER = "pseudo_labels"  # under the run folder; one file per case, remade only when its scan changes


def label_sources_record(case_ids, sources: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """The provenance entries for the cases ``case_ids``: ``label_sources`` (case -> kind, "real" where
    ``sources`` does not say), ``label_counts`` (kind -> cases) and ``synthetic`` (True when every case was)."""
    sources = dict(sources or {})
    unknown = sorted({str(v) for v in sources.values()} - set(LABEL_SOURCES))
    if unknown:
        raise Med3DError(f"label sources must be {', '.join(LABEL_SOURCES)}, got {', '.join(unknown)}")
    record = {str(c): sources.get(c, "real") for c in case_ids}
    counts = {kind: sum(1 for v in record.values() if v == kind) for kind in LABEL_SOURCES}
    return {"label_sources": record, "label_counts": counts,
            "synthetic": bool(record) and all(v == "synthetic" for v in record.values())}


def trained_only_on_synthetic(provenance: Mapping[str, Any]) -> bool:
    """True when a bundle's provenance says every training case was a synthetic phantom. Bundles the demo wrote
    before label sources were recorded are recognised by their data domain, the demo's ``phantom_lung``."""
    data = provenance.get("data") if isinstance(provenance, Mapping) else None
    if not isinstance(data, Mapping):
        return False
    if data.get("synthetic") is True:
        return True
    sources = data.get("label_sources")
    if isinstance(sources, Mapping) and sources:
        return all(v == "synthetic" for v in sources.values())
    return str(data.get("domain", "")).startswith("phantom")


def _stale(target: Path, sources) -> bool:
    """True when ``target`` is missing or older than any of its sources (a file or a DICOM folder's files)."""
    if not target.is_file():
        return True
    newest = 0.0
    for source in sources:
        paths = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
        newest = max([newest] + [os.stat(p).st_mtime for p in paths])
    return os.stat(target).st_mtime < newest


def _real_lung(path: Path, image, label_map: Optional[Mapping[int, int]]):
    """A real mask as the lung preset's label map (1 = lung): ``label_map`` values mapped to 1 (e.g. the lobes of
    a TotalSegmentator map), or every non-zero value when there is none; on the image's grid (checked)."""
    from .training_data import GEOMETRY_TOLERANCE
    from .volume_files import read_volume

    mask = read_volume(path)
    if not mask.same_geometry(image, GEOMETRY_TOLERANCE):
        raise Med3DError(f"real label {path} does not lie on its image's grid ({mask.geometry.describe()} vs "
                         f"{image.geometry.describe()}); resample it onto the image")
    values = np.asarray(mask.array)
    lung = np.isin(values, [k for k, v in label_map.items() if int(v) == 1]) if label_map else values != 0
    if not lung.any():
        raise Med3DError(f"real label {path} holds no lung (no {'mapped ' if label_map else 'non-zero '}value); "
                         "fix it or leave it out")
    return mask.with_array(lung.astype(np.uint8))


def classical_lung_domain(images: Path, work_dir: Path, name: str = "lung", real_labels: Optional[Path] = None,
                          label_map: Optional[Mapping[int, int]] = None,
                          reporter: Optional[Reporter] = None) -> Tuple[Any, Dict[str, str]]:
    """A lung fine-tuning domain from the CTs in ``images`` (files or DICOM series folders) and the label kind
    of each case. A case whose name matches a file in ``real_labels`` takes that real mask (``label_map``:
    source values that are lung, e.g. {10: 1, 11: 1, ...}); every other case takes the classical method's lungs.
    The labels are written under ``work_dir/pseudo_labels`` and remade only when their scan or mask changes."""
    from .classical_lung import segment_lungs
    from .domains import Case, Domain, case_key, image_files
    from .volume_files import read_volume, write_volume

    reporter = reporter or null_reporter
    images = Path(images)
    files = image_files(images)
    if not files:
        raise Med3DError(f"no scans in {images}; give a folder of CT files (NIfTI, NRRD, MHA) or DICOM folders")
    real = {case_key(p): p for p in image_files(Path(real_labels))} if real_labels else {}
    unknown = sorted(set(real) - {case_key(p) for p in files})
    if unknown:
        raise Med3DError(f"real labels {', '.join(unknown)} in {real_labels} match no scan in {images}; name each "
                         "mask as its scan")
    folder = Path(work_dir) / PSEUDO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    cases, sources = [], {}
    for n, path in enumerate(files):
        case_id = case_key(path)
        kind = "real" if case_id in real else "classical"
        target = folder / f"{case_id}.{kind}.nii.gz"
        origins = [path] + ([real[case_id]] if kind == "real" else [])
        if _stale(target, origins):
            image = read_volume(path)
            if kind == "real":
                lung = _real_lung(real[case_id], image, label_map)
            else:
                found = segment_lungs(image)
                if not (found.labels.array > 0).any():
                    raise Med3DError(f"the classical method found no lung in {path} ({'; '.join(found.warnings)}); "
                                     "remove it from the training scans or give its real mask")
                lung = found.labels.with_array((found.labels.array > 0).astype(np.uint8))
            write_volume(lung, target, overwrite=True)
        cases.append(Case(case_id, path, target))
        sources[case_id] = kind
        reporter(make_event("pseudo-labels", n + 1, len(files), metrics={"case": case_id, "labels": kind}))
    return Domain(name=name, modality="CT", label_names={1: "lung"}, cases=cases), sources
