"""``med3d classify``: benign/malignant probabilities of a nodule marked by an ROI or a mask."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..devices import DEVICE_CHOICES


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
    p.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..infer import classify
    from ..nodules import parse_roi
    from ..volume import read_volume

    roi = None
    if args.roi is not None:
        values = parse_roi(args.roi)
        roi = (values[:3], values[3:])
    volume = read_volume(args.input, series_uid=args.series_uid)
    mask = read_volume(args.mask) if args.mask else None
    result = classify(volume, args.model, roi=roi, mask=mask, device=args.device)
    if args.json:
        print(json.dumps({"probabilities": result.probabilities, "predicted": result.predicted,
                          "roi_center_lps": list(result.roi_center_lps), "roi_size_mm": list(result.roi_size_mm),
                          "warnings": result.warnings}))
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}")
    for name, p in result.probabilities.items():
        print(f"{name}: {p:.3f}")
    print(f"predicted: {result.predicted}")
    return 0
