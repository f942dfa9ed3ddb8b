"""``med3d finetune``: transfer an encoder to lung or liver segmentation, a custom label set, or nodule
classification, and write a self-describing model bundle."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..devices import AMP_MODES, DEVICE_CHOICES
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_reporter

TASKS = ("lung", "liver", "segmentation", "nodule")


def _numbers(text: Optional[str], count: int, what: str, kind: Any = float) -> Optional[Tuple[Any, ...]]:
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or min(values) <= 0:
        raise Med3DError(f"{what} must be {count} positive comma-separated numbers, got {text!r}")
    return values


def _pairs(text: Optional[str], what: str) -> Dict[int, str]:
    """"5:1,6:2" or "1:lung,2:nodule" -> {5: "1", ...}."""
    out: Dict[int, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        try:
            out[int(key)] = value.strip()
        except ValueError:
            sep = ""
        if not sep or not value.strip():
            raise Med3DError(f"{what} must look like VALUE:TARGET pairs separated by commas (e.g. 5:1,6:2), got "
                             f"{item!r}")
    return out


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a (pretrained) encoder for segmentation or nodule classification",
        description="Med3D transfer learning. Segmentation (--task lung | liver | segmentation) reads image/label "
                    "pairs from --images/--labels folders, a --csv (image,label[,patient_id]) or an MSD "
                    "--dataset dataset.json; nodule classification (--task nodule) reads a --csv with image, "
                    "label (benign/malignant, or a 1-5 malignancy rating: 1-3 benign, 4-5 malignant), optional "
                    "mask or roi (CX,CY,CZ,SX,SY,SZ in LPS mm) and optional patient_id. Initialise from a Med3D "
                    "bundle or a MedicalNet file (--init) or from scratch. The train/validation split never puts "
                    "one patient on both sides. Writes OUT/NAME.pt.")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="lung / liver (two stages: coarse ROI + DenseASPP; labels 1 liver, 2 tumour) presets, a "
                        "custom label set (segmentation), or benign/malignant nodule classification")
    data = p.add_argument_group("data")
    data.add_argument("--csv", help="table of cases (see above)")
    data.add_argument("--images", help="folder of images (segmentation; matched to --labels by file name)")
    data.add_argument("--labels", help="folder of label maps, same names as the images; or 'classical' (--task "
                                       "lung): the classical lung method labels every image, no masks needed")
    data.add_argument("--real-labels", help="with --labels classical: folder of real lung masks (same names as "
                                            "their images) used instead of the classical labels where present")
    data.add_argument("--dataset", help="MSD-style dataset.json (segmentation)")
    data.add_argument("--label-map", help="segmentation: source:target label values, e.g. 5:1 (liver of a "
                                          "TotalSegmentator map -> 1); other values become background")
    data.add_argument("--label-names", help="custom segmentation labels, e.g. 1:kidney,2:cyst (default: from "
                                            "dataset.json)")
    data.add_argument("--modality", default="CT", help="modality of the images (CT or MR; default CT)")
    model = p.add_argument_group("model")
    model.add_argument("--init", default="scratch",
                       help="'scratch', a Med3D bundle (its encoder), a MedicalNet .pth file, or a catalog name such "
                            "as medicalnet-resnet50 (see med3d models list; default scratch)")
    model.add_argument("--depth", type=int, default=None,
                       help="ResNet depth from scratch (default 10); with --init, the file's depth (checked)")
    model.add_argument("--shortcut", default=None, choices=("A", "B"),
                       help="shortcut type from scratch (default B); with --init, the file's (checked)")
    model.add_argument("--freeze", default="", help="encoder parts to freeze, e.g. conv1,bn1,layer1")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=None, help="optimisation steps (default 200 seg, 300 nodule)")
    train.add_argument("--batch-size", type=int, default=None, help="default 2 (segmentation), 8 (nodule)")
    train.add_argument("--lr", type=float, default=None,
                       help="encoder learning rate (default 0.001 pretrained, 0.01 scratch)")
    train.add_argument("--head-lr", type=float, default=None,
                       help="learning rate of the new layers (default 10x --lr when pretrained, else --lr)")
    train.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of patients held out (default 0.2; 0: no validation, train on every case)")
    train.add_argument("--val-every", type=int, default=50, help="validate every N steps (best checkpoint kept)")
    train.add_argument("--patch", help="segmentation training patch K,J,I voxels (default 32,64,64)")
    train.add_argument("--spacing", help="segmentation voxel spacing I,J,K mm (default: preset or median)")
    train.add_argument("--cube", type=int, default=32, help="nodule cube size in voxels (default 32)")
    train.add_argument("--cube-spacing", type=float, default=1.0, help="nodule cube spacing in mm (default 1)")
    train.add_argument("--mask-weight", type=float, default=0.0,
                       help="nodule: weight of an auxiliary mask loss, used when every case has a mask (default 0: "
                            "none; on the LIDC crops it was within noise, see Testing/benchmarks/RESULTS.md)")
    train.add_argument("--outline-steps", type=int,
                       help="nodule: steps of the nodule outline network that classify uses without a mask, trained "
                            "when every case has a mask (default: 3 x --steps; 0: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N")
    train.add_argument("--amp", default="auto", choices=AMP_MODES,
                       help="mixed precision of the training steps: auto (CUDA: bf16 or fp16; a CPU: bf16 where it "
                            "is native, AVX512_BF16 or AMX, and its gradients pass a check, else off), off, bf16 (any "
                            "device), fp16 (CUDA only)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder (the bundle NAME.pt and the run folder NAME/)")
    out.add_argument("--name", default=None, help="model name (default: the task)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME.pt")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run exactly")
    out.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                     help="bar (terminal), jsonl (one JSON event per line on stdout, for the Slicer module) or none")
    p.set_defaults(func=run)


def _segmentation_groups(csv_path: Optional[str]) -> Dict[str, str]:
    """case id -> patient id from a CSV's optional patient_id column."""
    from ..domains import case_key, read_csv_rows  # the same case naming the domain uses

    if not csv_path:
        return {}
    rows = read_csv_rows(csv_path)
    return {case_key(Path(r["image"].strip())): r["patient_id"].strip() for r in rows
            if (r.get("patient_id") or "").strip()}


def _domain(args: argparse.Namespace) -> Any:
    from ..domains import domain_from_dict
    from ..segmentation_finetune import PRESETS

    sources = [s for s in ("csv", "images", "dataset") if getattr(args, s)]
    if len(sources) != 1:
        raise Med3DError("give exactly one data source: --csv FILE, --images DIR --labels DIR, or --dataset JSON")
    entry: Dict[str, Any] = {"name": args.name or args.task, "modality": args.modality}
    if args.csv:
        entry["csv"] = os.path.abspath(args.csv)
    elif args.images:
        if not args.labels:
            raise Med3DError("--images needs --labels (the folder of label maps)")
        entry["images"], entry["masks"] = os.path.abspath(args.images), os.path.abspath(args.labels)
    else:
        entry["dataset_json"] = os.path.abspath(args.dataset)
    if args.task in PRESETS:
        entry["labels"] = {item["value"]: item["name"] for item in PRESETS[args.task]["labels"]}
    elif args.label_names:
        entry["labels"] = _pairs(args.label_names, "--label-names")
    if args.label_map:
        mapping = _pairs(args.label_map, "--label-map")
        try:
            entry["label_map"] = {k: int(v) for k, v in mapping.items()}
        except ValueError:
            raise Med3DError(f"--label-map targets must be integers, got {args.label_map!r}") from None
    return domain_from_dict(entry, Path.cwd())


def run(args: argparse.Namespace) -> int:
    from ..classification_finetune import ClassificationSettings, finetune_classification
    from ..finetune import check_run_name
    from ..nodules import NoduleInputSpec, read_nodule_table
    from ..segmentation_finetune import PRESETS, SegmentationSettings, finetune_segmentation

    reporter = make_reporter(args.progress)
    name = check_run_name(args.name or args.task)  # before anything is read, written or removed
    backbone = {"depth": args.depth, "shortcut_type": args.shortcut, "preact": None}  # None: not asked
    freeze = tuple(p.strip() for p in args.freeze.split(",") if p.strip())
    if not 0.0 <= args.val_fraction < 1.0:
        raise Med3DError(f"--val-fraction must be at least 0 and below 1 (e.g. 0.2; 0 = no validation), got "
                         f"{args.val_fraction}")
    if not (math.isfinite(args.mask_weight) and args.mask_weight >= 0):
        raise Med3DError(f"--mask-weight must be a number of at least 0 (0 = no mask loss), got {args.mask_weight}")
    if args.outline_steps is not None and not 0 <= args.outline_steps <= 1_000_000:
        raise Med3DError(f"--outline-steps must be a whole number from 0 (no outline) to 1000000, got "
                         f"{args.outline_steps}")
    if args.outline_steps is not None and args.task != "nodule":
        raise Med3DError("--outline-steps is for --task nodule (the outline classify uses without a mask)")
    if args.mask_weight and args.task != "nodule":
        raise Med3DError("--mask-weight is for --task nodule (an auxiliary loss of the classifier); segmentation "
                         "already learns the masks")
    if args.task == "nodule":
        if not args.csv or args.images or args.dataset:
            raise Med3DError("--task nodule reads a --csv table (image, label, optional mask/roi/patient_id)")
        if args.val_fraction == 0:
            raise Med3DError("--val-fraction 0 (no validation) is for segmentation; nodule classification keeps the "
                             "model that validates best, so give a fraction such as 0.2")
        settings = ClassificationSettings(
            steps=args.steps or 300, batch_size=args.batch_size or 8, lr=args.lr, head_lr=args.head_lr,
            freeze=freeze, val_fraction=args.val_fraction, validate_every=args.val_every, seed=args.seed,
            device=args.device, amp=args.amp, mask_weight=args.mask_weight, outline_steps=args.outline_steps)
        spec = NoduleInputSpec.from_dict({"cube": args.cube, "spacing_mm": args.cube_spacing})
        finetune_classification(read_nodule_table(args.csv), Path(args.out), name, init=args.init,
                                backbone=backbone, spec=spec, settings=settings, reporter=reporter,
                                resume=args.resume, overwrite=args.overwrite)
        return 0
    settings = SegmentationSettings(
        steps=args.steps or 200, batch_size=args.batch_size or 2, lr=args.lr, head_lr=args.head_lr, freeze=freeze,
        val_fraction=args.val_fraction, validate_every=args.val_every, patch=_numbers(args.patch, 3, "--patch", int),
        spacing=_numbers(args.spacing, 3, "--spacing"), seed=args.seed, device=args.device, amp=args.amp)
    if args.real_labels and args.labels != "classical":
        raise Med3DError("--real-labels goes with --labels classical; with a folder of masks give it as --labels")
    domain, sources = _pseudo_domain(args, name, reporter) if args.labels == "classical" else (_domain(args), None)
    finetune_segmentation(domain, Path(args.out), name,
                          preset=args.task if args.task in PRESETS else None, init=args.init,
                          backbone=backbone, settings=settings, groups=_segmentation_groups(args.csv),
                          reporter=reporter, resume=args.resume, overwrite=args.overwrite,
                          label_sources=sources)
    return 0


def _pseudo_domain(args: argparse.Namespace, name: str, reporter: Any) -> Tuple[Any, Dict[str, str]]:
    """--labels classical: the lung domain of --images with classical labels (real ones from --real-labels)."""
    from ..pseudo_labels import classical_lung_domain

    if args.task != "lung":
        raise Med3DError(f"--labels classical makes lung labels; use it with --task lung, not --task {args.task}")
    if not args.images or args.csv or args.dataset:
        raise Med3DError("--labels classical labels the scans of an --images folder; give --images DIR")
    label_map = None
    if args.label_map:
        try:
            label_map = {k: int(v) for k, v in _pairs(args.label_map, "--label-map").items()}
        except ValueError:
            raise Med3DError(f"--label-map targets must be integers, got {args.label_map!r}") from None
    return classical_lung_domain(Path(args.images), Path(args.out) / name, name, real_labels=args.real_labels,
                                 label_map=label_map, reporter=reporter)
