"""Sliding-window inference: med3dcore vs MONAI's sliding_window_inference, at equal output and at equal quality,
with a trained real-CT lung model, in one run.

    python Testing/benchmarks/bench_sliding_window.py --model /work/models/lung_real.pt [--repeats 3]
        [--threads 2] [--scans ct/chest_ct.nrrd,ct/chest_ct_lidc1011.nii.gz,ct/chest_ct_4dphase.nii.gz]
        [--parts output,quality,memory]

The model is the Med3D lung model trained on the real chest CTs with the classical method's labels (the training
command is in Testing/benchmarks/bench_lungs.py's docstring; it writes /work/models/lung_real.pt). Without it the
script stops: random weights predict nothing, and agreement between empty label maps measures nothing.

Everything is imported and loaded before any timing (MONAI too). Each scan is preprocessed once by the model's own
spec; then the variants of a comparison run alternately, ``--repeats`` times each, in rotating order, in this one
process; tables give the median and min-max wall seconds and the ratio of medians. Outputs are compared on the
network's grid: max |p(ours) - p(MONAI)| over all classes and the label Dice (argmax; mean over the labels, which
must be non-empty). MONAI runs the network as its users do: the plain PyTorch module, fp32, eval mode, softmax.

1. **Equal output** (chest_ct.nrrd): same tile, overlap and Gaussian blending in both (tiles that need no padding,
   so both see the same input); med3dcore in fp32 and in the CPU's native low precision (bf16 where the CPU has
   AVX512_BF16 or AMX). Goals: >= 2x in fp32 with probabilities within 1e-3, >= 4x in native precision.
2. **Equal quality** (every scan): MONAI at ROI 96^3, overlap 0.5, Gaussian is the reference output; med3dcore's
   defaults (tile "auto", overlap 0.1, precision "auto", passes "auto": two grid alignments averaged in native
   low precision, one in fp32), and the same with one pass. Goal: >= 6x with label Dice >= 0.99 to the reference.
   Label Dice on the network's grid (the network's own agreement) and between the label maps ``med3d segment``
   delivers from either output (restored to the scan's grid and cleaned up the same way: what the user gets).
3. **Precision** (every scan): label Dice between fp32 and bf16 with our defaults at one pass each;
   ``--precision auto`` may pick bf16 only where it is >= 0.995.
4. **Memory** (part "memory"): each configuration once more in a fresh process that builds only its own
   network; "inference MB" is the peak RSS during the inference (Linux VmHWM, reset after loading) minus the RSS
   after loading the network and the input (torch's CPU tensors are invisible to tracemalloc).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import (current_rss_mb, fmt, machine_line, paired,  # noqa: E402
                          peak_since_reset_mb, require_model, reset_peak_rss, summary)

ROOT = HERE.parents[1]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"
SCANS = "ct/chest_ct.nrrd,ct/chest_ct_lidc1011.nii.gz,ct/chest_ct_4dphase.nii.gz"
EQUAL_OUTPUT = [((32, 96, 96), 0.25), ((32, 96, 96), 0.5)]
REFERENCE = ((96, 96, 96), 0.5)


def label_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels (> 0) present in either map; refuses maps without any label."""
    labels = sorted(set(np.unique(a)) | set(np.unique(b)) - {0})
    if not labels:
        raise SystemExit("both label maps are empty: the model predicts nothing on this scan, so agreement "
                         "cannot be measured; check the model (see the docstring)")
    scores = []
    for v in labels:
        x, y = a == v, b == v
        scores.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


class Setup:
    """One scan preprocessed by the model's spec, and the networks: plain (MONAI's), med3d fp32, med3d bf16."""

    def __init__(self, torch: Any, model: str, scan: str, native: bool,
                 kinds: Tuple[str, ...] = ("plain", "fp32", "bf16")) -> None:
        from med3dcore.preprocess import PreprocessSpec, preprocess_image
        from med3dcore.sliding import make_predictor
        from med3dcore.volume_files import read_volume
        from med3dcore.bundles import load_bundle, model_from_bundle

        bundle = load_bundle(model)
        volume = read_volume(DATA / scan)
        array, self.prepared = preprocess_image(volume, PreprocessSpec.from_dict(bundle.preprocessing))
        self.torch, self.array, self.volume, self.bundle = torch, array, volume, bundle
        self.image = torch.from_numpy(array)[None]
        plain = model_from_bundle(bundle).eval()
        self.plain = lambda x: torch.softmax(plain(x), dim=1)  # noqa: E731
        self.fp32 = make_predictor(copy.deepcopy(plain), "cpu", "fp32") if "fp32" in kinds else None
        self.bf16 = make_predictor(copy.deepcopy(plain), "cpu", "bf16") if native and "bf16" in kinds else None
        with torch.inference_mode():  # oneDNN primitives are created on first use: outside the timing
            small = torch.zeros(1, 1, 16, 32, 32)
            for predict in (self.plain, self.fp32, self.bf16):
                if predict is not None:
                    predict(small)

    def monai(self, tile, overlap, mode: str = "gaussian"):
        from monai.inferers import sliding_window_inference

        with self.torch.inference_mode():
            return sliding_window_inference(self.image[None], list(tile), 1, self.plain, overlap=overlap,
                                            mode=mode)[0]

    def delivered(self, probs) -> np.ndarray:
        """The label map ``med3d segment`` writes from these probabilities: on the scan's grid, cleaned up."""
        from med3dcore.clean_up import clean_up
        from med3dcore.preprocess import restore_class_map

        values = np.asarray([0] + [int(info["value"]) for info in self.bundle.labels], dtype=np.uint8)
        return clean_up(self.volume, values[restore_class_map(probs.float().numpy(), self.prepared)], self.bundle)

    def ours(self, predict, tile, overlap, passes: int = 1):
        from med3dcore.sliding import sliding_window

        return sliding_window(predict, self.image, tile=tile, overlap=overlap, blend="gaussian", multiple=8,
                              pad_value=float(self.array.min()), passes=passes)


def _compare(name: str, outputs: Dict[str, Any], times: Dict[str, List[float]], reference: str) -> List[str]:
    ref_p = outputs[reference].float().numpy()
    ref_labels = ref_p.argmax(0)
    base = summary(times[reference])[0]
    rows = []
    for variant, seconds in times.items():
        p = outputs[variant].float().numpy()
        dp = float(np.abs(p - ref_p).max())
        rows.append(f"| {name} | {variant} | {fmt(seconds)} | {base / summary(seconds)[0]:.2f}x | "
                    f"{dp:.1e} | {label_dice(p.argmax(0), ref_labels):.4f} |")
    return rows


def _child(config: Dict[str, Any]) -> Dict[str, float]:
    """Memory of one configuration, alone in this fresh process."""
    import torch

    torch.set_num_threads(config["threads"])
    setup = Setup(torch, config["model"], config["scan"], config["predict"] == "bf16", (config["predict"],))
    base = current_rss_mb()
    # This process's own peak so far (VmHWM; getrusage's ru_maxrss would include the parent's RSS at fork on Linux)
    loading_peak = peak_since_reset_mb()
    if not reset_peak_rss():  # the peak of loading and preparing would hide the inference's own
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run with --parts output,quality")
    tile = config["tile"] if config["tile"] in (None, "auto") else tuple(config["tile"])
    if config["tool"] == "monai":
        setup.monai(tile, config["overlap"])
    else:
        setup.ours(getattr(setup, config["predict"]), tile, config["overlap"])
    return {"inference_mb": peak_since_reset_mb() - base, "peak_mb": max(loading_peak, peak_since_reset_mb())}


def _memory(config: Dict[str, Any]) -> Dict[str, float]:
    code = ("import json,sys; sys.path.insert(0, %r); import bench_sliding_window as b; "
            "print('RESULT', json.dumps(b._child(json.loads(sys.argv[1]))))" % str(HERE))
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads([l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/models/lung_real.pt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scans", default=SCANS)
    parser.add_argument("--parts", default="output,quality,memory",
                        help="which tables: output (equal output), quality (equal quality and precision), memory")
    args = parser.parse_args()
    model = require_model(args.model)

    import torch

    torch.set_num_threads(args.threads)
    import monai  # noqa: F401  (imported here: never inside a timed region)
    from monai.inferers import sliding_window_inference  # noqa: F401
    from med3dcore.devices import cpu_bf16_support

    native = cpu_bf16_support() is not None
    print(machine_line(torch))
    print(f"model {model}; MONAI {monai.__version__}; {args.repeats} paired repeats per comparison")
    scans = args.scans.split(",")
    parts = set(args.parts.split(","))
    first = Setup(torch, model, scans[0], native) if parts & {"output", "quality"} else None


    if "output" in parts:
        _equal_output(first, scans[0], native, args.repeats)
    if "quality" in parts:
        _equal_quality(torch, first, model, scans, native, args.repeats)
    if "memory" in parts:
        _memory_table(model, scans[0], native, args.threads)
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _equal_output(first: Setup, scan: str, native: bool, repeats: int) -> None:
    print(f"\n## Equal output: {scan}, network grid {tuple(first.array.shape)} (K, J, I), Gaussian blending")
    print("| tile, overlap | variant | wall s median (min-max) | speed vs MONAI | max abs dp vs MONAI | label Dice vs MONAI |")
    print("|---|---|---|---|---|---|")
    for tile, overlap in EQUAL_OUTPUT:
        variants = {"MONAI (plain fp32)": lambda: first.monai(tile, overlap),
                    "med3d fp32": lambda: first.ours(first.fp32, tile, overlap)}
        if first.bf16 is not None:
            variants["med3d bf16 (native)"] = lambda: first.ours(first.bf16, tile, overlap)
        outputs = {name: run() for name, run in variants.items()}
        times = paired(variants, repeats)
        for row in _compare(f"{'x'.join(map(str, tile))}, {overlap}", outputs, times, "MONAI (plain fp32)"):
            print(row, flush=True)
    if not native:
        print("(this CPU has no native bf16: the low-precision row is left out)")


def _equal_quality(torch: Any, first: Setup, model: str, scans: List[str], native: bool, repeats: int) -> None:
    """Tables 2 and 3: equal quality and precision, every scan."""
    from med3dcore.sliding import resolve_passes

    passes = resolve_passes("auto", "bf16" if native else "fp32")
    print(f"\n## Equal quality: reference MONAI ROI 96^3, overlap 0.5, Gaussian; med3d defaults (tile auto, overlap "
          f"0.1, precision auto, passes auto = {passes} here)")
    print("| scan | grid | MONAI reference s | med3d defaults s | speed-up | label Dice vs reference | delivered label "
          "maps vs reference | one pass: s, label Dice, delivered | fp32 vs bf16 label Dice, delivered (one pass "
          "each) | med3d fp32 defaults s | MONAI common (96^3, 0.25, constant) vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for scan in scans:
        setup = first if scan == scans[0] else Setup(torch, model, scan, native)
        auto = setup.bf16 if native else setup.fp32
        variants = {"reference": lambda: setup.monai(*REFERENCE),
                    "defaults": lambda: setup.ours(auto, "auto", 0.1, passes),
                    "one pass": lambda: setup.ours(auto, "auto", 0.1, 1),
                    "fp32": lambda: setup.ours(setup.fp32, "auto", 0.1, resolve_passes("auto", "fp32"))}
        probs = {name: run() for name, run in variants.items()}
        outputs = {name: p.float().numpy().argmax(0) for name, p in probs.items()}
        shipped = {name: setup.delivered(p) for name, p in probs.items()}  # what the user gets, scan grid
        del probs
        common = setup.monai((96, 96, 96), 0.25, "constant").float().numpy().argmax(0)  # how the model itself
        times = paired(variants, repeats)                                                # varies with tiling
        ref = summary(times["reference"])[0]

        def agreement(name: str, to: str = "reference") -> str:
            return f"{label_dice(outputs[name], outputs[to]):.4f}, {label_dice(shipped[name], shipped[to]):.4f}"

        # Without native bf16 the defaults are fp32 (auto): there is no second precision to compare.
        precision = agreement("one pass", "fp32") if native else "-"
        print(f"| {scan} | {'x'.join(map(str, setup.array.shape))} | {fmt(times['reference'])} | "
              f"{fmt(times['defaults'])} | {ref / summary(times['defaults'])[0]:.2f}x | "
              f"{label_dice(outputs['defaults'], outputs['reference']):.4f} | "
              f"**{label_dice(shipped['defaults'], shipped['reference']):.4f}** | "
              f"{fmt(times['one pass'])} ({ref / summary(times['one pass'])[0]:.1f}x), {agreement('one pass')} | "
              f"{precision} | {fmt(times['fp32'])} | {label_dice(common, outputs['reference']):.4f} |", flush=True)
        if setup is not first:
            del setup


def _memory_table(model: str, scan: str, native: bool, threads: int) -> None:
    """Table 4: each configuration alone in a fresh process."""
    print("\n## Memory (each configuration once, in its own process; inference MB = peak RSS - RSS after loading)")
    print("| configuration | inference MB | process peak MB |")
    print("|---|---|---|")
    configs = [(f"MONAI {'x'.join(map(str, t))}, {o}", dict(tool="monai", tile=list(t), overlap=o, predict="plain"))
               for t, o in EQUAL_OUTPUT + [REFERENCE]]
    configs += [(f"med3d fp32 {'x'.join(map(str, t))}, {o}", dict(tool="med3d", tile=list(t), overlap=o,
                                                                   predict="fp32")) for t, o in EQUAL_OUTPUT]
    if native:
        configs += [(f"med3d bf16 {'x'.join(map(str, t))}, {o}", dict(tool="med3d", tile=list(t), overlap=o,
                                                                       predict="bf16")) for t, o in EQUAL_OUTPUT]
    configs += [("med3d defaults fp32 (auto, 0.1)", dict(tool="med3d", tile="auto", overlap=0.1, predict="fp32"))]
    if native:
        configs += [("med3d defaults bf16 (auto, 0.1)", dict(tool="med3d", tile="auto", overlap=0.1,
                                                             predict="bf16"))]
    for name, config in configs:
        result = _memory(dict(config, model=model, scan=scan, threads=threads))
        print(f"| {name} | {result['inference_mb']:.0f} | {result['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
