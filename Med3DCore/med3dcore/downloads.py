"""Downloading a weights file: explicit, resumable, checked, published through the one write path.

Nothing here runs unless a user asks (``med3d models pull``, the Slicer module's Download button after it asked,
or :func:`download_weights` from Python). The transfer streams into a partial file next to the target,
``.<name>.partial`` (with ``.<name>.partial.json`` naming its URL and the server's validator), so an interrupted
download resumes with an HTTP ``Range`` request instead of starting again; ``If-Range`` makes a server whose file
changed meanwhile send the whole new file. Proxies come from the environment (``https_proxy``, ``http_proxy``,
``no_proxy``), as urllib reads them. When the bytes are complete they are checked (size, SHA-256, and the
caller's ``verify``, e.g. that the file is the 3D-ResNet it should be) and only then moved into place through
:mod:`med3dcore.safe_io`; a file that fails a check is deleted, never published.

No torch here: the Slicer module and ``med3d --help`` import this without loading PyTorch.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from . import __version__
from .errors import Med3DError
from .safe_io import write_atomically

PathLike = Union[str, "os.PathLike[str]"]
Reporter = Callable[[Dict[str, Any]], None]
_CHUNK = 1 << 20


def sha256_of(path: PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(text: Optional[str]) -> Optional[str]:
    """A checksum as 64 lower-case hexadecimal digits (None stays None); anything else is a Med3DError."""
    if text is None:
        return None
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise Med3DError(f"sha256 {text!r} is not a SHA-256 checksum (64 hexadecimal digits)")
    return value


def partial_path(dest: PathLike) -> Path:
    """Where the bytes of an unfinished download of ``dest`` wait to be resumed."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.partial"


def _meta_path(partial: Path) -> Path:
    return partial.parent / (partial.name + ".json")


def _read_meta(partial: Path) -> Dict[str, Any]:
    try:
        meta = json.loads(_meta_path(partial).read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def discard_partial(dest: PathLike) -> None:
    """Forget an unfinished download of ``dest`` (its bytes and its note)."""
    partial = partial_path(dest)
    for path in (partial, _meta_path(partial)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _opener() -> urllib.request.OpenerDirector:
    # Built per download: the ProxyHandler reads the proxy variables now, not when the module was imported.
    return urllib.request.build_opener()


def _content_range_start(value: Optional[str]) -> Optional[int]:
    found = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(found.group(1)) if found else None


def _open(url: str, offset: int, validator: Optional[str], timeout: float, hint: str) -> Any:
    headers = {"User-Agent": f"med3dcore/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        return _opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            return None  # the partial file does not fit the file there any more: start again
        raise Med3DError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; check the address {hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.timeout) or isinstance(exc, socket.timeout):
            reason = f"no answer within {timeout:g} s"
        raise Med3DError(f"cannot reach {url} ({reason}); check the network connection (and the https_proxy / "
                         f"http_proxy settings) {hint}") from None


def fetch(url: str, dest: PathLike, *, sha256: Optional[str] = None, size: Optional[int] = None,
          reporter: Optional[Reporter] = None, timeout: float = 60.0, resume: bool = True,
          verify: Optional[Callable[[Path], None]] = None, overwrite: bool = False) -> Tuple[Path, str]:
    """Download ``url`` to ``dest`` (see the module docstring); returns (``dest``, its SHA-256).

    ``size`` and ``sha256``, when known, must match (a size the server announces that differs fails before the
    transfer). ``verify(path)`` may raise :class:`Med3DError` to refuse the finished file. ``resume=False`` starts
    over even when a partial download is there. ``dest`` must not exist unless ``overwrite``.
    """
    from .progress import make_event

    dest = Path(dest)
    expected = check_sha256(sha256)
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise Med3DError(f"cannot download {url!r}: give an http(s):// or file:// address")
    if not dest.parent.is_dir():
        raise Med3DError(f"cannot download to {dest}: folder {dest.parent} does not exist; create it first")
    if dest.exists() and not overwrite:
        raise Med3DError(f"{dest} already exists; remove it first to download it again")
    hint = f"or download it by hand and place it at {dest}"
    partial = partial_path(dest)
    meta = _read_meta(partial) if resume else {}
    if not resume or meta.get("url") != url or scheme == "file":
        discard_partial(dest)
    offset = partial.stat().st_size if partial.is_file() else 0
    response = _open(url, offset, meta.get("validator"), timeout, hint)
    if response is None:  # 416: the server's file is shorter than what we hold
        discard_partial(dest)
        offset = 0
        response = _open(url, 0, None, timeout, hint)
    with response:
        status = getattr(response, "status", None) or 200
        if offset and (status != 206 or _content_range_start(response.headers.get("Content-Range")) != offset):
            offset = 0  # the server sent the whole file (no ranges, or the file changed): start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            discard_partial(dest)
            raise Med3DError(f"{url} offers {total} bytes, but {dest.name} has {size}; the server holds another "
                             f"file than expected (moved or changed?); nothing was kept {hint}")
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        with open(_meta_path(partial), "w", encoding="utf-8") as note:
            json.dump({"url": url, "validator": validator, "total": total}, note)
        done = offset
        # read1: what has arrived (up to 1 MiB), so a stall keeps every byte received before it
        read = getattr(response, "read1", response.read)
        with open(partial, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            while True:
                try:
                    chunk = read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    why = f"no data for {timeout:g} s" if isinstance(exc, socket.timeout) else str(exc) or \
                        type(exc).__name__
                    raise Med3DError(f"download of {url} broke off after {done} of {total or '?'} bytes ({why}); "
                                     f"run the same command again to resume {hint}") from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if reporter is not None:
                    reporter(make_event("download", done, total, message=dest.name, unit="B"))
    if total is not None and done != total:
        raise Med3DError(f"download of {url} is incomplete ({done} of {total} bytes); run the same command again "
                         f"to resume {hint}")
    try:
        if size is not None and done != size:
            raise Med3DError(f"download of {url} gave {done} bytes, but {dest.name} has {size}; nothing was kept "
                             f"{hint}")
        got = sha256_of(partial)
        if expected is not None and got != expected:
            raise Med3DError(f"checksum mismatch for {url}: expected sha256 {expected}, got {got}; the download is "
                             f"damaged or the file changed, try again {hint}")
        if verify is not None:
            verify(partial)
        write_atomically(dest, lambda staged: os.replace(partial, staged), overwrite=overwrite, what="download")
    finally:
        discard_partial(dest)  # published, or refused: either way no partial file is left to resume
    return dest, got


def download_weights(url: str, dest: PathLike, sha256: Optional[str] = None,
                     reporter: Optional[Reporter] = None, timeout: float = 60.0, size: Optional[int] = None,
                     resume: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resumable, checked, moved into place when complete); returns ``dest``.

    An existing ``dest`` whose checksum matches ``sha256`` (or any existing ``dest`` when no checksum is given) is
    kept and returned without a download; one that does not match is an error, never silently replaced.
    Progress events have stage ``download`` with ``step``/``total`` in bytes (``unit`` ``"B"``).
    """
    dest = Path(dest)
    expected = check_sha256(sha256)
    if dest.exists():
        if expected is None or sha256_of(dest) == expected:
            return dest
        raise Med3DError(f"{dest} already exists with a different checksum than expected; delete it to download "
                         f"it again")
    return fetch(url, dest, sha256=expected, size=size, reporter=reporter, timeout=timeout, resume=resume)[0]
