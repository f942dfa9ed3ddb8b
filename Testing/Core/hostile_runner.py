"""Running the hostile-input cases of ``hostile_cases.py``: a case's folder, its command, a fingerprint of every
file before and after, and two ways to start the command: the installed ``med3d`` in a subprocess (optionally under
a prefix such as ``/usr/bin/time -v``), or a child of the fork server (``hostile_forkserver.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hostile_cases import Case, Files
from test_new_user_errors import _med3d


def fingerprint(folder: Path) -> Dict[str, str]:
    """Every entry under ``folder`` (links not followed): a file's SHA-256, a link's target, a folder, a FIFO."""
    out: Dict[str, str] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


@dataclass
class Result:
    case: Case
    code: int
    stdout: str
    stderr: str
    seconds: float
    before: Dict[str, str]
    after: Dict[str, str]


def prepare(case: Case, files: Files, root: Path) -> Path:
    folder = root / case.id
    folder.mkdir(parents=True)
    if case.setup is not None:
        case.setup(folder, files)
    return folder


def command(case: Case, files: Files, folder: Path) -> List[str]:
    values = {k: str(v) for k, v in files.items()}
    values["d"] = str(folder)
    return [token.format(**values) for token in case.argv.split()]


def run_case(case: Case, files: Files, folder: Path, prefix: Sequence[str] = (), timeout: float = 120,
             server: Optional["ForkServer"] = None) -> Result:
    """Run the case's command: the installed ``med3d`` in a subprocess (``prefix`` e.g. ``/usr/bin/time -v``), or
    a child of ``server`` (the same ``main`` in a forked process, without importing torch again)."""
    before = fingerprint(folder)
    env = {k: v.format(d=folder) for k, v in case.env.items()}
    argv = command(case, files, folder)
    started = time.perf_counter()
    if server is not None:
        code, out, err = server.run(argv, folder, env, case.stdout, timeout)
        return Result(case, code, out, err, time.perf_counter() - started, before, fingerprint(folder))
    stdout = open(case.stdout, "w") if case.stdout else subprocess.PIPE
    proc = subprocess.Popen(list(prefix) + _med3d() + argv, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2", **env), cwd=str(folder), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code, out = proc.returncode, out or ""
    except subprocess.TimeoutExpired:  # a read blocked on a FIFO, say: end the whole group (prefixes included)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        code, out, err = -9, "", f"TIMEOUT after {timeout} s: {err}"
    finally:
        if case.stdout:
            stdout.close()
    return Result(case, code, out, err, time.perf_counter() - started, before, fingerprint(folder))


class ForkServer:
    """Client of ``hostile_forkserver.py``: ``run(argv, cwd, env, stdout, timeout) -> (code, stdout, stderr)``,
    safe to call from several threads; a child that outlives ``timeout`` is killed (code -9)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hostile_forkserver.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="2"))
        self.lock = threading.Lock()
        self.waiting: Dict[int, Tuple[threading.Event, dict]] = {}
        self.counter = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.lock:
                event, slot = self.waiting[message["id"]]
            slot.update(message)
            if "code" in message:
                event.set()

    def run(self, argv: List[str], cwd: Path, env: Dict[str, str], stdout: Optional[str],
            timeout: float) -> Tuple[int, str, str]:
        with self.lock:
            self.counter += 1
            ident = self.counter
            event, slot = threading.Event(), {}
            self.waiting[ident] = (event, slot)
            out, err = self.scratch / f"{ident}.out", self.scratch / f"{ident}.err"
            request = {"id": ident, "argv": argv, "cwd": str(cwd), "env": env, "stdout": stdout or str(out),
                       "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        if not event.wait(timeout):
            if "pid" in slot:
                os.kill(slot["pid"], signal.SIGKILL)
            event.wait(30)
            return -9, "", f"TIMEOUT after {timeout} s: " + (err.read_text() if err.exists() else "")
        return (slot["code"], out.read_text() if out.exists() else "", err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
