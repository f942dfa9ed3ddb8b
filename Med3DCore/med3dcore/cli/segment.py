"""``med3d segment``: segment a scan (file or DICOM folder) with a model bundle; writes the label map in the
input's exact geometry and optionally an overlay PNG."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Tuple, Union


from ..devices import DEVICE_CHOICES, PRECISIONS
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_event, make_reporter


def _tile(text: str) -> Union[str, Tuple[int, int, int], None]:
    """'K,J,I' -> a tile size; 'whole' -> None (the whole volume in one pass); 'auto' -> the default choice."""
    if text.strip().lower() == "whole":
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 8:
        raise Med3DError(f"--tile must be K,J,I voxel counts of at least 8 (e.g. 96,160,160), 'auto' or 'whole', "
                         f"got {text!r}")
    return values  # type: ignore[return-value]


def _passes(text: str) -> Union[str, int]:
    """'auto' or a whole number of tilings at shifted grid alignments (sliding.resolve_passes)."""
    from ..sliding import MAX_PASSES

    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().isdigit() and 1 <= int(text) <= MAX_PASSES:
        return int(text)
    raise Med3DError(f"--passes must be 'auto' or a whole number from 1 to {MAX_PASSES}, got {text!r}")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "segment", help="segment a CT (lung, two-stage liver, or any segmentation model)",
        description="Segment INPUT (a NIfTI/NRRD/MHA file or a DICOM series folder) with a Med3D segmentation "
                    "model and write the label map to OUTPUT, on exactly the input's voxel grid (size, spacing, "
                    "origin, direction). Without --model, the model for --task in the models folder "
                    "($MED3D_MODELS or ~/.med3d/models) is used; for --task lung without one, the classical "
                    "lung method (no weights; right and left lung).")
    p.add_argument("input", help="scan: a NIfTI, NRRD or MetaImage file, or a folder with a DICOM series")
    p.add_argument("output", help="label map to write (.nii.gz, .nrrd, .mha)")
    p.add_argument("--task", help="lung, liver or another segmentation task name; checked against the model")
    p.add_argument("--model", help="Med3D model bundle (.pt); default: the --task model in the models folder")
    p.add_argument("--method", default="auto", choices=("auto", "model", "classical"),
                   help="model (a Med3D model), classical (lungs without weights) or auto (default: --model, else "
                        "the --task model in the models folder, else classical for lungs)")
    p.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    p.add_argument("--overlay", help="also write a PNG with axial, coronal and sagittal views of the result")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--tile", default=None,
                   help="sliding-window tile K,J,I in voxels after preprocessing, 'whole' or 'auto' (default: "
                        "the whole volume when it fits about 2.5 million voxels, else the fewest tiles within that)")
    p.add_argument("--overlap", type=float, default=None, help="fraction tiles overlap (default 0.1)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call (default 1)")
    p.add_argument("--passes", default="auto",
                   help="how many times to run the network with its grid shifted (by up to its 8-voxel stride) "
                        "and average: 1-8 or auto (default: 2 with bf16 or amp, where the network is fast, else 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default: float16 mixed precision on CUDA, bf16 on CPUs with native bfloat16 "
                        "(AVX512_BF16 or AMX), fp32 elsewhere), fp32, bf16, or amp (CUDA only)")
    p.add_argument("--no-clean-up", action="store_true",
                   help="keep the network's labels as they are (default: the largest components where anatomy "
                        "demands it; for lungs on a CT also nothing outside the body, boundary on the scan's air)")
    p.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                   help="bar (terminal), jsonl (one JSON object per line on stdout) or none")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT / the overlay if they exist")
    p.set_defaults(func=run)


def _check_output(outputs: Any, path: Path, what: str, companions: Tuple[str, ...] = ()) -> None:
    """Before the long work: the target can be written (no link, folder or existing file without --overwrite)."""
    from ..safe_io import check_writable

    outputs.check(path, companions, what)
    check_writable(path.parent, f"the {what}")


def run(args: argparse.Namespace) -> int:
    from ..classical_lung import LUNG_WINDOW
    from ..infer import load_model, segment
    from ..model_choice import choose_method
    from ..preprocess import PreprocessSpec
    from ..safe_io import Outputs
    from ..volume_files import FILE_FORMATS, read_volume, stage_volume, volume_outputs

    reporter = make_reporter(args.progress)
    options = {"overlap": args.overlap, "batch_size": args.batch_size, "precision": args.precision,
               "passes": _passes(args.passes), "keep_largest": not args.no_clean_up}
    if args.tile is not None:
        options["tile"] = _tile(args.tile)
    output = Path(args.output)
    if os.path.realpath(output) == os.path.realpath(args.input):  # realpath: a link loop is reported below
        raise Med3DError("OUTPUT is the input scan; write the label map to another file")
    outputs = Outputs(args.overwrite)  # label map and overlay: staged, verified, published together
    _check_output(outputs, output, "output")
    if not output.name.lower().endswith(tuple(FILE_FORMATS)):
        raise Med3DError(f"cannot write the label map as '{output.name}': end the name in {', '.join(FILE_FORMATS)}")
    _check_output(outputs, output, "output", volume_outputs(output)[1])
    if args.overlay:
        if not args.overlay.lower().endswith(".png"):
            raise Med3DError(f"--overlay must name a .png file, got {args.overlay}")
        _check_output(outputs, Path(args.overlay), "overlay")
    method, model = choose_method(args.model, args.task, args.method)
    bundle = load_model(model) if method == "model" else None
    if method == "classical" and args.method == "auto":  # the user did not ask for it: say what runs instead
        from ..catalog import models_dir

        line = (f"no '{args.task}' model in {models_dir()}: using the classical lung method (no weights); "
                "--method chooses")
        if args.progress == "none":
            print(f"med3d segment: {line}", file=sys.stderr)
        reporter(make_event("segment", kind="message", message=line))
    image = read_volume(args.input, series_uid=args.series_uid)
    result = segment(image, bundle, task=args.task, device=args.device, reporter=reporter, method=method, **options)
    with outputs:
        written = stage_volume(outputs, result.labels, output)
        if args.overlay:
            from ..overlay import stage_overlay  # scikit-image and PIL: imported only when a picture is asked for

            window = PreprocessSpec.from_dict(bundle.preprocessing).window if bundle else LUNG_WINDOW
            stage_overlay(outputs, image, result.labels, args.overlay, result.label_info, window)
    import numpy as np

    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    volumes = {info["name"]: round(float(np.count_nonzero(result.labels.array == info["value"])) * voxel_ml, 2)
               for info in result.label_info}
    if args.progress == "jsonl":
        reporter(make_event("segment", kind="result", output=str(written), overlay=args.overlay,
                            volumes_ml=volumes, warnings=result.warnings, method=result.method,
                            labels=result.label_info))
    else:
        if args.progress == "none":  # the bar reporter already showed them as message events
            for warning in result.warnings:
                print(f"med3d segment: warning: {warning}", file=sys.stderr)
        print(f"wrote {written}" + (f" and {args.overlay}" if args.overlay else ""))
        for name, ml in volumes.items():
            print(f"  {name}: {ml:.1f} mL")
    return 0

