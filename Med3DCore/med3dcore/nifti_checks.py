"""Checks of a NIfTI file before ITK reads it. ITK reads a truncated file (missing voxels come back as garbage),
NaN voxels (as 0) and a sheared sform (as a rotation) without a word; each is refused here with one clear line.
The NIfTI counterpart of :mod:`med3dcore.headers` (NRRD/MetaImage) and :mod:`med3dcore.dicom_checks`.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Tuple

import nibabel as nib
import numpy as np

from . import limits
from .errors import Med3DError
from .volume import check_orthonormal


def check_nifti_complete(path: Path) -> None:
    """ITK reads a truncated NIfTI without complaint (missing voxels come back as garbage): compare the data the
    header promises with what the file holds, decompressing .nii.gz as a stream."""
    try:
        image = nib.load(str(path))
        # dataobj.offset is where the voxels start (a zero vox_offset in the header means "right after it").
        needed = int(image.dataobj.offset) + int(np.prod(image.header.get_data_shape())) * \
            image.header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises several types for damaged headers
        raise Med3DError(f"cannot read '{path}' as NIfTI: the file is damaged, truncated or not a NIfTI image "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    limits.voxels(image.header.get_data_shape()[::-1], f"'{path}'")
    _check_nifti_sform(image.header)
    if path.name.lower().endswith(".gz") and needed > limits.GZIP_MAX_RATIO * max(path.stat().st_size, 1):
        raise Med3DError(f"'{path}' cannot hold what its header promises ({needed} bytes from "
                         f"{path.stat().st_size} compressed bytes); the file is damaged or not a real scan")
    if path.name.lower().endswith(".gz") and _gzip_trailer_size(path) == needed % (1 << 32):
        return  # the trailer of a complete gzip file records its size; a cut file ends in arbitrary bytes
    if path.name.lower().endswith(".gz"):
        # Slow path, also right for multi-member gzip files: inflate as a stream and count.
        available, complete = _gzip_stream_size(path)
    else:
        available, complete = path.stat().st_size, True
    if not complete or available < needed:
        raise Med3DError(f"'{path}' is truncated or damaged (the NIfTI header promises {needed} bytes, the file "
                         f"holds {available}{'' if complete else ' and its compressed stream ends early'}); "
                         "copy or export the file again")


def check_nifti_finite(path: Path) -> None:
    """ITK reads NaN voxels of a NIfTI file as 0 without a word, which turns a broken scan into a plausible one;
    read the stored values of a float file once, as a stream in 16 MiB pieces, and refuse non-finite ones."""
    image = nib.load(str(path))
    dtype = image.header.get_data_dtype()
    if dtype.kind != "f":
        return
    remaining = int(np.prod(image.header.get_data_shape())) * dtype.itemsize
    try:
        with nib.openers.ImageOpener(str(path)) as stream:
            stream.seek(int(image.dataobj.offset))
            while remaining > 0:
                piece = stream.read(min(remaining, 1 << 24))
                if not piece:
                    break
                piece = piece[: len(piece) - len(piece) % dtype.itemsize]
                if not np.isfinite(np.frombuffer(piece, dtype=dtype)).all():
                    raise Med3DError(f"'{path}' holds NaN or infinite voxels (nothing computed from them would mean "
                                     "anything); fix or re-export the scan")
                remaining -= len(piece)
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise Med3DError(f"cannot read '{path}' as NIfTI: the file is damaged or truncated ({exc})") from None


def _check_nifti_sform(header) -> None:
    """A sheared sform: ITK would quietly take the (rotation-only) qform or an orthogonalised matrix instead, which
    turns the anatomy; refuse it like any other non-rectilinear grid."""
    sform, code = header.get_sform(coded=True)
    if sform is None or not code:
        return
    matrix = np.asarray(sform, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or norms.min() <= 0:
        raise Med3DError("the NIfTI header's sform matrix is singular or not finite; fix the file's header")
    check_orthonormal(matrix / norms)


def _gzip_stream_size(path: Path) -> Tuple[int, bool]:
    """Uncompressed size of a gzip file (all members) and whether its last member ends properly."""
    available, inflater, pending, complete = 0, zlib.decompressobj(wbits=31), b"", False
    with open(path, "rb") as stream:
        while True:
            pending = pending or stream.read(1 << 20)
            if not pending:
                return available, complete
            try:  # at most 16 MiB out at a time: a label map can compress a thousandfold
                available += len(inflater.decompress(pending, 1 << 24))
            except zlib.error:
                return available, False
            pending, complete = inflater.unconsumed_tail, inflater.eof
            if inflater.eof:  # the next member, if any, starts in unused_data
                pending, inflater = inflater.unused_data, zlib.decompressobj(wbits=31)


def _gzip_trailer_size(path: Path) -> int:
    """The last four bytes of a gzip file: the uncompressed size modulo 2**32."""
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        if stream.tell() < 18:
            return -1
        stream.seek(-4, os.SEEK_END)
        return int.from_bytes(stream.read(4), "little")
