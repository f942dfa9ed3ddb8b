"""Transfer a (pre)trained encoder to a new task: segmentation (any label set; lung and liver presets) or
nodule classification. The training itself is :func:`med3dcore.train.train`; this module prepares the data,
the model, the split and the learning rates, and writes the resulting checkpoint bundle.

Defaults follow Med3D: Adam, learning rate 0.001 from pretrained weights and 0.01 from scratch; new layers (the
head) get their own rate (default 10x the encoder's when it is pretrained); early encoder layers can be frozen.
The train/validation split groups by patient: one patient's cases never sit on both sides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Med3DError
from .metrics import accuracy, auc
from .nets import build_model
from .nets.model import Med3DNet
from .nodules import CLASS_NAMES, NoduleCase, NoduleInputSpec, prepare_nodule
from .progress import Reporter, make_event, null_reporter
from .volume import read_volume

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
    """Remove the training checkpoints of one run folder (``run_dir/checkpoints``, and the two stages' of a
    two-stage run), and only those: another run's checkpoints and the preprocessing cache stay."""
    import shutil

    run_dir = Path(run_dir)
    for folder in (run_dir / "checkpoints", run_dir / "coarse" / "checkpoints", run_dir / "fine" / "checkpoints"):
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


def _bundle_path(out_dir: Path, name: str, overwrite: bool, resume: bool) -> Path:
    """Where a run's model goes; refuses to replace one unless asked (nothing is removed here)."""
    bundle_path = out_dir / f"{check_run_name(name)}.pt"
    if bundle_path.exists() and not (overwrite or resume):
        raise Med3DError(f"{bundle_path} exists; choose another --name or pass --overwrite")
    return bundle_path


def _start_fresh(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """With --overwrite (and not --resume), remove this run's own training checkpoints; called once the new inputs
    have been read and checked, so a bad new input leaves the old run intact."""
    if overwrite and not resume:
        clear_checkpoints(run_dir)


def default_lr(pretrained: bool) -> float:
    """The paper's learning rate: 0.001 from pretrained weights, 0.01 from scratch."""
    return 1e-3 if pretrained else 1e-2


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
    from . import weights

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
    info = weights.inspect_file(path)
    found = {k: info[k] for k in ("depth", "shortcut_type", "preact")}
    if any(found.get(k) != v for k, v in asked.items()):
        wanted = weights.describe_architecture({**found, **asked})
        raise Med3DError(f"--init {path} holds {weights.describe_architecture(found)}, but {wanted} was asked; "
                         "leave out --depth/--shortcut to use the file's network, or start from scratch")
    arch = {"backbone": found, "head": dict(head)}
    model = build_model(arch)
    weights.load_medicalnet(model, path)
    provenance = {"init": str(path), "init_format": info["format"], "architecture": arch}
    if catalog:
        provenance.update(init_catalog=catalog[1].name, init_sha256=catalog[2])
    return model, provenance


def encoder_head_groups(model: Med3DNet, encoder_lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """Optimiser groups through the training loop's helper: encoder at ``encoder_lr``, new layers at ``head_lr``."""
    from .train import param_groups

    return param_groups(model, lr=head_lr, pretrained_lr=encoder_lr)


# ---------------------------------------------------------------------------------------- classification
@dataclass
class ClassificationSettings:
    """Settings of a classification fine-tuning run (recorded in the bundle's provenance)."""

    steps: int = 300
    batch_size: int = 8
    lr: Optional[float] = None            # encoder; default 0.001 pretrained / 0.01 scratch
    head_lr: Optional[float] = None       # new layers; default 10x lr when pretrained, lr from scratch
    freeze: Tuple[str, ...] = ()
    val_fraction: float = 0.2
    validate_every: int = 50
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    schedule: str = "poly"
    weight_decay: float = 1e-4

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["freeze"] = list(self.freeze)
        return out


def augment_cube(cube: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Modest augmentation of a (1, D, H, W) cube: flips of each axis, an in-plane transpose and a shift of up
    to two voxels (nodule malignancy does not depend on side or orientation)."""
    out = cube
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            out = np.flip(out, axis=axis)
    if rng.random() < 0.5:
        out = np.swapaxes(out, 2, 3)
    shift = rng.integers(-2, 3, size=3)
    out = np.roll(out, shift=tuple(int(s) for s in shift), axis=(1, 2, 3))
    return np.ascontiguousarray(out)


class CubeSampler:
    """Batches of nodule cubes, fixed by (seed, step) alone: every epoch is a fresh permutation, so a resumed
    run draws exactly the batches an uninterrupted one would (no hidden state to save)."""

    def __init__(self, cubes: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0,
                 augment: bool = True) -> None:
        self.cubes, self.labels = cubes, labels
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), bool(augment)

    def indices(self, step: int) -> np.ndarray:
        n = len(self.labels)
        first = (step - 1) * self.batch_size
        picked = []
        for position in range(first, first + self.batch_size):
            epoch, slot = divmod(position, n)
            picked.append(np.random.default_rng((self.seed, epoch)).permutation(n)[slot])
        return np.array(picked)

    def next_batch(self, step: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, 1_000_003, step))
        chosen = self.indices(step)
        cubes = [augment_cube(self.cubes[i], rng) if self.augment else self.cubes[i] for i in chosen]
        return {"image": torch.from_numpy(np.stack(cubes)),
                "label": torch.from_numpy(self.labels[chosen].astype(np.int64))}

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "n": int(len(self.labels)), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n"]) != len(self.labels) or int(state["batch_size"]) != self.batch_size:
            raise Med3DError("cannot resume: the training cases differ from the interrupted run's; use the same "
                             "table and settings")


def classification_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    device = next(model.parameters()).device
    logits = model(batch["image"].to(device))
    labels = batch["label"].to(device)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"accuracy": float((logits.argmax(1) == labels).float().mean())}


def predict_probabilities(model: torch.nn.Module, cubes: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Softmax probabilities (N, classes) of prepared cubes, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(cubes), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(cubes[start:start + batch_size])).to(device)
            out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 2))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Accuracy, AUC (when both classes are present) and cross-entropy of malignant-vs-benign predictions."""
    labels = np.asarray(labels).astype(int)
    metrics = {"accuracy": accuracy(probabilities.argmax(1), labels),
               "loss": float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))))}
    if len(set(labels.tolist())) == 2:
        metrics["auc"] = auc(probabilities[:, 1], labels)
    return metrics


def prepare_cases(cases: Sequence[NoduleCase], spec: NoduleInputSpec,
                  reporter: Optional[Reporter] = None) -> np.ndarray:
    """Prepared cubes (N, 1, D, H, W) of a classification table's cases (mask, ROI or whole crop each)."""
    reporter = reporter or null_reporter
    cubes = np.zeros((len(cases), 1, spec.cube, spec.cube, spec.cube), np.float32)
    for n, case in enumerate(cases):
        image = read_volume(case.image)
        if case.mask:
            cubes[n] = prepare_nodule(image, mask=read_volume(case.mask), params=spec)
        elif case.roi:
            cubes[n] = prepare_nodule(image, center_lps=case.roi[:3], size_mm=case.roi[3:], params=spec)
        else:
            cubes[n] = prepare_nodule(image, params=spec)
        reporter(make_event("prepare", n + 1, len(cases)))
    return cubes


def finetune_classification(cases: Sequence[NoduleCase], out_dir: Path, name: str, *,
                            init: Optional[str] = None, backbone: Optional[Mapping[str, Any]] = None,
                            spec: Optional[NoduleInputSpec] = None,
                            settings: Optional[ClassificationSettings] = None,
                            val_cases: Optional[Sequence[NoduleCase]] = None,
                            cubes: Optional[np.ndarray] = None, val_cubes: Optional[np.ndarray] = None,
                            reporter: Optional[Reporter] = None, resume: bool = False,
                            overwrite: bool = False) -> Dict[str, Any]:
    """Fine-tune a benign/malignant nodule classifier and write ``out_dir/<name>.pt`` (a classification bundle).

    Without ``val_cases`` a patient-grouped split of ``cases`` (``settings.val_fraction``) is used. ``cubes`` /
    ``val_cubes`` may hold already prepared inputs (cross-validation prepares every case once). Returns a dict
    with the bundle path, the best validation metrics and the validation probabilities.
    """
    from . import weights
    from .train import TrainConfig, seed_everything, train

    settings = settings or ClassificationSettings()
    spec = spec or NoduleInputSpec()
    reporter = reporter or null_reporter
    out_dir = Path(out_dir)
    bundle_path = _bundle_path(out_dir, name, overwrite, resume)
    labels = np.array([c.label for c in cases], dtype=np.int64)
    if cubes is None:
        cubes = prepare_cases(cases, spec, reporter)
    if val_cases is None:
        train_idx, val_idx = grouped_split([c.patient for c in cases], settings.val_fraction, labels, settings.seed)
        val_labels, val_cubes = labels[val_idx], cubes[val_idx]
        cubes, labels = cubes[train_idx], labels[train_idx]
        val_patients = sorted({cases[i].patient for i in val_idx})
    else:
        val_labels = np.array([c.label for c in val_cases], dtype=np.int64)
        if val_cubes is None:
            val_cubes = prepare_cases(val_cases, spec, reporter)
        val_patients = sorted({c.patient for c in val_cases})
    if len(set(labels.tolist())) < 2:
        raise Med3DError("the training cases hold only one class; a classifier needs benign and malignant cases")

    seed_everything(settings.seed)
    model, provenance = build_initialised_model({"type": "classifier", "num_classes": 2}, init, backbone)
    _start_fresh(out_dir / name, overwrite, resume)  # every new input read and checked by now
    pretrained = provenance["init"] != "scratch"
    lr = settings.lr if settings.lr is not None else default_lr(pretrained)
    head_lr = settings.head_lr if settings.head_lr is not None else (10 * lr if pretrained else lr)
    frozen = freeze_encoder_parts(model, settings.freeze)
    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=head_lr, pretrained_lr=lr,
                         weight_decay=settings.weight_decay, schedule=settings.schedule,
                         validate_every=settings.validate_every, best_metric="auc" if len(set(val_labels.tolist())) == 2
                         else "accuracy", checkpoint_every=max(settings.validate_every, 50), seed=settings.seed,
                         device=settings.device)
    sampler = CubeSampler(cubes, labels, settings.batch_size, settings.seed, settings.augment)
    last_probs: Dict[int, np.ndarray] = {}

    def validate(m: torch.nn.Module) -> Dict[str, float]:
        probs = predict_probabilities(m, val_cubes)
        last_probs[0] = probs
        return classification_metrics(probs, val_labels)

    result = train(model, config, sampler.next_batch, classification_loss, out_dir / name,
                   groups=encoder_head_groups(model, lr, head_lr), validate=validate,
                   stateful={"sampler": sampler}, reporter=reporter, resume=resume, stage="finetune")
    best_state = weights.safe_load(result.best_path)["model"] if result.best_path else model.state_dict()
    model.load_state_dict(best_state)
    probs = predict_probabilities(model, val_cubes)
    metrics = classification_metrics(probs, val_labels)
    weights.save_bundle(
        bundle_path, model=model.cpu(), architecture=provenance["architecture"],
        task={"type": "classification", "name": "nodule"},
        labels=[{"value": i, "name": n} for i, n in enumerate(CLASS_NAMES)],
        preprocessing=None,
        provenance={"data": {"train_cases": int(len(labels)), "validation_cases": int(len(val_labels)),
                             "validation_patients": len(val_patients)},
                    "init": provenance["init"], "steps": settings.steps, "settings": settings.to_dict(),
                    "frozen": sorted({n.split(".")[1] for n in frozen}),
                    "best": result.best, "metrics": metrics},
        extra={"nodule_input": spec.to_dict()}, overwrite=overwrite or resume)
    reporter(make_event("finetune", kind="result", message=f"saved {bundle_path}", metrics=metrics,
                        path=str(bundle_path)))
    return {"bundle": bundle_path, "metrics": metrics, "probabilities": probs, "labels": val_labels,
            "best": result.best}


# ------------------------------------------------------------------------------------------------ segmentation
# Presets: label values, names, Slicer-like colours and SNOMED CT terminology; the head; the preprocessing
# (spacing I, J, K in mm; CT window); the training patch (K, J, I). The liver preset adds a coarse stage that
# finds the organ on a 4 mm grid; the fine stage segments liver and tumour inside the crop.
LUNG_LABEL = {"value": 1, "name": "lung", "color": [197, 165, 145], "terminology": "SCT^39607008^Lung"}
LIVER_LABEL = {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": "SCT^10200004^Liver"}
TUMOUR_LABEL = {"value": 2, "name": "liver tumour", "color": [144, 238, 144], "terminology": "SCT^108369006^Neoplasm"}
PRESETS: Dict[str, Dict[str, Any]] = {
    # Lungs: a coarse 3 x 3 x 4 mm grid (a 64-voxel patch spans 19 cm, enough to tell trachea and gut gas from
    # lung; resampling a lung mask there and back keeps Dice above 0.98) and an air-to-bone window, so padding
    # values (-2048, -3024) and metal do not move the z-score.
    "lung": {"labels": [LUNG_LABEL], "head": {"type": "lung_decoder", "channels": [128, 64, 32]},
             "spacing": (3.0, 3.0, 4.0), "window": (-1000.0, 400.0), "modality": "CT", "patch": (32, 64, 64)},
    "liver": {"labels": [LIVER_LABEL, TUMOUR_LABEL], "head": {"type": "denseaspp"},
              "spacing": (1.5, 1.5, 3.0), "window": (-200.0, 250.0), "modality": "CT", "patch": (32, 64, 64),
              "coarse": {"spacing": (4.0, 4.0, 4.0), "patch": (32, 64, 64)}, "margin_mm": 10.0},
}
# Colours for labels of a custom label set, in order.
PALETTE = ([128, 174, 128], [241, 214, 145], [177, 122, 101], [111, 184, 210], [216, 101, 79], [221, 130, 101],
           [144, 238, 144], [192, 104, 88], [220, 245, 20], [78, 63, 0])


@dataclass
class SegmentationSettings:
    """Settings of a segmentation fine-tuning run (recorded in the bundle's provenance)."""

    steps: int = 200
    batch_size: int = 2
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    freeze: Tuple[str, ...] = ()
    val_fraction: float = 0.2
    validate_every: int = 50
    patch: Optional[Tuple[int, int, int]] = None       # K, J, I voxels; default the preset's or (32, 64, 64)
    spacing: Optional[Tuple[float, float, float]] = None  # default the preset's or the domain's median spacing
    foreground_share: float = 0.7
    rotate_deg: float = 10.0                           # augmentation: random in-plane rotation up to this angle
    coarse_steps: Optional[int] = None                 # liver: steps of the coarse stage (default: steps)
    seed: int = 0
    device: str = "auto"
    cache_dir: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["freeze"] = list(self.freeze)
        return out


def segmentation_labels(domain: Any, preset: Optional[str]) -> List[Dict[str, Any]]:
    """The bundle's label list: the preset's, or the domain's names with palette colours. The label values must
    be 1..n (the network's classes); remap other values with the domain's ``label_map``."""
    if preset is not None:
        labels = [dict(item) for item in PRESETS[preset]["labels"]]
        found = {int(v) for v in domain.label_names}
        wanted = {item["value"] for item in labels}
        if not found <= wanted:
            raise Med3DError(f"the '{preset}' preset has labels {sorted(wanted)} "
                             f"({', '.join(i['name'] for i in labels)}), the data has {sorted(found)}; map the "
                             f"data's values onto them (e.g. --label-map 5:1)")
        return labels
    values = sorted(int(v) for v in domain.label_names)
    if values != list(range(1, len(values) + 1)):
        raise Med3DError(f"label values must be 1..n to become network classes, got {values}; renumber them with "
                         f"a label map (e.g. --label-map 5:1,6:2)")
    return [{"value": v, "name": domain.label_names[v], "color": PALETTE[(v - 1) % len(PALETTE)]} for v in values]


class RotatingSampler:
    """Wraps a patch sampler: rotates each patch in the axial plane by a random angle (image linear, labels
    nearest) and flips it left-right at random. Randomness comes from (seed, step), so resuming is exact."""

    def __init__(self, sampler: Any, max_degrees: float, seed: int = 0) -> None:
        self.sampler, self.max_degrees, self.seed = sampler, float(max_degrees), int(seed)

    def next_batch(self, step: int) -> Dict[str, Any]:
        from scipy import ndimage

        batch = self.sampler.next_batch(step)
        if self.max_degrees <= 0:
            return batch
        rng = np.random.default_rng((self.seed, 7_919, step))
        images, labels = batch["image"].numpy().copy(), batch["label"].numpy().copy()
        for n in range(images.shape[0]):
            angle = float(rng.uniform(-self.max_degrees, self.max_degrees))
            fill = float(images[n].min())
            images[n, 0] = ndimage.rotate(images[n, 0], angle, axes=(1, 2), reshape=False, order=1, cval=fill)
            labels[n] = ndimage.rotate(labels[n], angle, axes=(1, 2), reshape=False, order=0, cval=0)
            if rng.random() < 0.5:
                images[n], labels[n] = images[n, :, :, :, ::-1], labels[n, :, :, ::-1]
        out = dict(batch)
        out["image"], out["label"] = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(
            np.ascontiguousarray(labels))
        return out

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def segmentation_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The pretraining loss (cross-entropy plus soft Dice over the foreground classes; Dice keeps small structures
    from vanishing) on one batch."""
    from .train import ce_dice_loss

    device = next(model.parameters()).device
    return ce_dice_loss(model(batch["image"].to(device)), batch["label"].to(device)), {}


def volume_dice(model: torch.nn.Module, data: Any, values: Sequence[int]) -> Dict[str, float]:
    """Mean and per-label Dice of whole preprocessed validation volumes (every case of ``data``)."""
    from .metrics import dice_per_label

    device = next(model.parameters()).device
    scores: Dict[int, List[float]] = {v: [] for v in values}
    for c in range(len(data.domains[0].cases)):
        image, label = data.arrays(0, c)
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None].to(device)
        prediction = model(x).argmax(1)[0].cpu().numpy()
        for v, s in dice_per_label(prediction, np.asarray(label), values).items():
            scores[v].append(s)
    per_label = {f"dice_{v}": float(np.mean(s)) for v, s in scores.items()}
    return {"dice": float(np.mean(list(per_label.values()))), **per_label}


def _run_stage(domain: Any, val_domain: Any, spacing: Sequence[float], head: Mapping[str, Any], patch: Sequence[int],
               steps: int, settings: SegmentationSettings, init: Optional[str], backbone: Optional[Mapping[str, Any]],
               values: Sequence[int], run_dir: Path, reporter: Reporter, resume: bool, stage: str,
               rotate: bool) -> Tuple[Med3DNet, Dict[str, Any], Dict[str, Any]]:
    """Train one network (encoder + ``head``) on patches of ``domain`` at ``spacing``; best by validation Dice."""
    from . import weights
    from .data import PatchSampler, PreparedCases
    from .train import TrainConfig, seed_everything, train

    cache = Path(settings.cache_dir) if settings.cache_dir else run_dir / "cache"
    spacings = {domain.name: tuple(spacing)}
    train_data = PreparedCases([domain], spacings, cache)
    val_data = PreparedCases([val_domain], {val_domain.name: tuple(spacing)}, cache) if val_domain.cases else None
    train_data.warm(reporter)
    if val_data is not None:
        val_data.warm(reporter)
    seed_everything(settings.seed)
    model, provenance = build_initialised_model(head, init, backbone)
    pretrained = provenance["init"] != "scratch"
    lr = settings.lr if settings.lr is not None else default_lr(pretrained)
    head_lr = settings.head_lr if settings.head_lr is not None else (10 * lr if pretrained else lr)
    frozen = freeze_encoder_parts(model, settings.freeze)
    sampler: Any = PatchSampler(train_data, patch, settings.batch_size, foreground_share=settings.foreground_share,
                                seed=settings.seed)
    if rotate:
        sampler = RotatingSampler(sampler, settings.rotate_deg, settings.seed)
    config = TrainConfig(steps=steps, batch_size=settings.batch_size, lr=head_lr, pretrained_lr=lr,
                         validate_every=settings.validate_every, best_metric="dice",
                         checkpoint_every=max(settings.validate_every, 25), seed=settings.seed, device=settings.device)
    result = train(model, config, sampler.next_batch, segmentation_loss, run_dir,
                   groups=encoder_head_groups(model, lr, head_lr),
                   validate=(lambda m: volume_dice(m, val_data, values)) if val_data is not None else None,
                   stateful={"sampler": sampler},
                   reporter=reporter, resume=resume, stage=stage)
    if result.best_path:
        model.load_state_dict(weights.safe_load(result.best_path)["model"])
    model.cpu().eval()
    provenance.update({"frozen": sorted({n.split(".")[1] for n in frozen}), "best": result.best,
                       "learning_rates": {"encoder": lr, "head": head_lr}})
    spec = train_data.specs[0]
    return model, provenance, spec.to_dict()


def finetune_segmentation(domain: Any, out_dir: Path, name: str, *, preset: Optional[str] = None,
                          init: Optional[str] = None, backbone: Optional[Mapping[str, Any]] = None,
                          settings: Optional[SegmentationSettings] = None,
                          groups: Optional[Mapping[str, str]] = None,
                          val_cases: Optional[Sequence[str]] = None, reporter: Optional[Reporter] = None,
                          resume: bool = False, overwrite: bool = False,
                          label_sources: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Fine-tune a segmentation model on one domain (:class:`med3dcore.data.Domain`) and write
    ``out_dir/<name>.pt``.

    ``preset`` ``"lung"`` or ``"liver"`` fixes labels, colours, terminology, head, spacing and CT window (liver:
    two stages, coarse ROI + DenseASPP); without a preset the domain's labels and median spacing are used with
    the lung decoder. ``groups`` maps case ids to patients for the grouped split (default: each case its own);
    ``val_cases`` (case ids) replaces the random split with a chosen validation set; ``settings.val_fraction``
    0 trains on every case without validation (the last weights are kept). ``label_sources`` (case id ->
    "real" | "classical" | "synthetic", default "real") is recorded in the bundle's provenance.
    """
    from . import weights
    from .data import validate_domains
    from .pseudo_labels import label_sources_record

    settings = settings or SegmentationSettings()
    reporter = reporter or null_reporter
    out_dir = Path(out_dir)
    bundle_path = _bundle_path(out_dir, name, overwrite, resume)
    if preset is not None and preset not in PRESETS:
        raise Med3DError(f"unknown preset '{preset}'; choose {', '.join(PRESETS)}")
    cfg: Dict[str, Any] = dict(PRESETS[preset]) if preset else {"head": {"type": "lung_decoder"}, "window": None,
                                                                "modality": None, "patch": (32, 64, 64)}
    labels = segmentation_labels(domain, preset)
    values = [item["value"] for item in labels]
    if preset:
        domain = dataclasses.replace(domain, window=domain.window or cfg["window"], modality=cfg["modality"])
    spacings = validate_domains([domain])
    spacing = settings.spacing or cfg.get("spacing") or spacings[domain.name]
    patch = tuple(settings.patch or cfg["patch"])
    case_groups = [(groups or {}).get(c.case_id, c.case_id) for c in domain.cases]
    if val_cases is None and settings.val_fraction > 0 and len(set(case_groups)) < 2:
        reporter(make_event("finetune", kind="message", message=f"the data hold one patient only ({case_groups[0]}): "
                            "training on all of it without validation (the last weights are kept); add cases "
                            "from more patients for a validated model"))
    if val_cases is None and (settings.val_fraction == 0 or len(set(case_groups)) < 2):
        train_idx, val_idx = list(range(len(domain.cases))), []
    elif val_cases is None:
        train_idx, val_idx = grouped_split(case_groups, settings.val_fraction, seed=settings.seed)
    else:
        val_idx = [i for i, c in enumerate(domain.cases) if c.case_id in set(val_cases)]
        train_idx = [i for i, c in enumerate(domain.cases) if c.case_id not in set(val_cases)]
        shared = {case_groups[i] for i in val_idx} & {case_groups[i] for i in train_idx}
        if len(val_idx) != len(set(val_cases)) or not train_idx or shared:
            raise Med3DError(f"validation cases {list(val_cases)} must be case ids of the data, leave training "
                             f"cases, and share no patient with them (shared: {sorted(shared)})")
    train_domain = dataclasses.replace(domain, cases=[domain.cases[i] for i in train_idx])
    val_domain = dataclasses.replace(domain, name=domain.name + "-validation",
                                     cases=[domain.cases[i] for i in val_idx])
    head = dict(cfg["head"], num_classes=len(values) + 1)
    run_dir = out_dir / name
    if init not in (None, "", "scratch"):
        build_initialised_model(head, init, backbone)  # a bad --init fails before anything is removed
    _start_fresh(run_dir, overwrite, resume)
    extra: Dict[str, Any] = {}
    coarse_info = None
    if "coarse" in cfg:
        coarse = cfg["coarse"]
        coarse_model, coarse_prov, coarse_spec = _run_stage(
            train_domain, val_domain, coarse["spacing"], {"type": "coarse_seg", "num_classes": len(values) + 1},
            coarse["patch"], settings.coarse_steps or settings.steps, settings, init, backbone, values,
            run_dir / "coarse", reporter, resume, "finetune-coarse", rotate=False)
        extra["coarse"] = {"architecture": coarse_prov["architecture"], "preprocessing": coarse_spec,
                           "state_dict": {k: v.detach().cpu() for k, v in coarse_model.state_dict().items()},
                           "input_size": None}
        extra["margin_mm"] = float(cfg["margin_mm"])
        coarse_info = {"best": coarse_prov["best"], "spacing": list(coarse["spacing"])}
    fine_dir = run_dir / "fine" if coarse_info else run_dir
    # A run interrupted during the coarse stage has no fine-stage checkpoint yet: that stage starts afresh.
    fine_resume = resume and (not coarse_info or (fine_dir / "checkpoints" / "last.pt").exists())
    model, provenance, spec = _run_stage(train_domain, val_domain, spacing, head, patch, settings.steps, settings,
                                         init, backbone, values, fine_dir, reporter, fine_resume, "finetune",
                                         rotate=preset == "liver")
    metrics = (provenance["best"] or {}).get("metrics", {})
    weights.save_bundle(
        bundle_path, model, architecture=provenance["architecture"],
        task={"type": "segmentation", "name": preset or name}, labels=labels, preprocessing=spec,
        provenance={"data": {"domain": domain.name, "train_cases": [c.case_id for c in train_domain.cases],
                             "validation_cases": [c.case_id for c in val_domain.cases],
                             **label_sources_record([c.case_id for c in domain.cases], label_sources)},
                    "init": provenance["init"], "steps": settings.steps, "settings": settings.to_dict(),
                    "frozen": provenance["frozen"], "learning_rates": provenance["learning_rates"],
                    "best": provenance["best"], "metrics": metrics, "coarse": coarse_info},
        extra=extra, overwrite=overwrite or resume)
    reporter(make_event("finetune", kind="result", message=f"saved {bundle_path}", metrics=metrics,
                        path=str(bundle_path)))
    return {"bundle": bundle_path, "metrics": metrics, "coarse": coarse_info}
