"""A background process whose stdout lines are read by a thread into a queue that the caller drains.

In Slicer the caller is a ``qt.QTimer`` on the main thread, so MRML and Qt are only touched there. The process
runs in its own process group (POSIX session / Windows process group), so Cancel ends the whole tree,
grandchildren included (e.g. DataLoader workers), not just the direct child.
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any, Deque, Dict, List, Optional, Sequence

from med3dcore.errors import Med3DError

STDERR_TAIL_LINES = 40


# Windows process-creation flags (winbase.h); named here because ``subprocess`` has them on Windows only.
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def popen_options(platform: str) -> Dict[str, Any]:
    """``subprocess.Popen`` options for a background child on ``platform`` (``sys.platform``).

    POSIX: a new session, so Cancel can signal the whole process group. Windows: a new process group (for
    ``taskkill /T``) and no console window: a console program started from Slicer (a GUI program) otherwise
    opens a console window that stays up for the whole run and kills the run when closed. Slicer's own
    ``launchConsoleProcess`` hides it with a STARTUPINFO; ``CREATE_NO_WINDOW`` also makes sure none is made.
    """
    if platform != "win32":
        return {"start_new_session": True}
    options: Dict[str, Any] = {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    startupinfo_class = getattr(subprocess, "STARTUPINFO", None)  # exists on Windows only
    if startupinfo_class is not None:
        info = startupinfo_class()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        options["startupinfo"] = info
    return options


def kill_tree_command(pid: int) -> List[str]:
    """Windows: end ``pid`` and all its children (``/T``), forcibly (``/F``: console programs ignore a polite
    close)."""
    return ["taskkill", "/F", "/T", "/PID", str(int(pid))]


def python_executable() -> str:
    """The Python that runs the engine: Slicer's ``PythonSlicer`` (same packages as Slicer), else this one."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a child Python that must import the same ``med3dcore`` (and ``Med3DLib``) as this one.

    Slicer puts its module folders on ``sys.path`` itself, but a child ``PythonSlicer`` does not know them,
    so the folders holding the packages go first on ``PYTHONPATH``. Output is unbuffered so progress lines
    arrive as they are written.
    """
    import med3dcore

    env = dict(os.environ if base is None else base)
    folders = [os.path.dirname(os.path.dirname(os.path.abspath(med3dcore.__file__)))]
    old = env.get("PYTHONPATH")
    if old:
        folders.append(old)
    env["PYTHONPATH"] = os.pathsep.join(folders)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class BackgroundProcess:
    """Runs ``command`` (a list) in the background; see the module docstring.

    ``lines()`` returns the stdout lines that arrived since the last call, without blocking. ``stderr_tail()``
    keeps the last lines of stderr for the error message when the process fails.
    """

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        if not command:
            raise Med3DError("no command to run")
        self.command = [str(part) for part in command]
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._stderr: Deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._threads: List[threading.Thread] = []

    def start(self) -> "BackgroundProcess":
        if self.process is not None:
            raise Med3DError("this process was already started; create a new one to run again")
        try:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
                **popen_options(sys.platform))
        except OSError as exc:
            raise Med3DError(f"could not start '{self.command[0]}': {exc}; check that the program exists "
                             "(in Slicer: PythonSlicer next to the Slicer executable)") from None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self._queue.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self._stderr.append), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    @staticmethod
    def _pump(stream, sink) -> None:  # type: ignore[no-untyped-def]
        for line in iter(stream.readline, ""):
            sink(line.rstrip("\r\n"))
        stream.close()

    def lines(self) -> List[str]:
        """All stdout lines read since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def finished(self) -> bool:
        """True once the process has exited and both output streams have been read to the end."""
        return (self.process is not None and self.process.poll() is not None
                and not any(thread.is_alive() for thread in self._threads))

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit (and the end of its output); returns the exit code."""
        if self.process is None:
            raise Med3DError("the process was not started")
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        return code

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def cancel(self, grace: float = 3.0) -> None:
        """End the whole process tree: a polite signal first, then a kill after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        if sys.platform == "win32":
            subprocess.run(kill_tree_command(self.process.pid), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=False,
                           **popen_options(sys.platform))
        else:
            pgid = self.process.pid  # start_new_session made the child its group's leader
            self._signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            # Also kill what is left of the group (children that ignored SIGTERM or outlived the parent).
            self._signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        for thread in self._threads:  # the pipes close with the tree; let the readers see the end
            thread.join(grace)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def failure_message(self, what: str = "the background run") -> Optional[str]:
        """None on success or cancel; otherwise what failed, with the exit code and the end of stderr."""
        code = self.returncode
        if code is None or code == 0 or self.cancelled:
            return None
        tail = self.stderr_tail().strip()
        last = tail.splitlines()[-1] if tail else "(no error output)"
        return f"{what} failed with exit code {code}: {last}"
