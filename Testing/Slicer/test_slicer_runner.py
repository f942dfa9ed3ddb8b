"""Med3DLib.runner: a real background process, its progress lines, exit codes, stderr and Cancel of the whole
process tree (grandchildren included)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from Med3DLib import progress_reader, runner
from med3dcore.errors import Med3DError


def python_command(code: str) -> list:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state where /proc exists.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_progress_lines_arrive_while_the_process_runs() -> None:
    code = """
        import json, sys, time
        for step in range(1, 4):
            print(json.dumps({"kind": "progress", "stage": "train", "step": step, "total": 3,
                              "metrics": {"loss": 1.0 / step}}), flush=True)
        time.sleep(30)
    """
    process = runner.BackgroundProcess(python_command(code)).start()
    state = progress_reader.ProgressState()
    try:
        assert wait_for(lambda: [state.feed(line) for line in process.lines()] is not None
                        and len(state.losses) == 3), "progress lines did not arrive before the exit"
        assert process.running and state.fraction == 1.0
    finally:
        process.cancel(grace=1.0)
    assert not process.running and process.cancelled
    assert process.failure_message() is None  # a cancel is not a failure


def test_exit_code_and_stderr_tail_on_failure() -> None:
    code = """
        import sys
        print("working", flush=True)
        for i in range(100):
            print(f"noise {i}", file=sys.stderr)
        print("med3d finetune: error: the data folder /x has no cases", file=sys.stderr)
        sys.exit(2)
    """
    process = runner.BackgroundProcess(python_command(code)).start()
    assert process.wait(30) == 2
    assert process.finished() and process.lines() == ["working"]
    assert len(process.stderr_tail().splitlines()) == runner.STDERR_TAIL_LINES
    assert process.failure_message("fine-tuning") == ("fine-tuning failed with exit code 2: med3d finetune: error: "
                                                      "the data folder /x has no cases")


def test_success_has_no_failure_message() -> None:
    process = runner.BackgroundProcess(python_command("print('done')")).start()
    assert process.wait(30) == 0
    assert process.failure_message() is None and process.lines() == ["done"]


@pytest.mark.skipif(sys.platform == "win32", reason="process-group signals are POSIX; Windows uses taskkill /T")
def test_cancel_kills_grandchildren_even_those_ignoring_sigterm(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # The grandchild announces itself only once it ignores SIGTERM, so only the group SIGKILL can end it.
    grandchild = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                  "[time.sleep(0.1) for _ in range(600)]")
    code = f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {grandchild!r}])
        print("started", flush=True)
        time.sleep(60)
    """
    process = runner.BackgroundProcess(python_command(code)).start()
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    grandchild_pid = int(pid_file.read_text())
    assert alive(grandchild_pid)
    started = time.monotonic()
    process.cancel(grace=1.0)
    assert time.monotonic() - started < 30  # the tree would live 60 s; cancel takes the 1 s grace and a kill
    assert wait_for(lambda: not alive(grandchild_pid), timeout=10), "the grandchild survived Cancel"
    assert process.returncode is not None and process.returncode != 0


def test_a_missing_program_and_a_double_start_are_clear_errors() -> None:
    with pytest.raises(Med3DError, match="could not start"):
        runner.BackgroundProcess(["/nonexistent/PythonSlicer", "-c", "pass"]).start()
    process = runner.BackgroundProcess(python_command("pass")).start()
    process.wait(30)
    with pytest.raises(Med3DError, match="already started"):
        process.start()


def test_engine_environment_lets_a_bare_child_python_import_med3dcore() -> None:
    """``python -S`` ignores site-packages (and the editable install), like a PythonSlicer that does not know the
    extension's folder: only the PYTHONPATH that engine_environment sets makes med3dcore importable."""
    import med3dcore

    command = [sys.executable, "-S", "-c", "import med3dcore; print(med3dcore.__file__)"]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    without = subprocess.run(command, env=base, capture_output=True, text=True)
    assert without.returncode != 0 and "No module named 'med3dcore'" in without.stderr
    with_env = subprocess.run(command, env=runner.engine_environment(base), capture_output=True, text=True)
    assert with_env.returncode == 0, with_env.stderr
    assert Path(with_env.stdout.strip()).resolve() == Path(med3dcore.__file__).resolve()


def test_windows_children_get_no_console_window_and_their_own_group() -> None:
    """Item 3: on Windows a console program started from Slicer opened a console window for the whole run
    (closing it killed the run); the child and taskkill are started with CREATE_NO_WINDOW (and hidden, as
    Slicer's own launchConsoleProcess does), in a new process group so that /T reaches the whole tree."""
    options = runner.popen_options("win32")
    assert options["creationflags"] & runner.CREATE_NO_WINDOW == 0x08000000
    assert options["creationflags"] & runner.CREATE_NEW_PROCESS_GROUP == 0x00000200
    if sys.platform == "win32":  # STARTUPINFO exists on Windows only
        assert options["startupinfo"].wShowWindow == 0
    assert runner.kill_tree_command(1234) == ["taskkill", "/F", "/T", "/PID", "1234"]
    assert runner.popen_options("linux") == {"start_new_session": True}
    assert runner.popen_options("darwin") == {"start_new_session": True}


def test_windows_options_are_what_popen_and_taskkill_get(monkeypatch) -> None:
    """The options above reach both subprocess calls (recorded, with sys.platform set to win32)."""
    calls = []

    class Recorded:
        pid, returncode = 4321, None

        def __init__(self, command, **kwargs):
            calls.append(("Popen", command[0], kwargs.get("creationflags")))
            self.stdout = self.stderr = None

        def poll(self):
            return self.returncode

        def wait(self, timeout=None):
            self.returncode = 1
            return 1

    monkeypatch.setattr(runner.sys, "platform", "win32")
    monkeypatch.setattr(runner.subprocess, "Popen", Recorded)
    monkeypatch.setattr(runner.subprocess, "run", lambda command, **kwargs: calls.append(
        ("run", command[0], kwargs.get("creationflags"))))
    monkeypatch.setattr(runner.threading, "Thread", lambda **kwargs: type("T", (), {
        "start": lambda self: None, "join": lambda self, t=None: None, "is_alive": lambda self: False})())
    process = runner.BackgroundProcess(["PythonSlicer", "-m", "med3dcore.cli"]).start()
    process.cancel()
    flags = runner.CREATE_NEW_PROCESS_GROUP | runner.CREATE_NO_WINDOW
    assert calls == [("Popen", "PythonSlicer", flags), ("run", "taskkill", flags)]
