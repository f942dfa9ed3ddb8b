"""Shared by the speed benchmarks: the machine line printed with every figure, paired alternating timing, Dice.

Every benchmark prints the CPU model, the flags that decide its fast paths (AVX-512, AVX512_BF16, AMX), the torch
version and threads, whether a GPU is there, and the load average before and after, so a figure is never read
without the machine and load it came from.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(have) or 'unknown'}"


def machine_line(torch: Any) -> str:
    """One line: CPU, flags, torch, threads, GPU, load average."""
    from med3dcore.devices import cpu_bf16_support

    gpu = (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU (none was lent to this run)")
    load = os.getloadavg()
    return (f"machine: {cpu_description()}; native bf16: {cpu_bf16_support() or 'no'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {gpu}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def paired(variants: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, List[float]]:
    """Run each variant ``repeats`` times, alternating (the order rotates every round so no variant always runs
    first after another); returns the wall seconds of every run per variant."""
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: Sequence[float]) -> Tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(seconds), min(seconds), max(seconds)


def fmt(seconds: Sequence[float]) -> str:
    med, low, high = summary(seconds)
    return f"{med:.3f} s ({low:.3f}-{high:.3f})"


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean maps; refuses two empty maps (agreement of nothing measures nothing)."""
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        raise SystemExit("both label maps are empty: the model predicts nothing here, so agreement cannot be "
                         "measured; use a trained model (see the benchmark's docstring)")
    return float(2 * np.logical_and(a, b).sum() / total)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM via /proc/self/clear_refs) so :func:`peak_since_reset_mb` sees
    only what runs after; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_since_reset_mb() -> float:
    """Peak RSS since :func:`reset_peak_rss` (VmHWM), else the process's whole-life peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def require_model(path: str, what: str = "the trained real-CT lung model") -> str:
    """The model path, or a clear refusal: these benchmarks never fall back to random weights."""
    if not path or not os.path.isfile(path):
        raise SystemExit(f"{what} was not found at {path!r}. Train it first with the command in "
                         "Testing/benchmarks/bench_lungs.py's docstring (it writes /work/models/lung_real.pt), or "
                         "give --model FILE. Random weights predict nothing, so no agreement figure would mean "
                         "anything.")
    return path
