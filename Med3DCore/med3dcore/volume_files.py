"""Reading and writing volume files: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM
series folders, all through SimpleITK, to and from :class:`med3dcore.volume.Volume`.

Inputs are looked at with ``os.stat`` before a reader opens them; NIfTI files are checked by
:mod:`med3dcore.nifti_checks`, NRRD/MetaImage headers by :mod:`med3dcore.headers`, DICOM series by
:mod:`med3dcore.dicom_checks`. Every write goes through the one write path (:mod:`med3dcore.safe_io`).
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .dicom_checks import check_series_files
from .errors import Med3DError
from .headers import check_header
from .nifti_checks import check_nifti_complete, check_nifti_finite
from .safe_io import Outputs, file_kind, input_stat, os_reason
from .volume import Geometry, Volume, check_scalar_3d

PathLike = Union[str, "os.PathLike[str]"]

# Suffix -> format name; a folder is read as a DICOM series.
FILE_FORMATS = {
    ".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
}
# Formats whose voxels live in a separate file next to the header, and the data file SimpleITK writes for them
# (compressed, uncompressed).
_DETACHED_SUFFIXES = {".nhdr": (".raw.gz", ".raw"), ".mhd": (".zraw", ".raw")}
_ANALYZE_STEMS = (".hdr", ".img", ".hdr.gz", ".img.gz")  # NIfTI's two-file (Analyze) names
_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


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
            check_nifti_complete(path)
            check_nifti_finite(path)
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
    check_scalar_3d(image, f"'{path}'")
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
    check_scalar_3d(reader, f"'{path}'")
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
    stem = path.name[: -len(suffix)]
    # ITK's NIfTI writer strips these inner extensions and writes another file ('a.nii.gz.nii.gz' -> 'a.nii.gz')
    inner = [e for e in (".nii", ".nii.gz") + _ANALYZE_STEMS if stem.lower().endswith(e)]
    if FILE_FORMATS[suffix] == "NIfTI" and inner:
        plain = stem[: -len(max(inner, key=len))] or "labels"
        raise Med3DError(f"cannot write '{path.name}': the NIfTI writer would store it under another name; "
                         f"drop the repeated extension (e.g. '{plain}{suffix}')")
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
