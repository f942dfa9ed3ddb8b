"""End-to-end lung segmentation of the real chest CT (chest_ct.nrrd, 512x512x48) with the trained real-CT lung
model: the whole `med3d segment` process, and where its time goes.

    python Testing/benchmarks/bench_lung_e2e.py --model /work/models/lung_real.pt [--repeats 5] [--threads 2]
        [--precision auto] [--device cpu]

The model is the one Testing/benchmarks/bench_lungs.py's docstring trains (/work/models/lung_real.pt); without it
the script stops (random weights label nothing, and an empty label map is faster to post-process than a real one).

1. Whole process: ``med3d segment chest_ct.nrrd OUT --task lung --model MODEL --progress none`` run ``--repeats``
   times, each under its own small wrapper process so its peak RSS (getrusage of the child) is its own; wall
   seconds include interpreter start, imports, reading, preprocessing, the network, restoring, clean-up and
   writing. Targets (issue 14): < 4 s wall and < 1 GB on 2 cores.
2. Stages, in this process after the imports (median of the repeats): load the bundle, read, preprocess,
   network, restore to the input grid, clean-up, write; plus the import times measured once at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import fmt, machine_line, require_model  # noqa: E402

ROOT = HERE.parents[1]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"
WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(json.dumps({'rc': rc, 'wall': time.perf_counter() - t, "
           "'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def whole_process(model: str, out: Path, threads: int, precision: str, device: str) -> dict:
    script = Path(sys.executable).with_name("med3d")  # the console script users run, else the module
    med3d = [str(script)] if script.is_file() else [sys.executable, "-m", "med3dcore.cli"]
    command = med3d + ["segment", str(DATA / "ct" / "chest_ct.nrrd"), str(out), "--task", "lung", "--model", model,
                       "--progress", "none", "--overwrite", "--precision", precision, "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", WRAPPER] + command, capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"med3d segment failed (exit {result['rc']}): {done.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/models/lung_real.pt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = require_model(args.model)
    imports = {}
    t = time.perf_counter()
    import torch
    imports["torch"] = time.perf_counter() - t
    t = time.perf_counter()
    import numpy as np
    import SimpleITK  # noqa: F401
    imports["SimpleITK"] = time.perf_counter() - t
    t = time.perf_counter()
    from med3dcore import infer
    from med3dcore.devices import describe_precision, resolve_device, resolve_precision
    from med3dcore.preprocess import PreprocessSpec, preprocess_image, restore_class_map
    from med3dcore.sliding import make_predictor, resolve_passes, sliding_window
    from med3dcore.volume_files import read_volume, write_volume
    from med3dcore.bundles import model_from_bundle
    from med3dcore.clean_up import clean_up
    imports["med3dcore"] = time.perf_counter() - t
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    print(machine_line(torch))
    print(f"model {model}; precision {describe_precision(precision, device)}, passes "
          f"{resolve_passes('auto', precision)}; imports: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))
    tmp = Path(tempfile.mkdtemp(prefix="bench_lung_e2e_"))

    # 1. Whole process.
    runs = [whole_process(model, tmp / "lungs.nii.gz", args.threads, args.precision, args.device)
            for _ in range(args.repeats)]
    walls = [r["wall"] for r in runs]
    peak = max(r["peak_mb"] for r in runs)
    print(f"\n## Whole process: med3d segment chest_ct.nrrd --task lung ({args.repeats} runs)")
    print(f"wall {fmt(walls)} (target < 4 s); peak RSS {peak:.0f} MB (max over runs; target < 1024 MB)")

    # 2. Stages in this process.
    stages = {k: [] for k in ("load bundle + build", "read", "preprocess", "network", "restore", "clean-up",
                              "write")}
    lung_ml = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        bundle = infer.load_model(model)
        net = model_from_bundle(bundle)
        stages["load bundle + build"].append(time.perf_counter() - t)
        t = time.perf_counter()
        volume = read_volume(DATA / "ct" / "chest_ct.nrrd")
        stages["read"].append(time.perf_counter() - t)
        t = time.perf_counter()
        array, prepared = preprocess_image(volume, PreprocessSpec.from_dict(bundle.preprocessing))
        stages["preprocess"].append(time.perf_counter() - t)
        t = time.perf_counter()
        predict = make_predictor(net, device, precision)
        probs = sliding_window(predict, torch.from_numpy(array)[None], tile=infer.DEFAULT_TILE,
                               overlap=infer.DEFAULT_OVERLAP, multiple=infer.OUTPUT_STRIDE,
                               pad_value=float(array.min()), device=device,
                               passes=resolve_passes("auto", precision))
        stages["network"].append(time.perf_counter() - t)
        t = time.perf_counter()
        classes = restore_class_map(probs.numpy(), prepared)
        labels = infer._label_map(classes, probs.shape[0], [int(i["value"]) for i in bundle.labels])
        stages["restore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        kept = clean_up(volume, labels, bundle)
        stages["clean-up"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_volume(volume.with_array(kept), tmp / "stages.nii.gz", overwrite=True)
        stages["write"].append(time.perf_counter() - t)
        lung_ml = float(np.count_nonzero(kept)) * float(np.prod(volume.spacing)) / 1000.0
    if not lung_ml:
        raise SystemExit("the model labels no lung on chest_ct.nrrd; check the model")
    total = sum(statistics.median(v) for v in stages.values())
    print(f"\n## Stages in one process after the imports (median, min-max of {args.repeats}); lung volume "
          f"{lung_ml:.0f} mL")
    for name, seconds in stages.items():
        print(f"- {name}: {fmt(seconds)} ({statistics.median(seconds) / total:.0%})")
    print(f"- sum of medians: {total:.2f} s; imports in this process: {sum(imports.values()):.2f} s")
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
