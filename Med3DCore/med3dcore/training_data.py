"""The training data of segmentation domains (:mod:`med3dcore.domains`): up-front validation, the preprocessing
cache and patch sampling.

:func:`validate_domains` reads every pair once and raises one :class:`Med3DError` listing every problem.
:class:`PreparedCases` preprocesses each case as the paper does (canonical orientation, the domain's spacing,
0.5/99.5 percentile clipping, z-score) and keeps the result in a cache of ``.npy`` files (memory-mapped), keyed
by the source files (path, size, modification time) and the preprocessing, so a changed source is redone.
:class:`PatchSampler` draws random patches with a foreground share and picks a domain per step (round-robin or
in proportion to size), with a resumable state; it serves single-domain fine-tuning just as well.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .domains import Case, Domain
from .errors import Med3DError
from .preprocess import PreprocessSpec, median_spacing, prepare_label, preprocess_image
from .safe_io import write_atomically
from .volume import Volume, canonical_spacing
from .volume_files import read_volume

PathLike = Union[str, "os.PathLike[str]"]
DOMAIN_SAMPLING = ("round_robin", "proportional")
CACHE_VERSION = 1
GEOMETRY_TOLERANCE = 1e-3  # mm (and direction cosines) between an image and its label map


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
