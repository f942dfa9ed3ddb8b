"""The model lists of the panel: the models on disk for a task (plus the engine's weights-free lung method),
starting models for fine-tuning, and what to say when a task has no model."""
from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Tuple

from med3dcore.errors import Med3DError

# Panel task -> the engine task type a model bundle records.
TASKS = {"lung": "segmentation", "liver": "segmentation", "nodule": "classification"}
TASK_TITLES = {"lung": "Lung segmentation", "liver": "Liver segmentation", "nodule": "Nodule classification"}

# The engine's lung method that needs no weights (``med3d segment --task lung --method classical``): the value
# stored in place of a model path, and how the panel names it.
CLASSICAL = "classical"
CLASSICAL_TITLE = "Classical lung method (threshold, no weights)"
CLASSICAL_TASKS = ("lung",)
FROM_SCRATCH = "(from scratch)"


def task_from_title(title: str) -> str:
    for key, text in TASK_TITLES.items():
        if text == title or key == title:
            return key
    raise Med3DError(f"unknown task '{title}'; choose one of: {', '.join(TASK_TITLES)}")


def _task_name(info: Any) -> str:
    task = getattr(info, "task", "")
    if isinstance(task, dict):  # a bundle's {"type": ..., "name": ...}
        task = task.get("name") or task.get("type") or ""
    return str(task or "").lower()


def models_for_task(models: Iterable[Any], task: str) -> List[Any]:
    """The usable Med3D models whose recorded task name is ``task`` (``lung``, ``liver``, ``nodule``)."""
    return [info for info in models if getattr(info, "kind", "bundle") == "bundle"
            and not getattr(info, "error", None) and _task_name(info) == task]


def model_choices(models: Iterable[Any], task: str) -> List[Tuple[str, str]]:
    """(title, value) per entry of the panel's model list: the task's models, then for lung the classical
    method, which is therefore the lung model whenever no trained one is present."""
    choices = [(str(info.name), str(info.path)) for info in models_for_task(models, task)]
    if task in CLASSICAL_TASKS:
        choices.append((CLASSICAL_TITLE, CLASSICAL))
    return choices


# A start-model value whose catalog file is not in the models folder yet (the panel offers Download for it).
NOT_DOWNLOADED = "catalog:"


def catalog_title(model: Any) -> str:
    """How the panel names a catalog encoder, e.g. "MedicalNet ResNet-50 (23 datasets)"."""
    datasets = "23 datasets" if model.name.endswith("-23datasets") else "3DSeg-8"
    return f"MedicalNet ResNet-{model.depth} ({datasets})"


def pending_name(value: Optional[str]) -> Optional[str]:
    """The catalog name of a start-model value that still needs a download, else None."""
    return value[len(NOT_DOWNLOADED):] if value and value.startswith(NOT_DOWNLOADED) else None


def start_model_choices(models: Iterable[Any]) -> List[Tuple[str, str]]:
    """Fine-tuning can start from scratch, from any Med3D model's encoder or weights file in the models folder,
    or from a published MedicalNet encoder of the engine's catalog: by its name when its file is there (the
    engine checks it against its recorded SHA-256), else as ``catalog:NAME``, titled with the download's size."""
    import med3dcore.catalog as catalog

    listed = list(models)
    known = {m.file for m in catalog.KNOWN_MODELS}
    present = {os.path.basename(str(m.path)) for m in listed}
    own = [(str(m.name), str(m.path)) for m in listed if not getattr(m, "error", None) and getattr(m, "kind", "bundle")
           and os.path.basename(str(m.path)) not in known]
    published = [(catalog_title(m), m.name) if m.file in present else
                 (f"{catalog_title(m)} - not downloaded ({m.approx_size})", NOT_DOWNLOADED + m.name)
                 for m in catalog.KNOWN_MODELS]
    return [(FROM_SCRATCH, "")] + own + published


def pick_start_model(models: Iterable[Any], value: str, folder: str) -> str:
    """The ``--init`` of a fine-tuning run: a catalog name (checked by the engine), or a file as
    :func:`pick_model` finds it; a catalog encoder that is not downloaded yet is an error saying how to get it."""
    import med3dcore.catalog as catalog

    pending = pending_name(value)
    if pending:
        raise Med3DError(f"{pending} is not downloaded yet: press Download next to the starting model (or run "
                         f"med3d models pull {pending})")
    known = catalog.find_known(value)
    if known is not None and value == known.name:
        return value
    return pick_model(models, "", value, folder)


def no_model_text(task: str, folder: str) -> str:
    """The explanation shown where the model list is empty."""
    return (f"No {TASK_TITLES.get(task, task).lower()} model is in {folder} yet. Add one with "
            f"'Add model file...' (a Med3D .pt bundle), train one under 'Fine-tune', or copy bundles into "
            "that folder; Med3D never downloads weights by itself.")


def pick_model(models: Iterable[Any], task: str, model: Optional[str], folder: str) -> str:
    """What to run: ``model`` (a path, a known model's name or ``"classical"``), else the task's first choice
    (for lung without a trained model: the classical method)."""
    candidates = list(models)
    if model:
        if model == CLASSICAL:
            if task not in CLASSICAL_TASKS:
                raise Med3DError(f"the classical method exists for {', '.join(CLASSICAL_TASKS)} only, not {task}")
            return CLASSICAL
        if os.path.isfile(model):
            return model
        for info in candidates:
            if getattr(info, "name", None) == model and not getattr(info, "error", None):
                return str(info.path)
        raise Med3DError(f"model '{model}' is neither a file nor a known model in {folder}; give the path of a "
                         "Med3D bundle (.pt) or one of the names listed in the module's model menu")
    choices = model_choices(candidates, task)
    if not choices:
        raise Med3DError(no_model_text(task, folder))
    return choices[0][1]
