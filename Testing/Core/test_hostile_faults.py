"""Issue 11's faults beyond a single command line: full disks and read-only folders (a small tmpfs, mounted when the
machine allows it, else skipped with the reason), concurrent runs, Ctrl-C and SIGKILL, and the engine behaviours
behind them (the resume learning rate, old bundles without a checksum, detached formats written whole).

Commands run as real processes (the installed ``med3d``, or children of the fork server of
``test_hostile_inputs.py``); every file the user had is compared by SHA-256 before and after.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from hostile_cases import Files, make_shared, pretrain_config
from hostile_runner import ForkServer, fingerprint
from med3dcore.errors import Med3DError
from test_new_user_errors import _bundle, _check_error, _med3d

ENV = dict(os.environ, OMP_NUM_THREADS="2")


def _ctrl_c_default() -> None:
    """In the child before exec: Ctrl-C back to its default even when this test run was started with SIGINT
    ignored (a background job keeps SIG_IGN across exec, and the child would never see the Ctrl-C sent to it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Files:
    return make_shared(tmp_path_factory.mktemp("faults_shared"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork = ForkServer(tmp_path_factory.mktemp("faults_fork"))
    yield fork
    fork.close()


def med3d(args: List[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(_med3d() + [str(a) for a in args], capture_output=True, text=True, cwd=str(cwd), env=ENV,
                          timeout=kwargs.pop("timeout", 180), **kwargs)


def staging_left(folder: Path) -> List[str]:
    return [str(p) for p in folder.rglob(".med3d-*")]


# ------------------------------------------------------------------------------------------------ a small tmpfs

@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 96 MiB at ``tmp_path/fs`` (CI runs as root on a machine like this one; elsewhere: skipped)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("full-disk and read-only cases mount a small tmpfs, which needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); full-disk cases need one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> None:
    """Take every free byte of the file system holding ``folder``."""
    for name, block in (("filler", 1 << 20), ("filler2", 512)):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, bytes(block)):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


def test_02_full_disk_keeps_the_label_map(shared, small_fs, server):
    """'wrote', exit 0 and a 0-byte file in place of the good one, before: now one line and the file intact."""
    first = server.run(["segment", str(shared["ct"]), str(small_fs / "good.nii.gz"), "--model", str(shared["lung"]),
                        "--progress", "none", "--device", "cpu"], small_fs, {}, None, 120)
    assert first[0] == 0, first[2]
    fill(small_fs)
    before = fingerprint(small_fs)
    code, out, err = server.run(["segment", str(shared["ct"]), str(small_fs / "good.nii.gz"), "--model",
                                 str(shared["lung"]), "--progress", "none", "--device", "cpu", "--overwrite"],
                                small_fs, {}, None, 120)
    _check_error("segment", code, err, ["no space left on device", "nothing was replaced"])
    assert "wrote" not in out and fingerprint(small_fs) == before and not staging_left(small_fs)


def test_02_full_disk_overlay_publishes_nothing(shared, small_fs, tmp_path, server):
    """The label map (on a disk with room) and the overlay (on the full one) are published together or not at all."""
    fill(small_fs)
    code, _, err = server.run(["segment", str(shared["ct"]), str(tmp_path / "labels.nii.gz"), "--model",
                               str(shared["lung"]), "--overlay", str(small_fs / "overlay.png"), "--progress", "none",
                               "--device", "cpu"], tmp_path, {}, None, 120)
    _check_error("segment", code, err, ["overlay", "no space left on device"])
    assert not (tmp_path / "labels.nii.gz").exists() and not (small_fs / "overlay.png").exists()


def test_02_full_disk_while_training_keeps_the_model(shared, small_fs, server):
    (small_fs / "o").mkdir()
    model = small_fs / "o" / "nodule.pt"
    model.write_bytes(shared["nodule"].read_bytes())
    fill(small_fs)
    before = fingerprint(small_fs)
    code, _, err = server.run(["finetune", "--task", "nodule", "--csv", str(shared["nodules_csv"]), "--out",
                               str(small_fs / "o"), "--name", "nodule", "--overwrite", "--steps", "1", "--batch-size",
                               "2", "--cube", "16", "--device", "cpu", "--progress", "none"], small_fs, {}, None, 180)
    _check_error("finetune", code, err, ["no space left on device"])
    after = fingerprint(small_fs)
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the user's changed"
    assert not staging_left(small_fs)


def test_11_read_only_output_folder(shared, small_fs, server):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for args, words in (
            (["segment", shared["ct"], small_fs / "l.nii.gz", "--model", shared["lung"], "--progress", "none"],
             ["read-only file system"]),
            (["finetune", "--task", "nodule", "--csv", shared["nodules_csv"], "--out", small_fs / "o", "--steps", "1",
              "--cube", "16", "--device", "cpu", "--progress", "none"], ["read-only file system"])):
        code, _, err = server.run([str(a) for a in args], shared["base"], {}, None, 180)
        _check_error(args[0], code, err, words)
    assert list(small_fs.iterdir()) == []


# ------------------------------------------------------------------------------------------------ races

def test_05_concurrent_segments_exactly_one_writes(shared, tmp_path, server):
    target = tmp_path / "labels.nii.gz"
    args = ["segment", str(shared["ct"]), str(target), "--model", str(shared["lung"]), "--progress", "none",
            "--device", "cpu"]
    results: List[Tuple[int, str, str]] = []
    threads = [threading.Thread(target=lambda: results.append(server.run(args, tmp_path, {}, None, 180)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2], [r[2] for r in results]
    for code, out, err in results:
        if code == 2:
            line = _check_error("segment", code, err, [])
            assert "already exists" in line or "appeared while" in line, line
    from med3dcore.volume_files import read_volume
    assert read_volume(target).array.shape == (12, 20, 20) and not staging_left(tmp_path)


def test_05_publishing_is_exclusive_without_overwrite(tmp_path):
    """Eight writers stage the same new name and publish at one instant: exactly one wins, its bytes are the file."""
    from med3dcore.safe_io import Outputs

    barrier, outcome = threading.Barrier(8), {}

    def writer(n: int) -> None:
        outputs = Outputs(overwrite=False)
        outputs.stage(tmp_path / "report.json", lambda p: p.write_text(f'{{"writer": {n}}}'))
        barrier.wait()
        try:
            outputs.publish()
            outcome[n] = "won"
        except Med3DError as exc:
            outcome[n] = str(exc)
        finally:
            outputs.discard()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, result in outcome.items() if result == "won"]
    assert len(winners) == 1, outcome
    assert (tmp_path / "report.json").read_text() == f'{{"writer": {winners[0]}}}'
    assert all("appeared while" in r for n, r in outcome.items() if n != winners[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_05_concurrent_pretraining_shares_a_cache(shared, tmp_path, server):
    config = shared["base"] / "pretrain16.json"
    config.write_text(__import__("json").dumps(dict(pretrain_config(), training={
        "steps": 1, "batch_size": 1, "patch_size": [16, 16, 16]})))
    results: List[Tuple[int, str, str]] = []

    def run(n: int) -> None:
        results.append(server.run(["pretrain", "--config", str(config), "--out", str(tmp_path / f"run{n}"),
                                   "--cache", str(tmp_path / "cache"), "--progress", "none", "--device", "cpu"],
                                  tmp_path, {}, None, 300))
    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    assert not staging_left(tmp_path)


def test_05_cache_rebuild_keeps_the_current_entry(shared, tmp_path):
    """A run rebuilding a case's entry removes older entries of that case, never the one another run just wrote."""
    from med3dcore.domains import domain_from_dict
    from med3dcore.training_data import PreparedCases

    domain = domain_from_dict({"name": "a", "images": str(shared["base"] / "images"),
                               "masks": str(shared["base"] / "labels"), "labels": {1: "x"}}, tmp_path)
    first = PreparedCases([domain], {"a": (3.0, 3.0, 3.0)}, tmp_path / "cache")
    image_path, label_path = first.entry_paths(0, 0)
    stale = image_path.with_name(image_path.name.replace(image_path.name.rsplit("-", 1)[1].split(".")[0], "0" * 20))
    first.arrays(0, 0)
    stale.write_bytes(b"an entry of older sources")
    label_path.unlink()  # as if another run were halfway through writing this entry
    second = PreparedCases([domain], {"a": (3.0, 3.0, 3.0)}, tmp_path / "cache")
    image, labels = second.arrays(0, 0)
    assert image_path.is_file() and label_path.is_file() and not stale.exists()
    assert np.array_equal(np.asarray(image), np.asarray(first.arrays(0, 0)[0]))


# ------------------------------------------------------------------------------------------------ signals

def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_11_ctrl_c_in_the_first_second(shared, tmp_path):
    proc = subprocess.Popen(_med3d() + ["segment", str(shared["ct"]), str(tmp_path / "l.nii.gz"), "--model",
                                        str(shared["lung"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=_ctrl_c_default)
    maps = Path(f"/proc/{proc.pid}/maps")  # wait until torch is being loaded: well inside the first second's work
    if maps.exists():
        _wait_for(lambda: proc.poll() is not None or "torch" in maps.read_text(), 60)
    else:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].endswith(": interrupted") and not (tmp_path / "l.nii.gz").exists()


def _pretrain_long(shared: Files, out: Path) -> List[str]:
    config = out.parent / "long.json"
    config.write_text(__import__("json").dumps(dict(pretrain_config(), training={
        "steps": 400, "batch_size": 1, "patch_size": [16, 16, 16], "checkpoint_every": 1})))
    for sub in ("images", "labels"):
        if not (out.parent / sub).exists():
            (out.parent / sub).symlink_to(shared["base"] / sub)
    return _med3d() + ["pretrain", "--config", str(config), "--out", str(out), "--progress", "none", "--device", "cpu"]


def test_11_ctrl_c_while_writing_checkpoints(shared, tmp_path):
    """Interrupted between and during checkpoint writes (one every step): exit 130, one line, a loadable last.pt,
    no staging folder left."""
    from med3dcore.checkpoint_files import safe_load

    out = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_long(shared, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, preexec_fn=_ctrl_c_default)
    _wait_for(lambda: (out / "checkpoints" / "last.pt").exists() or proc.poll() is not None)
    time.sleep(0.7)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err and lines == ["med3d pretrain: interrupted"], err
    assert safe_load(out / "checkpoints" / "last.pt")["step"] >= 1 and not staging_left(out)


def test_12_killed_run_leaves_nothing_after_resume(shared, tmp_path):
    """SIGKILL mid-checkpoint leaves a staging folder; the resumed run removes it (its writer is gone)."""
    out = tmp_path / "run"
    argv = _pretrain_long(shared, out)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    _wait_for(lambda: (out / "checkpoints" / "last.pt").exists() or proc.poll() is not None)
    _wait_for(lambda: staging_left(out) != [] or proc.poll() is not None, 60)  # catch it inside a write
    proc.kill()
    proc.wait()
    left = staging_left(out)
    done = subprocess.run(argv + ["--resume", "--set", "steps=1"], capture_output=True, text=True, env=ENV,
                          timeout=180)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert left and not staging_left(out), f"left by the kill: {left}; after the resume: {staging_left(out)}"


def test_12_stale_temporaries_are_cleaned_when_certainly_ours(shared, tmp_path, server):
    from med3dcore.safe_io import _HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".med3d-{_HOST}-{int(gone.stdout)}-abc.tmp"
    live = tmp_path / f".med3d-{_HOST}-{os.getpid()}-def.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "labels.nii.gz").write_bytes(bytes(1 << 20))
    legacy = tmp_path / ".labels.nii.gz.ab12cd34.tmp"  # what med3dcore 0.1 left
    legacy.write_bytes(bytes(1 << 20))
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    (tmp_path / ".notes.tmp").write_text("the user's own hidden file")
    code, _, err = server.run(["segment", str(shared["ct"]), str(tmp_path / "labels.nii.gz"), "--model",
                               str(shared["lung"]), "--progress", "none", "--device", "cpu"], tmp_path, {}, None, 120)
    assert code == 0, err
    assert not dead.exists() and not legacy.exists() and live.is_dir() and (tmp_path / ".notes.tmp").exists()


def test_12_inspect_escapes_a_strangers_strings(tmp_path):
    evil = "\x1b[2J\x1b[31mlung\nfile: /etc/passwd\u202e"
    path = _bundle(tmp_path / "evil.pt", {"type": "coarse_seg", "num_classes": 2},
                   {"type": "segmentation", "name": "lung\x1b]0;owned\x07"}, [{"value": 1, "name": evil}])
    done = med3d(["inspect", path], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\u202e" not in done.stdout and "\x07" not in done.stdout
    label_lines = [line for line in done.stdout.splitlines() if line.startswith("labels:")]
    assert len(label_lines) == 1 and "\\x1b[2J" in label_lines[0] and "\\n" in label_lines[0]
    assert not [line for line in done.stdout.splitlines() if line.startswith("file: /etc")]


# ------------------------------------------------------------------------------------------------ engine behaviour

def _tiny_training(tmp_path: Path, lr: float, steps: int, nan_at: int = 0, resume: bool = False, events=None):
    from med3dcore.train import train
    from med3dcore.training_setup import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    config = TrainConfig(steps=steps, batch_size=2, lr=lr, schedule="constant", checkpoint_every=2, device="cpu")

    def loss(m, batch):
        value = m(batch).pow(2).mean()
        return (value * float("nan") if nan_at and len(events_seen) + 1 >= nan_at else value), {}
    events_seen: List[dict] = []

    def report(event):
        if event.get("kind") == "progress":
            events_seen.append(event)
        if events is not None:
            events.append(event)
    return train(model, config, lambda step: torch.ones(2, 4), loss, tmp_path, reporter=report, resume=resume)


def test_10_nan_stop_and_resume_with_a_lower_learning_rate(tmp_path):
    with pytest.raises(Med3DError) as first:
        _tiny_training(tmp_path / "a", 1e-3, 6, nan_at=1)
    assert "no checkpoint was written yet" in str(first.value) and "last.pt" not in str(first.value)
    with pytest.raises(Med3DError) as stopped:
        _tiny_training(tmp_path / "b", 1e-3, 6, nan_at=4)
    assert "(step 2) is kept" in str(stopped.value) and "--resume --set lr=" in str(stopped.value)
    events: List[dict] = []
    _tiny_training(tmp_path / "b", 1e-5, 6, resume=True, events=events)
    rates = [e["metrics"]["lr"] for e in events if e.get("kind") == "progress"]
    assert rates and all(r == pytest.approx(1e-5) for r in rates), rates
    assert any("learning rate 1e-05 (the checkpoint had 0.001)" in (e.get("message") or "") for e in events)


def test_08_bundles_without_a_checksum_still_load(shared, tmp_path):
    from med3dcore.bundle_checks import CHECKSUM_KEY
    from med3dcore.bundles import inspect_file, load_bundle

    assert inspect_file(shared["lung"])["checksum"] == "verified"
    old = torch.load(shared["lung"], weights_only=True)
    del old[CHECKSUM_KEY]
    torch.save(old, tmp_path / "old.pt")
    assert load_bundle(tmp_path / "old.pt").task["name"] == "lung"
    assert inspect_file(tmp_path / "old.pt")["checksum"].startswith("none")


@pytest.mark.parametrize("name", ["lab.nhdr", "lab.mhd", "lab.nrrd", "lab.nii.gz"])
def test_01_every_format_is_replaced_whole_with_overwrite(tmp_path, name):
    from med3dcore.volume import Volume
    from med3dcore.volume_files import read_volume, write_volume

    first, second = (Volume(np.full((3, 4, 5), v, np.uint8), (1.0, 1.0, 2.0)) for v in (1, 7))
    write_volume(first, tmp_path / name)
    with pytest.raises(Med3DError, match="already exists"):
        write_volume(second, tmp_path / name)
    write_volume(second, tmp_path / name, overwrite=True)
    assert np.array_equal(read_volume(tmp_path / name).array, second.array)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted({name, {"lab.nhdr": "lab.raw.gz", "lab.mhd": "lab.zraw"}.get(name, name)})
