"""Segmentation domains, run configs, up-front validation, the preprocessing cache and patch sampling.

A *domain* is a set of image/label pairs with its own label space and modality. Sources (one per domain entry of a
run config; paths are relative to the file that names them, ``${VAR}`` reads the environment):

- ``images`` + ``masks``: two folders whose files are matched by name (``case_0000.nii.gz`` in nnU-Net style
  matches ``case.nii.gz``);
- ``csv``: a CSV file with ``image`` and ``label`` columns;
- ``dataset_json``: an MSD-style ``dataset.json`` (its ``training`` list, ``labels`` and ``modality``);
- ``cases``: an explicit list of ``{"image": ..., "label": ...}`` or ``{"image": ..., "masks": {name: file}}``
  (binary masks merged into one label map: mask ``name`` gets the value that ``labels`` gives that name).

Other keys: ``name``, ``modality`` (``CT``, ``MR``, ...), ``labels`` (value -> name; 0 is background),
``label_map`` (source value -> domain value, other source values become background: e.g. a few TotalSegmentator
classes), ``spacing`` (mm, I J K; default: the domain's median spacing), ``window`` (``[low, high]`` clip, e.g. a CT
window, before the percentile clipping and z-score).

A run config (JSON or YAML) is ``{"name", "domains": [...], "model": {...}, "training": {...}, "env_defaults":
{VAR: value}}``; ``env_defaults`` gives values (paths relative to the config) for variables not set in the
environment.

:func:`validate_domains` reads every pair once and raises one :class:`Med3DError` listing every problem.
:class:`PreparedCases` preprocesses each case as the paper does (canonical orientation, the domain's spacing,
0.5/99.5 percentile clipping, z-score) and keeps the result in a cache of ``.npy`` files (memory-mapped), keyed
by the source files (path, size, modification time) and the preprocessing, so a changed source is redone.
:class:`PatchSampler` draws random patches with a foreground share and picks a domain per step (round-robin or
in proportion to size), with a resumable state; it serves single-domain fine-tuning just as well.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import limits
from .errors import Med3DError
from .safe_io import MAX_TEXT_BYTES, read_text, regular_file, write_atomically
from .preprocess import PreprocessSpec, median_spacing, prepare_label, preprocess_image
from .volume import Volume, canonical_spacing, read_volume

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DOMAIN_SAMPLING = ("round_robin", "proportional")
CACHE_VERSION = 1
GEOMETRY_TOLERANCE = 1e-3  # mm (and direction cosines) between an image and its label map
CONFIG_KEYS = ("name", "domains", "model", "training", "env_defaults")
DOMAIN_KEYS = ("name", "modality", "labels", "label_map", "spacing", "window", "images", "masks", "csv",
               "dataset_json", "cases")


@dataclass
class Case:
    """One image and its label: ``label`` a label-map file, or ``masks`` binary masks by label name."""
    case_id: str
    image: Path
    label: Optional[Path] = None
    masks: Dict[str, Path] = field(default_factory=dict)

    def sources(self) -> List[Path]:
        return [self.image] + ([self.label] if self.label else []) + list(self.masks.values())


@dataclass
class Domain:
    """A segmentation dataset with its own label space (value -> name; 0 is background) and modality."""
    name: str
    modality: str
    label_names: Dict[int, str]
    cases: List[Case]
    label_map: Optional[Dict[int, int]] = None
    spacing: Optional[Tuple[float, float, float]] = None
    window: Optional[Tuple[float, float]] = None

    @property
    def num_classes(self) -> int:
        return max(self.label_names) + 1

    def labels_list(self) -> List[Dict[str, Any]]:
        return [{"value": v, "name": n} for v, n in sorted(self.label_names.items())]


@dataclass
class RunConfig:
    name: str
    path: Path
    domains: List[Domain]
    model: Dict[str, Any]
    training: Dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Describing domains


def _expand(value: str, base: Path, env: Mapping[str, str]) -> Path:
    def sub(match: "re.Match[str]") -> str:
        var = match.group(1)
        if var in os.environ:
            return os.environ[var]
        if var in env:
            return env[var]
        raise Med3DError(f"path {value!r} uses ${{{var}}}, which is not set; export {var}=... or add it to the "
                         "config's env_defaults")
    path = Path(re.sub(r"\$\{(\w+)\}", sub, str(value))).expanduser()
    return path if path.is_absolute() else (base / path)


def _case_key(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_\d{4}$", "", name)  # nnU-Net channel suffix


def _image_files(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise Med3DError(f"folder {folder} does not exist; check the domain's paths")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  (p.is_dir() or any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES)))


def _cases_from_folders(images: Path, masks: Path) -> List[Case]:
    labels = {_case_key(p): p for p in _image_files(masks)}
    cases, unmatched = [], []
    for image in _image_files(images):
        key = _case_key(image)
        if key in labels:
            cases.append(Case(key, image, labels.pop(key)))
        else:
            unmatched.append(image.name)
    if unmatched or labels:
        raise Med3DError(f"images in {images} and labels in {masks} do not match by name: "
                         + "; ".join(filter(None, [f"no label for {', '.join(unmatched)}" if unmatched else "",
                                                   f"no image for {', '.join(sorted(labels))}" if labels else ""]))
                         + "; give every image a label file of the same name")
    return cases


def read_csv_rows(path: Union[str, Path]) -> List[Dict[str, str]]:
    """The rows of a CSV table with a header, as dicts; the one CSV reader of the project."""
    path = Path(path)
    if regular_file(path, "CSV file").st_size > MAX_TEXT_BYTES:
        raise Med3DError(f"CSV file {path} is larger than {MAX_TEXT_BYTES >> 20} MiB; is it the right file?")
    try:  # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise Med3DError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save the table as "
                         "CSV UTF-8") from None


def _cases_from_csv(path: Path, env: Mapping[str, str]) -> List[Case]:
    rows = read_csv_rows(path)
    if not rows or "image" not in rows[0] or not ({"label", "mask"} & set(rows[0])):
        raise Med3DError(f"{path} needs a header with 'image' and 'label' columns and at least one row")
    cases = []
    for line, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        # 'mask' wins over 'label': a classification table (e.g. the LIDC nodules) has both, and there 'label' is
        # the class (benign/malignant), not a label map.
        label = (row.get("mask") or row.get("label") or "").strip()
        if not image or not label:
            raise Med3DError(f"{path}, line {line}: a case needs both an image and a label (or mask) file; fill in "
                             "the row or remove it")
        cases.append(Case((row.get("case_id") or "").strip() or _case_key(Path(image)),
                          _expand(image, path.parent, env), _expand(label, path.parent, env)))
    return cases


def _read_msd(path: Path, env: Mapping[str, str]) -> Tuple[List[Case], Dict[int, str], Optional[str]]:
    text = read_text(path, "dataset.json")  # stat first: /dev/zero or a FIFO is refused, not read forever
    try:
        meta = json.loads(text)
        training = meta["training"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Med3DError(f"{path} is not an MSD-style dataset.json with a 'training' list ({exc})") from None
    if not isinstance(training, list):
        raise Med3DError(f"{path}: 'training' must be a list of {{'image': ..., 'label': ...}} entries")
    cases = []
    for i, item in enumerate(training):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
                not isinstance(item.get("label"), str):
            raise Med3DError(f"{path}: training entry {i} must give 'image' and 'label' file names, got "
                             f"{item!r:.120}")
        cases.append(Case(_case_key(Path(item["image"])), _expand(item["image"], path.parent, env),
                          _expand(item["label"], path.parent, env)))
    try:
        names = {int(k): str(v) for k, v in (meta.get("labels") or {}).items() if int(k) != 0}
        modality = (meta.get("modality") or {}).get("0")
    except (AttributeError, TypeError, ValueError):
        raise Med3DError(f"{path}: 'labels' must map label values to names and 'modality' channel numbers to "
                         "names, as in an MSD dataset.json") from None
    return cases, names, None if modality is None else str(modality)


def domain_from_dict(entry: Mapping[str, Any], base: Path, env: Optional[Mapping[str, str]] = None) -> Domain:
    """One domain from a config entry (see the module docstring); relative paths are relative to ``base``."""
    env = env or {}
    if not isinstance(entry, Mapping):
        raise Med3DError(f"each entry of 'domains' must be a mapping (name, modality, labels, a data source), "
                         f"got {entry!r}")
    name = str(entry.get("name") or "")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise Med3DError(f"every domain needs a 'name' of letters, digits, '_' or '-' (it names the domain's "
                         f"branch), got {name!r}")
    unknown = sorted(str(k) for k in entry if k not in DOMAIN_KEYS)
    if unknown:  # e.g. a misspelt 'modality' would silently make an MR domain CT
        raise Med3DError(f"domain '{name}': unknown key(s) {', '.join(unknown)}; known: {', '.join(DOMAIN_KEYS)}")
    sources = [k for k in ("images", "csv", "dataset_json", "cases") if k in entry]
    if len(sources) != 1:
        raise Med3DError(f"domain '{name}' must give exactly one of images+masks, csv, dataset_json or cases "
                         f"(found {', '.join(sources) or 'none'})")
    names: Dict[int, str] = {}
    modality = entry.get("modality")
    if "images" in entry:
        if "masks" not in entry:
            raise Med3DError(f"domain '{name}' gives 'images' but no 'masks' folder")
        cases = _cases_from_folders(_expand(entry["images"], base, env), _expand(entry["masks"], base, env))
    elif "csv" in entry:
        cases = _cases_from_csv(_expand(entry["csv"], base, env), env)
    elif "dataset_json" in entry:
        cases, names, msd_modality = _read_msd(_expand(entry["dataset_json"], base, env), env)
        modality = modality or msd_modality
    else:
        cases = []
        if not isinstance(entry["cases"], list):
            raise Med3DError(f"domain '{name}': 'cases' must be a list of {{'image': ..., 'label': ...}} entries")
        for i, item in enumerate(entry["cases"]):
            if not isinstance(item, Mapping) or not isinstance(item.get("image"), str) or \
                    not isinstance(item.get("masks") or {}, Mapping):
                raise Med3DError(f"domain '{name}', case {i}: give a mapping with 'image' and 'label' (or 'masks': "
                                 f"{{name: file}}), got {item!r:.120}")
            image = _expand(item["image"], base, env)
            masks = {str(k): _expand(v, base, env) for k, v in (item.get("masks") or {}).items()}
            label = _expand(item["label"], base, env) if item.get("label") else None
            if (label is None) == (not masks):
                raise Med3DError(f"domain '{name}', case {i}: give either 'label' or 'masks'")
            cases.append(Case(str(item.get("id") or _case_key(image)), image, label, masks))
    if "labels" in entry:
        try:
            names = {int(k): str(v) for k, v in dict(entry["labels"]).items() if int(k) != 0}
        except (TypeError, ValueError):
            raise Med3DError(f"domain '{name}': 'labels' must map integer values to names") from None
    if not names:
        raise Med3DError(f"domain '{name}' has no label names; add 'labels': {{1: 'organ', ...}}")
    if min(names) < 1 or max(names) > 255:
        raise Med3DError(f"domain '{name}': label values must be 1..255 (0 is background), got {sorted(names)}; "
                         "map large source values to small ones with 'label_map'")
    if not cases:
        raise Med3DError(f"domain '{name}' has no cases")
    label_map = None
    if entry.get("label_map"):
        try:
            label_map = {int(k): int(v) for k, v in dict(entry["label_map"]).items()}
        except (TypeError, ValueError):
            raise Med3DError(f"domain '{name}': 'label_map' must map whole source values to whole domain values "
                             f"(e.g. {{5: 1}}), got {entry['label_map']!r:.120}") from None
        bad = sorted(v for v in label_map.values() if v != 0 and v not in names)
        if bad:
            raise Med3DError(f"domain '{name}': label_map targets {bad} have no name in 'labels'")
    for case in cases:
        missing = [m for m in case.masks if m not in names.values()]
        if missing:
            raise Med3DError(f"domain '{name}', case {case.case_id}: masks {missing} are not among the label names "
                             f"{sorted(names.values())}")
    spacing = _floats(entry.get("spacing"), f"domain '{name}': spacing", "three positive numbers (mm)")
    window = _floats(entry.get("window"), f"domain '{name}': window", "[low, high] with low < high")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise Med3DError(f"domain '{name}': spacing must be three positive numbers (mm), got {entry['spacing']}")
    if window is not None and (len(window) != 2 or window[0] >= window[1]):
        raise Med3DError(f"domain '{name}': window must be [low, high] with low < high, got {entry['window']}")
    return Domain(name, str(modality or "CT"), names, cases, label_map, spacing, window)  # type: ignore[arg-type]


def _floats(value: Any, what: str, expected: str) -> Optional[Tuple[float, ...]]:
    if not value:
        return None
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise Med3DError(f"{what} must be {expected}, got {value!r:.120}") from None


def _read_config_file(path: Path) -> Dict[str, Any]:
    text = read_text(path, "config file")  # stat and size first: a FIFO or /dev/zero is refused, not read
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # noqa: F401
            except ImportError:
                raise Med3DError("reading a YAML config needs PyYAML: pip install PyYAML, or use a JSON config") from None
            data = limits.load_yaml(text, str(path))  # aliases counted before anything is built
        else:
            data = json.loads(text)
    except Med3DError:
        raise
    except Exception as exc:  # a parse error of either format
        raise Med3DError(f"cannot parse config {path}: {_parse_problem(exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("domains"), list) or not data["domains"]:
        raise Med3DError(f"config {path} must be a mapping with a non-empty 'domains' list")
    unknown = sorted(str(k) for k in data if k not in CONFIG_KEYS)
    if unknown:  # a misspelt section would otherwise be ignored without a word
        raise Med3DError(f"config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    return data


def _parse_problem(exc: Exception) -> str:
    """One line saying what a JSON/YAML parser found wrong and where (YAML messages span several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_run_config(path: PathLike) -> RunConfig:
    """Read a run config (JSON, or YAML with PyYAML) and describe its domains (nothing is read from images yet)."""
    path = Path(os.path.realpath(path))  # never raises (a link loop is reported by the read below)
    data = _read_config_file(path)
    for section in ("model", "training", "env_defaults"):
        if not isinstance(data.get(section) or {}, dict):
            raise Med3DError(f"config {path}: '{section}' must be a mapping of settings, got "
                             f"{type(data[section]).__name__}")
    if not isinstance(data.get("name") or "", str):
        raise Med3DError(f"config {path}: 'name' must be a string")
    env = {k: str(_expand(str(v), path.parent, {})) for k, v in (data.get("env_defaults") or {}).items()}
    domains = [domain_from_dict(entry, path.parent, env) for entry in data["domains"]]
    names = [d.name for d in domains]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise Med3DError(f"config {path}: domain names must be unique, repeated: {', '.join(duplicates)}")
    return RunConfig(str(data.get("name") or path.stem), path, domains, dict(data.get("model") or {}),
                     dict(data.get("training") or {}))


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _read_label(case: Case, domain: Domain) -> Volume:
    """The case's label map in the domain's label space (masks merged, label_map applied), on its own grid."""
    if case.label is not None:
        raw = read_volume(case.label)
        values = np.asarray(raw.array)
        if values.dtype.kind == "f":
            if not np.all(np.mod(values, 1) == 0):
                raise Med3DError(f"label file {case.label} holds non-integer values; give a label map")
        values = values.astype(np.int64)
        if domain.label_map is not None:
            out = np.zeros(values.shape, dtype=np.uint8)
            for source, target in domain.label_map.items():
                out[values == source] = target
            values = out
        return Volume(values, raw.spacing, raw.origin, raw.direction)
    merged, geometry = None, None
    by_name = {n: v for v, n in domain.label_names.items()}
    for name, path in case.masks.items():
        mask = read_volume(path)
        if merged is None:
            merged, geometry = np.zeros(mask.shape, dtype=np.int64), mask
        elif not mask.same_geometry(geometry, GEOMETRY_TOLERANCE):
            raise Med3DError(f"mask {path} does not lie on the grid of the other masks of case {case.case_id}")
        merged[np.asarray(mask.array) > 0] = by_name[name]
    return Volume(merged, geometry.spacing, geometry.origin, geometry.direction)


def _check_case(case: Case, domain: Domain) -> Tuple[List[str], Optional[Tuple[float, float, float]]]:
    where = f"domain '{domain.name}', case {case.case_id}"
    try:
        image = read_volume(case.image)
    except Med3DError as exc:
        return [f"{where}: image: {exc}"], None
    try:
        label = _read_label(case, domain)
    except Med3DError as exc:
        return [f"{where}: label: {exc}"], None
    problems = []
    if not label.same_geometry(image, GEOMETRY_TOLERANCE):
        problems.append(f"{where}: label grid differs from the image ({label.geometry.describe()} vs "
                        f"{image.geometry.describe()}); resample the label onto its image")
    values = set(np.unique(label.array).tolist()) - {0}
    if not values:
        problems.append(f"{where}: the label map is empty (no {', '.join(domain.label_names.values())}); "
                        "remove the case or fix its label")
    outside = sorted(values - set(domain.label_names))
    if outside:
        problems.append(f"{where}: label values {outside} are outside the domain's label space "
                        f"{sorted(domain.label_names)}; add them to 'labels' or map them with 'label_map' "
                        "(med3d finetune: --label-map, e.g. 5:1)")
    return problems, canonical_spacing(image)


def validate_domains(domains: Sequence[Domain]) -> Dict[str, Tuple[float, float, float]]:
    """Read every pair once: readable, 3D, label on the image's grid (within 1e-3 mm), labels non-empty and in
    the label space. Raises one :class:`Med3DError` listing every problem; returns each domain's target spacing
    (its ``spacing`` or the median of its cases' canonical spacings)."""
    problems: List[str] = []
    spacings: Dict[str, Tuple[float, float, float]] = {}
    for domain in domains:
        found = []
        for case in domain.cases:
            case_problems, spacing = _check_case(case, domain)
            problems.extend(case_problems)
            if spacing is not None:
                found.append(spacing)
        if domain.spacing is not None:
            spacings[domain.name] = domain.spacing
        elif found:
            spacings[domain.name] = median_spacing(found)
    if problems:
        raise Med3DError(f"{len(problems)} problem(s) in the data: " + " | ".join(" ".join(p.split()) for p in problems))
    return spacings


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and its cache


def domain_spec(domain: Domain, spacing: Sequence[float]) -> PreprocessSpec:
    """The paper's per-domain preprocessing: canonical orientation, the domain's spacing, its optional window,
    0.5/99.5 percentile clipping and z-score."""
    modality = domain.modality.upper() if domain.modality.upper() in ("CT", "MR") else None
    return PreprocessSpec(spacing=tuple(spacing), window=domain.window, modality=modality)


def source_stamp(path: Path) -> List[Any]:
    """(path, size, mtime) of a file, or of every file in a DICOM folder: what makes a cache entry stale."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamp = []
    for f in files:
        st = f.stat()
        stamp.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
    return stamp


def cache_key(case: Case, domain: Domain, spec: PreprocessSpec) -> str:
    """Hash of the case's source files (path, size, mtime), the preprocessing spec and the label mapping."""
    payload = {"version": CACHE_VERSION, "sources": [source_stamp(p) for p in case.sources()],
               "masks": sorted(case.masks), "spec": spec.to_dict(),
               "label_map": sorted((domain.label_map or {}).items()), "labels": sorted(domain.label_names.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def preprocess_case(case: Case, domain: Domain, spec: PreprocessSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Read and preprocess one pair: float32 image and uint8 label map on the network grid (K, J, I)."""
    image = read_volume(case.image)
    array, prepared = preprocess_image(image, spec)
    labels = prepare_label(_read_label(case, domain), prepared)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise Med3DError(f"case {case.case_id} of domain '{domain.name}' has label values outside 0..255; map them "
                         "into the domain's label space with 'label_map'")
    return array, labels.astype(np.uint8)


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    """A cache entry through the one write path; concurrent runs sharing the cache write identical entries, so
    the last one to finish may replace the others'."""
    def write(staged: Path) -> None:
        with open(staged, "wb") as f:
            np.save(f, array)

    def verify(staged: Path) -> None:
        back = np.load(staged, mmap_mode="r")
        if back.shape != array.shape or back.dtype != array.dtype:
            raise Med3DError("the array read back differs")
    write_atomically(path, write, overwrite=True, verify=verify, what="cache entry")


@dataclass
class _CaseInfo:
    classes: List[int]
    voxels: List[np.ndarray]  # flat indices of each class
    pad_value: float


class PreparedCases:
    """Preprocessed arrays of the cases of several domains, from a cache of ``.npy`` files when ``cache_dir`` is
    given (memory-mapped, built on first use, an entry redone when its sources or spec change), else
    preprocessed afresh on every access (the slow path the cache exists to avoid)."""

    def __init__(self, domains: Sequence[Domain], spacings: Mapping[str, Sequence[float]],
                 cache_dir: Optional[PathLike] = None) -> None:
        self.domains = list(domains)
        self.specs = [domain_spec(d, spacings[d.name]) for d in self.domains]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._arrays: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}
        self._info: Dict[Tuple[int, int], _CaseInfo] = {}

    def entry_paths(self, d: int, c: int) -> Tuple[Path, Path]:
        """Cache files (image, label) of case ``c`` of domain ``d`` for its current sources and spec."""
        assert self.cache_dir is not None
        domain, case = self.domains[d], self.domains[d].cases[c]
        key = cache_key(case, domain, self.specs[d])
        folder = self.cache_dir / re.sub(r"[^\w.-]", "_", domain.name)
        stem = re.sub(r"[^\w.-]", "_", case.case_id)
        return folder / f"{stem}-{key}.image.npy", folder / f"{stem}-{key}.label.npy"

    def arrays(self, d: int, c: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image float32, labels uint8) of case ``c`` of domain ``d``, both (K, J, I)."""
        if self.cache_dir is None:
            return preprocess_case(self.domains[d].cases[c], self.domains[d], self.specs[d])
        if (d, c) in self._arrays:
            return self._arrays[(d, c)]
        image_path, label_path = self.entry_paths(d, c)
        for attempt in range(3):
            if attempt or not (image_path.is_file() and label_path.is_file()):
                self._build(d, c, image_path, label_path)
            try:
                pair = (np.load(image_path, mmap_mode="r"), np.load(label_path, mmap_mode="r"))
                break
            except (FileNotFoundError, ValueError, EOFError):
                # Another run sharing the cache replaced or removed the entry between the check and the load
                # (or an older version left it half-written): build it again.
                if attempt == 2:
                    raise Med3DError(f"cache entry {image_path} keeps changing or cannot be read; is another run "
                                     "rebuilding the same cache? Try again, or use a separate --cache") from None
        self._arrays[(d, c)] = pair
        return pair

    def _build(self, d: int, c: int, image_path: Path, label_path: Path) -> None:
        image, labels = preprocess_case(self.domains[d].cases[c], self.domains[d], self.specs[d])
        image_path.parent.mkdir(parents=True, exist_ok=True)
        stem, key = image_path.name.rsplit("-", 1)[0], image_path.name.rsplit("-", 1)[1].split(".")[0]
        for old in image_path.parent.glob("*.npy"):  # this case's entries of older sources or specs, not this one's
            name = old.name.rsplit("-", 1)
            if name[0] == stem and name[1].split(".")[0] != key:
                try:
                    old.unlink()
                except FileNotFoundError:  # another run removed it first
                    pass
        save_npy_atomically(image_path, image)
        save_npy_atomically(label_path, labels)

    def warm(self, reporter=None) -> None:
        """Build every missing cache entry now (one pass), reporting progress."""
        from .progress import make_event
        total = sum(len(d.cases) for d in self.domains)
        done = 0
        for d, domain in enumerate(self.domains):
            for c in range(len(domain.cases)):
                self.arrays(d, c)
                done += 1
                if reporter is not None:
                    reporter(make_event("preprocess", done, total, metrics={"domain": domain.name}))

    def info(self, d: int, c: int, labels: np.ndarray, image: np.ndarray) -> _CaseInfo:
        """Foreground voxel lists per class and the padding value; kept in memory with a cache."""
        if (d, c) in self._info:
            return self._info[(d, c)]
        flat = np.asarray(labels).reshape(-1)
        classes = [int(v) for v in np.unique(flat) if v != 0]
        info = _CaseInfo(classes, [np.flatnonzero(flat == v) for v in classes], float(np.min(image)))
        if self.cache_dir is not None:
            self._info[(d, c)] = info
        return info


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[start:start+size]``, padded with ``fill`` where the box leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchSampler:
    """Random training patches, one domain per step.

    Each step picks a domain (``round_robin`` or ``proportional`` to its number of cases), then draws the global
    batch: per sample a random case, and with probability ``foreground_share`` a patch holding a voxel of a
    random present class (else anywhere). Volumes smaller than the patch are padded (image with its minimum,
    labels with background). Every rank draws the same plan from the same generator and materialises only its
    own slice (``rank``-th of ``world_size`` equal parts), as a distributed sampler would. ``state_dict`` /
    ``load_state_dict`` make it resumable.
    """

    def __init__(self, data: PreparedCases, patch_size: Sequence[int], batch_size: int,
                 foreground_share: float = 0.5, domain_sampling: str = "round_robin", seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise Med3DError(f"patch_size must be three positive sizes (K, J, I), got {tuple(patch_size)}")
        if not 0.0 <= foreground_share <= 1.0:
            raise Med3DError(f"foreground_share must be between 0 and 1, got {foreground_share}")
        if domain_sampling not in DOMAIN_SAMPLING:
            raise Med3DError(f"domain_sampling '{domain_sampling}' unknown; choose {', '.join(DOMAIN_SAMPLING)}")
        if batch_size % world_size:
            raise Med3DError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.foreground_share = float(foreground_share)
        self.domain_sampling = domain_sampling
        self.rng = np.random.default_rng(seed)
        self.draws = 0
        sizes = np.array([len(d.cases) for d in data.domains], dtype=float)
        self._weights = sizes / sizes.sum()

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["rng"])
        self.draws = int(state["draws"])

    def next_domain(self) -> int:
        if self.domain_sampling == "round_robin":
            return self.draws % len(self.data.domains)
        return int(self.rng.choice(len(self._weights), p=self._weights))

    def next_batch(self, step: int = 0) -> Dict[str, Any]:
        """This rank's share of the next global batch: ``image`` (n, 1, K, J, I) float32, ``label`` (n, K, J, I)
        int64, ``domain`` (index) and ``domain_name``."""
        d = self.next_domain()
        self.draws += 1
        n = self.batch_size // self.world_size
        mine = range(self.rank * n, (self.rank + 1) * n)
        images, labels = [], []
        for i in range(self.batch_size):
            c = int(self.rng.integers(len(self.data.domains[d].cases)))
            foreground = bool(self.rng.random() < self.foreground_share)
            jitter = [int(self.rng.integers(p)) for p in self.patch_size]
            pick = self.rng.random(2)  # class and voxel choice, drawn always so the plan is data-independent
            uniform = self.rng.random(3)
            if i not in mine:
                continue
            image, label = self.data.arrays(d, c)
            info = self.data.info(d, c, label, image)
            shape = image.shape
            if foreground and info.classes:
                voxels = info.voxels[int(pick[0] * len(info.classes))]
                centre = np.unravel_index(int(voxels[int(pick[1] * len(voxels))]), shape)
                start = [int(min(max(v - j, 0), max(dim - p, 0)))
                         for v, j, dim, p in zip(centre, jitter, shape, self.patch_size)]
            else:
                start = [int(u * (max(dim - p, 0) + 1)) for u, dim, p in zip(uniform, shape, self.patch_size)]
            images.append(_crop(np.asarray(image), start, self.patch_size, info.pad_value))
            labels.append(_crop(np.asarray(label), start, self.patch_size, 0))
        return {"image": torch.from_numpy(np.stack(images)[:, None].astype(np.float32)),
                "label": torch.from_numpy(np.stack(labels).astype(np.int64)),
                "domain": d, "domain_name": self.data.domains[d].name}
