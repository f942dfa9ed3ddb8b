"""Cost of the Slicer module's glue, against peers in the same process.

1. Volume node -> engine Volume on a real CT (chest_ct.nrrd loaded the way Slicer loads it, via the Slicer
   double): Med3D's ``Med3DLogic.volumeFromNode`` (one copy, geometry from IJK-to-RAS) against the route of
   ``sitkUtils.PullVolumeFromSlicer`` + ``Volume.from_sitk`` (array -> SimpleITK image with LPS geometry -> array,
   re-implemented here because sitkUtils needs a real Slicer).
2. Progress latency of the background runner: a child prints a timestamped JSON line every 50 ms; the time until
   the parent's poll sees it, for ``BackgroundProcess`` (reader thread + queue, polled every 10 ms) against
   ``Popen.communicate()`` (everything arrives at the exit).
3. Cancel: time until the whole process tree is gone, with and without a grandchild that ignores SIGTERM.

    python Testing/benchmarks/bench_slicer_glue.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "Med3DSlicer"), str(ROOT / "Testing" / "Slicer")]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_conversion(repeats: int) -> None:
    import SimpleITK as sitk
    import slicer_double
    import vtk

    from med3dcore.volume import Volume

    slicer = slicer_double.install()
    try:
        import Med3D

        node = slicer.util.loadVolume(str(DATA / "ct" / "chest_ct.nrrd"))
        logic = Med3D.Med3DLogic()

        def peer() -> Volume:
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            m = slicer.util.arrayFromVTKMatrix(matrix)
            spacing = np.linalg.norm(m[:3, :3], axis=0)
            image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node))
            image.SetSpacing(tuple(spacing))
            image.SetOrigin(tuple(m[:3, 3] * [-1, -1, 1]))
            image.SetDirection(tuple((np.diag([-1, -1, 1.0]) @ (m[:3, :3] / spacing)).ravel()))
            return Volume.from_sitk(image)

        ours_volume, peer_volume = logic.volumeFromNode(node), peer()
        assert ours_volume.same_geometry(peer_volume) and np.array_equal(ours_volume.array, peer_volume.array)
        ours = median_time(lambda: logic.volumeFromNode(node), repeats)
        theirs = median_time(peer, repeats)
        shape = "x".join(str(s) for s in node.array.shape[::-1])
        print(f"node -> Volume, chest_ct {shape} {node.array.dtype}: Med3D {ours * 1000:.1f} ms, "
              f"sitkUtils route {theirs * 1000:.1f} ms, ratio {theirs / ours:.2f}x")
    finally:
        slicer_double.uninstall()


CHILD = """
import json, sys, time
for step in range(40):
    print(json.dumps({"kind": "progress", "stage": "train", "step": step, "sent": time.time()}), flush=True)
    time.sleep(0.05)
"""


def bench_latency() -> None:
    from Med3DLib.runner import BackgroundProcess

    command = [sys.executable, "-u", "-c", CHILD]
    process = BackgroundProcess(command).start()
    delays = []
    while not process.finished():
        now = time.time()
        delays += [now - json.loads(line)["sent"] for line in process.lines()]
        time.sleep(0.01)
    delays += [time.time() - json.loads(line)["sent"] for line in process.lines()]
    start = time.time()
    out, _ = subprocess.Popen(command, stdout=subprocess.PIPE, text=True).communicate()
    done = time.time()
    naive = [done - json.loads(line)["sent"] for line in out.splitlines()]
    ours, theirs = statistics.median(delays), statistics.median(naive)
    print(f"progress latency over {len(delays)} lines: BackgroundProcess median {ours * 1000:.1f} ms "
          f"(max {max(delays) * 1000:.1f} ms); communicate() median {theirs * 1000:.0f} ms; ratio {theirs / ours:.0f}x "
          f"(communicate run took {done - start:.1f} s)")


def bench_cancel() -> None:
    from Med3DLib.runner import BackgroundProcess

    for ignore in (False, True):
        grandchild = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore else "")
                      + "print('ready', flush=True)\ntime.sleep(120)\n")
        code = textwrap.dedent(f"""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", {grandchild!r}], stdout=subprocess.PIPE, text=True)
            child.stdout.readline()
            print(child.pid, flush=True)
            time.sleep(120)
        """)
        process = BackgroundProcess([sys.executable, "-u", "-c", code]).start()
        lines = []
        while not lines:
            lines = process.lines()
            time.sleep(0.01)
        pid = int(lines[0])
        start = time.perf_counter()
        process.cancel(grace=3.0)
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            time.sleep(0.01)
        print(f"cancel, grandchild {'ignoring' if ignore else 'obeying'} SIGTERM: tree gone after "
              f"{(time.perf_counter() - start) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_conversion(args.repeats)
    bench_latency()
    if sys.platform.startswith("linux"):
        bench_cancel()


if __name__ == "__main__":
    main()
