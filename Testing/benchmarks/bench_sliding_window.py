"""Sliding-window inference: med3dcore.sliding vs MONAI's sliding_window_inference, same network and input.

    python Testing/benchmarks/bench_sliding_window.py [--spacing 2,2,5] [--threads 2]

The network is ResNet-10 + the lung preset's decoder (finetune.PRESETS): fixed random weights (speed does not
depend on training), or a trained lung bundle with --model (then label agreement figures mean something). The
input is the real chest CT (../shared/data/ct/chest_ct.nrrd), preprocessed like a lung model would
(resampled to --spacing, CT window, z-score). Every configuration runs in a fresh Python process, so its peak RSS
(resource.getrusage high-water mark; tracemalloc cannot see torch's CPU tensors) is its own; "inference RSS" is
the peak minus the RSS after loading the network and the input.

Rows:
  1. same settings (tile, overlap 0.25, Gaussian blending, batch 1) in both tools: outputs must agree;
  2. MONAI's common use (roi 96^3, its default overlap 0.25 and constant blending, batch 1);
  3. our defaults (tile 96x160x160 shrunk to the volume, overlap 0.1, Gaussian), fp32, and bf16,
     with the Dice agreement of their label maps with row 2;
  4. a memory-lean setting (tile 96^3, overlap 0.1) for machines where RAM is the limit.
Wall seconds suffer when other work shares the CPU; CPU seconds (user + system) are steadier.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"


def _rss_mb() -> float:
    # ru_maxrss is in kB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_one(config: dict) -> dict:
    """Run one configuration in this (fresh) process; returns timings and memory, saves probabilities."""
    import torch

    torch.set_num_threads(config["threads"])
    from med3dcore.nets import build_model
    from med3dcore.preprocess import PreprocessSpec, preprocess_image
    from med3dcore.sliding import make_predictor, sliding_window
    from med3dcore.volume import read_volume

    if config["model"]:
        from med3dcore.weights import load_bundle, model_from_bundle

        bundle = load_bundle(config["model"])
        net = model_from_bundle(bundle)
        spec = PreprocessSpec.from_dict(bundle.preprocessing)
    else:
        from med3dcore.finetune import PRESETS

        torch.manual_seed(0)
        net = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                           "head": dict(PRESETS["lung"]["head"], num_classes=2)}).eval()
        spec = PreprocessSpec(spacing=config["spacing"], window=(-1000.0, 400.0), modality="CT")
    array, _ = preprocess_image(read_volume(DATA / "ct" / "chest_ct.nrrd"), spec)
    image = torch.from_numpy(array)[None]
    # MONAI runs the network as its users do (plain forward); med3d adds its slab-wise decoder (same values).
    predict = make_predictor(net, "cpu", config["precision"], slabs=config["tool"] == "med3d")
    with torch.inference_mode():  # warm-up on a small input (oneDNN primitive creation) outside the timing
        predict(torch.zeros(1, 1, 16, 32, 32))
    base = _current_rss_mb()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    if config["tool"] == "monai":
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            probs = sliding_window_inference(image[None], config["tile"], config["batch"], predict,
                                             overlap=config["overlap"], mode=config["blend"])[0]
    else:
        probs = sliding_window(predict, image, tile=config["tile"], overlap=config["overlap"],
                               batch_size=config["batch"], blend=config["blend"], multiple=8,
                               pad_value=float(array.min()))
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    np.save(config["out"], probs[1].float().numpy())
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": _rss_mb(), "inference_rss_mb": _rss_mb() - base,
            "shape": list(array.shape)}


def _spawn(config: dict) -> dict:
    code = ("import json,sys; sys.path.insert(0, %r); import bench_sliding_window as b; "
            "print('RESULT', json.dumps(b.run_one(json.loads(sys.argv[1]))))" % str(Path(__file__).parent))
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", default="2,2,3", help="preprocessing spacing I,J,K mm (default 2,2,3, as the "
                                                          "lung preset)")
    parser.add_argument("--model", default=None, help="a lung segmentation bundle (its network and preprocessing) "
                                                      "instead of random weights at --spacing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--same-tile", default="32,96,96", help="tile K,J,I of the same-settings row")
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()
    spacing = [float(v) for v in args.spacing.split(",")]
    same_tile = [int(v) for v in args.same_tile.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_sw_"))
    rows = [
        ("same settings: med3d", dict(tool="med3d", tile=same_tile, overlap=0.25, blend="gaussian", batch=1)),
        ("same settings: MONAI", dict(tool="monai", tile=same_tile, overlap=0.25, blend="gaussian", batch=1)),
        ("MONAI common (roi 96^3, overlap 0.25, constant)",
         dict(tool="monai", tile=[96, 96, 96], overlap=0.25, blend="constant", batch=1)),
        ("med3d defaults (tile 96x160x160, overlap 0.1), fp32",
         dict(tool="med3d", tile=[96, 160, 160], overlap=0.1, blend="gaussian", batch=1)),
    ]
    rows.append(("med3d lean (tile 96^3, overlap 0.1), fp32",
                 dict(tool="med3d", tile=[96, 96, 96], overlap=0.1, blend="gaussian", batch=1)))
    if not args.skip_bf16:
        rows.append(("med3d defaults, bf16",
                     dict(tool="med3d", tile=[96, 160, 160], overlap=0.1, blend="gaussian", batch=1,
                          precision="bf16")))
    results = {}
    what = args.model or f"random ResNet-10 + lung-preset decoder at {spacing} mm"
    print(f"chest_ct.nrrd, {what}, {args.threads} threads")
    for name, config in rows:
        config = dict(config, spacing=spacing, threads=args.threads, out=str(tmp / f"{len(results)}.npy"),
                      model=args.model)
        config.setdefault("precision", "fp32")
        result = _spawn(config)
        result["probs"] = np.load(config["out"])
        results[name] = result
        print(f"{name:55s} {result['seconds']:7.1f} s (CPU {result['cpu_seconds']:6.1f} s)  "
              f"peak RSS {result['peak_rss_mb']:6.0f} MB (inference {result['inference_rss_mb']:5.0f} MB)  grid {result['shape']}", flush=True)
    same_ours, same_monai = results["same settings: med3d"], results["same settings: MONAI"]
    diff = float(np.abs(same_ours["probs"] - same_monai["probs"]).max())
    print(f"same settings: max |p(ours) - p(MONAI)| = {diff:.2e}; "
          f"label Dice {_dice(same_ours['probs'], same_monai['probs']):.5f}; "
          f"speed ratio MONAI/ours {same_monai['seconds'] / same_ours['seconds']:.2f}x "
          f"(CPU time {same_monai['cpu_seconds'] / same_ours['cpu_seconds']:.2f}x)")
    common = results["MONAI common (roi 96^3, overlap 0.25, constant)"]
    for name in [n for n in results if n.startswith(("med3d defaults", "med3d lean"))]:
        r = results[name]
        print(f"{name}: {common['seconds'] / r['seconds']:.2f}x faster than MONAI common "
              f"(CPU time {common['cpu_seconds'] / r['cpu_seconds']:.2f}x), inference RSS "
              f"{r['inference_rss_mb']:.0f} vs {common['inference_rss_mb']:.0f} MB, label Dice vs MONAI common "
              f"{_dice(r['probs'], common['probs']):.4f}")
    if "med3d defaults, bf16" in results:
        fp32 = results["med3d defaults (tile 96x160x160, overlap 0.1), fp32"]
        bf16 = results["med3d defaults, bf16"]
        print(f"bf16 vs fp32 (our defaults): max |dp| {float(np.abs(fp32['probs'] - bf16['probs']).max()):.3f}, "
              f"label Dice {_dice(fp32['probs'], bf16['probs']):.4f}, speed {fp32['seconds'] / bf16['seconds']:.2f}x")


if __name__ == "__main__":
    main()
