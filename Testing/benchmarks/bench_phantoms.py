"""Speed of the synthetic CT phantom (the offline demo and many tests build them): best of N for a 64^3 phantom
and for the demo's size. A timing, not a test: the unit tests must not depend on the machine's load.

    python Testing/benchmarks/bench_phantoms.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

from med3dcore.phantoms import make_ct_phantom


def best_of(shape, repeats: int) -> float:
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        make_ct_phantom(shape, seed=seed)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for shape in ((64, 64, 64), (48, 96, 96)):
        print(f"make_ct_phantom{shape}: best of {args.repeats}: {best_of(shape, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
