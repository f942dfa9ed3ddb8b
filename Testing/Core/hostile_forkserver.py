"""A fork server for the hostile-input tests: imports torch and the ``med3d`` command once, then forks one child
process per request that runs ``med3dcore.cli.main`` exactly as the console script does (``sys.exit(main())``),
with its own working folder, environment, and stdout/stderr files. Each child is a real process (its own file
descriptors, exit status and interpreter exit), without paying the second of importing torch again.

Protocol, one JSON object per line: requests on stdin ``{"id", "argv", "cwd", "env", "stdout", "stderr"}``;
answers on stdout ``{"id", "pid"}`` when the child starts and ``{"id", "code"}`` when it ends (``code`` as a shell
reports it: 128 + N for a signal). Started with no torch work done, so forked children may use OpenMP safely.
"""
from __future__ import annotations

import json
import os
import select
import sys
import traceback


def _child(request: dict) -> None:
    try:
        os.chdir(request["cwd"])
        os.environ.update(request.get("env") or {})
        for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if name != "/dev/full" else \
                os.open(name, os.O_WRONLY)
            os.dup2(target, fd)
            os.close(target)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["med3d"] + list(request["argv"])
        from med3dcore.cli import main
        try:
            code = main()
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        try:
            sys.stdout.flush()
        except OSError:  # what the interpreter does at exit when stdout cannot be flushed
            sys.stderr.write("Exception ignored on flushing sys.stdout:\n" + traceback.format_exc())
            code = 120
        sys.stderr.flush()
    except BaseException:  # an uncaught exception: the traceback the console script would print
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    os._exit(int(code) & 0xFF)


def serve() -> None:
    import importlib

    import med3dcore.cli
    med3dcore.cli.build_parser()
    # The command imports its engine lazily: import it here once (no torch work is done, so no thread pool exists
    # yet and forked children may use OpenMP).
    for name in ("torch", "SimpleITK", "med3dcore.infer", "med3dcore.checkpoint_files", "med3dcore.medicalnet",
                 "med3dcore.bundles", "med3dcore.volume", "med3dcore.volume_files", "med3dcore.overlay",
                 "med3dcore.train", "med3dcore.training_setup", "med3dcore.distributed", "med3dcore.domains",
                 "med3dcore.training_data", "med3dcore.finetune", "med3dcore.segmentation_finetune",
                 "med3dcore.classification_finetune", "med3dcore.pretrain", "med3dcore.nodules"):
        importlib.import_module(name)
    running = {}
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request)
                running[pid] = request["id"]
                print(json.dumps({"id": request["id"], "pid": pid}), flush=True)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            print(json.dumps({"id": running.pop(pid), "code": code}), flush=True)
    for pid in running:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    serve()
