"""Issue 11, made permanent: hostile files, faults and races against the real ``med3d`` command.

Every case of ``hostile_cases.CASES`` runs the ``med3d`` command in a process of its own on real files (a case
number prefix names the issue's item): a representative set through the installed console script, the others as
children of a fork server that imported torch once (``hostile_forkserver.py``: the same ``main``, a fresh process
each, a second less per case). Each must end with exit status 2 and exactly one line ``med3d <command>: error:
...`` holding the expected words (a few are meant to succeed: exit 0), print no traceback, leave every file of its
folder byte-identical (SHA-256 before and after; FIFOs, links and folders as they were), leave no staging folder
behind, and never hang on a FIFO (a time limit turns a hang into a failure). The shared scan and bundles are
hashed before and after the whole run. Cases run three at a time.

Faults that need a file system of their own (full disk, read-only folder), races, signals and the training
loop's resume are in ``test_hostile_faults.py``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Tuple

import pytest

from hostile_cases import CASES, Files, make_shared
from hostile_runner import ForkServer, Result, fingerprint, prepare, run_case
from test_new_user_errors import _check_error


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Files:
    return make_shared(tmp_path_factory.mktemp("hostile_shared"))


@pytest.fixture(scope="module")
def results(shared, tmp_path_factory) -> Tuple[Dict[str, Result], Dict[str, str]]:
    before = fingerprint(shared["base"])
    root = tmp_path_factory.mktemp("hostile_cases")
    folders = {case.id: prepare(case, shared, root) for case in CASES}
    server = ForkServer(root / ".forkserver")
    try:
        with ThreadPoolExecutor(3) as pool:
            done = list(pool.map(lambda case: run_case(case, shared, folders[case.id], timeout=90,
                                                       server=None if case.real else server), CASES))
    finally:
        server.close()
    return {r.case.id: r for r in done}, before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, results):
    result = results[0][case.id]
    assert result.code != -9, f"{case.id} hung (a blocking read?): {result.stderr}"
    command = case.argv.split()[0]
    if case.code == 2:
        _check_error(command, result.code, result.stderr, case.words)
    else:
        assert result.code == case.code, result.stderr
        assert "Traceback" not in result.stderr and "error" not in result.stderr.lower(), result.stderr
    expected = dict(result.before)
    changed = {k: v for k, v in result.after.items() if expected.get(k) != v}
    assert set(changed) <= set(case.new_files), f"files created or changed: {sorted(changed)}"
    assert set(expected) <= set(result.after), f"files removed: {sorted(set(expected) - set(result.after))}"
    assert not [name for name in result.after if Path(name).name.startswith(".med3d-")], "staging left behind"


def test_shared_files_are_byte_identical(results, shared):
    assert fingerprint(shared["base"]) == results[1]
