"""Synthetic CT/MR phantoms for tests, the offline demo and the pretraining example.

A phantom is a small torso drawn in the field of view's normalised coordinates (so any shape or anisotropic
spacing shows the same anatomy): an elliptic body of soft tissue (~40 HU) with a fat rim (~-100 HU), two lungs
(~-850 HU), a liver (~60 HU) with an optional tumour (~20 HU), a spine-like column of vertebrae (~400 HU) and
lung nodules. Nodules come in two kinds: ``"benign"`` (small, smooth, round, calcified-ish, dense) and
``"malignant"`` (larger, soft-tissue density, lobulated with spicules). Everything is random but seeded: the same
seed gives the same phantom bit for bit.

Axes follow the project's conventions: arrays are (K, J, I); spacing/origin/direction are LPS in (I, J, K) order.
Patient left is +x (I), posterior is +y (J), superior is +z (K); the liver sits on the patient's right (-x).

Functions:

- :func:`make_ct_phantom` / :func:`make_mr_phantom` -> ``(image Volume, labels Volume, label_names)``
- :func:`make_nodule_crop` -> ``(image Volume, mask Volume)``, a lung cube around one nodule of a given kind
- :func:`store_as` -> the same physical image stored flipped and/or transposed (orientation tests)
- :func:`write_phantom_domains` -> writes four small phantom domains (different label spaces, CT and MR-like,
  folder-pair / CSV / MSD ``dataset.json`` layouts) and a pretraining config; returns the config's path.

A 64^3 phantom takes well under a second.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import Med3DError
from .safe_io import write_text
from .volume import Volume
from .volume_files import write_volume

# Label values of the full phantom label map.
LABEL_NAMES: Dict[int, str] = {1: "lung", 2: "liver", 3: "liver_tumour", 4: "bone", 5: "lung_nodule"}
NODULE_KINDS = ("benign", "malignant")

# Tissue classes used to draw a phantom; each modality maps them to intensities.
_AIR, _FAT, _SOFT, _LUNG, _LIVER, _TUMOUR, _BONE, _BENIGN, _MALIGNANT = range(9)
_CT_HU = {_AIR: -1000.0, _FAT: -100.0, _SOFT: 40.0, _LUNG: -850.0, _LIVER: 60.0, _TUMOUR: 20.0,
          _BONE: 400.0, _BENIGN: 250.0, _MALIGNANT: 30.0}
# A T1-like MR contrast in arbitrary units: fat bright, lung and cortical bone dark, tumour darker than liver.
_MR_VALUE = {_AIR: 0.0, _FAT: 900.0, _SOFT: 350.0, _LUNG: 30.0, _LIVER: 500.0, _TUMOUR: 250.0,
             _BONE: 120.0, _BENIGN: 60.0, _MALIGNANT: 300.0}


def _grid(shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised voxel-centre coordinates in [-1, 1], as broadcastable (z, y, x) arrays for a (K, J, I) shape."""
    k, j, i = (int(s) for s in shape)
    z = ((np.arange(k, dtype=np.float32) + 0.5) / k * 2 - 1)[:, None, None]
    y = ((np.arange(j, dtype=np.float32) + 0.5) / j * 2 - 1)[None, :, None]
    x = ((np.arange(i, dtype=np.float32) + 0.5) / i * 2 - 1)[None, None, :]
    return z, y, x


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    cx, cy, cz = centre
    rx, ry, rz = radii
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def _nodule_mask(dz, dy, dx, radius: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Nodule shape around the origin of offsets (dz, dy, dx), all in the same (physical or normalised) unit.

    Benign: a sphere. Malignant: a lobulated body whose radius grows sharply along a few random directions
    (spicules): r(d) = radius * (1 + lobes(d) + sum_k spike * max(0, d.s_k)^p).
    """
    dist = np.sqrt(dz * dz + dy * dy + dx * dx) + 1e-6
    if kind == "benign":
        return dist <= radius
    directions = rng.normal(size=(int(rng.integers(5, 9)), 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    reach = np.ones(np.broadcast(dz, dy, dx).shape, dtype=np.float32)
    lobe_dirs = rng.normal(size=(3, 3))
    lobe_dirs /= np.linalg.norm(lobe_dirs, axis=1, keepdims=True)
    for lz, ly, lx in lobe_dirs:
        reach += 0.15 * ((dz * lz + dy * ly + dx * lx) / dist) ** 2
    for sz, sy, sx in directions:
        cosine = np.clip((dz * sz + dy * sy + dx * sx) / dist, 0.0, None)
        reach += float(rng.uniform(0.6, 1.2)) * cosine ** 24
    return dist <= radius * reach


def _check_shape_spacing(shape: Sequence[int], spacing: Sequence[float]) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    shape_t = tuple(int(s) for s in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape_t) != 3 or min(shape_t) < 4:
        raise Med3DError(f"phantom shape must be three sizes (K, J, I) of at least 4 voxels, got {tuple(shape)}")
    if len(spacing_t) != 3 or min(spacing_t) <= 0:
        raise Med3DError(f"phantom spacing must be three positive sizes in mm (I, J, K), got {tuple(spacing)}")
    return shape_t, spacing_t


def _draw_tissues(shape: Sequence[int], rng: np.random.Generator, tumour: bool,
                  nodules: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue-class map and label map (values of LABEL_NAMES) for one random torso."""
    z, y, x = _grid(shape)
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - small local helper
    tissue = np.full(tuple(shape), _AIR, dtype=np.uint8)
    labels = np.zeros(tuple(shape), dtype=np.uint8)

    # Body: an elliptic cylinder along z with a fat rim.
    bx, by = 0.92 + jitter(0.04), 0.72 + jitter(0.04)
    outer = (x / bx) ** 2 + (y / by) ** 2 <= 1.0
    inner = (x / (bx - 0.08)) ** 2 + (y / (by - 0.08)) ** 2 <= 1.0
    body = np.broadcast_to(outer, tuple(shape))
    tissue[body] = _FAT
    tissue[np.broadcast_to(inner, tuple(shape))] = _SOFT

    # Liver on the patient's right (-x), low; lungs above it (drawn later, so they win at the dome).
    lc = (-0.33 + jitter(0.05), -0.05 + jitter(0.05), -0.45 + jitter(0.05))
    lr = (0.42 + jitter(0.04), 0.42 + jitter(0.04), 0.38 + jitter(0.04))
    liver = _ellipsoid(z, y, x, lc, lr) & np.broadcast_to(inner, tuple(shape))
    liver_core = _ellipsoid(z, y, x, lc, tuple(0.55 * r for r in lr)) & liver
    tissue[liver] = _LIVER
    labels[liver] = 2
    lung_mask = np.zeros(tuple(shape), dtype=bool)
    for side in (-1.0, 1.0):
        lung = _ellipsoid(z, y, x, (side * (0.40 + jitter(0.03)), -0.05 + jitter(0.04), 0.35 + jitter(0.05)),
                          (0.28 + jitter(0.03), 0.42 + jitter(0.03), 0.55 + jitter(0.05)))
        lung_mask |= lung
    lung_mask &= np.broadcast_to(inner, tuple(shape))
    tissue[lung_mask] = _LUNG
    labels[lung_mask] = 1

    if tumour and liver.any():
        # Centre the tumour on a random voxel of the liver's core, so most of it lies inside the liver.
        candidates = np.argwhere(liver_core if liver_core.any() else liver)
        kc, jc, ic = candidates[int(rng.integers(len(candidates)))]
        r = float(rng.uniform(0.11, 0.18))
        zc, yc, xc = (float(z[kc, 0, 0]), float(y[0, jc, 0]), float(x[0, 0, ic]))
        blob = _ellipsoid(z, y, x, (xc, yc, zc), (r, r, r)) & liver
        tissue[blob] = _TUMOUR
        labels[blob] = 3

    # Spine: posterior midline column of vertebral bodies separated by soft-tissue discs.
    sx, sy, sr = jitter(0.02), 0.50 + jitter(0.03), 0.11 + jitter(0.01)
    column = ((x - sx) ** 2 + (y - sy) ** 2 <= sr ** 2)
    period = 0.25 + jitter(0.02)
    discs = (np.mod(z + jitter(0.1), period) < 0.05 * period / 0.25)
    bone = np.broadcast_to(column, tuple(shape)) & ~np.broadcast_to(discs, tuple(shape))
    tissue[bone] = _BONE
    labels[bone] = 4

    # Nodules inside the lungs, placed at a random lung voxel at least a nodule radius from the lung border.
    lung_voxels = np.argwhere(lung_mask)
    for kind in nodules:
        if kind not in NODULE_KINDS:
            raise Med3DError(f"unknown nodule kind {kind!r}; choose from {', '.join(NODULE_KINDS)}")
        if len(lung_voxels) == 0:
            break
        kc, jc, ic = lung_voxels[int(rng.integers(len(lung_voxels)))]
        r = float(rng.uniform(0.03, 0.05) if kind == "benign" else rng.uniform(0.06, 0.10))
        nod = _nodule_mask(z - z[kc, 0, 0], y - y[0, jc, 0], x - x[0, 0, ic], r, kind, rng) & lung_mask
        tissue[nod] = _BENIGN if kind == "benign" else _MALIGNANT
        labels[nod] = 5
    return tissue, labels


def _volume(array: np.ndarray, spacing: Sequence[float], origin: Optional[Sequence[float]] = None) -> Volume:
    k, j, i = array.shape
    if origin is None:  # centre the field of view on the world origin
        origin = tuple(-0.5 * (n - 1) * s for n, s in zip((i, j, k), spacing))
    return Volume(array, spacing=tuple(spacing), origin=tuple(origin), direction=np.eye(3))


def _intensities(tissue: np.ndarray, modality: str, rng: np.random.Generator, noise: float) -> np.ndarray:
    table = _CT_HU if modality == "CT" else _MR_VALUE
    lut = np.array([table[t] for t in range(len(table))], dtype=np.float32)
    image = lut[tissue]
    if modality == "MR":
        # A smooth multiplicative bias field, as MR coils give, so MR domains need per-volume normalisation.
        z, y, x = _grid(tissue.shape)
        a, b, c = rng.uniform(-0.2, 0.2, size=3)
        image *= (1.0 + a * x + b * y + c * z).astype(np.float32)
    image += rng.normal(0.0, noise, size=tissue.shape).astype(np.float32)
    return image


def store_as(volume: Volume, flip: Sequence[int] = (), permute: Optional[Sequence[int]] = None) -> Volume:
    """The same physical image stored differently: array axes in ``flip`` reversed, then axes reordered by
    ``permute`` (as ``np.transpose``). Origin and direction change so every voxel keeps its world position."""
    array = np.asarray(volume.array)
    spacing = np.array(volume.spacing, dtype=float)
    origin = np.array(volume.origin, dtype=float)
    direction = np.array(volume.direction, dtype=float).reshape(3, 3).copy()
    for axis in flip:
        c = 2 - int(axis)  # array axis a is physical axis 2 - a
        origin = origin + direction[:, c] * spacing[c] * (array.shape[int(axis)] - 1)
        direction[:, c] = -direction[:, c]
        array = np.flip(array, axis=int(axis))
    if permute is not None:
        perm = [int(p) for p in permute]
        if sorted(perm) != [0, 1, 2]:
            raise Med3DError(f"permute must reorder the axes (0, 1, 2), got {tuple(permute)}")
        old_axis = [2 - perm[2 - c] for c in range(3)]  # new physical axis c comes from this old one
        spacing = spacing[old_axis]
        direction = direction[:, old_axis]
        array = np.transpose(array, perm)
    return Volume(np.ascontiguousarray(array), spacing=tuple(spacing.tolist()), origin=tuple(origin.tolist()),
                  direction=direction)


def _make_phantom(modality: str, shape: Sequence[int], spacing: Sequence[float], seed: int, tumour: bool,
                  nodules: Sequence[str], noise: Optional[float], flip: Sequence[int],
                  permute: Optional[Sequence[int]]) -> Tuple[Volume, Volume, Dict[int, str]]:
    shape_t, spacing_t = _check_shape_spacing(shape, spacing)
    rng = np.random.default_rng(seed)
    tissue, labels = _draw_tissues(shape_t, rng, tumour, nodules)
    image = _intensities(tissue, modality, rng, (15.0 if modality == "CT" else 20.0) if noise is None else noise)
    if modality == "CT":
        image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    image_vol = store_as(_volume(image, spacing_t), flip, permute)
    label_vol = store_as(_volume(labels, spacing_t), flip, permute)
    return image_vol, label_vol, dict(LABEL_NAMES)


def make_ct_phantom(shape: Sequence[int] = (64, 64, 64), spacing: Sequence[float] = (1.5, 1.5, 1.5),
                    seed: int = 0, tumour: bool = True, nodules: Sequence[str] = ("benign", "malignant"),
                    noise: Optional[float] = None, flip: Sequence[int] = (),
                    permute: Optional[Sequence[int]] = None) -> Tuple[Volume, Volume, Dict[int, str]]:
    """A synthetic torso CT (int16 HU) and its label map (uint8, values of :data:`LABEL_NAMES`).

    ``shape`` is (K, J, I) and ``spacing`` (I, J, K) in mm; the anatomy fills the field of view whatever the
    spacing. ``nodules`` lists the nodule kinds to place in the lungs. ``flip``/``permute`` store the result
    flipped/transposed (see :func:`store_as`); the world geometry of every tissue stays the same.
    Returns ``(image, labels, label_names)``.
    """
    return _make_phantom("CT", shape, spacing, seed, tumour, nodules, noise, flip, permute)


def make_mr_phantom(shape: Sequence[int] = (64, 64, 64), spacing: Sequence[float] = (1.5, 1.5, 1.5),
                    seed: int = 0, tumour: bool = True, nodules: Sequence[str] = (),
                    noise: Optional[float] = None, flip: Sequence[int] = (),
                    permute: Optional[Sequence[int]] = None) -> Tuple[Volume, Volume, Dict[int, str]]:
    """The same anatomy as :func:`make_ct_phantom` with a T1-like MR contrast (float32, arbitrary units, fat
    bright, lungs dark) and a smooth bias field. Returns ``(image, labels, label_names)``."""
    return _make_phantom("MR", shape, spacing, seed, tumour, nodules, noise, flip, permute)


def make_nodule_crop(kind: str, seed: int = 0, shape: Sequence[int] = (32, 32, 32),
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), noise: float = 20.0) -> Tuple[Volume, Volume]:
    """A cube of lung (int16 HU) around one nodule of ``kind`` (``"benign"`` or ``"malignant"``), with a few
    vessels, and the nodule's mask (uint8). Sizes are physical: benign 4-9 mm across, dense and round;
    malignant 10-20 mm, soft-tissue density and spiculated. The nodule sits near the centre (jittered)."""
    if kind not in NODULE_KINDS:
        raise Med3DError(f"unknown nodule kind {kind!r}; choose from {', '.join(NODULE_KINDS)}")
    shape_t, spacing_t = _check_shape_spacing(shape, spacing)
    rng = np.random.default_rng(seed)
    k, j, i = shape_t
    sx, sy, sz = spacing_t
    # Physical offsets (mm) from the field of view's centre.
    z = ((np.arange(k, dtype=np.float32) - (k - 1) / 2) * sz)[:, None, None]
    y = ((np.arange(j, dtype=np.float32) - (j - 1) / 2) * sy)[None, :, None]
    x = ((np.arange(i, dtype=np.float32) - (i - 1) / 2) * sx)[None, None, :]
    image = np.full(shape_t, _CT_HU[_LUNG], dtype=np.float32)
    # Vessels: thin tubes of soft tissue along random lines through the cube.
    for _ in range(int(rng.integers(1, 4))):
        point = rng.uniform(-0.4, 0.4, size=3) * np.array([i * sx, j * sy, k * sz])
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        rel = (x - point[0], y - point[1], z - point[2])
        along = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
        dist2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along ** 2
        image[np.broadcast_to(dist2 <= float(rng.uniform(0.8, 1.6)) ** 2, shape_t)] = _CT_HU[_SOFT]
    fov = min(i * sx, j * sy, k * sz)
    centre = rng.uniform(-0.08, 0.08, size=3) * fov
    diameter = float(rng.uniform(4.0, 9.0) if kind == "benign" else rng.uniform(10.0, 20.0))
    mask = _nodule_mask(z - centre[2], y - centre[1], x - centre[0], diameter / 2, kind, rng)
    mask = np.broadcast_to(mask, shape_t)
    image[mask] = _CT_HU[_BENIGN if kind == "benign" else _MALIGNANT] + float(rng.normal(0, 30))
    image += rng.normal(0.0, noise, size=shape_t).astype(np.float32)
    image_i16 = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    return _volume(image_i16, spacing_t), _volume(mask.astype(np.uint8), spacing_t)


def _remap(labels: Volume, mapping: Dict[int, int]) -> Volume:
    """A label map with the phantom's values mapped to a domain's own label space (others -> background)."""
    lut = np.zeros(256, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return Volume(lut[np.asarray(labels.array)], spacing=labels.spacing, origin=labels.origin,
                  direction=labels.direction)


# The phantom domains: name, modality, layout, spacing (I, J, K), phantom labels -> domain labels, names.
_DOMAINS = (
    ("phantom_ct_lung", "CT", "folders", (2.0, 2.0, 2.5), {1: 1, 5: 2}, {1: "lung", 2: "lung_nodule"}),
    ("phantom_ct_liver", "CT", "csv", (1.5, 1.5, 3.0), {2: 1, 3: 2}, {1: "liver", 2: "liver_tumour"}),
    ("phantom_ct_bone", "CT", "msd", (2.0, 2.0, 2.0), {4: 1}, {1: "bone"}),
    ("phantom_mr_abdomen", "MR", "folders", (2.0, 2.0, 3.0), {2: 1, 4: 2}, {1: "liver", 2: "spine"}),
)


def write_phantom_domains(folder, n_cases: int = 4, seed: int = 0, shape: Sequence[int] = (32, 40, 40),
                          overwrite: bool = False) -> Path:
    """Write four small phantom segmentation domains and a pretraining config for them; return the config path.

    Domains (each with its own label space; label 1 means lung in one, liver in another, bone in a third):
    ``phantom_ct_lung`` (folder pair ``imagesTr``/``labelsTr``), ``phantom_ct_liver`` (a CSV, with every other case
    stored flipped), ``phantom_ct_bone`` (an MSD-style ``dataset.json``) and ``phantom_mr_abdomen`` (MR-like
    contrast, folder pair). Each domain has its own spacing, so per-domain median-spacing resampling matters.
    The config (``pretrain.json``) uses paths relative to itself and a small ResNet-10 run.
    """
    if n_cases < 1:
        raise Med3DError(f"n_cases must be at least 1, got {n_cases}")
    root = Path(folder)
    config_path = root / "pretrain.json"
    if config_path.exists() and not overwrite:
        raise Med3DError(f"{config_path} already exists; choose another folder or pass overwrite=True")
    domains = []
    for d, (name, modality, layout, spacing, mapping, names) in enumerate(_DOMAINS):
        droot = root / name
        (droot / "imagesTr").mkdir(parents=True, exist_ok=True)
        (droot / "labelsTr").mkdir(parents=True, exist_ok=True)
        pairs = []
        for c in range(n_cases):
            case_seed = seed * 1000 + d * 100 + c
            make = make_mr_phantom if modality == "MR" else make_ct_phantom
            flip = (2,) if layout == "csv" and c % 2 == 1 else ()
            image, labels, _ = make(shape=shape, spacing=spacing, seed=case_seed, flip=flip,
                                    nodules=("benign", "malignant") if name == "phantom_ct_lung" else ())
            stem = f"case_{c:03d}"
            image_path = droot / "imagesTr" / f"{stem}.nii.gz"
            label_path = droot / "labelsTr" / f"{stem}.nii.gz"
            write_volume(image, image_path, overwrite=overwrite)
            write_volume(_remap(labels, mapping), label_path, overwrite=overwrite)
            pairs.append((f"imagesTr/{stem}.nii.gz", f"labelsTr/{stem}.nii.gz"))
        entry = {"name": name, "modality": modality, "labels": {str(k): v for k, v in names.items()}}
        if layout == "folders":
            entry.update(images=f"{name}/imagesTr", masks=f"{name}/labelsTr")
        elif layout == "csv":
            table = io.StringIO(newline="")
            writer = csv.writer(table)
            writer.writerow(["image", "label"])
            writer.writerows(pairs)
            write_text(droot / "cases.csv", table.getvalue(), overwrite=overwrite, what="case table")
            entry["csv"] = f"{name}/cases.csv"
        else:
            msd = {"name": name, "modality": {"0": modality},
                   "labels": {"0": "background", **{str(k): v for k, v in names.items()}},
                   "numTraining": len(pairs),
                   "training": [{"image": f"./{a}", "label": f"./{b}"} for a, b in pairs]}
            write_text(droot / "dataset.json", json.dumps(msd, indent=2), overwrite=overwrite, what="dataset.json")
            entry["dataset_json"] = f"{name}/dataset.json"
        domains.append(entry)
    config = {
        "name": "phantom_pretraining",
        "domains": domains,
        "model": {"depth": 10, "shortcut_type": "B"},
        "training": {"steps": 40, "batch_size": 2, "patch_size": [24, 24, 24], "lr": 0.001,
                     "foreground_share": 0.5, "domain_sampling": "round_robin", "checkpoint_every": 20,
                     "seed": seed},
    }
    write_text(config_path, json.dumps(config, indent=2), overwrite=overwrite, what="config")
    return config_path
