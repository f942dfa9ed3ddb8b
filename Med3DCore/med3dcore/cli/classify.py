"""``med3d classify``: benign/malignant probabilities of a nodule marked by an ROI or a mask."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..devices import DEVICE_CHOICES
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_event, make_reporter
from . import dump_json


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "classify", help="classify a lung nodule (benign / malignant) in a CT",
        description="Print the class probabilities of the nodule in INPUT (a CT file or DICOM folder) with a Med3D "
                    "classification model. Mark the nodule with --roi (centre and size in millimetres, LPS world "
                    "coordinates as ITK and DICOM use them; Slicer shows RAS, so negate its x and y) or with "
                    "--mask (a label map on the image's grid, non-zero = nodule). With neither, INPUT is taken "
                    "to be a crop around the nodule.")
    p.add_argument("input", help="CT: a NIfTI, NRRD or MetaImage file, or a DICOM series folder")
    p.add_argument("--model", required=True, help="Med3D classification model (.pt)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--roi", metavar="CX,CY,CZ,SX,SY,SZ",
                       help="nodule box: centre x,y,z then size x,y,z, in mm, LPS coordinates; write --roi=-12.5,... "
                            "when the first number is negative")
    where.add_argument("--mask", help="nodule mask on the image's grid (non-zero voxels = nodule)")
    p.add_argument("--outline", metavar="FILE",
                   help="also write the nodule's learnt outline (.nii.gz, .nrrd, .mha; a label map on INPUT's grid, "
                        "1 = nodule) when the model estimates it: a model fine-tuned with masks, classifying "
                        "without --mask")
    p.add_argument("--overwrite", action="store_true", help="replace the --outline file if it exists")
    p.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--progress", default="none", choices=PROGRESS_MODES,
                   help="none (default), bar (terminal) or jsonl: one JSON object per line on stdout, progress "
                        "events then a result event with every field of the result (as the Slicer module reads it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..infer import classify
    from ..nodules import parse_roi
    from ..safe_io import Outputs, check_writable
    from ..volume_files import read_volume, stage_volume, volume_outputs

    reporter = make_reporter(args.progress)
    roi = None
    if args.roi is not None:
        values = parse_roi(args.roi)
        roi = (values[:3], values[3:])
    outputs = Outputs(args.overwrite)
    if args.outline:  # checked before the work: a name the writer can write, nothing replaced unasked
        if args.mask:
            raise Med3DError("--outline is the outline the model estimates without a mask; with --mask, the mask is "
                             "the outline: leave one out")
        target, companions = volume_outputs(args.outline)
        if os.path.realpath(target) == os.path.realpath(args.input):
            raise Med3DError("--outline names the input scan; write the outline to another file")
        outputs.check(target, companions, "outline")
        check_writable(target.parent, "the outline")
    reporter(make_event("classify", 0, 2, message="reading the scan"))
    volume = read_volume(args.input, series_uid=args.series_uid)
    mask = read_volume(args.mask) if args.mask else None
    reporter(make_event("classify", 1, 2, message="classifying"))
    result = classify(volume, args.model, roi=roi, mask=mask, device=args.device)
    written = None  # JSON "outline": null also when the model has no outline network (the Slicer module asks anyway)
    if args.outline and result.outline is not None:
        with outputs:
            written = str(stage_volume(outputs, result.outline, args.outline))
    reporter(make_event("classify", 2, 2))
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fields["outline"] = written  # the file, not the voxels
    if args.progress == "jsonl":  # every field of the result, so new ones reach the reader unchanged
        reporter(make_event("classify", kind="result", **fields))
        return 0
    if args.json:  # the same fields as the jsonl result event
        print(dump_json(fields))
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}")
    for name, p in result.probabilities.items():
        print(f"{name}: {p:.3f}")
    if result.diameter_mm is not None:
        source = "from the mask" if result.size_from == "mask" else "estimated from the learnt outline"
        print(f"nodule: {result.diameter_mm:.1f} mm equivalent-sphere diameter, {result.volume_ml:.3f} mL ({source})")
    if result.basis != "image":  # the network's own answer too: what the box shown gives back as --roi
        alone = ", ".join(f"{name} {p:.3f}" for name, p in result.image_probabilities.items())
        print(f"probability from: {result.basis} (image alone: {alone})")
    else:
        print("probability from: image" + (" (this model has no measured-size part)" if args.mask else ""))
    centre, size = result.roi_center_lps, result.roi_size_mm
    print("box shown (LPS mm; give it back as --roi): --roi=" + ",".join(f"{v:.1f}" for v in (*centre, *size)))
    if written:
        print(f"learnt outline written to {written} (an estimate; check it before trusting the size)")
    elif args.outline:
        print(f"no outline written to {args.outline}: this model has no learnt nodule outline (it was fine-tuned "
              "without masks)")
    print(f"predicted: {result.predicted}")
    return 0
