"""Background engine runs: segmentation, nodule classification and fine-tuning each run ``med3d ...
--progress jsonl`` in a ``PythonSlicer`` process through :mod:`runner`, in a temporary work folder.

A job never touches Slicer by itself: the caller polls it on the main thread (the panel with a ``qt.QTimer``,
a script with :meth:`Job.wait`), and an inference job's result is loaded into the scene by the ``load``
callable the caller gives, on the main thread too. GPU memory is the child's and goes with it. Every job
deletes its work folder (exported scans, results) when it ends, is cancelled, or Slicer exits.
"""
from __future__ import annotations

import atexit
import re
import shutil
import time
from typing import Any, Callable, List, Optional, Sequence, Set

from med3dcore.errors import Med3DError

from . import models, progress_reader, runner

_LIVE: "Set[Job]" = set()  # started and not yet closed (held here so none escapes the clean-up at exit)
_ENGINE_ERROR = re.compile(r"^med3d [\w-]+: error: (.+)$")


@atexit.register
def end_all_jobs() -> None:
    """Slicer exits: stop every background run and delete its work folder."""
    for job in list(_LIVE):
        job.cancel()


class Job:
    """One background engine command with its progress state and work folder."""

    what = "the background run"

    def __init__(self, command: Sequence[str], work_folder: Optional[str] = None) -> None:
        self.command = [str(part) for part in command]
        self.work_folder = work_folder
        self.process = runner.BackgroundProcess(self.command, env=runner.engine_environment(), cwd=work_folder)
        self.state = progress_reader.ProgressState()
        self.on_progress: Optional[Callable[["Job"], None]] = None  # called by poll() after new lines
        self._closed = False
        self._cancelled = False

    def start(self) -> "Job":
        self.process.start()
        _LIVE.add(self)
        return self

    def poll(self) -> bool:
        """Read what arrived (never blocks); True while the process runs."""
        lines = self.process.lines()
        finished = self.process.finished() or self.cancelled
        if finished:
            lines += self.process.lines()  # written just before the exit
        for line in lines:
            self.state.feed(line)
        if lines and self.on_progress is not None:
            self.on_progress(self)
        if finished:
            self._ended()
        return not finished

    def _ended(self) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.process.process is not None and not self.process.finished()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> Optional[int]:
        """Block until the process ends (for scripts); returns its exit code."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if end is not None and time.monotonic() > end:
                self.cancel()
                raise Med3DError(f"{self.what} did not finish within {timeout:.0f} s and was stopped")
            time.sleep(interval)
        return self.process.returncode

    def cancel(self) -> None:
        """Kill the whole process tree and delete the work folder (also when it has just ended by itself:
        the user asked for nothing more from it)."""
        self._cancelled = True
        self.process.cancel()
        self.close()

    def failure(self) -> Optional[str]:
        """None on success or cancel; else the engine's own error message, or the exit code and stderr's end."""
        if self.cancelled or self.process.returncode in (None, 0):
            return None
        if self.state.error:
            return self.state.error
        lines = self.process.stderr_tail().strip().splitlines()
        found = _ENGINE_ERROR.match(lines[-1]) if lines else None
        return found.group(1) if found else self.process.failure_message(self.what)

    def close(self) -> None:
        """Delete the work folder (once)."""
        if not self._closed:
            self._closed = True
            if self.work_folder:
                shutil.rmtree(self.work_folder, ignore_errors=True)
        _LIVE.discard(self)


class InferenceJob(Job):
    """A segmentation or classification; ``finish()`` loads its result (main thread) and cleans up."""

    def __init__(self, command: Sequence[str], work_folder: str, what: str,
                 load: Callable[["InferenceJob"], Any]) -> None:
        super().__init__(command, work_folder)
        self.what = what
        self._load = load
        self.result: Any = None
        self.table: Any = None  # a classification's result table
        self.outline: Any = None  # a classification's learnt nodule outline (segmentation node)

    @property
    def warnings(self) -> List[str]:
        """What the engine warned about (e.g. an MR volume given to a CT model)."""
        return [str(w) for w in (self.state.result or {}).get("warnings") or []]

    def _ended(self) -> None:
        pass  # the result file is in the work folder: finish() loads it, then closes

    def finish(self) -> Any:
        """After the process ended: the loaded result (None when cancelled); raises the engine's error."""
        try:
            if self.running:
                raise Med3DError(f"{self.what} is still running")
            if self.cancelled:
                return None
            failure = self.failure()
            if failure:
                raise Med3DError(failure)
            if self.state.result is None:
                raise Med3DError(f"{self.what} ended without a result; see the Python console "
                                 f"({self.process.stderr_tail()[-300:]})")
            self.result = self._load(self)
            return self.result
        finally:
            self.close()


class FinetuneJob(Job):
    """A fine-tuning run; the new model is ``output``. Its work folder (exported cases) goes when it ends."""

    what = "fine-tuning"

    def __init__(self, command: Sequence[str], output: str, work_folder: Optional[str]) -> None:
        super().__init__(command, work_folder)
        self.output = output
        self.lossPlot: Any = None


def engine_command(python: str, command: str) -> List[str]:
    return [python, "-m", "med3dcore.cli", command]


def segment_command(python: str, image: str, output: str, task: str, model: str, device: str = "auto") -> List[str]:
    """``med3d segment`` for a background run; ``model`` is a bundle path or :data:`models.CLASSICAL`."""
    command = engine_command(python, "segment") + [image, output, "--task", task, "--device", device,
                                                   "--progress", "jsonl"]
    return command + (["--method", "classical"] if model == models.CLASSICAL else ["--model", model])


def classify_command(python: str, image: str, model: str, device: str = "auto",
                     roi: Optional[Sequence[float]] = None, mask: Optional[str] = None,
                     outline: Optional[str] = None) -> List[str]:
    """``med3d classify`` for a background run; ``roi``: LPS centre then size (mm); ``mask``: a label map;
    ``outline``: where the engine writes the nodule outline it estimates (models fine-tuned with masks)."""
    command = engine_command(python, "classify") + [image, "--model", model, "--device", device,
                                                    "--progress", "jsonl"]
    if roi is not None:
        command.append("--roi=" + ",".join(f"{float(v):.4f}" for v in roi))  # '=': the first may be negative
    if mask is not None:
        command += ["--mask", mask]
    if outline is not None:
        command += ["--outline", outline]
    return command


def work_folder(kind: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"Med3D-{kind}-")
