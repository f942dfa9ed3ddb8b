"""End-to-end lung segmentation of the real chest CT (512x512x48): read, preprocess, infer, write.

    python Testing/benchmarks/bench_lung_e2e.py [--model lung.pt] [--device cpu] [--threads 2] [--tile 96,160,160]

Without --model it uses /tmp/med3d_work/models/lung.pt when present, else a ResNet-10 + lung decoder bundle with
fixed random weights, the lung preset's head and grid (finetune.PRESETS; speed does not depend on training).
Reports seconds per
stage and the process's peak RSS (resource.getrusage high-water mark), against the targets of under 20 s and
under 4 GB on 2 CPU cores. Run it as its own process so the RSS figure is this pipeline's.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"
TRAINED = Path("/tmp/med3d_work/models/lung.pt")


def _random_lung_bundle(path: Path) -> Path:
    import torch

    from med3dcore.finetune import PRESETS
    from med3dcore.nets import build_model
    from med3dcore.preprocess import PreprocessSpec
    from med3dcore.weights import save_bundle

    torch.manual_seed(0)
    preset = PRESETS["lung"]
    arch = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
            "head": dict(preset["head"], num_classes=2)}
    spec = PreprocessSpec(spacing=preset["spacing"], window=preset["window"], modality="CT")
    return save_bundle(path, build_model(arch), architecture=arch, task={"type": "segmentation", "name": "lung"},
                       labels=[{"value": 1, "name": "lung", "color": [197, 165, 145]}], preprocessing=spec,
                       provenance={"data": "random weights (benchmark)"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", default=None, help="K,J,I or 'whole' (default: the engine's)")
    parser.add_argument("--overlap", type=float, default=None)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from med3dcore import infer
    from med3dcore.devices import describe_device, resolve_device
    from med3dcore.volume import read_volume, write_volume

    tmp = Path(tempfile.mkdtemp(prefix="bench_lung_"))
    model = Path(args.model) if args.model else (TRAINED if TRAINED.is_file() else _random_lung_bundle(tmp / "lung.pt"))
    options = {"overlap": args.overlap, "precision": args.precision}
    if args.tile:
        options["tile"] = None if args.tile == "whole" else tuple(int(v) for v in args.tile.split(","))
    stages = {}
    bundle = infer.load_model(model)  # loading the weights counts as part of the run
    start = time.perf_counter()
    t = time.perf_counter()
    image = read_volume(DATA / "ct" / "chest_ct.nrrd")
    stages["read"] = time.perf_counter() - t
    t = time.perf_counter()
    result = infer.segment(image, bundle, task="lung", device=args.device, **options)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    stages["preprocess+infer+restore"] = time.perf_counter() - t
    t = time.perf_counter()
    write_volume(result.labels, tmp / "lung_labels.nii.gz")
    stages["write"] = time.perf_counter() - t
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    voxel_ml = float(image.spacing[0] * image.spacing[1] * image.spacing[2]) / 1000
    lung_ml = float((result.labels.array > 0).sum()) * voxel_ml
    device = describe_device(resolve_device(args.device))
    print(f"model: {model} ({bundle.provenance.get('data', '?')}); device {device}")
    print(f"input {image.shape[::-1]} (I,J,K) at {tuple(round(s, 3) for s in image.spacing)} mm; "
          f"output same grid: {result.labels.same_geometry(image)}; lung volume {lung_ml:.0f} mL")
    print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    print(f"total {total:.1f} s (target < 20 s), peak RSS {peak_gb:.2f} GB (target < 4 GB)")
    if result.warnings:
        print("warnings: " + "; ".join(result.warnings))


if __name__ == "__main__":
    sys.exit(main())
