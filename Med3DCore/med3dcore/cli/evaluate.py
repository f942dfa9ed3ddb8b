"""``med3d evaluate``: score a model on labelled cases: Dice per label (segmentation), or for nodule
classification AUC, accuracy, sensitivity at 90 % specificity, Brier score and ECE with 95 % intervals from a
bootstrap over patients (``nodule_evaluation.py``), printed as JSON; a plain warning on stderr when the cases come
from patients the model was fine-tuned on."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from ..devices import DEVICE_CHOICES
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_event, make_reporter
from . import dump_json


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a model on labelled cases (Dice, or AUC, accuracy and calibration with 95%% CIs)",
        description="Run a Med3D model over labelled cases and print the scores as JSON. Segmentation models: "
                    "Dice per label and its mean over cases, from --images DIR --labels DIR (files matched by "
                    "name) or a --csv with image,label columns. Classification models: AUC, accuracy, "
                    "sensitivity at 90% specificity, Brier score and calibration error (ECE) of malignant vs "
                    "benign, each with a 95% interval from a bootstrap over patients, from a --csv with image, "
                    "label and optional mask, roi and patient_id columns (the table med3d finetune --task nodule "
                    "reads); it warns when cases come from patients the model was fine-tuned on.")
    p.add_argument("--model", required=True, help="Med3D model bundle (.pt)")
    p.add_argument("--csv", help="table of cases")
    p.add_argument("--images", help="folder of images (segmentation)")
    p.add_argument("--labels", help="folder of reference label maps with the images' file names")
    p.add_argument("--label-map", help="map reference label values onto the model's, e.g. 5:1 (others -> 0)")
    p.add_argument("--roi-from-mask", action="store_true",
                   help="classification: score what ROI users get: each case's mask only places the box classify "
                        "would show for it (its bounding box plus the model's context), given as an ROI; the mask's "
                        "measures are not used")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--progress", default="none", choices=PROGRESS_MODES,
                   help="progress on stderr (bar) or stdout (jsonl) while evaluating; default none")
    p.add_argument("--json", action="store_true", help="print compact JSON on one line (default: indented)")
    p.set_defaults(func=run)


def _segmentation_pairs(args: argparse.Namespace) -> List[Any]:
    from ..domains import domain_from_dict

    if args.csv and args.images:
        raise Med3DError("give either --csv or --images/--labels, not both")
    if args.images:
        if not args.labels:
            raise Med3DError("--images needs --labels (the folder of reference label maps)")
        entry = {"name": "evaluate", "images": os.path.realpath(args.images),  # realpath: never raises on a loop
                 "masks": os.path.realpath(args.labels), "labels": {1: "any"}}
    elif args.csv:
        entry = {"name": "evaluate", "csv": os.path.realpath(args.csv), "labels": {1: "any"}}
    else:
        raise Med3DError("give the labelled cases: --csv FILE, or --images DIR --labels DIR")
    cases = domain_from_dict(entry, Path.cwd()).cases
    same = [c for c in cases if os.path.realpath(c.image) == os.path.realpath(c.label)]
    if same:
        raise Med3DError(f"case {same[0].case_id}: the image and the reference label map are the same file "
                         f"({same[0].image}); give the reference label map in the label column")
    return cases


def _label_map(text: Any) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for item in (text or "").split(","):
        if item.strip():
            try:
                source, target = (int(v) for v in item.split(":"))
            except ValueError:
                raise Med3DError(f"--label-map must be SOURCE:TARGET pairs like 5:1,6:2, got {item!r}") from None
            out[source] = target
    return out


def evaluate_segmentation(args: argparse.Namespace, bundle: Any, reporter: Any) -> Dict[str, Any]:
    from ..infer import segment
    from ..metrics import dice_per_label
    from ..volume import as_label_map
    from ..volume_files import read_volume

    mapping = _label_map(args.label_map)
    cases = _segmentation_pairs(args)
    names = {int(l["value"]): str(l["name"]) for l in bundle.labels}
    rows = []
    for n, case in enumerate(cases):
        image = read_volume(case.image)
        reference = read_volume(case.label)
        if not reference.same_geometry(image, atol=1e-3):
            raise Med3DError(f"reference {case.label} does not lie on the grid of {case.image}; resample it onto "
                             "the image first")
        try:  # a reference of label -1 or 0.5 is not a label map: never silently scored (as Dice 1.0)
            truth = np.asarray(as_label_map(reference).array).astype(np.int64)
        except Med3DError as exc:
            raise Med3DError(f"reference {case.label}: {exc}") from None
        if mapping:
            mapped = np.zeros(truth.shape, np.int64)
            for source, target in mapping.items():
                mapped[truth == source] = target
            truth = mapped
        predicted = segment(image, bundle, device=args.device).labels.array
        scores = dice_per_label(predicted, truth, sorted(names))
        rows.append({"case": case.case_id, "dice": {names[v]: s for v, s in scores.items()}})
        reporter(make_event("evaluate", n + 1, len(cases)))
    mean = {name: float(np.mean([r["dice"][name] for r in rows])) for name in names.values()}
    return {"task": bundle.task, "cases": len(rows), "mean_dice": mean, "per_case": rows}


def evaluate_classification(args: argparse.Namespace, bundle: Any, reporter: Any) -> Dict[str, Any]:
    from ..infer import classify, probability_temperature
    from ..nodule_evaluation import (format_scores, overlap_warning, patient_id, score_with_intervals,
                                     training_overlap)
    from ..nodules import nodule_box, read_nodule_table
    from ..volume_files import read_volume

    if not args.csv or args.images:
        raise Med3DError("a classification model is evaluated on a --csv table (image, label, optional mask/roi)")
    cases = read_nodule_table(args.csv)
    names = {int(l["value"]): str(l["name"]) for l in bundle.labels}
    if sorted(names) != [0, 1]:
        raise Med3DError(f"{args.model} has labels {names}; evaluation expects benign (0) / malignant (1)")
    scores, truth, rows = [], [], []
    for n, case in enumerate(cases):
        image = read_volume(case.image)
        if case.mask and args.roi_from_mask:  # the box a mask shows, as an ROI: what an ROI user gets
            low, high = nodule_box(image, mask=read_volume(case.mask), params=bundle.extra.get("nodule_input"))
            result = classify(image, bundle, roi=((low + high) / 2.0, high - low), device=args.device)
        elif case.mask:
            result = classify(image, bundle, mask=read_volume(case.mask), device=args.device)
        elif case.roi:
            result = classify(image, bundle, roi=(case.roi[:3], case.roi[3:]), device=args.device)
        else:
            result = classify(image, bundle, device=args.device)
        p = result.probabilities[names[1]]
        scores.append(p)
        truth.append(case.label)
        rows.append({"image": case.image, "label": names[case.label], "probability": p, "basis": result.basis})
        reporter(make_event("evaluate", n + 1, len(cases)))
    scored = score_with_intervals(scores, truth, [c.patient for c in cases])
    out: Dict[str, Any] = {"task": bundle.task, "cases": len(rows), "patients": scored["patients"]}
    out.update({name: item["value"] for name, item in scored["metrics"].items()})
    out["ci95"] = {name: item["ci95"] for name, item in scored["metrics"].items()}
    out["bootstrap"] = scored.get("bootstrap") or {"note": scored["note"]}
    out["temperature"] = probability_temperature(bundle)
    out["training_overlap"] = training_overlap([patient_id(c) for c in cases], bundle.provenance, str(args.model))
    warning = overlap_warning(out["training_overlap"])
    out["warnings"] = [warning] if warning else []
    bases = {b: sum(r["basis"] == b for r in rows) for b in sorted({r["basis"] for r in rows})}
    out["probability_from"] = bases
    out["roi_from_mask"] = bool(args.roi_from_mask)
    out["summary"] = format_scores(scored) + ["probabilities from: " + ", ".join(f"{b} ({n} cases)"
                                                                              for b, n in bases.items())]
    out["per_case"] = rows
    return out


def run(args: argparse.Namespace) -> int:
    from ..infer import load_model

    if args.images and args.labels and os.path.realpath(args.images) == os.path.realpath(args.labels):
        raise Med3DError("--images and --labels are the same folder, so every image would be scored against "
                         "itself; give --labels the folder of reference label maps")
    bundle = load_model(args.model)
    kind = bundle.task.get("type")
    reporter = make_reporter(args.progress)
    if kind == "segmentation":
        if args.roi_from_mask:
            raise Med3DError(f"--roi-from-mask is for nodule classification models; {args.model} segments")
        result = evaluate_segmentation(args, bundle, reporter)
    elif kind == "classification":
        result = evaluate_classification(args, bundle, reporter)
    else:
        raise Med3DError(f"{args.model} is a '{kind}' model; evaluate takes segmentation or classification models")
    summary = result.pop("summary", [])
    print(dump_json(result, indent=None if args.json else 2))
    if not args.json:  # the scores in plain words beside the JSON on stdout
        for line in summary:
            print(f"med3d evaluate: {line}", file=sys.stderr)
    for warning in result.get("warnings", []):
        print(f"med3d evaluate: warning: {warning}", file=sys.stderr)
    return 0
