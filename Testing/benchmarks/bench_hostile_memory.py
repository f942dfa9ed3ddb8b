"""Peak memory of every hostile-input case of issue 11 (``Testing/Core/hostile_cases.py``), each in its own
``med3d`` process under ``/usr/bin/time -v``: target < 1 GB each (a few-hundred-byte YAML, a 5 MB zip bomb or a
bundle asking for 10^9 classes must be refused before anything big is allocated).

    python Testing/benchmarks/bench_hostile_memory.py [--pythonpath DIR] [--timeout 60]

``--pythonpath`` runs another med3dcore (e.g. an older checkout's ``Med3DCore``) for comparison; its processes
get an address-space limit of 6 GB so a bomb cannot take the machine down. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing" / "Core"))

from hostile_cases import CASES, make_shared  # noqa: E402
from hostile_runner import prepare, run_case  # noqa: E402

LIMIT_MB = 1024.0


def peak_mb(stderr: str) -> float:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(found.group(1)) / 1024.0 if found else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pythonpath", help="run the med3dcore found here instead of the installed one")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case (a hang counts as a failure)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at a time (default 2)")
    args = parser.parse_args()
    if not os.path.exists("/usr/bin/time"):
        print("needs GNU time at /usr/bin/time (apt-get install time)", file=sys.stderr)
        return 2
    prefix = ["/usr/bin/time", "-v"]
    if args.pythonpath:
        os.environ["PYTHONPATH"] = args.pythonpath
        prefix = ["bash", "-c", 'ulimit -v 6000000; exec "$@"', "_"] + prefix
    with tempfile.TemporaryDirectory(prefix="med3d_hostile_") as tmp:
        files = make_shared(Path(tmp) / "shared")
        folders = {case.id: prepare(case, files, Path(tmp) / "cases") for case in CASES}
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, files, folders[c.id], prefix, args.timeout), CASES))
    print("| case | exit | peak RSS MB | wall s | first line of stderr |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for result in results:
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("\t")
                 and not line.startswith("Command ")]
        peak = peak_mb(result.stderr)
        worst = max(worst, peak if peak == peak else 0.0)
        first = (lines[0] if lines else "").replace("|", "/")
        first = re.sub(r"/tmp/med3d_hostile_\w+/", "", first)
        print(f"| {result.case.id} | {result.code} | {peak:.0f} | {result.seconds:.1f} | "
              f"{first[:90] + ('...' if len(first) > 90 else '')} |")
    over = [r.case.id for r in results if peak_mb(r.stderr) > LIMIT_MB]
    print(f"\n{len(results)} cases, largest peak RSS {worst:.0f} MB; over {LIMIT_MB:.0f} MB: {', '.join(over) or 'none'}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
