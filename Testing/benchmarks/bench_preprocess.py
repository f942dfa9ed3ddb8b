"""Read + preprocess speed of med3dcore against MONAI transforms, in one process, on real CTs.

Both sides read the same .nii.gz, reorient, resample linearly to the target spacing, clip to a CT window and the
0.5/99.5 percentiles and z-score. med3dcore also restores a label map to the input grid and writes it, the part
of a segmentation run around the network.

    python Testing/benchmarks/bench_preprocess.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from med3dcore.preprocess import PreprocessSpec, preprocess_image, restore_labels  # noqa: E402
from med3dcore.volume_files import read_volume, write_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"
CASES = [("chest_ct 512x512x48", "ct/chest_ct.nrrd", (1.0, 1.0, 2.0)),
         ("abdomen_ct 122x101x112", "ct/abdomen_ct.nii.gz", (1.5, 1.5, 1.5))]
WINDOW = (-1000.0, 400.0)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(path: Path, spacing) -> np.ndarray:
    array, _ = preprocess_image(read_volume(path), PreprocessSpec(spacing=spacing, window=WINDOW))
    return array


def ours_back(path: Path, spacing, out: Path) -> None:
    volume = read_volume(path)
    array, prepared = preprocess_image(volume, PreprocessSpec(spacing=spacing, window=WINDOW))
    labels = (array > 0).astype(np.uint8)  # stands in for the network's argmax
    write_volume(restore_labels(labels, prepared), out, overwrite=True)


def monai_pipeline(spacing):
    from monai import transforms as T
    return T.Compose([
        T.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True),
        T.Orientation(axcodes="RAS"),
        T.Spacing(pixdim=spacing, mode="bilinear", dtype=np.float32),
        T.ScaleIntensityRange(a_min=WINDOW[0], a_max=WINDOW[1], b_min=WINDOW[0], b_max=WINDOW[1], clip=True),
        # Clip to the percentiles (rescaling to 0..1 on the way does not change the z-score that follows).
        T.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        T.NormalizeIntensity(),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (DATA / "README.md").is_file():
        print(f"real data folder {DATA} is missing; set MED3D_SHARED")
        return 1
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")  # MONAI's deprecation chatter
    try:
        import monai  # noqa: F401
        have_monai = True
    except ImportError:
        have_monai = False
    print(f"torch threads {torch.get_num_threads()}, repeats {args.repeats} (median), MONAI: {have_monai}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel, spacing in CASES:
            source = DATA / rel
            nii = Path(tmp) / "input.nii.gz"  # both sides read the same NIfTI
            write_volume(read_volume(source), nii, overwrite=True)
            ours_s = timed(lambda: ours(nii, spacing), args.repeats)
            back_s = timed(lambda: ours_back(nii, spacing, Path(tmp) / "labels.nii.gz"), args.repeats)
            shape = ours(nii, spacing).shape
            line = (f"{name} -> {spacing} mm, grid {shape}: med3dcore read+preprocess {ours_s:.2f} s; "
                    f"+ restore labels + write {back_s:.2f} s")
            if have_monai:
                pipeline = monai_pipeline(spacing)
                monai_s = timed(lambda: pipeline(str(nii)), args.repeats)
                monai_shape = tuple(pipeline(str(nii)).shape[1:])
                line += (f"; MONAI read+preprocess {monai_s:.2f} s (grid {monai_shape}); "
                         f"MONAI/ours {monai_s / ours_s:.2f}x")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
