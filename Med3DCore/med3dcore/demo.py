"""The offline demo (``med3d demo``): Med3D's whole idea end to end on synthetic CT phantoms, with no network
access and no downloaded weights.

1. Draw synthetic phantoms (``phantoms.py``): four pretraining domains with different label spaces and spacings,
   separate lung-segmentation and nodule-classification sets, and one held-out torso.
2. Pretrain a ResNet-10 encoder on the four domains at once (``pretrain.py``, Med3D co-training).
3. Fine-tune lung segmentation and nodule classification twice each: from that encoder and from scratch, with the
   same steps and data (``segmentation_finetune.py``, ``classification_finetune.py``).
4. Segment the held-out torso and classify its nodule (``infer.py``); write the label map, overlay PNGs (the
   segmentation, and where it agrees with the phantom's truth), the training curves of both initialisations on
   one picture per task, and a report comparing pretrained with scratch.
5. Delete what only training needed (checkpoints, preprocessing caches) unless ``keep_checkpoints``.

The data are synthetic, so the figures show that the machinery works, not clinical accuracy.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .devices import resolve_device
from .errors import Med3DError
from .progress import Reporter, make_event, null_reporter
from .safe_io import write_text

SYNTHETIC_NOTE = ("All data in this demo are synthetic CT phantoms drawn by med3dcore.phantoms (ellipsoid torsos, "
                  "lungs, liver and simple nodules), not patient scans; the figures show that pretraining, "
                  "fine-tuning and inference work end to end, not clinical accuracy.")
# Phantom grid of the demo's torsos: (K, J, I) voxels at (I, J, K) mm spacing.
TORSO_SHAPE = (32, 48, 48)
TORSO_SPACING = (3.0, 3.0, 4.0)
# Nodule cubes: 24^3 voxels of 1.25 mm (30 mm) hold the largest phantom nodule (20 mm) at 40% of the cost of 32^3.
NODULE_INPUT = {"cube": 24, "spacing_mm": 1.25}


@dataclass
class DemoSize:
    """How much work the demo does; ``quick`` is for tests."""

    pretrain_cases: int = 4
    pretrain_steps: int = 60
    lung_cases: int = 6
    lung_steps: int = 90
    nodules_per_kind: int = 16
    nodule_steps: int = 30
    test_nodules_per_kind: int = 8


QUICK_NOTE = ("Quick mode: a few training steps per model, so these numbers are NOT results (a Dice of 0 and chance "
              "accuracy are expected); quick mode only shows that every stage runs. Run without --quick for the "
              "pretrained-vs-scratch comparison.")
FULL = DemoSize()
QUICK = DemoSize(pretrain_cases=2, pretrain_steps=3, lung_cases=3, lung_steps=3, nodules_per_kind=4,
                 nodule_steps=3, test_nodules_per_kind=2)
# One learning rate for both initialisations (encoder and head), so only the initialisation differs. The paper's
# 0.01 from scratch does not converge in a few dozen steps here; 0.001 does for both.
LEARNING_RATE = 1e-3


def _lung_domain(folder: Path, count: int, seed: int):
    """Torso phantoms with lung labels (nodules inside the lungs count as lung), as a fine-tuning domain."""
    from .domains import Case, Domain
    from .phantoms import make_ct_phantom
    from .volume_files import write_volume

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    cases = []
    for c in range(count):
        image, labels, _ = make_ct_phantom(TORSO_SHAPE, TORSO_SPACING, seed=seed + c, flip=(2,) if c % 2 else ())
        lung = labels.with_array(np.isin(labels.array, (1, 5)).astype(np.uint8))
        image_path = write_volume(image, folder / "images" / f"case_{c:02d}.nii.gz", overwrite=True)
        label_path = write_volume(lung, folder / "labels" / f"case_{c:02d}.nii.gz", overwrite=True)
        cases.append(Case(case_id=f"case_{c:02d}", image=image_path, label=label_path))
    return Domain(name="phantom_lung", modality="CT", label_names={1: "lung"}, cases=cases)


def _nodule_cases(folder: Path, per_kind: int, seed: int, prefix: str):
    """Nodule crops of both kinds with masks on disk, one patient per crop."""
    from .nodules import CLASS_NAMES, NoduleCase
    from .phantoms import make_nodule_crop
    from .volume_files import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for n in range(per_kind):
        for label, kind in enumerate(CLASS_NAMES):
            image, mask = make_nodule_crop(kind, seed=seed + 2 * n + label, shape=(24, 40, 40),
                                           spacing=(0.8, 0.8, 1.5))
            stem = f"{prefix}_{kind}_{n:02d}"
            image_path = write_volume(image, folder / f"{stem}.nii.gz", overwrite=True)
            mask_path = write_volume(mask, folder / f"{stem}_mask.nii.gz", overwrite=True)
            cases.append(NoduleCase(image=str(image_path), label=label, mask=str(mask_path), patient=stem))
    return cases


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    from .metrics import dice

    return float(dice(prediction > 0, truth > 0))


def _classify_all(model: Path, cases, device: str) -> Dict[str, float]:
    from .infer import classify, load_model
    from .metrics import accuracy, auc
    from .volume_files import read_volume

    model = load_model(model)  # once, not per case
    scores, predicted, truth = [], [], []
    for case in cases:
        result = classify(read_volume(case.image), model, mask=read_volume(case.mask), device=device)
        scores.append(result.probabilities["malignant"])
        predicted.append(int(result.predicted == "malignant"))
        truth.append(case.label)
    return {"accuracy": float(accuracy(predicted, truth)), "auc": float(auc(scores, truth))}


def run_demo(out_dir: Path, quick: bool = False, device: str = "auto", seed: int = 0,
             reporter: Optional[Reporter] = None, overwrite: bool = False,
             keep_checkpoints: bool = False) -> Dict[str, Any]:
    """Run the demo into ``out_dir``; returns the report as a dict (also written as report.md and report.json).

    Outputs: ``heldout_ct.nii.gz`` (the held-out phantom), ``heldout_lung_labels.nii.gz`` (its lung segmentation
    by the pretrained model, in the phantom's geometry), ``heldout_overlay.png`` (with legend and volumes),
    ``heldout_vs_truth.png`` (agreement with the phantom's truth), ``lung_curves.png``/``nodule_curves.png``
    (pretrained and scratch training on one picture each), ``report.md``/``report.json``, the models under
    ``models/`` (each run's ``history.json`` and ``training_curve.png`` beside them), the pretrained encoder
    under ``pretrain/`` and the phantom training data under ``data/``. Training checkpoints and preprocessing
    caches are deleted at the end unless ``keep_checkpoints``.
    """
    from .classification_finetune import ClassificationSettings, finetune_classification
    from .finetune import clear_checkpoints
    from .segmentation_finetune import SegmentationSettings, finetune_segmentation
    from .nodules import NoduleInputSpec
    from .infer import classify, segment
    from .overlay import write_overlay
    from .phantoms import make_ct_phantom, write_phantom_domains
    from .pretrain import pretrain
    from .volume_files import write_volume

    reporter = reporter or null_reporter
    size = QUICK if quick else FULL
    out = Path(out_dir)
    resolve_device(device)  # a missing GPU is an error before anything is written
    if out.exists() and not out.is_dir():
        raise Med3DError(f"--out {out} is a file; give a folder for the demo's outputs")
    report_path = out / "report.md"
    if report_path.exists() and not overwrite:
        raise Med3DError(f"{out} already holds a demo (report.md); choose another --out or pass --overwrite")
    if overwrite:
        clear_checkpoints(out / "pretrain")  # else it asks for --resume; fine-tuning clears its own runs
    out.mkdir(parents=True, exist_ok=True)
    say = lambda text: reporter(make_event("demo", kind="message", message=text))  # noqa: E731
    started = time.perf_counter()
    timings: Dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    say("synthetic data only: drawing CT phantoms (no downloads, no patient scans)")
    t = time.perf_counter()
    config = write_phantom_domains(out / "data" / "pretraining", n_cases=size.pretrain_cases, seed=seed,
                                   overwrite=True)
    lung_train = _lung_domain(out / "data" / "lung", size.lung_cases, seed=seed + 5000)
    nodules = _nodule_cases(out / "data" / "nodules", size.nodules_per_kind, seed=seed + 7000, prefix="train")
    test_nodules = _nodule_cases(out / "data" / "nodules_test", size.test_nodules_per_kind, seed=seed + 9000,
                                 prefix="test")
    t = lap("phantoms", t)

    say(f"pretraining a ResNet-10 encoder on 4 phantom domains ({size.pretrain_steps} steps)")
    encoder = pretrain(config, out / "pretrain", device=device, reporter=reporter,
                       overrides={"steps": size.pretrain_steps, "checkpoint_every": max(size.pretrain_steps, 1)},
                       overwrite=overwrite).bundle_path
    t = lap("pretrain", t)

    models = out / "models"
    # Validation once, at the end (it segments whole volumes: costly next to a 30-step run); the lung model works
    # on the phantoms' own 3 x 3 x 4 mm grid, which keeps patches and inference small.
    seg_settings = SegmentationSettings(steps=size.lung_steps, batch_size=2, patch=(16, 32, 32),
                                        spacing=TORSO_SPACING, lr=LEARNING_RATE, head_lr=LEARNING_RATE,
                                        validate_every=size.lung_steps, device=device, seed=seed)
    cls_settings = ClassificationSettings(steps=size.nodule_steps, batch_size=8, lr=LEARNING_RATE,
                                          head_lr=LEARNING_RATE, validate_every=size.nodule_steps, device=device,
                                          seed=seed)
    bundles: Dict[str, Path] = {}
    for init_name, init in (("pretrained", str(encoder)), ("scratch", None)):
        say(f"fine-tuning lung segmentation from {init_name} ({size.lung_steps} steps)")
        bundles[f"lung_{init_name}"] = finetune_segmentation(
            lung_train, models, f"lung_{init_name}", preset="lung", init=init, settings=seg_settings,
            reporter=reporter, overwrite=True,
            label_sources={c.case_id: "synthetic" for c in lung_train.cases})["bundle"]
        t = lap(f"finetune lung ({init_name})", t)
        say(f"fine-tuning nodule classification from {init_name} ({size.nodule_steps} steps)")
        bundles[f"nodule_{init_name}"] = finetune_classification(
            nodules, models, f"nodule_{init_name}", init=init, spec=NoduleInputSpec.from_dict(NODULE_INPUT),
            settings=cls_settings, reporter=reporter, overwrite=True)["bundle"]
        t = lap(f"finetune nodule ({init_name})", t)

    say("segmenting and classifying a held-out phantom")
    image, truth, _ = make_ct_phantom(TORSO_SHAPE, TORSO_SPACING, seed=seed + 99991, nodules=("malignant",))
    write_volume(image, out / "heldout_ct.nii.gz", overwrite=True)
    lung_truth = np.isin(truth.array, (1, 5))
    results: Dict[str, Dict[str, float]] = {}
    for init_name in ("pretrained", "scratch"):
        seg = segment(image, bundles[f"lung_{init_name}"], task="lung", device=device, reporter=reporter,
                      synthetic_input=True)  # a phantom: the phantom-trained model's warning does not apply
        if init_name == "pretrained":
            labels_path = write_volume(seg.labels, out / "heldout_lung_labels.nii.gz", overwrite=True)
            write_overlay(image, seg.labels, out / "heldout_overlay.png", seg.label_info, (-1000.0, 400.0),
                          overwrite=True)
            write_overlay(image, _agreement(seg.labels, lung_truth), out / "heldout_vs_truth.png", AGREEMENT_LABELS,
                          (-1000.0, 400.0), overwrite=True)
        results[init_name] = {"lung_dice": _dice(seg.labels.array, lung_truth),
                              **_volumes_ml(seg.labels.array > 0, lung_truth, image.spacing)}
        results[init_name].update({f"nodule_{k}": v for k, v in
                                   _classify_all(bundles[f"nodule_{init_name}"], test_nodules, device).items()})
    nodule_mask = truth.with_array((truth.array == 5).astype(np.uint8))
    heldout_nodule = classify(image, bundles["nodule_pretrained"], mask=nodule_mask, device=device)
    lap("inference", t)
    curves = {task: str(_curves(models, task, out / f"{task}_curves.png")) for task in ("lung", "nodule")}
    if not keep_checkpoints:
        _drop_training_files(out, [models / name for name in bundles] + [out / "pretrain"])
    timings["total"] = round(time.perf_counter() - started, 1)

    report = {"synthetic": True, "note": SYNTHETIC_NOTE, "quick": quick, "quick_note": QUICK_NOTE if quick else None,
              "results": results,
              "heldout_nodule": {"truth": "malignant", "predicted": heldout_nodule.predicted,
                                 "probabilities": heldout_nodule.probabilities},
              "outputs": {"labels": str(labels_path), "overlay": str(out / "heldout_overlay.png"),
                          "agreement": str(out / "heldout_vs_truth.png"), "curves": curves,
                          "models": {k: str(v) for k, v in bundles.items()}},
              "kept_checkpoints": keep_checkpoints,
              "sizes": size.__dict__, "seconds": timings}
    write_text(out / "report.json", json.dumps(report, indent=2), overwrite=True, what="report")
    write_text(report_path, _markdown(report), overwrite=True, what="report")
    report["megabytes"] = round(_folder_bytes(out) / 1e6, 1)
    reporter(make_event("demo", kind="result", message=f"report written to {report_path}"))
    return report


# Where the held-out segmentation agrees with the phantom's truth, for heldout_vs_truth.png.
AGREEMENT_LABELS = [
    {"value": 1, "name": "lung: model and truth agree", "color": [60, 200, 90]},
    {"value": 2, "name": "model only (over-segmented)", "color": [235, 60, 50]},
    {"value": 3, "name": "truth only (missed)", "color": [60, 120, 240]},
]


def _agreement(labels: Any, truth: np.ndarray) -> Any:
    predicted = np.asarray(labels.array) > 0
    out = np.zeros(predicted.shape, np.uint8)
    out[predicted & truth], out[predicted & ~truth], out[~predicted & truth] = 1, 2, 3
    return labels.with_array(out)


def _volumes_ml(predicted: np.ndarray, truth: np.ndarray, spacing: Any) -> Dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {"lung_ml": round(float(predicted.sum()) * voxel_ml, 1), "truth_ml": round(float(truth.sum()) * voxel_ml, 1)}


def _curves(models: Path, task: str, path: Path) -> Path:
    """Both initialisations' training of ``task`` on one picture (from each run's history.json)."""
    from .plots import curves_from_history, write_curves
    from .train import HISTORY_NAME

    runs = {}
    for init_name, title in (("pretrained", "Med3D-pretrained encoder"), ("scratch", "from scratch")):
        record = json.loads((models / f"{task}_{init_name}" / HISTORY_NAME).read_text(encoding="utf-8"))
        runs[title] = curves_from_history(record["history"], record["validations"], record.get("metric"))
    what = "lung segmentation (validation Dice)" if task == "lung" else "nodule classification (validation AUC)"
    return write_curves(path, runs, title=f"Demo: fine-tuning {what}, pretrained vs scratch")


def _drop_training_files(out: Path, run_dirs: List[Path]) -> None:
    """Training checkpoints and preprocessing caches: hundreds of MB no one looks at after the run."""
    import shutil

    from .finetune import clear_checkpoints

    for run_dir in run_dirs:
        clear_checkpoints(run_dir)
        cache = run_dir / "cache"
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _markdown(report: Dict[str, Any]) -> str:
    r = report["results"]
    lines: List[str] = ["# Med3D offline demo", "", f"**Synthetic data.** {report['note']}", ""]
    if report.get("quick_note"):
        lines += [f"**{report['quick_note']}**", ""]
    lines += ["| initialisation | lung Dice (held-out torso) | lung volume, mL (truth) | nodule accuracy | "
              "nodule AUC |", "|---|---|---|---|---|"]
    for name in ("pretrained", "scratch"):
        lines.append(f"| {'Med3D-pretrained encoder' if name == 'pretrained' else 'from scratch'} | "
                     f"{r[name]['lung_dice']:.3f} | {r[name]['lung_ml']:.0f} ({r[name]['truth_ml']:.0f}) | "
                     f"{r[name]['nodule_accuracy']:.2f} | {r[name]['nodule_auc']:.2f} |")
    n, o = report["heldout_nodule"], report["outputs"]
    lines += [
        "",
        f"Held-out torso nodule (truly {n['truth']}): predicted {n['predicted']} "
        f"(p(malignant) = {n['probabilities']['malignant']:.2f}, pretrained model).",
        "",
        f"Label map: `{o['labels']}` (same geometry as `heldout_ct.nii.gz`); overlay with legend and volumes: "
        f"`{o['overlay']}`; where it agrees with the phantom's truth (green), over-segments (red) or misses (blue): "
        f"`{o['agreement']}`; training curves, pretrained and scratch on one picture: "
        f"`{o['curves']['lung']}`, `{o['curves']['nodule']}`.",
        "",
        "Both initialisations used the same data, steps, seeds and learning rate (0.001); with this little "
        "training the difference between them is noisy, so read it as a smoke test of the method, not as evidence.",
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()) + ".",
        "",
        ("Training checkpoints were kept (--keep-checkpoints)." if report.get("kept_checkpoints") else
         "Training checkpoints and preprocessing caches were deleted (--keep-checkpoints keeps them)."),
        "",
    ]
    return "\n".join(lines)
