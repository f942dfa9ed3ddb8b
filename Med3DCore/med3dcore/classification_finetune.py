"""Nodule classification fine-tuning: a (pre)trained encoder + global pooling + a fully-connected layer learns
benign vs malignant from a nodule table (:func:`med3dcore.nodules.read_nodule_table`). The training itself is
:func:`med3dcore.train.train`; the patient-grouped split, initialisation, learning rates and bundle path are
:mod:`med3dcore.finetune`'s, shared with segmentation fine-tuning.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .devices import resolve_device, training_autocast
from .errors import Med3DError
from .finetune import (build_initialised_model, encoder_head_groups, freeze_encoder_parts, grouped_split,
                       learning_rates, run_bundle_path, start_fresh)
from .metrics import accuracy, auc, brier, expected_calibration_error, fit_temperature
from .nodule_measures import fit_fusion, fused_probability, measure_cases
from .nodule_mask_loss import attach_mask_head, detach_mask_head, mask_classification_loss
from .nodule_cubes import load_cached_cubes, prepare_cases, store_cubes
from .nodules import CLASS_NAMES, NoduleCase, NoduleInputSpec, trained_context
from .progress import Reporter, make_event, null_reporter

# Outline steps per classifier step when not given: 900 instead of 300 on the LIDC folds lifted the outline's Dice
# from 0.62-0.69 to 0.78-0.80 and the ROI-only AUC by +0.027 (paired; Testing/benchmarks/RESULTS.md).
OUTLINE_STEPS_PER_STEP = 3


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
    amp: str = "auto"                     # mixed precision of the training steps (train.TrainConfig.amp)
    mask_weight: float = 0.0              # auxiliary nodule-mask loss (nodule_mask_loss.py); needs every mask
    outline_steps: Optional[int] = None   # nodule outline network (nodule_outline.py): None = 3 x steps, 0 = none
    cache_dir: Optional[str] = None       # prepared cubes; default <out>/<name>/cache

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
                 augment: bool = True, masks: Optional[np.ndarray] = None) -> None:
        self.cubes, self.labels, self.masks = cubes, labels, masks
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
        # A mask travels as a second channel, so that it is flipped and shifted with its image.
        cubes = [self.cubes[i] if self.masks is None else np.concatenate([self.cubes[i], self.masks[i]])
                 for i in chosen]
        stacked = np.stack([augment_cube(c, rng) if self.augment else c for c in cubes])
        batch = {"image": torch.from_numpy(np.ascontiguousarray(stacked[:, :1])),
                 "label": torch.from_numpy(self.labels[chosen].astype(np.int64))}
        if self.masks is not None:
            batch["mask"] = torch.from_numpy(np.ascontiguousarray(stacked[:, 1:]))
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "n": int(len(self.labels)), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n"]) != len(self.labels) or int(state["batch_size"]) != self.batch_size:
            raise Med3DError("cannot resume: the training cases differ from the interrupted run's; use the same "
                             "table and settings")


def classification_loss(model: torch.nn.Module,
                        batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    device = next(model.parameters()).device
    logits = model(batch["image"].to(device))
    labels = batch["label"].to(device)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"accuracy": float((logits.argmax(1) == labels).float().mean())}


def evaluate_batches(model: torch.nn.Module, cubes: np.ndarray, batch_size: int,
                     keep: Callable[[torch.Tensor], np.ndarray]) -> List[np.ndarray]:
    """``keep(model(batch))`` for each batch of prepared cubes, in eval mode without gradients (the model's training
    mode is restored afterwards)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(cubes), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(cubes[start:start + batch_size])).to(device)
                out.append(keep(model(x)))
    finally:
        model.train(was_training)
    return out


def predict_logits(model: torch.nn.Module, cubes: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Logits (N, classes), float32, of prepared cubes, in eval mode."""
    out = evaluate_batches(model, cubes, batch_size, lambda y: y.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def softmax_with_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` per row, as :func:`med3dcore.infer.classify` computes it."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, np.float32)) / float(temperature), dim=1).numpy()


def predict_probabilities(model: torch.nn.Module, cubes: np.ndarray, batch_size: int = 16,
                          temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, classes) of prepared cubes, ``softmax(logits / temperature)``, in eval mode."""
    return softmax_with_temperature(predict_logits(model, cubes, batch_size), temperature)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Accuracy, AUC (when both classes are present), cross-entropy, Brier score and expected calibration error of
    malignant-vs-benign predictions."""
    labels = np.asarray(labels).astype(int)
    metrics = {"accuracy": accuracy(probabilities.argmax(1), labels),
               "loss": float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)))),
               "brier": brier(probabilities[:, 1], labels),
               "ece": expected_calibration_error(probabilities[:, 1], labels)}
    if len(set(labels.tolist())) == 2:
        metrics["auc"] = auc(probabilities[:, 1], labels)
    return metrics


def calibrate(logits: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
    """Temperature scaling fitted on validation logits (:func:`med3dcore.metrics.fit_temperature`), with the
    validation Brier score and ECE before and after. One parameter: accuracy and AUC stay as they are. Without
    both classes in validation nothing can be fitted: T stays 1 and ``note`` says why."""
    labels = np.asarray(labels).astype(int)

    def scores(temperature: float) -> Optional[Dict[str, float]]:
        if not len(labels):
            return None
        p = softmax_with_temperature(logits, temperature)[:, 1]
        return {"brier": brier(p, labels), "ece": expected_calibration_error(p, labels)}

    record: Dict[str, Any] = {"temperature": 1.0, "fitted_on": "validation", "validation_cases": int(len(labels)),
                              "before": scores(1.0)}
    if len(set(labels.tolist())) < 2:
        record.update(fitted_on=None, after=record["before"],
                      note="no validation cases of both classes: probabilities are not calibrated (temperature 1)")
        return record
    record["temperature"] = fit_temperature(logits, labels)
    record["after"] = scores(record["temperature"])
    return record


def calibration_summary(record: Mapping[str, Any]) -> str:
    """One line for the run's summary: validation Brier and ECE before -> after, and the temperature."""
    before, after = record.get("before"), record.get("after")
    if record.get("fitted_on") is None or not before or not after:
        return record.get("note") or "probabilities not calibrated (temperature 1)"
    return (f"calibrated on {record['validation_cases']} validation cases: temperature {record['temperature']:.3f}, "
            f"Brier {before['brier']:.3f} -> {after['brier']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f}")


def fit_measured_fusion(train_measures: Optional[np.ndarray], train_labels: np.ndarray,
                        val_measures: Optional[np.ndarray], val_logits: np.ndarray,
                        val_labels: np.ndarray) -> Dict[str, Any]:
    """The measured-size model of :mod:`med3dcore.nodule_measures` when every case has a mask (measures not None)
    and both sets hold both classes (stage 1 on training and validation cases, stage 2 on validation only):
    ``{"record"}`` for the bundle, the validation metrics of what ``classify --mask`` then gives (stage 2 is fitted
    on these very cases, so they flatter it) and a ``summary`` line; else only the summary."""
    if len(set(np.asarray(train_labels).tolist())) < 2 or len(set(np.asarray(val_labels).tolist())) < 2:
        return {"summary": "no measured-size model: it needs training and validation cases of both classes"}
    if train_measures is None or val_measures is None:
        return {"summary": "no measured-size model (it needs a mask for every case); classify gives the image's "
                           "probability alone"}
    image_logits = val_logits[:, 1] - val_logits[:, 0]
    # Stage 1 (six weights) learns from every labelled case; only stage 2 must see cases the network did not.
    record = fit_fusion(np.concatenate([train_measures, val_measures]), np.concatenate([train_labels, val_labels]),
                        val_measures, image_logits, val_labels)
    p = fused_probability(record, val_measures, image_logits)
    metrics = classification_metrics(np.column_stack([1 - p, p]), val_labels)
    unused = "" if record["combine"]["weights"][1] > 0 else \
        "; the network's logit got no weight: on this validation split it adds nothing to the measures"
    return {"record": record, "validation": metrics, "fitted_on": "stage 1 training + validation, stage 2 validation",
            "summary": f"measured-size model (classify --mask): validation AUC {metrics['auc']:.3f}, "
                       f"Brier {metrics['brier']:.3f}, ECE {metrics['ece']:.3f} (stage 2 fitted there){unused}"}


def recorded_patients(cases: Sequence[NoduleCase]) -> List[str]:
    """The sorted digests of a table's patient ids (:func:`med3dcore.nodule_evaluation.patient_digest`), recorded
    in the bundle so that ``med3d evaluate`` can say when it is shown these patients again."""
    from .nodule_evaluation import patient_digest, patient_id

    return sorted({patient_digest(p) for p in (patient_id(c) for c in cases) if p is not None})


def _cached_or_prepared(cases: Sequence[NoduleCase], spec: NoduleInputSpec, cache: Path, reporter: Reporter,
                        to_store: List[Tuple[Any, np.ndarray, str]], kind: str) -> np.ndarray:
    """Cubes (or mask cubes) of ``cases`` from the cache, else prepared and queued in ``to_store`` for the cache."""
    found = load_cached_cubes(cases, spec, cache, kind)
    if found is None:
        found = prepare_cases(cases, spec, reporter, kind)
        to_store.append((cases, found, kind))
    return found


def finetune_classification(cases: Sequence[NoduleCase], out_dir: Path, name: str, *,
                            init: Optional[str] = None, backbone: Optional[Mapping[str, Any]] = None,
                            spec: Optional[NoduleInputSpec] = None,
                            settings: Optional[ClassificationSettings] = None,
                            val_cases: Optional[Sequence[NoduleCase]] = None,
                            cubes: Optional[np.ndarray] = None, val_cubes: Optional[np.ndarray] = None,
                            mask_cubes: Optional[np.ndarray] = None, reporter: Optional[Reporter] = None,
                            resume: bool = False,
                            overwrite: bool = False) -> Dict[str, Any]:
    """Fine-tune a benign/malignant nodule classifier and write ``out_dir/<name>.pt`` (a classification bundle).

    Without ``val_cases`` a patient-grouped split of ``cases`` (``settings.val_fraction``) is used. ``cubes`` /
    ``val_cubes`` may hold already prepared inputs (cross-validation prepares every case once, with a spec it has
    passed through :func:`~med3dcore.nodules.trained_context`; otherwise that is done here), ``mask_cubes`` their
    masks for the auxiliary mask loss (``settings.mask_weight``; prepared here when not given). After the best
    checkpoint is chosen, temperature scaling is fitted on the validation logits (:func:`calibrate`) and stored
    in the bundle (``extra["temperature"]``; its record, Brier and ECE before and after, in the provenance), as
    are the training patients' ids (so ``med3d evaluate`` can say when it is shown them again). When every case
    has a mask, a nodule outline network is trained afterwards for ``settings.outline_steps`` steps and stored with
    its fusion record (:mod:`med3dcore.nodule_outline`: ``classify`` without a mask then uses it). Returns a dict
    with the bundle path, the validation metrics and probabilities (calibrated), the calibration record and the
    measured-size and outline fits.
    """
    from . import bundles, checkpoint_files
    from .train import train
    from .training_setup import TrainConfig, seed_everything

    settings = settings or ClassificationSettings()
    spec = before = spec or NoduleInputSpec()
    reporter = reporter or null_reporter
    out_dir = Path(out_dir)
    bundle_path = run_bundle_path(out_dir, name, overwrite, resume)
    labels = np.array([c.label for c in cases], dtype=np.int64)
    cache = Path(settings.cache_dir) if settings.cache_dir else out_dir / name / "cache"
    to_store = []  # written to the cache only once every input has been checked (below)
    if cubes is None:  # prepared cubes come with the spec they were prepared with; else match the crops' context
        spec = trained_context([*cases, *(val_cases or [])], spec)
        if spec is not before:
            reporter(make_event("finetune", kind="message", message=(
                f"context shown around each mask: {spec.context_text()}, as the training crops show it (classify "
                "shows a nodule in a whole CT the same way)")))
        cubes = _cached_or_prepared(cases, spec, cache, reporter, to_store, "image")
    every_mask = all(c.mask for c in [*cases, *(val_cases or [])])
    use_masks = settings.mask_weight > 0 and every_mask
    outline_steps = (OUTLINE_STEPS_PER_STEP * settings.steps if settings.outline_steps is None
                     else int(settings.outline_steps))
    if settings.mask_weight > 0 and not use_masks:
        reporter(make_event("finetune", kind="message", message=(
            "no auxiliary mask loss: it needs a mask for every case; training on the labels alone")))
    val_masks = None
    if (use_masks or outline_steps > 0) and every_mask:
        if mask_cubes is None:
            mask_cubes = _cached_or_prepared(cases, spec, cache, reporter, to_store, "mask")
        if val_cases:
            val_masks = _cached_or_prepared(val_cases, spec, cache, reporter, to_store, "mask")
    if val_cases is None:
        train_idx, val_idx = grouped_split([c.patient for c in cases], settings.val_fraction, labels, settings.seed)
        val_labels, val_cubes = labels[val_idx], cubes[val_idx]
        cubes, labels = cubes[train_idx], labels[train_idx]
        if mask_cubes is not None:
            mask_cubes, val_masks = mask_cubes[train_idx], mask_cubes[val_idx]
        val_patients = sorted({cases[i].patient for i in val_idx})
        train_cases, val_cases = [cases[i] for i in train_idx], [cases[i] for i in val_idx]
        recorded = {"train_patient_sha256": recorded_patients([cases[i] for i in train_idx]),
                    "validation_patient_sha256": recorded_patients([cases[i] for i in val_idx])}
    else:
        train_cases = list(cases)
        recorded = {"train_patient_sha256": recorded_patients(cases),
                    "validation_patient_sha256": recorded_patients(val_cases)}
        val_labels = np.array([c.label for c in val_cases], dtype=np.int64)
        if val_cubes is None:
            val_cubes = _cached_or_prepared(val_cases, spec, cache, reporter, to_store, "image")
        val_patients = sorted({c.patient for c in val_cases})
    if len(set(labels.tolist())) < 2:
        raise Med3DError("the training cases hold only one class; a classifier needs benign and malignant cases")

    # Measured before training, so that a bad mask is reported before minutes of work, not after.
    train_measures, val_measures = measure_cases(train_cases), measure_cases(val_cases)
    seed_everything(settings.seed)
    model, provenance = build_initialised_model({"type": "classifier", "num_classes": 2}, init, backbone)
    training_autocast(settings.amp, resolve_device(settings.device))  # refused before anything is written
    start_fresh(out_dir / name, overwrite, resume)  # every new input read and checked by now
    for stored_cases, stored_cubes, kind in to_store:
        store_cubes(stored_cases, spec, cache, stored_cubes, kind)
    if use_masks:
        attach_mask_head(model)
    lr, head_lr = learning_rates(settings.lr, settings.head_lr, provenance["init"] != "scratch")
    frozen = freeze_encoder_parts(model, settings.freeze)
    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=head_lr, pretrained_lr=lr,
                         weight_decay=settings.weight_decay, schedule=settings.schedule,
                         validate_every=settings.validate_every, best_metric="auc" if len(set(val_labels.tolist())) == 2
                         else "accuracy", checkpoint_every=max(settings.validate_every, 50), seed=settings.seed,
                         device=settings.device, amp=settings.amp)
    sampler = CubeSampler(cubes, labels, settings.batch_size, settings.seed, settings.augment,
                          masks=mask_cubes if use_masks else None)
    last_probs: Dict[int, np.ndarray] = {}

    def validate(m: torch.nn.Module) -> Dict[str, float]:
        probs = predict_probabilities(m, val_cubes)
        last_probs[0] = probs
        return classification_metrics(probs, val_labels)

    loss = mask_classification_loss(settings.mask_weight) if use_masks else classification_loss
    result = train(model, config, sampler.next_batch, loss, out_dir / name,
                   groups=encoder_head_groups(model, lr, head_lr), validate=validate,
                   stateful={"sampler": sampler}, reporter=reporter, resume=resume, stage="finetune")
    best_state = checkpoint_files.safe_load(result.best_path)["model"] if result.best_path else model.state_dict()
    model.load_state_dict(best_state)
    detach_mask_head(model)  # training only: the bundle holds the classifier
    logits = predict_logits(model, val_cubes)
    calibration = calibrate(logits, val_labels)
    probs = softmax_with_temperature(logits, calibration["temperature"])
    metrics = classification_metrics(probs, val_labels)  # of the calibrated probabilities the bundle gives
    reporter(make_event("finetune", kind="message", message=calibration_summary(calibration)))
    fusion = fit_measured_fusion(train_measures, labels, val_measures, logits, val_labels)
    reporter(make_event("finetune", kind="message", message=fusion["summary"]))
    extra = {"nodule_input": spec.to_dict(), "temperature": calibration["temperature"]}
    if fusion.get("record"):
        extra["measured_fusion"] = fusion["record"]
    outline: Dict[str, Any] = {"note": "no outline model: " + (
        "outline steps 0" if outline_steps == 0 else "it needs a mask for every case and a measured-size model")}
    if outline_steps > 0 and val_masks is not None and "record" in fusion:
        from .nodule_outline import fit_outline_fusion, outline_bundle_extra, report_outline, train_outline

        net = train_outline(cubes, mask_cubes, labels, outline_steps, out_dir / name, batch_size=settings.batch_size,
                            seed=settings.seed, device=settings.device, amp=settings.amp,
                            augment=settings.augment, reporter=reporter, resume=resume)
        outline = fit_outline_fusion(net, spec, (np.concatenate([cubes, val_cubes]),
                                                 np.concatenate([mask_cubes, val_masks]),
                                                 np.concatenate([labels, val_labels])),
                                     (val_cubes, val_masks, val_labels, logits), calibration["temperature"])
        report_outline(reporter, outline)
        if "record" in outline:
            extra.update(outline_bundle_extra(net, outline["record"]))
    bundles.save_bundle(
        bundle_path, model=model.cpu(), architecture=provenance["architecture"],
        task={"type": "classification", "name": "nodule"},
        labels=[{"value": i, "name": n} for i, n in enumerate(CLASS_NAMES)],
        preprocessing=None,
        provenance={"data": {"train_cases": int(len(labels)), "validation_cases": int(len(val_labels)),
                             "validation_patients": len(val_patients), **recorded},
                    "init": provenance["init"], "steps": settings.steps, "settings": settings.to_dict(),
                    "frozen": sorted({n.split(".")[1] for n in frozen}),
                    "best": result.best, "metrics": metrics, "calibration": calibration,
                    "measured_fusion": {k: v for k, v in fusion.items() if k != "record"},
                    "outline": {k: outline[k] for k in ("note", "validation_dice", "empty") if k in outline}},
        extra=extra,
        overwrite=overwrite or resume)
    reporter(make_event("finetune", kind="result", metrics=metrics, path=str(bundle_path),
                        message=f"saved {bundle_path}; {calibration_summary(calibration)}"))
    return {"bundle": bundle_path, "metrics": metrics, "probabilities": probs, "labels": val_labels,
            "best": result.best, "calibration": calibration, "measured_fusion": fusion, "outline": outline}
