"""``med3d segment``: segment a scan (file or DICOM folder) with a model bundle; writes the label map in the
input's exact geometry and optionally an overlay PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from ..devices import DEVICE_CHOICES
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_event, make_reporter
from ..sliding import PRECISIONS


def _tile(text: str) -> Optional[Tuple[int, int, int]]:
    """'K,J,I' -> a tile size; 'whole' -> None (the whole volume in one pass)."""
    if text.strip().lower() == "whole":
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 8:
        raise Med3DError(f"--tile must be K,J,I voxel counts of at least 8 (e.g. 96,160,160) or 'whole', got {text!r}")
    return values  # type: ignore[return-value]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "segment", help="segment a CT (lung, two-stage liver, or any segmentation model)",
        description="Segment INPUT (a NIfTI/NRRD/MHA file or a DICOM series folder) with a Med3D segmentation "
                    "model and write the label map to OUTPUT, on exactly the input's voxel grid (size, spacing, "
                    "origin, direction). Without --model, the model for --task in the models folder "
                    "($MED3D_MODELS or ~/.med3d/models) is used.")
    p.add_argument("input", help="scan: a NIfTI, NRRD or MetaImage file, or a folder with a DICOM series")
    p.add_argument("output", help="label map to write (.nii.gz, .nrrd, .mha)")
    p.add_argument("--task", help="lung, liver or another segmentation task name; checked against the model")
    p.add_argument("--model", help="Med3D model bundle (.pt); default: the --task model in the models folder")
    p.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    p.add_argument("--overlay", help="also write a PNG with axial, coronal and sagittal views of the result")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--tile", default=None,
                   help="sliding-window tile K,J,I in voxels after preprocessing, or 'whole' (default 96,160,160)")
    p.add_argument("--overlap", type=float, default=None, help="fraction tiles overlap (default 0.1)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call (default 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (mixed precision on CUDA, fp32 elsewhere), fp32, bf16 or amp")
    p.add_argument("--no-clean-up", action="store_true",
                   help="keep every connected component (default: keep the largest where anatomy demands it)")
    p.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                   help="bar (terminal), jsonl (one JSON object per line on stdout) or none")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT / the overlay if they exist")
    p.set_defaults(func=run)


def find_model(task: Optional[str]) -> Path:
    """The one segmentation model for ``task`` in the models folder, or a Med3DError saying how to get one."""
    from ..weights import list_models, models_dir

    if not task:
        raise Med3DError("give --model FILE, or --task (lung, liver, ...) to use a model from the models folder")
    folder = models_dir()
    found = [m for m in list_models(folder)
             if m.error is None and m.task.get("type") == "segmentation" and m.task.get("name") == task]
    if not found:
        raise Med3DError(f"no --model given and no '{task}' segmentation model in {folder} (set MED3D_MODELS to use "
                         f"another folder); make one with `med3d finetune --task {task} ...`, or try the synthetic "
                         f"`med3d demo`, then pass --model FILE or copy the .pt file there")
    if len(found) > 1:
        names = ", ".join(m.path.name for m in found)
        raise Med3DError(f"several '{task}' models in {folder} ({names}); choose one with --model")
    return found[0].path


def _check_output(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite:
        raise Med3DError(f"{what} {path} already exists; choose another name or pass --overwrite")
    if not path.parent.is_dir():
        raise Med3DError(f"folder {path.parent} for the {what} does not exist; create it first")


def run(args: argparse.Namespace) -> int:
    from ..infer import load_model, segment
    from ..overlay import write_overlay
    from ..preprocess import PreprocessSpec
    from ..volume import FILE_FORMATS, read_volume, write_volume

    reporter = make_reporter(args.progress)
    output = Path(args.output)
    if output.resolve() == Path(args.input).resolve():
        raise Med3DError("OUTPUT is the input scan; write the label map to another file")
    _check_output(output, args.overwrite, "output")
    if not output.name.lower().endswith(tuple(FILE_FORMATS)):
        raise Med3DError(f"cannot write the label map as '{output.name}': end the name in {', '.join(FILE_FORMATS)}")
    if args.overlay:
        if not args.overlay.lower().endswith(".png"):
            raise Med3DError(f"--overlay must name a .png file, got {args.overlay}")
        _check_output(Path(args.overlay), args.overwrite, "overlay")
    bundle = load_model(args.model or find_model(args.task))
    image = read_volume(args.input, series_uid=args.series_uid)
    options = {"overlap": args.overlap, "batch_size": args.batch_size, "precision": args.precision,
               "keep_largest": not args.no_clean_up}
    if args.tile is not None:
        options["tile"] = _tile(args.tile)
    result = segment(image, bundle, task=args.task, device=args.device, reporter=reporter, **options)
    written = write_volume(result.labels, output, overwrite=args.overwrite)
    if args.overlay:
        window = PreprocessSpec.from_dict(bundle.preprocessing).window
        write_overlay(image, result.labels, args.overlay, result.label_info, window, overwrite=args.overwrite)
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    volumes = {info["name"]: round(float(np.count_nonzero(result.labels.array == info["value"])) * voxel_ml, 2)
               for info in result.label_info}
    if args.progress == "jsonl":
        reporter(make_event("segment", kind="result", output=str(written), overlay=args.overlay,
                            volumes_ml=volumes, warnings=result.warnings))
    else:
        if args.progress == "none":  # the bar reporter already showed them as message events
            for warning in result.warnings:
                print(f"med3d segment: warning: {warning}", file=sys.stderr)
        print(f"wrote {written}" + (f" and {args.overlay}" if args.overlay else ""))
        for name, ml in volumes.items():
            print(f"  {name}: {ml:.1f} mL")
    return 0

