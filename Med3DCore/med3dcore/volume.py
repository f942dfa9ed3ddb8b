"""A 3D image with its physical geometry, file reading and writing, and exact reorientation.

Conventions (see DESIGN.md): ``array`` is (K, J, I) = (slice, row, column), as SimpleITK's ``GetArrayFromImage``
gives it; ``spacing`` and ``origin`` are in (I, J, K) order, ITK's LPS world (mm); ``direction[:, c]`` is the LPS
direction of image axis c. Files: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM
series folders, all through SimpleITK.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from . import limits
from .dicom_checks import check_series_files
from .errors import Med3DError
from .headers import check_header
from .safe_io import Outputs, file_kind, input_stat, os_reason

PathLike = Union[str, "os.PathLike[str]"]

# Suffix -> format name; a folder is read as a DICOM series.
FILE_FORMATS = {
    ".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
}
# Formats whose voxels live in a separate file next to the header, and the data file SimpleITK writes for them
# (compressed, uncompressed).
_DETACHED_SUFFIXES = {".nhdr": (".raw.gz", ".raw"), ".mhd": (".zraw", ".raw")}
_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"

# Integer dtypes Slicer accepts (updateVolumeFromArray rejects int64), smallest first.
_LABEL_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32)


def _vector3(value, name: str) -> Tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise Med3DError(f"volume {name} must be three numbers (I, J, K), got {value!r}") from None
    if len(out) != 3 or not all(np.isfinite(out)):
        raise Med3DError(f"volume {name} must be three finite numbers (I, J, K), got {value!r}")
    return out  # type: ignore[return-value]


# Direction cosines from DICOM carry about six decimals; a sheared grid is off by far more.
_ORTHONORMAL_TOLERANCE = 1e-3


def _check_orthonormal(direction: np.ndarray) -> None:
    """Refuse a sheared or scaled direction matrix: every step of Med3D (reorientation, resampling, the way back
    to the input's grid) assumes a rotation, and coercing a shear to one puts the anatomy elsewhere."""
    error = np.abs(direction.T @ direction - np.eye(3)).max()
    if error > _ORTHONORMAL_TOLERANCE:
        cosines = np.clip(np.abs(direction.T @ direction)[np.triu_indices(3, 1)], 0.0, 1.0)
        worst = 90.0 - float(np.degrees(np.arccos(cosines.max())))
        raise Med3DError(f"the volume's axes are not perpendicular (sheared by {worst:.1f} degrees) or not of unit "
                         "length; Med3D needs a rectilinear grid and will not guess one: resample the scan onto a "
                         "regular grid first (e.g. Slicer's Resample Scalar Volume)")


@dataclass(eq=False)  # compare grids with same_as(atol): == on arrays is ambiguous
class Geometry:
    """The voxel grid of a volume without its voxels: shape (K, J, I), spacing, origin, direction (LPS)."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3:
            raise Med3DError(f"a volume grid needs three sizes (K, J, I), got {self.shape}")
        self.spacing = _vector3(self.spacing, "spacing")
        if min(self.spacing) <= 0:
            raise Med3DError(f"volume spacing must be positive, got {self.spacing}; fix the file's header")
        self.origin = _vector3(self.origin, "origin")
        direction = np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise Med3DError(f"volume direction must be a 3x3 matrix, got shape {direction.shape}")
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise Med3DError("volume direction matrix is singular or not finite; fix the file's header")
        _check_orthonormal(direction)
        self.direction = direction

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking a homogeneous voxel index (I, J, K, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def lps_to_ijk(self, points) -> np.ndarray:
        """Continuous voxel indices (I, J, K) of LPS points, shape (N, 3) or (3,)."""
        pts = np.asarray(points, dtype=np.float64)
        scaled = self.direction * np.asarray(self.spacing)[None, :]
        return np.linalg.solve(scaled, (pts - np.asarray(self.origin)).T).T

    def same_as(self, other: "Geometry", atol: float = 1e-4) -> bool:
        """True when both grids have the same shape and, within ``atol`` (mm, or unitless for directions), the
        same spacing, origin and direction."""
        return (tuple(self.shape) == tuple(other.shape)
                and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
                and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
                and np.allclose(self.direction, other.direction, rtol=0, atol=atol))

    def describe(self) -> str:
        """A short human-readable line, for error messages."""
        size = "x".join(str(s) for s in self.shape[::-1])
        spacing = "x".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"size {size} (I x J x K), spacing {spacing} mm, origin ({origin})"


@dataclass(eq=False)  # compare with same_geometry() and np.array_equal()
class Volume:
    """A 3D image: ``array`` (K, J, I) plus its LPS geometry; spacing/origin are (I, J, K)."""

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise Med3DError(
                f"Med3D works on 3D volumes, got a {self.array.ndim}D array of shape {self.array.shape}; "
                "give a single 3D image (split 4D series into 3D volumes, stack 2D slices into a series)")
        geometry = Geometry(self.array.shape, self.spacing, self.origin, self.direction)  # validates
        self.spacing, self.origin, self.direction = geometry.spacing, geometry.origin, geometry.direction

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (K, J, I)."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def geometry(self) -> Geometry:
        """The voxel grid (shape, spacing, origin, direction)."""
        return Geometry(self.array.shape, self.spacing, self.origin, self.direction)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking a homogeneous voxel index (I, J, K, 1) to LPS mm."""
        return self.geometry.ijk_to_lps()

    def lps_to_ijk(self, points) -> np.ndarray:
        """Continuous voxel indices (I, J, K) of LPS points, shape (N, 3) or (3,)."""
        return self.geometry.lps_to_ijk(points)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume with the same geometry and new voxels of the same shape."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise Med3DError(f"new voxel array has shape {array.shape}, the volume has {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def same_geometry(self, other: Union["Volume", Geometry], atol: float = 1e-4) -> bool:
        """True when ``other`` lies on the same voxel grid (see :meth:`Geometry.same_as`)."""
        other_geometry = other.geometry if isinstance(other, Volume) else other
        return self.geometry.same_as(other_geometry, atol)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and geometry (bool becomes uint8, float16 float32)."""
        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))  # row-major, column c = axis c
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        """A volume from a 3D scalar SimpleITK image (voxels copied)."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            _check_scalar_3d(image, "image")  # raises the matching message
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                   np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3))


def _check_scalar_3d(image: Union[sitk.Image, sitk.ImageFileReader], what: str) -> None:
    """Refuse 2D, 4D+, vector and single-slice images (an image or a reader after ReadImageInformation)."""
    dim, shape = image.GetDimension(), image.GetSize()
    size = "x".join(str(s) for s in shape)
    components = (image.GetNumberOfComponents() if isinstance(image, sitk.ImageFileReader)
                  else image.GetNumberOfComponentsPerPixel())
    if dim == 2:
        raise Med3DError(f"{what} is a 2D image (size {size}); Med3D needs a 3D volume "
                         "(a NIfTI/NRRD/MHA volume or a DICOM series folder)")
    if dim != 3:
        raise Med3DError(f"{what} is a {dim}D image (size {size}), e.g. a time series; "
                         "extract one 3D volume first")
    if components != 1:
        raise Med3DError(f"{what} has {components} values per voxel (colour or "
                         "vector image); Med3D needs a scalar (grey-value) 3D volume")
    if min(shape) < 2:
        raise Med3DError(f"{what} is a single slice (size {size}); Med3D needs a 3D volume with at least two "
                         "voxels along every axis")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in FILE_FORMATS:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _dicom_description(filename: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    try:
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            return reader.GetMetaData("0008|103e").strip()
    except RuntimeError:
        pass
    return ""


def _series_ids(folder: Path) -> Tuple[str, ...]:
    # ITK prints a warning to the console when a folder holds no series; an empty answer says it already.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_dicom_series(folder: PathLike) -> List[Tuple[str, str, int]]:
    """The DICOM series in a folder as ``(series_uid, description, number_of_files)``; empty when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Med3DError(f"'{folder}' is not a folder; give the folder that holds the DICOM files")
    _check_folder_entries(folder)
    series = []
    for uid in _series_ids(folder):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        series.append((uid, _dicom_description(files[0]) if files else "", len(files)))
    return series


def _check_folder_entries(folder: Path) -> None:
    """GDCM opens every file of a folder to find the series: a FIFO among them would block it forever, a device
    would be read without end. Refuse such entries (and link loops) before GDCM looks."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise Med3DError(f"cannot list folder '{folder}': {os_reason(exc)}") from None
    for entry in entries:
        mode = input_stat(entry.path, "DICOM folder entry").st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise Med3DError(f"folder '{folder}' holds '{entry.name}', which is {file_kind(mode)}; Med3D reads only "
                             "regular files: remove it from the DICOM folder")


def _read_dicom_folder(folder: Path, series_uid: Optional[str]) -> sitk.Image:
    if not any(folder.iterdir()):
        raise Med3DError(f"folder '{folder}' is empty; give a folder holding one DICOM series, or a volume file")
    series = list_dicom_series(folder)
    if not series:
        raise Med3DError(f"no DICOM series found in folder '{folder}' (subfolders are not searched); give the "
                         f"folder that directly holds the DICOM files, or a volume file: {_SUPPORTED}")
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid or '(no uid)'} '{desc}' ({n} files)" for uid, desc, n in series)
            raise Med3DError(f"folder '{folder}' holds {len(series)} DICOM series; choose one with series_uid "
                             f"(--series-uid): {listing}")
        series_uid = series[0][0]
    elif series_uid not in [uid for uid, _, _ in series]:
        known = ", ".join(uid or "(no uid)" for uid, _, _ in series)
        hint = "; leave out the series UID to read the only one" if len(series) == 1 else ""
        raise Med3DError(f"DICOM series '{series_uid}' is not in folder '{folder}'; series there: {known}{hint}")
    reader = sitk.ImageSeriesReader()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    check_series_files(files, folder)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # slice positions, to check the spacing below
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # uneven slices are reported as an error below
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise Med3DError(f"cannot read DICOM series in '{folder}': {_first_line(exc)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    _check_even_slices(reader, image, folder)
    return image


def _check_even_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """ITK stacks unevenly spaced slices (gaps, variable thickness) with one average spacing, which puts
    anatomy in the wrong place; refuse such a series."""
    positions = []
    for index in range(len(reader.GetFileNames())):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return  # no positions (e.g. a secondary capture): nothing to check against
        try:
            positions.append([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])
        except ValueError:
            return
    if len(positions) < 3:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff(np.sort(np.asarray(positions) @ normal))
    spacing = image.GetSpacing()[2]
    if np.max(np.abs(steps - spacing)) > 0.05 * spacing + 1e-3:
        raise Med3DError(f"DICOM series in '{folder}' has unevenly spaced slices (gaps between {steps.min():.3g} and "
                         f"{steps.max():.3g} mm): missing files, variable slice thickness or several images per "
                         "position (echoes, phases); add the missing files or split/resample the series in a DICOM "
                         "tool first")


def _first_line(exc: Exception) -> str:
    # ITK messages span several lines with source locations and object addresses; keep the description.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Exception thrown in", "Reason:"))]
    text = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-fA-F]+\):)?\s*", "", text)


def _check_nifti_complete(path: Path) -> None:
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


def _check_nifti_finite(path: Path) -> None:
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
    _check_orthonormal(matrix / norms)


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


def _is_dicom_file(path: Path) -> bool:
    # DICOM Part 10 files carry "DICM" after a 128-byte preamble, whatever their name.
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _checked_file(path: Path) -> str:
    """The format suffix of a readable volume file; clear errors for DICOM files and other formats."""
    suffix = _suffix(path)
    if _is_dicom_file(path):
        raise Med3DError(f"'{path.name}' is one DICOM file; give the folder that holds its series ('{path.parent}')")
    if suffix not in FILE_FORMATS:
        raise Med3DError(f"cannot read '{path.name}': '{suffix or 'no extension'}' is not a volume format; "
                         f"give {_SUPPORTED}")
    return suffix


def _unreadable(path: Path, suffix: str, exc: Exception, printed: str = "") -> Med3DError:
    kind = FILE_FORMATS[suffix]
    # MetaIO says why on stderr ("data not read completely ...") and raises a vague "File cannot be read".
    reason = " ".join(line.strip() for line in printed.splitlines() if line.strip())[:200] or _first_line(exc)
    return Med3DError(f"cannot read '{path}' as {kind}: the file is damaged, truncated or not a {kind} image "
                      f"({reason})")


@contextlib.contextmanager
def _library_stderr(collected: List[str]) -> Iterator[None]:
    """Collect what C++ readers (MetaIO) print straight to the process's stderr, so a damaged file gives one clear
    message instead of library chatter around it; the text is appended to ``collected``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr (e.g. a GUI process): nothing to collect
        yield
        return
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                capture.seek(0)
                collected.append(capture.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)


def _snap_direction(direction: np.ndarray) -> np.ndarray:
    # NRRD readers normalise "space directions" vectors, leaving 1e-16 noise on axis-aligned directions;
    # snap it so an axis-aligned grid survives any number of round trips exactly.
    snapped = np.round(direction)
    noise = np.abs(direction - snapped) < 1e-12
    direction[noise] = snapped[noise]
    return direction


def _existing(path: PathLike) -> Path:
    """The input path, looked at with os.stat before anything opens it: a FIFO or a device would block a reader
    or never end, a link loop is not a file."""
    path = Path(path).expanduser()
    mode = input_stat(path, "input").st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise Med3DError(f"'{path}' is {file_kind(mode)}, not a volume file or a DICOM folder; give "
                         f"{_SUPPORTED}")
    return path


def read_volume(path: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read a 3D scalar volume from a NIfTI/NRRD/MetaImage file or a DICOM series folder.

    A folder with several DICOM series is an error that lists them, unless ``series_uid`` picks one.
    """
    path = _existing(path)
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid)
    else:
        suffix = _checked_file(path)
        if FILE_FORMATS[suffix] == "NIfTI":
            _check_nifti_complete(path)
            _check_nifti_finite(path)
        else:
            check_header(path, FILE_FORMATS[suffix])
        printed: List[str] = []
        try:
            with _library_stderr(printed):
                image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise _unreadable(path, suffix, exc, "".join(printed)) from None
        if "".join(printed).strip():  # warnings of a file that was read: still shown
            sys.stderr.write("".join(printed))
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]  # a 4D header around one 3D volume
    _check_scalar_3d(image, f"'{path}'")
    volume = Volume.from_sitk(image)
    _snap_direction(volume.direction)
    return volume


def read_geometry(path: PathLike, series_uid: Optional[str] = None) -> Geometry:
    """The grid of a volume file from its header alone (fast: e.g. for a dataset's median spacing); a DICOM
    folder is read whole."""
    path = _existing(path)
    if path.is_dir():
        return read_volume(path, series_uid).geometry
    suffix = _checked_file(path)
    if FILE_FORMATS[suffix] != "NIfTI":
        check_header(path, FILE_FORMATS[suffix])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, suffix, exc) from None
    dim = reader.GetDimension()
    if dim == 4 and reader.GetSize()[3] == 1:  # a 4D header around one 3D volume
        direction = np.array(reader.GetDirection()).reshape(4, 4)[:3, :3]
        return Geometry(reader.GetSize()[2::-1], reader.GetSpacing()[:3], reader.GetOrigin()[:3],
                        _snap_direction(direction.copy()))
    _check_scalar_3d(reader, f"'{path}'")
    return Geometry(reader.GetSize()[::-1], reader.GetSpacing(), reader.GetOrigin(),
                    _snap_direction(np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)))


def write_volume(volume: Volume, path: PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Write ``volume`` (voxels, dtype and geometry) to a NIfTI/NRRD/MetaImage file; returns the path.

    Written through the one write path (:mod:`med3dcore.safe_io`): staged next to the target, read back and
    compared, then moved into place; an existing file (or the data file of a detached ``.nhdr``/``.mhd``) is
    replaced only with ``overwrite=True``, and a symbolic link is never written through.
    """
    with Outputs(overwrite) as outputs:
        path = stage_volume(outputs, volume, path, compress)
    return path


def volume_outputs(path: PathLike, compress: bool = True) -> Tuple[Path, Tuple[str, ...]]:
    """The checked output path and the names of the data files written next to it (detached formats)."""
    path = Path(path).expanduser()
    suffix = _suffix(path)
    if suffix not in FILE_FORMATS:
        raise Med3DError(f"cannot write '{path.name}': choose a file name ending in "
                         f"{', '.join(FILE_FORMATS)}")
    if suffix in _DETACHED_SUFFIXES:
        data = _DETACHED_SUFFIXES[suffix][0 if compress else 1]
        return path, (path.name[: -len(suffix)] + data,)
    return path, ()


def stage_volume(outputs: Outputs, volume: Volume, path: PathLike, compress: bool = True) -> Path:
    """Stage ``volume`` as ``path`` in ``outputs`` (published with the other outputs of the same run)."""
    path, companions = volume_outputs(path, compress)
    image = volume.to_sitk()

    def write(staged: Path) -> None:
        try:
            sitk.WriteImage(image, str(staged), compress)
        except RuntimeError as exc:
            raise Med3DError(f"cannot write '{path}': {_first_line(exc)}") from None

    def verify(staged: Path) -> None:  # SimpleITK may not report a write that failed on a full disk
        back = sitk.ReadImage(str(staged))
        if not (back.GetSize() == image.GetSize() and back.GetPixelID() == image.GetPixelID() and
                np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))):
            raise Med3DError("the file read back differs from the volume")

    outputs.stage(path, write, companions=companions, verify=verify, what="output")
    return path


# ----------------------------------------------------------------------------------------------------- label maps

def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    """The smallest integer dtype (uint8 ... int32, never int64, which Slicer rejects) that holds the values."""
    if array.size == 0:
        return np.dtype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in _LABEL_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise Med3DError(f"label values {low}..{high} do not fit in 32-bit integers; this is not a label map")


def as_label_map(volume: Volume) -> Volume:
    """The volume with integer labels in the smallest fitting dtype; float masks (e.g. float64 0/1) are accepted
    when every value is a whole non-negative number."""
    array = volume.array
    if array.dtype == np.bool_:
        return volume.with_array(array.astype(np.uint8))
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise Med3DError("label map contains NaN or infinite values; give a mask of whole numbers (0, 1, ...)")
        if not np.array_equal(array, np.round(array)):
            raise Med3DError("label map has fractional values (e.g. probabilities or an image); give a mask of "
                             "whole numbers (0, 1, ...), or threshold it first")
    elif array.dtype.kind not in "iu":
        raise Med3DError(f"label map has voxel type {array.dtype}; give a mask of whole numbers (0, 1, ...)")
    if array.size and array.min() < 0:
        raise Med3DError(f"label map has negative values (minimum {array.min()}); this looks like an image, "
                         "not a mask of labels 0, 1, ...")
    dtype = smallest_label_dtype(array)
    return volume if array.dtype == dtype else volume.with_array(array.astype(dtype))


# ---------------------------------------------------------------------------------------------------- orientation

@dataclass
class Orientation:
    """How :func:`to_canonical` rearranged a volume, and the original grid to restore exactly.

    ``axes[w]`` is the original image axis (0=I, 1=J, 2=K) that became canonical axis ``w``; ``flips[w]`` says
    whether it was reversed. ``original`` is the input's grid, restored bit-for-bit by :func:`from_canonical`.
    """

    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    original: Geometry

    @property
    def is_identity(self) -> bool:
        return tuple(self.axes) == (0, 1, 2) and not any(self.flips)

    @property
    def canonical_shape(self) -> Tuple[int, int, int]:
        """Array shape (K, J, I) after reorientation."""
        ijk = self.original.shape[::-1]
        return tuple(ijk[a] for a in self.axes)[::-1]  # type: ignore[return-value]

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Reorient the last three (K, J, I) axes of ``array`` from the original to the canonical layout."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        # Canonical array axis (2 - w) holds original image axis axes[w], i.e. original array axis 2 - axes[w].
        order = list(range(lead)) + [lead + 2 - self.axes[2 - p] for p in range(3)]
        out = np.transpose(array, order)
        flip_axes = tuple(lead + 2 - w for w in range(3) if self.flips[w])
        if flip_axes:
            out = np.flip(out, flip_axes)
        return np.ascontiguousarray(out)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`forward` on the last three axes of ``array``."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        flip_axes = tuple(lead + 2 - w for w in range(3) if self.flips[w])
        out = np.flip(array, flip_axes) if flip_axes else array
        order = list(range(lead)) + [lead + 2 - self.axes[2 - p] for p in range(3)]
        return np.ascontiguousarray(np.transpose(out, np.argsort(order)))

    def canonical_geometry(self) -> Geometry:
        """The grid of the reoriented volume (same voxel centres in world space, new index order)."""
        g = self.original
        size_ijk = g.shape[::-1]
        corner = [0.0, 0.0, 0.0]  # original index of the canonical voxel (0, 0, 0)
        direction = np.empty((3, 3))
        for w, (axis, flip) in enumerate(zip(self.axes, self.flips)):
            corner[axis] = float(size_ijk[axis] - 1) if flip else 0.0
            direction[:, w] = -g.direction[:, axis] if flip else g.direction[:, axis]
        origin = g.ijk_to_lps() @ np.array(corner + [1.0])
        spacing = tuple(g.spacing[a] for a in self.axes)
        return Geometry(self.canonical_shape, spacing, tuple(origin[:3]), direction)


def orientation_of(geometry: Union[Volume, Geometry]) -> Orientation:
    """The axis permutation and flips that bring a grid closest to the LPS identity direction."""
    g = geometry.geometry if isinstance(geometry, Volume) else geometry
    best_axes, best_score = (0, 1, 2), -1.0
    # Six permutations: pick the one whose axes line up best with L, P, S (robust for oblique scans).
    for perm in itertools.permutations(range(3)):
        score = sum(abs(g.direction[w, perm[w]]) for w in range(3))
        if score > best_score + 1e-9:
            best_axes, best_score = perm, score
    flips = tuple(bool(g.direction[w, best_axes[w]] < 0) for w in range(3))
    return Orientation(tuple(best_axes), flips, g)  # type: ignore[arg-type]


def to_canonical(volume: Volume) -> Tuple[Volume, Orientation]:
    """Permute and flip axes (no interpolation) so the direction is closest to identity (LPS).

    The voxels keep their world positions; :func:`from_canonical` undoes it exactly. A volume that is already
    canonical comes back as the same object (no copy).
    """
    orientation = orientation_of(volume)
    if orientation.is_identity:
        return volume, orientation
    g = orientation.canonical_geometry()
    return Volume(orientation.forward(volume.array), g.spacing, g.origin, g.direction), orientation


def from_canonical(array_or_volume: Union[np.ndarray, Volume], orientation: Orientation) -> Volume:
    """Bring a canonical-layout array (or volume) back to the original grid, geometry restored bit-for-bit."""
    array = array_or_volume.array if isinstance(array_or_volume, Volume) else np.asarray(array_or_volume)
    expected = orientation.canonical_shape
    if array.shape != tuple(expected):
        raise Med3DError(f"array of shape {array.shape} does not match the reoriented volume's shape {expected}")
    g = orientation.original
    return Volume(orientation.inverse(array), g.spacing, g.origin, g.direction.copy())


def canonical_spacing(volume: Union[Volume, Geometry]) -> Tuple[float, float, float]:
    """The spacing (I, J, K) the volume has after :func:`to_canonical` (no voxels touched)."""
    orientation = orientation_of(volume)
    return tuple(orientation.original.spacing[a] for a in orientation.axes)  # type: ignore[return-value]
