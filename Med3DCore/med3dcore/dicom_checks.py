"""Checks of DICOM files that GDCM (through SimpleITK) lets pass silently.

- Pixel data shorter than rows x columns x bytes x samples x frames: GDCM returns the image anyway, the missing
  voxels uninitialised memory.
- An ImageOrientationPatient of zero vectors, or with parallel row and column directions: ITK falls back to the
  identity direction, so the volume lands in the wrong orientation without a word.

:func:`check_series_files` walks each file's data elements (little or big endian, explicit or implicit VR,
sequences of defined or undefined length) up to the pixel data, reading only element headers and the few values
it needs. Files it cannot walk (deflated data sets, odd encodings) are left to GDCM.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Dict, Optional, Sequence, Tuple

from .errors import Med3DError

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_NATIVE = {"1.2.840.10008.1.2": (False, True), "1.2.840.10008.1.2.1": (True, True),
           "1.2.840.10008.1.2.2": (True, False)}  # transfer syntax -> (explicit VR, little endian)
_PIXEL_DATA = (0x7FE0, 0x0010)
_WANTED = {(0x0002, 0x0010): "syntax", (0x0028, 0x0010): "rows", (0x0028, 0x0011): "columns",
           (0x0028, 0x0100): "bits", (0x0028, 0x0002): "samples", (0x0028, 0x0008): "frames",
           (0x0020, 0x0037): "orientation"}


class _Unwalkable(Exception):
    pass


def _walk(stream: BinaryIO, explicit: bool, little: bool, found: Dict[str, object], depth: int,
          end: Optional[int] = None, meta: bool = False) -> None:
    """Read elements until ``end``, a delimiter (inside sequences), the pixel data (top level) or the end of the
    meta group (``meta``). Values of the ``_WANTED`` tags at the top level go into ``found``."""
    order = "<" if little else ">"
    if depth > 32:
        raise _Unwalkable("sequences nested too deep")
    while end is None or stream.tell() < end:
        start = stream.tell()
        head = stream.read(8)
        if len(head) < 8:
            return
        group, element = struct.unpack(order + "HH", head[:4])
        if meta and group != 0x0002:
            stream.seek(start)
            return
        if group == 0xFFFE:  # items and delimiters carry no VR
            length = struct.unpack(order + "I", head[4:])[0]
            if element in (0xE00D, 0xE0DD):
                return
            if length == _UNDEFINED:
                _walk(stream, explicit, little, found, depth + 1)
            else:
                stream.seek(length, os.SEEK_CUR)
            continue
        vr = head[4:6] if explicit else None
        if explicit and vr in _LONG_VRS:
            extra = stream.read(4)
            if len(extra) < 4:
                return
            length = struct.unpack(order + "I", extra)[0]
        elif explicit:
            if not vr.isalpha():
                raise _Unwalkable("not an explicit-VR element")
            length = struct.unpack(order + "H", head[6:8])[0]
        else:
            length = struct.unpack(order + "I", head[4:8])[0]
        tag = (group, element)
        if tag == _PIXEL_DATA and depth == 0:
            found["pixel"] = (stream.tell(), length)
            return
        if length == _UNDEFINED:  # a sequence (or UN with undefined length: implicit VR inside)
            _walk(stream, explicit and vr != b"UN", little, found, depth + 1)
            continue
        if depth == 0 and tag in _WANTED and length <= 1024:
            value = stream.read(length)
            if len(value) == 2 and tag[0] == 0x0028 and tag[1] != 0x0008:
                found[_WANTED[tag]] = struct.unpack(order + "H", value)[0]
            else:
                found[_WANTED[tag]] = value.decode("ascii", "replace").strip("\x00 ")
        else:
            stream.seek(length, os.SEEK_CUR)


def _scan(path: Path) -> Optional[Dict[str, object]]:
    """The wanted values and the pixel data (offset, length) of one file, or None when it cannot be walked."""
    found: Dict[str, object] = {}
    try:
        with open(path, "rb") as stream:
            preamble = stream.read(132)
            if preamble[128:132] == b"DICM":
                _walk(stream, True, True, found, 0, meta=True)
                syntax = str(found.get("syntax", "1.2.840.10008.1.2.1"))
                if syntax not in _NATIVE and not syntax.startswith("1.2.840.10008.1.2.4") and \
                        not syntax.startswith("1.2.840.10008.1.2.5"):
                    return None  # deflated or unknown: not walkable here
                explicit, little = _NATIVE.get(syntax, (True, True))
            else:
                stream.seek(0)
                explicit, little = False, True
            _walk(stream, explicit, little, found, 0)
    except (_Unwalkable, OSError, struct.error, ValueError):
        return None
    return found


def _orientation(text: object) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    try:
        values = [float(v) for v in str(text).split("\\")]
    except ValueError:
        return None
    if len(values) != 6:
        return None
    return tuple(values[:3]), tuple(values[3:])


def check_series_files(files: Sequence[str], folder: Path) -> None:
    """Refuse a series with short pixel data or a degenerate ImageOrientationPatient (one line each)."""
    for name in files:
        path = Path(name)
        info = _scan(path)
        if info is None:
            continue
        where = f"DICOM file '{path.name}' in '{folder}'"
        orientation = _orientation(info["orientation"]) if "orientation" in info else None
        if orientation is not None:
            row, column = orientation
            norms = [math.sqrt(sum(v * v for v in axis)) for axis in (row, column)]
            if min(norms) < 0.5 or not all(math.isfinite(n) for n in norms):
                raise Med3DError(f"{where} has ImageOrientationPatient {info['orientation']!r}, which holds a zero "
                                 "direction: the slices' orientation is unknown; fix the series' headers (a DICOM "
                                 "tool, or the scanner's export) before using it")
            dot = sum(a * b for a, b in zip(row, column)) / (norms[0] * norms[1])
            if abs(dot) > 0.1:
                raise Med3DError(f"{where} has ImageOrientationPatient {info['orientation']!r}, whose row and column "
                                 "directions are parallel or far from perpendicular: the slices' orientation is "
                                 "unknown; fix the series' headers before using it")
        pixel = info.get("pixel")
        if not isinstance(pixel, tuple) or pixel[1] == _UNDEFINED:
            continue  # no pixel data found, or compressed (encapsulated) pixel data: GDCM decodes and checks it
        try:
            rows, columns = int(info["rows"]), int(info["columns"])  # type: ignore[call-overload]
            bits, samples = int(info.get("bits", 16)), int(info.get("samples", 1))  # type: ignore[call-overload]
            frames = int(float(str(info.get("frames", "1")) or 1))
        except (KeyError, ValueError, TypeError):
            continue
        expected = rows * columns * samples * max(frames, 1) * bits // 8
        offset, length = pixel
        available = min(length, max(os.path.getsize(path) - offset, 0))
        if available < expected:
            raise Med3DError(f"{where} holds {available} bytes of pixel data where its header promises {expected} "
                             f"({rows} x {columns} pixels, {bits} bits, {samples} sample(s), {max(frames, 1)} "
                             "frame(s)); the file is truncated or damaged: copy or export the series again")
