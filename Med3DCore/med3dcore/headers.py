"""The reader policy for NRRD and MetaImage headers: what a header may make Med3D read.

A ``.nhdr``/``.mhd`` header (and, by the formats' rules, a ``.nrrd``/``.mha`` too) can name its voxel data in
other files: ``data file: x.raw.gz`` / ``ElementDataFile = x.zraw``, a ``LIST`` of files, or a numbered pattern.
A header from a stranger could name ``/etc/shadow``, ``../../secret``, ``/dev/urandom`` or a FIFO, and ITK would
read it as voxels (or block forever). :func:`check_header` reads the header text (bounded) before ITK sees the
file and refuses, with one line:

- a data file given as an absolute path or with a ``..`` component, or one that resolves (through symbolic
  links) outside the header's own folder;
- a data file that is missing, a folder, a FIFO, a device or a socket;
- a header whose sizes declare more voxels than :data:`~med3dcore.limits.MAX_VOXELS`, or more data than its
  uncompressed data files hold (ITK would allocate it all before finding out).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import limits
from .errors import Med3DError
from .safe_io import file_kind

MAX_HEADER_BYTES = 1 << 20
MAX_DATA_FILES = 100_000
_NRRD_TYPES = {  # NRRD type names -> bytes per value
    "char": 1, "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2, "ushort": 2,
    "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2, "int": 4, "signed int": 4,
    "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4, "longlong": 8,
    "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8, "int64": 8,
    "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8, "uint64": 8,
    "uint64_t": 8, "float": 4, "double": 8}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _read_head(path: Path) -> Tuple[str, bool]:
    """The header text (up to the blank line ending an attached NRRD header) and whether the file ended."""
    with open(path, "rb") as stream:
        data = stream.read(MAX_HEADER_BYTES + 1)
    complete = len(data) <= MAX_HEADER_BYTES
    text = data.decode("latin-1")
    return text, complete


def _nrrd_fields(text: str) -> Tuple[Dict[str, str], List[str]]:
    """NRRD fields (lower-case keys) and, after a ``data file: LIST`` line, the listed file names."""
    fields: Dict[str, str] = {}
    lines = text.replace("\r\n", "\n").split("\n")
    listed: List[str] = []
    for index, line in enumerate(lines[1:], start=1):
        if line == "":
            break  # end of the header: binary data of an attached file follows
        if line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        key = key.strip().lower()
        fields[key] = value.strip()
        if key in ("data file", "datafile") and value.strip().split(" ")[0] == "LIST":
            listed = [name for name in lines[index + 1:] if name.strip()]
            break
    return fields, listed


def _met_fields(text: str) -> Tuple[Dict[str, str], List[str]]:
    fields: Dict[str, str] = {}
    lines = text.replace("\r\n", "\n").split("\n")
    listed: List[str] = []
    for index, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lower()
        fields[key] = value.strip()
        if key == "elementdatafile":  # always the last field; data (or a LIST of names) follows
            if value.strip().split(" ")[0] == "LIST":
                listed = [name.strip() for name in lines[index + 1:] if name.strip()]
            break
    return fields, listed


def _pattern_files(value: str, where: str) -> Optional[List[str]]:
    """``name%03d.raw 1 50 1`` -> the names it stands for (None when ``value`` is not a pattern)."""
    parts = value.split()
    if len(parts) < 4 or "%" not in parts[0]:
        return None
    try:
        first, last, step = (int(p) for p in parts[1:4])
    except ValueError:
        return None
    if step == 0 or (last - first) // step + 1 > MAX_DATA_FILES:
        raise Med3DError(f"{where} names data files by a pattern with a step of 0 or over {MAX_DATA_FILES} files; "
                         "the header is damaged or not meant for Med3D")
    try:
        return [parts[0] % n for n in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise Med3DError(f"{where} names data files by an unreadable pattern {parts[0]!r}") from None


def _data_files(path: Path, fmt: str) -> Tuple[List[str], Dict[str, str]]:
    """The data files a header names (empty when the voxels are in the header's own file), and its fields."""
    text, complete = _read_head(path)
    if fmt == "NRRD":
        if not text.startswith("NRRD"):
            return [], {}
        fields, listed = _nrrd_fields(text)
        value = fields.get("data file", fields.get("datafile"))
    else:
        fields, listed = _met_fields(text)
        value = fields.get("elementdatafile")
        if value is not None and value.upper() == "LOCAL":
            value = None
    if value is None:
        return [], fields
    where = f"'{path}'"
    if value.split(" ")[0] == "LIST":
        if not complete and len(listed) >= MAX_DATA_FILES:
            raise Med3DError(f"{where} lists more than {MAX_DATA_FILES} data files; the header is damaged")
        return listed, fields
    pattern = _pattern_files(value, where)
    if pattern is not None:
        return pattern, fields
    return [value], fields


def _check_data_file(header: Path, name: str) -> Path:
    """One data file named by ``header``: inside the header's folder, an existing regular file."""
    where = f"'{header}' names data file '{name}'"
    parts = re.split(r"[\\/]+", name)
    if os.path.isabs(name) or name.startswith(("\\", "/")) or re.match(r"^[A-Za-z]:", name):
        raise Med3DError(f"{where} by an absolute path; Med3D reads only data files in the header's own folder "
                         "(a scan from elsewhere must not make it read other files): move the data file next to "
                         "the header and name it there")
    if ".." in parts:
        raise Med3DError(f"{where}, which lies outside the header's folder ('..'); Med3D reads only data files in "
                         "the header's own folder: move the data file next to the header")
    folder = header.parent
    candidate = folder.joinpath(*[p for p in parts if p not in ("", ".")])
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real, real_folder]) != real_folder:
        raise Med3DError(f"{where}, a symbolic link that leads outside the header's folder (to '{real}'); Med3D "
                         "reads only data files in the header's own folder: copy the data file there")
    try:
        st = os.stat(candidate)
    except FileNotFoundError:
        raise Med3DError(f"{where}, which does not exist; copy the data file next to the header") from None
    except OSError as exc:
        raise Med3DError(f"{where}, which cannot be looked at ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Med3DError(f"{where}, which is {file_kind(st.st_mode)}, not a regular file; Med3D reads voxels only "
                         "from regular files")
    return candidate


def _payload(fields: Dict[str, str], fmt: str) -> Tuple[Optional[List[int]], int, str]:
    """(sizes, bytes per voxel, encoding) from the header fields; sizes None when unreadable (ITK decides)."""
    try:
        if fmt == "NRRD":
            sizes = [int(v) for v in fields.get("sizes", "").split()]
            width = _NRRD_TYPES.get(fields.get("type", "").lower(), 0)
            encoding = fields.get("encoding", "raw").lower()
            encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "text", "ascii": "text"}.get(encoding, encoding)
        else:
            sizes = [int(v) for v in fields.get("dimsize", "").split()]
            width = _MET_TYPES.get(fields.get("elementtype", "").upper(), 0)
            width *= int(fields.get("elementnumberofchannels", "1") or 1)
            compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
            encoding = "gzip" if compressed else "raw"
    except ValueError:
        return None, 0, ""
    return (sizes or None), width, encoding


def check_header(path: Path, fmt: str) -> None:
    """Apply the reader policy to an NRRD (``fmt="NRRD"``) or MetaImage (``"MetaImage"``) file before ITK reads
    it; raises :class:`Med3DError` with one line."""
    names, fields = _data_files(path, fmt)
    files = [_check_data_file(path, name) for name in names]
    sizes, width, encoding = _payload(fields, fmt)
    if not sizes:
        return
    count = limits.voxels(sizes[::-1], f"'{path}'")
    needed = count * width
    if not width:
        return
    held = sum(os.path.getsize(f) for f in files) if files else os.path.getsize(path)
    if encoding == "raw" and held < needed and files:
        raise Med3DError(f"'{path}' is truncated or damaged (its header promises {needed} bytes of voxels, its data "
                         f"file{'s hold' if len(files) > 1 else ' holds'} {held}); copy or export the scan again")
    if encoding == "gzip" and needed > limits.GZIP_MAX_RATIO * max(held, 1):
        raise Med3DError(f"'{path}' cannot hold what its header promises ({needed} bytes of voxels from {held} "
                         "compressed bytes); the file is damaged or not a real scan")
