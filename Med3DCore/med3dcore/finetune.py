"""What segmentation and classification fine-tuning share: patient-grouped splits and folds, the initialised
model, learning rates and frozen layers, and the run's name, bundle path and checkpoints. The tasks themselves are
:mod:`med3dcore.segmentation_finetune` and :mod:`med3dcore.classification_finetune`; the training loop is
:func:`med3dcore.train.train`.

Defaults follow Med3D: Adam, learning rate 0.001 from pretrained weights and 0.01 from scratch; new layers (the
head) get their own rate (default 10x the encoder's when it is pretrained); early encoder layers can be frozen.
The train/validation split groups by patient: one patient's cases never sit on both sides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import Med3DError
from .nets import build_model
from .nets.model import Med3DNet

ENCODER_PARTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
DEFAULT_BACKBONE = {"depth": 10, "shortcut_type": "B", "preact": False}


# ----------------------------------------------------------------------------------------------- splits
def _patient_strata(groups: Sequence[str], strata: Optional[Sequence[int]]) -> Dict[str, int]:
    """Each patient's stratum: the largest stratum value among its cases (e.g. 'has a malignant nodule')."""
    out: Dict[str, int] = {}
    for i, g in enumerate(groups):
        value = int(strata[i]) if strata is not None else 0
        out[g] = max(out.get(g, value), value)
    return out


def grouped_folds(groups: Sequence[str], k: int, strata: Optional[Sequence[int]] = None,
                  seed: int = 0) -> List[np.ndarray]:
    """Split case indices into ``k`` folds so that all cases of one group (patient) share a fold.

    Patients are shuffled within each stratum and dealt round-robin, so folds get similar shares of each
    stratum. Returns one sorted index array per fold.
    """
    per_patient = _patient_strata(groups, strata)
    if k < 2 or k > len(per_patient):
        raise Med3DError(f"cannot make {k} folds from {len(per_patient)} patients; use 2..{len(per_patient)} folds")
    rng = np.random.default_rng(seed)
    fold_of: Dict[str, int] = {}
    position = 0
    for stratum in sorted(set(per_patient.values())):
        patients = sorted(p for p, s in per_patient.items() if s == stratum)
        for p in rng.permutation(len(patients)):
            fold_of[patients[p]] = position % k
            position += 1
    folds = [[] for _ in range(k)]
    for i, g in enumerate(groups):
        folds[fold_of[g]].append(i)
    return [np.array(sorted(f), dtype=int) for f in folds]


def grouped_split(groups: Sequence[str], val_fraction: float = 0.2, strata: Optional[Sequence[int]] = None,
                  seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) with about ``val_fraction`` of the patients in validation and no
    patient on both sides. Needs at least two patients."""
    if val_fraction == 0:
        raise Med3DError("a validation fraction of 0 (no validation) cannot make a train/validation split: this task "
                         "keeps the model that validates best, so give a fraction such as 0.2")
    if not 0.0 < val_fraction < 1.0:
        raise Med3DError(f"the validation fraction must be above 0 and below 1 (e.g. 0.2), got {val_fraction}")
    per_patient = _patient_strata(groups, strata)
    if len(per_patient) < 2:
        raise Med3DError("a train/validation split needs cases from at least two patients (give a patient_id "
                         "column, or more cases)")
    rng = np.random.default_rng(seed)
    n_val = min(max(1, int(round(val_fraction * len(per_patient)))), len(per_patient) - 1)
    val_patients = set()
    # Take each stratum's share (at least one patient where a stratum has two or more), then top up.
    for stratum in sorted(set(per_patient.values())):
        patients = sorted(p for p, s in per_patient.items() if s == stratum)
        share = int(round(val_fraction * len(patients)))
        share = max(share, 1) if len(patients) >= 2 else share
        val_patients.update(patients[i] for i in rng.permutation(len(patients))[:share])
    remaining = sorted(set(per_patient) - val_patients)
    while len(val_patients) < n_val and remaining:
        val_patients.add(remaining.pop(int(rng.integers(len(remaining)))))
    if len(val_patients) >= len(per_patient):
        val_patients.discard(sorted(val_patients)[0])
    val = np.array([i for i, g in enumerate(groups) if g in val_patients], dtype=int)
    train = np.array([i for i, g in enumerate(groups) if g not in val_patients], dtype=int)
    return train, val


# ------------------------------------------------------------------------------------- model and rates
def clear_checkpoints(run_dir: Path) -> None:
    """Remove the training checkpoints of one run folder (``run_dir/checkpoints``, the two stages' of a
    two-stage run and a nodule outline's), and only those: another run's checkpoints and the preprocessing cache stay."""
    import shutil

    run_dir = Path(run_dir)
    for folder in (run_dir / "checkpoints", run_dir / "coarse" / "checkpoints", run_dir / "fine" / "checkpoints",
                   run_dir / "outline" / "checkpoints"):
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


def check_run_name(name: str) -> str:
    """A run's name becomes ``OUT/<name>.pt`` and the run folder ``OUT/<name>/``: it must be a plain file name,
    so nothing is written (or, with --overwrite, removed) outside the run's own files in ``--out``."""
    if not isinstance(name, str) or not name or name in (".", "..") or len(name) > 128 or \
            name.startswith((".", "-")) or any(c in name for c in "/\\:") or not name.isprintable():
        raise Med3DError(f"--name must be a plain file name (letters, digits, '-', '_', '.'; not starting with '.' "
                         f"or '-', no folders), got {name!r}")
    return name


def run_bundle_path(out_dir: Path, name: str, overwrite: bool, resume: bool) -> Path:
    """Where a run's model goes; refuses to replace one unless asked (nothing is removed here)."""
    bundle_path = out_dir / f"{check_run_name(name)}.pt"
    if bundle_path.exists() and not (overwrite or resume):
        raise Med3DError(f"{bundle_path} exists; choose another --name or pass --overwrite")
    return bundle_path


def start_fresh(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """With --overwrite (and not --resume), remove this run's own training checkpoints; called once the new inputs
    have been read and checked, so a bad new input leaves the old run intact."""
    if overwrite and not resume:
        clear_checkpoints(run_dir)


def default_lr(pretrained: bool) -> float:
    """The paper's learning rate: 0.001 from pretrained weights, 0.01 from scratch."""
    return 1e-3 if pretrained else 1e-2


def learning_rates(lr: Optional[float], head_lr: Optional[float], pretrained: bool) -> Tuple[float, float]:
    """(encoder, head) learning rates: ``lr`` or the paper's default; ``head_lr`` or 10x the encoder's when it is
    pretrained (new layers learn faster than tuned ones), the encoder's from scratch."""
    encoder = lr if lr is not None else default_lr(pretrained)
    return encoder, head_lr if head_lr is not None else (10 * encoder if pretrained else encoder)


def freeze_encoder_parts(model: Med3DNet, parts: Sequence[str]) -> List[str]:
    """Stop gradients for the named encoder parts (``conv1``, ``bn1``, ``layer1`` ... ``layer4``).

    Returns the frozen parameter names. Their BatchNorm running statistics still adapt during training.
    """
    frozen = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        module = getattr(model.encoder, part, None)
        if part not in ENCODER_PARTS or module is None:
            raise Med3DError(f"cannot freeze '{part}': choose among {', '.join(ENCODER_PARTS)}")
        for name, p in module.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"encoder.{part}.{name}")
    return frozen


def build_initialised_model(head: Mapping[str, Any], init: Optional[str],
                            backbone: Optional[Mapping[str, Any]] = None) -> Tuple[Med3DNet, Dict[str, Any]]:
    """A model with the given head on an encoder from ``init``: ``None``/``"scratch"`` (random; ``backbone``
    entries override ResNet-10 shortcut B), or a file holding a 3D-ResNet (Med3D bundle, MedicalNet release, state
    dict), whose depth and shortcut type it takes; a ``backbone`` entry that contradicts the file is an error.
    ``None`` values in ``backbone`` mean "not asked". Returns (model, provenance)."""
    from . import bundles, medicalnet

    asked = {k: v for k, v in (backbone or {}).items() if v is not None}
    if init in (None, "", "scratch"):
        arch = {"backbone": {**DEFAULT_BACKBONE, **asked}, "head": dict(head)}
        return build_model(arch), {"init": "scratch", "architecture": arch}
    from .catalog import resolve

    catalog = resolve(str(init))  # a catalog name (or file): checked against its recorded SHA-256 first
    path = catalog[0] if catalog else Path(init)
    if not path.is_file():
        raise Med3DError(f"--init {init}: no such file or catalog name; give a Med3D bundle, a MedicalNet .pth "
                         "file, a catalog name (med3d models list) or 'scratch'")
    info = bundles.inspect_file(path)
    found = {k: info[k] for k in ("depth", "shortcut_type", "preact")}
    if any(found.get(k) != v for k, v in asked.items()):
        wanted = medicalnet.describe_architecture({**found, **asked})
        raise Med3DError(f"--init {path} holds {medicalnet.describe_architecture(found)}, but {wanted} was asked; "
                         "leave out --depth/--shortcut to use the file's network, or start from scratch")
    arch = {"backbone": found, "head": dict(head)}
    model = build_model(arch)
    medicalnet.load_medicalnet(model, path)
    provenance = {"init": str(path), "init_format": info["format"], "architecture": arch}
    if catalog:
        provenance.update(init_catalog=catalog[1].name, init_sha256=catalog[2])
    return model, provenance


def encoder_head_groups(model: Med3DNet, encoder_lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """Optimiser groups through the training loop's helper: encoder at ``encoder_lr``, new layers at ``head_lr``."""
    from .training_setup import param_groups

    return param_groups(model, lr=head_lr, pretrained_lr=encoder_lr)
