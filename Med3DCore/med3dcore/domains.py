"""Segmentation domains and run configs: what the data is and where it lies, described from folders, CSV tables,
MSD ``dataset.json`` files and explicit case lists (no image is read here; see :mod:`med3dcore.training_data`).

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
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from . import limits
from .errors import Med3DError
from .safe_io import MAX_TEXT_BYTES, read_text, regular_file

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
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


def case_key(path: Path) -> str:
    """The case an image or label file belongs to: its name without the image suffix and without an nnU-Net
    channel suffix (``case_0000.nii.gz`` -> ``case``); images and labels are matched by it."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_\d{4}$", "", name)  # nnU-Net channel suffix


def image_files(folder: Path) -> List[Path]:
    """The image files (by suffix) and subfolders (DICOM series) of ``folder``, sorted, hidden ones left out."""
    if not folder.is_dir():
        raise Med3DError(f"folder {folder} does not exist; check the domain's paths")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  (p.is_dir() or any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES)))


def _cases_from_folders(images: Path, masks: Path) -> List[Case]:
    labels = {case_key(p): p for p in image_files(masks)}
    cases, unmatched = [], []
    for image in image_files(images):
        key = case_key(image)
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
        cases.append(Case((row.get("case_id") or "").strip() or case_key(Path(image)),
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
        cases.append(Case(case_key(Path(item["image"])), _expand(item["image"], path.parent, env),
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
            cases.append(Case(str(item.get("id") or case_key(image)), image, label, masks))
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
