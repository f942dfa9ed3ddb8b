"""Each inference lever of the engine, measured on its own: paired ratio and output agreement, kept or dropped.

    python Testing/benchmarks/bench_inference_levers.py --model /work/models/lung_real.pt [--repeats 5]
        [--threads 2] [--compile] [--throughput-only]

The model is the trained real-CT lung model (see Testing/benchmarks/bench_lungs.py's docstring for the command
that makes /work/models/lung_real.pt; the script refuses to run without it). Input: chest_ct.nrrd preprocessed by
the model's spec. Every comparison runs its two variants alternately (``--repeats`` each, rotating order) in this
one process, after a warm-up; the table gives medians with min-max, the ratio of medians (new / old: below 1 is
faster) and the agreement of the outputs (max |dp| of the probabilities, label Dice or equality).

Levers:
- network form at the whole-volume tile and at a 32x96x96 tile (fp32): contiguous -> channels-last;
  BatchNorm folded; fused ReLU / residual additions with every convolution on oneDNN; bf16 on top (where native);
- tiles per call (batch 4 vs 1) and the slab-wise lung decoder (time; memory is bench_sliding_window.py's);
- torch.compile (``--compile``; inductor + freezing): compile seconds and steady-state ratio;
- post-processing: restore_probabilities + argmax vs restore_class_map (time, labels equal);
- tile choice: the old fixed default 96x160x160 vs tile "auto" on chest_ct_4dphase (a grid just wider than 160);
- network throughput: GFLOP/s of the forward (convolution FLOPs) against this machine's measured conv3d peak
  (a 64->64 3x3x3 convolution on 32x64x64, oneDNN, channels-last) in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import fmt, machine_line, paired, require_model, summary  # noqa: E402

ROOT = HERE.parents[1]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"


def conv_flops(torch: Any, net: Any, shape) -> float:
    """Floating-point operations (2 per multiply-add) of every convolution of ``net`` for one input ``shape``."""
    from torch import nn

    total = [0.0]

    def hook(module, inputs, output):
        k = float(np.prod(module.kernel_size))
        if isinstance(module, nn.ConvTranspose3d):
            voxels = float(np.prod(inputs[0].shape[2:])) * inputs[0].shape[0]
            total[0] += 2 * voxels * module.in_channels * module.out_channels / module.groups * k
        else:
            voxels = float(np.prod(output.shape[2:])) * output.shape[0]
            total[0] += 2 * voxels * module.out_channels * module.in_channels / module.groups * k

    probe = copy.deepcopy(net)
    handles = [m.register_forward_hook(hook) for m in probe.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.inference_mode():
        probe(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total[0]


def conv_peak(torch: Any, dtype: Any, repeats: int) -> float:
    """GFLOP/s of one large 3x3x3 convolution through oneDNN (channels-last): this machine's practical peak."""
    x = torch.randn(1, 64, 32, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(64, 64, 3, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    b = torch.zeros(64, dtype=dtype)
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1], 1, "none", [], "")
    with torch.inference_mode():
        run = lambda: torch.ops.mkldnn._convolution_pointwise(x, w, b, *args)  # noqa: E731
        run()
        seconds = paired({"conv": run}, repeats)["conv"]
    return 2 * 32 * 64 * 64 * 64 * 64 * 27 / summary(seconds)[0] / 1e9


def row(name: str, old: List[float], new: List[float], agreement: str, kept: str) -> str:
    return (f"| {name} | {fmt(old)} | {fmt(new)} | {summary(new)[0] / summary(old)[0]:.2f}x | {agreement} | "
            f"{kept} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/models/lung_real.pt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes to compile)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the network's GFLOP/s against this machine's conv3d peak")
    args = parser.parse_args()
    model = require_model(args.model)

    import torch

    torch.set_num_threads(args.threads)
    from med3dcore.devices import cpu_bf16_support
    from med3dcore.nets.fused import fold_batchnorm
    from med3dcore.preprocess import PreprocessSpec, preprocess_image, restore_class_map, restore_probabilities
    from med3dcore.sliding import effective_tile, make_predictor, sliding_window
    from med3dcore.volume_files import read_volume
    from med3dcore.bundles import load_bundle, model_from_bundle

    native = cpu_bf16_support() is not None
    print(machine_line(torch))
    bundle = load_bundle(model)
    spec = PreprocessSpec.from_dict(bundle.preprocessing)
    array, prepared = preprocess_image(read_volume(DATA / "ct" / "chest_ct.nrrd"), spec)
    image = torch.from_numpy(array)[None]
    plain = model_from_bundle(bundle).eval()
    whole = effective_tile(array.shape, "auto", 8)
    print(f"model {model}; chest_ct.nrrd on the network grid {array.shape}, whole-volume tile {whole}; "
          f"{args.repeats} paired repeats")

    def predictor(kind: str) -> Callable:
        net = copy.deepcopy(plain)
        if kind == "contiguous":
            return lambda x: torch.softmax(net(x), dim=1)
        if kind == "channels-last":
            return make_predictor(net, "cpu", "fp32", fuse=False)
        if kind == "folded":
            fold_batchnorm(net)
            return make_predictor(net, "cpu", "fp32", fuse=False)
        if kind == "fused":
            return make_predictor(net, "cpu", "fp32")
        if kind == "bf16 unfused":
            return make_predictor(net, "cpu", "bf16", fuse=False)
        if kind == "bf16 fused":
            return make_predictor(net, "cpu", "bf16")
        raise ValueError(kind)

    kinds = ["contiguous", "channels-last", "folded", "fused"] + (["bf16 unfused", "bf16 fused"] if native else [])
    if args.throughput_only:  # only the fused networks are timed
        kinds = ["fused"] + (["bf16 fused"] if native else [])
    predictors = {k: predictor(k) for k in kinds}
    with torch.inference_mode():
        for p in predictors.values():
            p(torch.zeros(1, 1, 16, 32, 32))

    def run(kind: str, tile, overlap: float = 0.25, batch: int = 1):
        return sliding_window(predictors[kind], image, tile=tile, overlap=overlap, batch_size=batch, multiple=8,
                              pad_value=float(array.min()))

    if args.throughput_only:
        _throughput(torch, plain, predictors, whole, native, args.repeats)
        return
    print("\n| lever | before s | after s | after / before | agreement | verdict |")
    print("|---|---|---|---|---|---|")
    reference = {}
    steps = [("contiguous", "channels-last", "channels-last 3D (fp32)"),
             ("channels-last", "folded", "BatchNorm folded at load (fp32)"),
             ("folded", "fused", "fused ReLU/residual + every conv on oneDNN (fp32)")]
    if native:
        steps += [("fused", "bf16 fused", "bf16 (native), fused network"),
                  ("bf16 unfused", "bf16 fused", "fusion within bf16")]
    for tile_name, tile in (("whole volume", "auto"), ("tile 32x96x96, overlap 0.25", (32, 96, 96))):
        reference[tile_name] = run("contiguous", tile).numpy()
        for old, new, name in steps:
            out_old, out_new = run(old, tile).numpy(), run(new, tile).numpy()
            times = paired({old: lambda: run(old, tile), new: lambda: run(new, tile)}, args.repeats)
            dp = float(np.abs(out_new - out_old).max())
            same = float((out_new.argmax(0) == out_old.argmax(0)).mean())
            print(row(f"{name}; {tile_name}", times[old], times[new], f"max dp {dp:.1e}, labels equal on "
                      f"{same:.5%}", "kept" if summary(times[new])[0] < summary(times[old])[0] else "no gain"),
                  flush=True)

    # Tiles per call and the slab-wise decoder (fp32 fused, 32x96x96).
    tile = (32, 96, 96)
    times = paired({"1": lambda: run("fused", tile), "4": lambda: run("fused", tile, batch=4)}, args.repeats)
    print(row("4 tiles per network call instead of 1 (fp32 fused, 32x96x96)", times["1"], times["4"], "same tiles",
              "default stays 1 (memory)"), flush=True)
    slabless = make_predictor(copy.deepcopy(plain), "cpu", "fp32", slabs=False)
    with torch.inference_mode():
        slabless(torch.zeros(1, 1, 16, 32, 32))
    times = paired({"slabs": lambda: run("fused", "auto"),
                    "plain": lambda: sliding_window(slabless, image, tile="auto", multiple=8,
                                                    pad_value=float(array.min()))}, args.repeats)
    print(row("lung decoder in one piece instead of slabs (fp32 fused, whole volume)", times["slabs"],
              times["plain"], "identical values", "slabs kept (memory)"), flush=True)

    if args.compile:
        _compile_row(torch, plain, image, array, args.repeats, run, native)

    # Post-processing.
    probs = run("bf16 fused" if native else "fused", "auto").numpy()
    old_labels = np.argmax(restore_probabilities(probs, prepared), axis=0)
    new_labels = restore_class_map(probs, prepared)
    if not new_labels.any():
        raise SystemExit("the model labels nothing on chest_ct.nrrd: cannot compare post-processing")
    times = paired({"old": lambda: np.argmax(restore_probabilities(probs, prepared), axis=0),
                    "new": lambda: restore_class_map(probs, prepared)}, args.repeats)
    differ = int(np.count_nonzero(old_labels != new_labels))
    print(row(f"restore: class map without per-class full-size maps ({probs.shape[0]} classes, to "
              f"{'x'.join(map(str, old_labels.shape))})", times["old"], times["new"],
              f"{differ} of {old_labels.size} labels differ", "kept" if differ == 0 else "CHECK"), flush=True)

    # Tile choice on a grid just wider than the old default tile.
    array2, _ = preprocess_image(read_volume(DATA / "ct" / "chest_ct_4dphase.nii.gz"), spec)
    image2 = torch.from_numpy(array2)[None]
    fast = "bf16 fused" if native else "fused"
    run2 = lambda tile: sliding_window(predictors[fast], image2, tile=tile, overlap=0.1, multiple=8,  # noqa: E731
                                       pad_value=float(array2.min()))
    old_out, new_out = run2((96, 160, 160)).numpy().argmax(0), run2("auto").numpy().argmax(0)
    times = paired({"fixed": lambda: run2((96, 160, 160)), "auto": lambda: run2("auto")}, args.repeats)
    auto_tile = effective_tile(array2.shape, "auto", 8)
    print(row(f"tile auto {auto_tile} (one pass) vs fixed 96x160x160 (4 tiles), chest_ct_4dphase "
              f"{'x'.join(map(str, array2.shape))}, {fast}", times["fixed"], times["auto"],
              f"labels equal on {float((old_out == new_out).mean()):.4%}", "kept"), flush=True)

    _throughput(torch, plain, predictors, whole, native, args.repeats)


def _throughput(torch: Any, plain: Any, predictors: Dict[str, Callable], whole, native: bool,
                repeats: int) -> None:
    """Network GFLOP/s on the whole-volume tile against this machine's conv3d peak, per precision."""
    print("\n| precision | network GFLOP (whole-volume tile) | forward s | achieved GFLOP/s | conv3d peak GFLOP/s | share |")
    print("|---|---|---|---|---|---|")
    shape = (1, 1) + tuple(whole)
    flops = conv_flops(torch, plain, shape)
    x = torch.randn(shape)
    for kind, dtype in [("fused", torch.float32)] + ([("bf16 fused", torch.bfloat16)] if native else []):
        with torch.inference_mode():
            seconds = paired({kind: lambda: predictors[kind](x)}, repeats)[kind]
        peak = conv_peak(torch, dtype, repeats)
        achieved = flops / summary(seconds)[0] / 1e9
        print(f"| {kind} | {flops / 1e9:.1f} | {fmt(seconds)} | {achieved:.0f} | {peak:.0f} | {achieved / peak:.0%} |",
              flush=True)
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _compile_row(torch: Any, plain: Any, image: Any, array: np.ndarray, repeats: int, run: Callable,
                 native: bool) -> None:
    """torch.compile (inductor, freezing) of the fused network: compile time, then steady state."""
    from med3dcore.sliding import make_predictor, sliding_window

    kind = "bf16 fused" if native else "fused"
    try:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        net = copy.deepcopy(plain)
        inner = make_predictor(net, "cpu", "bf16" if native else "fp32", slabs=False)
        compiled = torch.compile(net)
        dtype = torch.bfloat16 if native else torch.float32

        def predict(x):
            x = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
            return torch.softmax(compiled(x).float(), dim=1)

        start = time.perf_counter()
        with torch.inference_mode():
            sliding_window(predict, image, tile="auto", multiple=8, pad_value=float(array.min()))
        compile_s = time.perf_counter() - start
        del inner
    except Exception as exc:  # noqa: BLE001 - no compiler on this machine etc.: record why
        print(f"| torch.compile ({kind}) | - | - | - | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} "
              f"| dropped |")
        return
    out_old = run(kind, "auto").numpy()
    out_new = sliding_window(predict, image, tile="auto", multiple=8, pad_value=float(array.min())).numpy()
    times = paired({"eager": lambda: run(kind, "auto"),
                    "compiled": lambda: sliding_window(predict, image, tile="auto", multiple=8,
                                                       pad_value=float(array.min()))}, repeats)
    gain = summary(times["eager"])[0] - summary(times["compiled"])[0]
    pays = f"pays after {compile_s / gain:.0f} scans" if gain > 0 else "never pays"
    print(row(f"torch.compile + freezing ({kind}), whole volume; first call {compile_s:.1f} s", times["eager"],
              times["compiled"], f"max dp {float(np.abs(out_new - out_old).max()):.1e}",
              f"dropped ({pays}; a process segments one scan, and compiling needs a C++ compiler)"), flush=True)


if __name__ == "__main__":
    main()
