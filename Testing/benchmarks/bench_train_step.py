"""Training steps per second: the optimiser's form (per-parameter loop, foreach, fused Adam), the memory layout
(contiguous vs channels-last 3D) and the precision (fp32, bf16 autocast as ``amp: bf16`` trains), for a
segmentation step and a classification step, paired.

    python Testing/benchmarks/bench_train_step.py [--rounds 5] [--steps 4] [--threads 2]

Segmentation step: ResNet-10 B + the lung preset's decoder (128/64/32), batch 2 of 32x64x64 patches,
``training_setup.ce_dice_loss``. Classification step: ResNet-10 B + classifier head, batch 8 of 32^3 cubes (the
nodule input), cross-entropy. Inputs are random (speed does not depend on the values). Each step is what ``train.train``
does: zero_grad, forward, loss, backward, optimiser step. Variants are run in alternation, ``--steps`` steps per
round after one warm-up step, and every round's variants in a rotated order; the table gives the median and the
min-max of the per-round seconds per step, and the ratio of medians to the per-parameter loop (the default Adam
on CPU before this change). The CPU's flags and the load average are printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_line  # noqa: E402


def _setups(torch):
    from med3dcore.segmentation_finetune import PRESETS
    from med3dcore.nets import build_model
    from med3dcore.training_setup import ce_dice_loss

    gen = torch.Generator().manual_seed(0)

    def segmentation():
        model = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                             "head": dict(PRESETS["lung"]["head"], num_classes=2)})
        x = torch.randn(2, 1, 32, 64, 64, generator=gen)
        y = (torch.rand(2, 32, 64, 64, generator=gen) > 0.6).long()
        return model, lambda m: ce_dice_loss(m(x), y)

    def classification():
        model = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                             "head": {"type": "classifier", "num_classes": 2}})
        x = torch.randn(8, 1, 32, 32, 32, generator=gen)
        y = torch.randint(0, 2, (8,), generator=gen)
        return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)

    return {"segmentation": segmentation, "classification": classification}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="segmentation,classification")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from med3dcore.bf16_guard import thin_map_guard
    from med3dcore.training_setup import make_adam, training_layout

    variants = [("loop", False, False), ("foreach", False, False), ("fused", False, False), ("fused", True, False),
                ("loop", True, False), ("fused", False, True), ("fused", True, True)]  # (Adam, channels-last, bf16)
    print(machine_line(torch))
    for task in args.tasks.split(","):
        build = _setups(torch)[task]
        runs = {}
        for kind, channels_last, bf16 in variants:
            model, loss_of = build()
            model.train()
            if channels_last:
                model.to(memory_format=torch.channels_last_3d)
            optimizer = make_adam([{"params": list(model.parameters())}], 1e-3, 0.0, kind=kind)
            runs[(kind, channels_last, bf16)] = (model, loss_of, optimizer, [])

        def step(model, loss_of, optimizer, bf16):
            optimizer.zero_grad(set_to_none=True)
            # what train.train does for amp bf16: autocast, and thin maps in float32 where this CPU needs it
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                    thin_map_guard(torch.device("cpu"), torch.bfloat16 if bf16 else None):
                loss = loss_of(model)
            loss.backward()
            optimizer.step()

        for key, (model, loss_of, optimizer, _) in runs.items():
            step(model, loss_of, optimizer, key[2])  # warm-up: oneDNN primitives, optimiser state
        keys = list(runs)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                model, loss_of, optimizer, times = runs[key]
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(model, loss_of, optimizer, key[2])
                times.append((time.perf_counter() - start) / args.steps)
        base = statistics.median(runs[("loop", False, False)][3])
        print(f"\n{task} step (median, min-max of {args.rounds} rounds x {args.steps} steps; load {os.getloadavg()[0]:.1f})")
        print("| optimiser | layout | precision | s/step | min-max | steps/s | vs loop, contiguous, fp32 |")
        print("|---|---|---|---|---|---|---|")
        for (kind, channels_last, bf16), (_, _, optimizer, times) in runs.items():
            med = statistics.median(times)
            print(f"| {kind} | {'channels-last' if channels_last else 'contiguous'} | "
                  f"{'bf16 autocast' if bf16 else 'fp32'} | {med:.3f} | "
                  f"{min(times):.3f}-{max(times):.3f} | {1 / med:.2f} | {med / base:.2f}x |")
        # The optimiser's step alone (the same parameters and gradients for every form): steadier than whole steps.
        model = build()[0]
        params = [p for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizers = {k: make_adam([{"params": params}], 1e-3, 0.0, kind=k) for k in ("loop", "foreach", "fused")}
        alone = {k: [] for k in optimizers}
        for r in range(args.rounds):
            for k in list(optimizers)[r % 3:] + list(optimizers)[:r % 3]:
                start = time.perf_counter()
                for _ in range(5):
                    optimizers[k].step()
                alone[k].append((time.perf_counter() - start) / 5)
        loop = statistics.median(alone["loop"])
        print(f"Adam step alone ({sum(p.numel() for p in params) / 1e6:.1f} M parameters): " + ", ".join(
            f"{k} {statistics.median(v) * 1000:.1f} ms ({min(v) * 1000:.1f}-{max(v) * 1000:.1f}, "
            f"{statistics.median(v) / loop:.2f}x)" for k, v in alone.items()))
        print(f"what train.train uses on this CPU: optimiser '{type(make_adam([{'params': [torch.zeros(1)]}], 1e-3, 0.0)).__name__}"
              f"' ({_kind(make_adam([{'params': [torch.zeros(1, requires_grad=True)]}], 1e-3, 0.0))}), layout "
              f"{'channels-last' if training_layout(build()[0], torch.device('cpu')) else 'contiguous'}")


def _kind(optimizer) -> str:
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "loop"


if __name__ == "__main__":
    main()
