"""Pretraining speed with and without the preprocessing cache on the real five-domain config.

Prints (1) the one-off cost of validating the pairs and building the cache, (2) batches per second of the sampler
alone and (3) training steps per second (ResNet-10, the config's patch and batch size) with the memory-mapped
cache versus preprocessing (read + resample + normalise) the volume of every patch afresh, and the ratios.

    python Testing/benchmarks/bench_pretrain_cache.py [--steps 4] [--rounds 3] [--batches 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "Testing" / "configs" / "five_domain.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--steps", type=int, default=4, help="training steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--batches", type=int, default=20, help="sampler batches timed per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from med3dcore.domains import load_run_config
    from med3dcore.training_data import PatchSampler, PreparedCases, validate_domains
    from med3dcore.pretrain import build_pretrain_model, pretrain_loss, split_training
    from med3dcore.train import train
    from med3dcore.training_setup import seed_everything

    run = load_run_config(args.config)
    config, sampling = split_training(dict(run.training, steps=args.steps, checkpoint_every=0, device="cpu"))
    print(f"config {args.config}: {len(run.domains)} domains, {sum(len(d.cases) for d in run.domains)} cases, "
          f"patch {sampling['patch_size']}, batch {config.batch_size}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    spacings = validate_domains(run.domains)
    t_validate = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cached = PreparedCases(run.domains, spacings, Path(tmp) / "cache")
        t0 = time.perf_counter()
        cached.warm()
        t_warm = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*.npy")) / 2 ** 20
        print(f"validate all pairs: {t_validate:.1f} s; build cache: {t_warm:.1f} s ({size:.0f} MiB of .npy)")
        variants = {"cache": cached, "no cache": PreparedCases(run.domains, spacings, None)}

        rates = {}
        for name, data in variants.items():
            sampler = PatchSampler(data, sampling["patch_size"], config.batch_size,
                                   float(sampling.get("foreground_share", 0.5)), seed=0)
            sampler.next_batch(0)  # first touch (page cache, foreground lists)
            t0 = time.perf_counter()
            for step in range(args.batches):
                sampler.next_batch(step)
            rates[name] = args.batches / (time.perf_counter() - t0)
            print(f"sampler only, {name:8s}: {rates[name]:7.2f} batches/s")
        print(f"sampler speed-up with cache: {rates['cache'] / rates['no cache']:.1f}x")

        # Training: rounds alternate the two variants so a change in machine load hits both alike.
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, data in variants.items():
                sampler = PatchSampler(data, sampling["patch_size"], config.batch_size,
                                       float(sampling.get("foreground_share", 0.5)), seed=r)
                seed_everything(r)
                model = build_pretrain_model(run)
                out = Path(tmp) / f"{name.replace(' ', '_')}_{r}"
                t0 = time.perf_counter()
                train(model, config, sampler.next_batch, pretrain_loss, out, stateful={"sampler": sampler})
                times[name].append((time.perf_counter() - t0) / args.steps)
        for name, per_step in times.items():
            median = statistics.median(per_step)
            print(f"training (ResNet-10), {name:8s}: {1 / median:6.3f} steps/s (median {median:.2f} s/step over "
                  f"{args.rounds} rounds of {args.steps} steps: {', '.join(f'{t:.2f}' for t in per_step)})")
        ratio = statistics.median(times["no cache"]) / statistics.median(times["cache"])
        print(f"training speed-up with cache: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
