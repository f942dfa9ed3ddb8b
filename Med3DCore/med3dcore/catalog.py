"""The model catalog: published encoders Med3D knows by name, and the models folder they are kept in.

``KNOWN_MODELS`` lists Tencent's MedicalNet 3D-ResNets (Chen, Ma, Zheng 2019) as re-hosted on the Hugging Face hub
under ``TencentMedicalNet/MedicalNet-Resnet<depth>`` (where MONAI's ``pretrained=True`` fetches them too):
``resnet_<depth>.pth``, pretrained on the eight datasets of the paper's 3DSeg-8, for depths 10-200, and
``resnet_<depth>_23dataset.pth``, pretrained on 23 datasets (MedicalNet's update of 2019-07-30), for 10, 18, 34
and 50. Licence: MIT (MedicalNet's repository and the hub's model cards). Exact sizes and SHA-256 checksums are
those the hub's Git LFS pointers publish; where none was found the entry leaves them ``None`` (then the size the
server announces is checked, and the checksum is recorded at the first download).

A site can mirror the files on its own server and set ``MED3D_CATALOG_MIRROR`` to that folder's URL. Nothing is
ever downloaded implicitly: ``med3d models pull NAME`` (or the Slicer module's Download button, after
asking) fetches a file; ``med3d models import FILE`` takes one obtained by hand (offline sites). Both check the
file (size, checksum, a MedicalNet 3D-ResNet of the listed depth and shortcut) and record its SHA-256 in
``<models folder>/.med3d-models.json``; every later use by name (``med3d finetune --init medicalnet-resnet50``)
checks the file against that record (and the table) first, so a file changed on disk is refused, not trained on.

This module does not import torch (the Slicer module reads the table in its own process); the checks that need
it import it when they run.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .errors import Med3DError

PathLike = Union[str, "os.PathLike[str]"]
RECORD_NAME = ".med3d-models.json"
MIRROR_ENV = "MED3D_CATALOG_MIRROR"
LICENCE = "MIT"
_HUB = "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}"


def models_dir() -> Path:
    """Where models live: ``$MED3D_MODELS``, else ``~/.med3d/models`` (not created here)."""
    env = os.environ.get("MED3D_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".med3d" / "models"


@dataclass(frozen=True)
class KnownModel:
    """One published file. ``size`` (bytes) and ``sha256`` are None where no published value was found."""

    name: str
    file: str
    depth: int
    shortcut_type: str
    datasets: str
    approx_size: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    licence: str = LICENCE

    @property
    def url(self) -> str:
        """Where ``pull`` fetches the file: the hub, or ``$MED3D_CATALOG_MIRROR/<file>`` where a site mirrors the
        files (an intranet server for machines without internet; the same checks apply)."""
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        if mirror:
            return f"{mirror.rstrip('/')}/{self.file}"
        return f"{_HUB.format(depth=self.depth)}/resolve/main/{self.file}"

    @property
    def page(self) -> str:
        return _HUB.format(depth=self.depth)

    @property
    def description(self) -> str:
        return (f"MedicalNet ResNet-{self.depth} encoder (shortcut {self.shortcut_type}), pretrained on "
                f"{self.datasets} by Tencent; a starting point for fine-tuning, not a ready model")


_RELEASED_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}
_3DSEG8 = "the 8 segmentation datasets of 3DSeg-8"
_23 = "23 datasets"


def _entry(depth: int, datasets23: bool, approx: str, size: Optional[int], sha: Optional[str]) -> KnownModel:
    suffix = "_23dataset" if datasets23 else ""
    return KnownModel(name=f"medicalnet-resnet{depth}" + ("-23datasets" if datasets23 else ""),
                      file=f"resnet_{depth}{suffix}.pth", depth=depth, shortcut_type=_RELEASED_SHORTCUT[depth],
                      datasets=_23 if datasets23 else _3DSEG8, approx_size=approx, size=size, sha256=sha)


# Sizes and checksums: the Git LFS pointers of the hub's upload commits (June 2022). resnet_10_23dataset.pth and
# resnet_152.pth: checksum published, exact size not found; resnet_18_23dataset.pth: neither found for the copy in
# MedicalNet-Resnet18 (the hub lists 132 MB).
KNOWN_MODELS: Tuple[KnownModel, ...] = (
    _entry(10, False, "57.5 MB", 57456599, "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0"),
    _entry(10, True, "57.5 MB", None, "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605"),
    _entry(18, False, "132 MB", 131992196, "38b3a17444c5c18a795355a868e6a2d9ce9318054067f5373d337f55c0f61da3"),
    _entry(18, True, "132 MB", None, None),
    _entry(34, False, "253 MB", 253276232, "977a1be79298602fa35980de9c03789229ad36087fb1f4d9bde468aec653c658"),
    _entry(34, True, "253 MB", 253276232, "3ea7188e396774e4ef95b66e5e90a78273bb33f6e58d3d717bf24f5f1aaeaa28"),
    _entry(50, False, "185 MB", 184885051, "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84"),
    _entry(50, True, "185 MB", 184885051, "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e"),
    _entry(101, False, "341 MB", 341330267, "a26bbcf9b2ad35f048b0fa317234c003f171a4d719760e5c4aff9f793654ebcf"),
    _entry(152, False, "470 MB", None, "e96c459f5317ef2cbb898c91575402da2c78b31a31f55c5d28943683fe0626da"),
    _entry(200, False, "507 MB", 507146295, "df58525b0276117169782617a379480d2cbc75230e84e152c603bf22a1fabfa8"),
)


def known_names() -> List[str]:
    return [m.name for m in KNOWN_MODELS]


def find_known(name: str) -> Optional[KnownModel]:
    """The catalog entry called ``name`` (or whose file is ``name``), else None."""
    for model in KNOWN_MODELS:
        if name in (model.name, model.file):
            return model
    return None


def known_model(name: str) -> KnownModel:
    model = find_known(name)
    if model is None:
        raise Med3DError(f"'{name}' is not in the model catalog; known: {', '.join(known_names())} "
                         "(med3d models list)")
    return model


# ------------------------------------------------------------------------------------------- the record

def _folder(folder: Optional[PathLike]) -> Path:
    return Path(folder) if folder is not None else models_dir()


def read_record(folder: Optional[PathLike] = None) -> Dict[str, Dict[str, Any]]:
    """File name -> what was recorded when it was pulled or imported (``sha256``, ``size``, ``name``, ...)."""
    path = _folder(folder) / RECORD_NAME
    try:
        from .safe_io import read_text

        data = json.loads(read_text(path, "model record", limit=1 << 20))
    except (Med3DError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _write_record(folder: Path, record: Dict[str, Dict[str, Any]]) -> None:
    from .safe_io import write_text

    write_text(folder / RECORD_NAME, json.dumps(record, indent=2, sort_keys=True), overwrite=True,
               what="model record")


def _remember(folder: Path, model: KnownModel, path: Path, sha: str, how: str, source: str) -> None:
    record = read_record(folder)
    record[path.name] = {"name": model.name, "sha256": sha, "size": path.stat().st_size, "how": how,
                         "source": source, "added": datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds")}
    _write_record(folder, record)


# ------------------------------------------------------------------------------------------- checks

def check_architecture(path: Path, model: KnownModel) -> None:
    """``path`` must hold a MedicalNet 3D-ResNet of ``model``'s depth and shortcut (imports torch)."""
    from .bundles import inspect_file
    from .medicalnet import describe_architecture

    info = inspect_file(path)
    found = {k: info[k] for k in ("depth", "shortcut_type", "preact")}
    wanted = {"depth": model.depth, "shortcut_type": model.shortcut_type, "preact": False}
    if info["format"] == "med3d-bundle" or found != wanted:
        what = "a Med3D model" if info["format"] == "med3d-bundle" else describe_architecture(found)
        raise Med3DError(f"{path.name} holds {what}, not {model.name} ({describe_architecture(wanted)}); it is "
                         "not the file the catalog lists")


def _check_against_table(path: Path, model: KnownModel, sha: str) -> None:
    size = path.stat().st_size
    if model.size is not None and size != model.size:
        raise Med3DError(f"{path} has {size} bytes, but {model.file} as published has {model.size}; it is not the "
                         f"published file (a partial or different copy?)")
    if model.sha256 is not None and sha != model.sha256:
        raise Med3DError(f"{path} has SHA-256 {sha}, but {model.file} as published has {model.sha256}; it is not "
                         "the published file")


def verify(path: PathLike, model: KnownModel, folder: Optional[PathLike] = None) -> str:
    """Check a catalog file before it is used: its SHA-256 must equal the one recorded when it was pulled or
    imported (and the table's, where the table has one). A file placed by hand without a record is checked
    against the table and its architecture, then recorded. Returns the SHA-256."""
    from .downloads import sha256_of

    path, folder = Path(path), _folder(folder)
    sha = sha256_of(path)
    recorded = read_record(folder).get(path.name)
    if recorded is not None and recorded.get("sha256") != sha:
        raise Med3DError(f"{path} changed since it was {recorded.get('how', 'added')} (SHA-256 {sha}, recorded "
                         f"{recorded.get('sha256')}); get it again: med3d models remove {model.name} && "
                         f"med3d models pull {model.name}")
    _check_against_table(path, model, sha)
    if recorded is None:
        check_architecture(path, model)
        try:
            _remember(folder, model, path, sha, "found", str(path))
        except Med3DError:
            pass  # a read-only models folder: the file was checked, it just cannot be recorded
    return sha


def resolve(init: str, folder: Optional[PathLike] = None) -> Optional[Tuple[Path, KnownModel, str]]:
    """For ``--init``: a catalog name (or a file of the models folder that the catalog lists) -> (path, entry,
    verified SHA-256); None when ``init`` is neither (an ordinary path). A catalog model that is not in the
    folder yet is an error saying how to get it; nothing is downloaded here."""
    folder = _folder(folder)
    model = find_known(init)
    if model is not None and init == model.name:
        path = folder / model.file
        if not path.is_file():
            raise Med3DError(f"{model.name} is not in {folder} yet: download it with 'med3d models pull {model.name}' "
                             f"({model.approx_size} from {model.page}), or get {model.file} by hand and run "
                             f"'med3d models import {model.file}'")
        return path, model, verify(path, model, folder)
    path = Path(init)
    model = find_known(path.name)
    if model is not None and path.is_file() and path.resolve().parent == folder.resolve():
        return path, model, verify(path, model, folder)
    return None


# ------------------------------------------------------------------------------------------- commands

def status(folder: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """One dict per catalog entry: the table's fields, ``state`` (``downloaded``, ``partial`` or ``missing``),
    ``path``, ``bytes`` on disk and the recorded ``sha256``. Reads no file contents."""
    from .downloads import partial_path

    folder = _folder(folder)
    record = read_record(folder)
    rows = []
    for model in KNOWN_MODELS:
        path, partial = folder / model.file, partial_path(folder / model.file)
        row: Dict[str, Any] = {"name": model.name, "file": model.file, "depth": model.depth,
                               "shortcut_type": model.shortcut_type, "datasets": model.datasets,
                               "approx_size": model.approx_size, "size": model.size, "licence": model.licence,
                               "url": model.url, "description": model.description, "path": str(path)}
        if path.is_file():
            row.update(state="downloaded", bytes=path.stat().st_size,
                       sha256=(record.get(model.file) or {}).get("sha256"))
        elif partial.is_file():
            row.update(state="partial", bytes=partial.stat().st_size)
        else:
            row.update(state="missing", bytes=0)
        rows.append(row)
    return rows


def pull(name: str, folder: Optional[PathLike] = None, reporter: Optional[Callable[[Dict[str, Any]], None]] = None,
         timeout: float = 60.0, resume: bool = True) -> Path:
    """Download catalog model ``name`` into the models folder (created if needed); resumes a partial download.
    The file is checked (size, SHA-256 where published, architecture) before it is moved into place, and its
    SHA-256 recorded. Already there: checked against its record and kept."""
    from .downloads import fetch

    model = known_model(name)
    folder = _folder(folder)
    path = folder / model.file
    if path.exists():
        verify(path, model, folder)
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Med3DError(f"cannot create the models folder {folder}: {exc.strerror or exc}; set MED3D_MODELS to a "
                         "folder you may write to") from None
    _, sha = fetch(model.url, path, sha256=model.sha256, size=model.size, reporter=reporter, timeout=timeout,
                   resume=resume, verify=lambda staged: check_architecture(staged, model))
    _remember(folder, model, path, sha, "pulled", model.url)
    return path


def import_file(source: PathLike, name: Optional[str] = None, folder: Optional[PathLike] = None) -> Path:
    """Copy a catalog model obtained by hand into the models folder (offline sites). ``name`` is the catalog name;
    by default the one whose file name ``source`` has. Checked like a download; an existing file is kept."""
    import shutil

    from .downloads import sha256_of
    from .safe_io import regular_file, write_atomically

    source = Path(source)
    regular_file(source, "model file")
    model = known_model(name) if name else find_known(source.name)
    if model is None:
        raise Med3DError(f"{source.name} is not a file the catalog lists; name the model with --name (one of "
                         f"{', '.join(known_names())}), or use the file directly: med3d finetune --init {source}")
    folder = _folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / model.file
    sha = sha256_of(source)
    _check_against_table(source, model, sha)
    check_architecture(source, model)
    if target.exists():
        if sha256_of(target) != sha:
            raise Med3DError(f"{target} is already there with other contents; remove it first: med3d models remove "
                             f"{model.name}")
    elif source.resolve() != target.resolve():
        write_atomically(target, lambda staged: shutil.copyfile(source, staged), what="model")
    _remember(folder, model, target, sha, "imported", str(source))
    return target


def remove(name: str, folder: Optional[PathLike] = None) -> List[Path]:
    """Delete a catalog model's file, its unfinished download and its record; returns what was removed. Models a
    user trained are not catalog models and are never removed here."""
    from .downloads import discard_partial, partial_path

    model = known_model(name)
    folder = _folder(folder)
    path = folder / model.file
    removed = [p for p in (path, partial_path(path)) if p.is_file()]
    if path.is_file():
        path.unlink()
    discard_partial(path)
    record = read_record(folder)
    if record.pop(model.file, None) is not None:
        _write_record(folder, record)
    if not removed:
        raise Med3DError(f"{model.name} is not in {folder}; nothing to remove")
    return removed
