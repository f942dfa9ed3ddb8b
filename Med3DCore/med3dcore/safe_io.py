"""The one way Med3D touches files: inputs are checked before they are opened, outputs go through one write path.

Reading: :func:`input_stat` / :func:`regular_file` look at a path with ``os.stat`` before anything opens it, so a
FIFO, a device (``/dev/zero``), a socket, a symbolic-link loop or a missing file is one clear message and never a
read that blocks or never ends. :func:`read_text` adds a size bound for the text files Med3D reads whole
(configs, ``dataset.json``).

Writing: every output (label maps in every format, detached NRRD/MetaImage data files included, overlay PNGs,
model bundles, checkpoints, MedicalNet exports, caches, reports) goes through :class:`Outputs`:

1. each target is checked first: its folder exists, it is not a folder, a special file or a symbolic link (Med3D
   never writes through a link, nor replaces one), and an existing file is replaced only with ``overwrite``;
2. the writer writes into a private staging folder inside the target's folder (same file system, so publishing
   is a rename), under the final names, so a detached header still names its data file correctly;
3. the staged files are flushed to disk and verified (the caller's check, e.g. re-reading a label map, because
   SimpleITK does not always report a failed write on a full disk; plus a non-empty size);
4. only then are they published: without ``overwrite`` with ``os.link`` (which fails if the name appeared
   meanwhile, so of two concurrent runs exactly one wins), with it by ``os.replace``; a data file before its
   header. Whatever happens, the staging folder is removed.

A run killed with SIGKILL leaves its staging folder behind; its name (``.med3d-<host>-<pid>-*.tmp``) says whose it
is, and the next write into that folder removes it once that process is gone (:func:`clean_stale`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import Med3DError

PathLike = Union[str, "os.PathLike[str]"]
MAX_TEXT_BYTES = 64 << 20  # configs, dataset.json: far above any real one, far below what would hurt

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
STAGING_PREFIX = ".med3d-"
_STAGING = re.compile(r"^\.med3d-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+\.tmp$")
# Temporary files of med3dcore 0.1's writers next to the target: ".<target>.<8 chars (mkstemp) or pid>.tmp|.part"
_LEGACY_SUFFIX = re.compile(r"^\.([a-z0-9_]{8}|\d+)\.(tmp|part)$")
_LEGACY_AGE_S = 600.0

_REASONS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
            errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
            errno.EPERM: "Operation not permitted", errno.ELOOP: "Too many levels of symbolic links (a link loop)",
            errno.ENAMETOOLONG: "File name too long", errno.EIO: "Input/output error (a failing disk?)"}


def os_reason(exc: BaseException) -> str:
    """A short reason for an OSError (``No space left on device``), else the first line of the message."""
    code = getattr(exc, "errno", None)
    if code in _REASONS:
        return _REASONS[code]
    text = getattr(exc, "strerror", None) or str(exc)
    for code, reason in _REASONS.items():  # C++ writers report errno only as text
        if os.strerror(code).lower() in text.lower():
            return reason
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def file_kind(mode: int) -> str:
    """What a stat mode is, for messages: 'a folder', 'a FIFO (named pipe)', 'a character device', ..."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


# ------------------------------------------------------------------------------------------------------------ reading

def input_stat(path: PathLike, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` (links followed) with one-line errors for missing paths, broken links and link loops."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Med3DError(f"{what} {path} is a symbolic link to '{os.readlink(path)}', which does not exist; "
                             "check the link") from None
        raise Med3DError(f"{what} {path} does not exist; check the path") from None
    except NotADirectoryError:
        raise Med3DError(f"{what} {path} does not exist (a part of the path is a file, not a folder)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Med3DError(f"{what} {path} is a symbolic link loop (the link points back to itself); fix or "
                             "remove the link") from None
        raise Med3DError(f"cannot look at {what} {path}: {os_reason(exc)}") from None


def regular_file(path: PathLike, what: str = "file", folder_hint: str = "") -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file (folders get ``folder_hint``), before any open."""
    st = input_stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        hint = folder_hint if stat.S_ISDIR(st.st_mode) and folder_hint else "give a regular file"
        raise Med3DError(f"{path} is {file_kind(st.st_mode)}, not a {what}; {hint}")
    return st


def read_text(path: PathLike, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes (a byte-order mark is dropped)."""
    st = regular_file(path, what)
    if st.st_size > limit:
        raise Med3DError(f"{what} {path} is {st.st_size / 2**20:.0f} MiB; a text file Med3D reads may hold at most "
                         f"{limit >> 20} MiB (is it the right file?)")
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise Med3DError(f"cannot read {what} {path}: {os_reason(exc)}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Med3DError(f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as "
                         "UTF-8") from None


# ------------------------------------------------------------------------------------------------------------ writing

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: PathLike, targets: Iterable[str] = ()) -> List[str]:
    """Remove what interrupted Med3D writes left in ``folder``: staging folders of this host whose process is gone,
    and old-style temporary files of the named ``targets`` older than ten minutes. Returns the names removed;
    anything not certainly ours is left alone."""
    removed: List[str] = []
    targets = set(targets)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        match = _STAGING.match(name)
        try:
            if match and match.group(1) == _HOST and not _alive(int(match.group(2))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(name)
            elif name.startswith(".") and any(name.startswith(f".{t}.") and _LEGACY_SUFFIX.match(name[len(t) + 1:])
                                              for t in targets):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > _LEGACY_AGE_S:
                    os.unlink(entry.path)
                    removed.append(name)
        except OSError:
            continue
    return removed


def _check_target(path: Path, overwrite: bool, what: str) -> None:
    folder = path.parent
    try:
        folder_st = os.stat(folder)
    except FileNotFoundError:
        raise Med3DError(f"cannot write {what} {path}: folder {folder} does not exist; create it first") from None
    except OSError as exc:
        raise Med3DError(f"cannot write {what} {path}: folder {folder}: {os_reason(exc)}") from None
    if not stat.S_ISDIR(folder_st.st_mode):
        raise Med3DError(f"cannot write {what} {path}: '{folder}' is {file_kind(folder_st.st_mode)}, not a folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise Med3DError(f"cannot write {what} {path}: {os_reason(exc)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise Med3DError(f"{what} {path} is a symbolic link (to '{os.readlink(path)}'); Med3D neither writes "
                         "through links nor replaces them: give the real path, or remove the link")
    if not stat.S_ISREG(st.st_mode):
        raise Med3DError(f"cannot write {what} {path}: it is {file_kind(st.st_mode)}; choose a file name")
    if not overwrite:
        raise Med3DError(f"{what} {path} already exists; choose another name or allow overwriting (--overwrite; overwrite=True from Python)")


def _unwritten(what: str, path: Path, detail: str) -> Med3DError:
    """A write that failed without an error from the writer (SimpleITK on a full disk): say why if we can tell."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except (OSError, AttributeError):
        full = False
    reason = "No space left on device: free some space or write elsewhere" if full else \
        "check free disk space and permissions"
    return Med3DError(f"cannot save {what} {path}: {detail}; {reason} (nothing was replaced)")


def check_writable(folder: Path, what: str) -> None:
    """Refuse early (before long work) a folder the process may not write to, e.g. a read-only mount."""
    if not os.access(folder, os.W_OK | os.X_OK):
        reason = "Read-only file system" if _read_only_fs(folder) else "Permission denied"
        raise Med3DError(f"cannot write {what} into folder {folder}: {reason}; choose a folder you may write to")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # folders cannot be opened for fsync on every platform
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


class _Staged:
    def __init__(self, path: Path, staging: Path, what: str) -> None:
        self.path, self.staging, self.what = path, staging, what
        self.names: List[str] = []


class Outputs:
    """Output files written together: staged and verified one by one, published together at the end.

    Use as a context manager: leaving the block normally publishes every staged file, an exception (Ctrl-C
    included) publishes nothing and removes the staging folders::

        with Outputs(overwrite=args.overwrite) as out:
            out.check(label_path, what="label map")          # early, before the long work
            ...
            out.stage(label_path, lambda p: write(p), verify=lambda p: check(p))
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = bool(overwrite)
        self._staged: List[_Staged] = []
        self.published: List[Path] = []

    def check(self, path: PathLike, companions: Sequence[str] = (), what: str = "output") -> Path:
        """Refuse now what :meth:`stage` would refuse later (folder, links, special files, existing files)."""
        path = Path(path)
        for target in [path] + [path.parent / c for c in companions]:
            _check_target(target, self.overwrite, what if target == path else f"{what} data file")
        return path

    def stage(self, path: PathLike, write: Callable[[Path], None], *, companions: Sequence[str] = (),
              verify: Optional[Callable[[Path], None]] = None, what: str = "output") -> Path:
        """Write ``path`` (and the ``companions`` the writer makes next to it) into a staging folder, flush and
        verify; :meth:`publish` moves them into place. ``write(staged_path)`` must write exactly there."""
        path = self.check(path, companions, what)
        folder = path.parent
        clean_stale(folder, [path.name] + list(companions))
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_HOST}-{os.getpid()}-", suffix=".tmp",
                                            dir=str(folder)))
        except OSError as exc:
            raise Med3DError(f"cannot write {what} {path}: {os_reason(exc)} in folder {folder}; choose a folder "
                             "you may write to") from None
        item = _Staged(path, staging, what)
        self._staged.append(item)
        staged = staging / path.name
        try:
            write(staged)
            item.names = sorted(os.listdir(staging))
            for name in item.names:
                _fsync_path(staging / name)
        except Med3DError:
            raise
        except (OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK, torch's C++ writers
            raise Med3DError(f"cannot save {what} {path}: {os_reason(exc)}; check free disk space and permissions "
                             "(nothing was replaced)") from None
        expected = sorted({path.name, *companions})
        if item.names != expected:
            missing = sorted(set(expected) - set(item.names))
            raise _unwritten(what, path, f"the writer did not produce {', '.join(missing) or 'the expected files'}")
        for name in item.names:
            st = os.lstat(staging / name)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                raise _unwritten(what, path.parent / name, "the written file is empty")
        if verify is not None:
            try:
                verify(staged)
            except Exception as exc:  # what was written does not read back: the write did not succeed
                detail = str(exc) if isinstance(exc, Med3DError) else os_reason(exc)
                raise _unwritten(what, path, f"what was written does not read back ({detail})") from None
        return staged

    def publish(self) -> List[Path]:
        """Move every staged file into place (data files before headers); returns the paths written."""
        linked: List[Tuple[Path, Path]] = []
        folders = set()
        try:
            for item in self._staged:
                order = [n for n in item.names if n != item.path.name] + [item.path.name]
                for name in order:
                    final, staged = item.path.parent / name, item.staging / name
                    self._place(staged, final, item.what, linked)
                folders.add(item.path.parent)
                self.published.append(item.path)
        except BaseException:
            for staged, final in linked:  # undo only names this call created (same inode as ours)
                try:
                    if os.path.samestat(os.lstat(final), os.lstat(staged)):
                        os.unlink(final)
                except OSError:
                    pass
            raise
        for folder in folders:
            _fsync_path(folder, directory=True)
        return list(self.published)

    def _place(self, staged: Path, final: Path, what: str, linked: List[Tuple[Path, Path]]) -> None:
        if self.overwrite:
            _check_target(final, True, what)  # a link or folder that appeared meanwhile is not replaced either
            try:
                os.replace(staged, final)
            except OSError as exc:
                raise Med3DError(f"cannot write {what} '{final}': {os_reason(exc)}") from None
            return
        try:
            os.link(staged, final)  # fails if the name exists: no check-then-write race
            linked.append((staged, final))
            return
        except FileExistsError:
            raise Med3DError(f"{what} '{final}' appeared while Med3D was writing it (another run?); it was left "
                             "as it is: choose another name or allow overwriting (--overwrite; overwrite=True from Python)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise Med3DError(f"cannot write {what} '{final}': {os_reason(exc)}") from None
        # No hard links here (FAT, some network shares): claim the name exclusively, then rename over the claim.
        try:
            fd = os.open(str(final), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise Med3DError(f"{what} '{final}' appeared while Med3D was writing it (another run?); it was left "
                             "as it is: choose another name or allow overwriting (--overwrite; overwrite=True from Python)") from None
        except OSError as exc:
            raise Med3DError(f"cannot write {what} '{final}': {os_reason(exc)}") from None
        os.close(fd)
        os.replace(staged, final)

    def discard(self) -> None:
        """Remove the staging folders (published files are already elsewhere)."""
        for item in self._staged:
            shutil.rmtree(item.staging, ignore_errors=True)
        self._staged = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.publish()
        finally:
            self.discard()


def write_atomically(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                     companions: Sequence[str] = (), verify: Optional[Callable[[Path], None]] = None,
                     what: str = "output") -> Path:
    """Write one output through :class:`Outputs` (staged, verified, published); returns ``path``."""
    with Outputs(overwrite) as out:
        out.stage(path, write, companions=companions, verify=verify, what=what)
    return Path(path)


def write_text(path: PathLike, text: str, *, overwrite: bool = False, what: str = "file") -> Path:
    """Write a small text file (a JSON or CSV report, a config) through the one write path."""
    data = text.encode("utf-8")

    def write(staged: Path) -> None:
        with open(staged, "wb") as stream:
            stream.write(data)

    def verify(staged: Path) -> None:
        if staged.read_bytes() != data:
            raise Med3DError("the file read back differs")
    return write_atomically(path, write, overwrite=overwrite, verify=verify, what=what)
