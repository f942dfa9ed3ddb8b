"""The model list of the panel: known models on disk for a task, and what to say when there is none."""
from __future__ import annotations

from typing import Any, Iterable, List, Optional

from med3dcore.errors import Med3DError

# Panel task -> the engine task name a model bundle records.
TASKS = {"lung": "segmentation", "liver": "segmentation", "nodule": "classification"}
TASK_TITLES = {"lung": "Lung segmentation", "liver": "Liver segmentation", "nodule": "Nodule classification"}


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
    """The models whose recorded task name is ``task`` (``lung``, ``liver``, ``nodule``)."""
    return [info for info in models if _task_name(info) == task]


def no_model_text(task: str, folder: str) -> str:
    """The explanation shown where the model list is empty."""
    return (f"No {TASK_TITLES.get(task, task).lower()} model is in {folder} yet. Add one with "
            f"'Add model file...' (a Med3D .pt bundle), train one under 'Fine-tune', or copy bundles into "
            "that folder; Med3D never downloads weights by itself.")


def pick_model(models: Iterable[Any], task: str, model: Optional[str], folder: str) -> str:
    """The bundle path to use: ``model`` (a path or a known model's name), else the first model of the task."""
    import os

    candidates = list(models)
    if model:
        if os.path.isfile(model):
            return model
        for info in candidates:
            if getattr(info, "name", None) == model:
                return str(info.path)
        raise Med3DError(f"model '{model}' is neither a file nor a known model in {folder}; give the path of a "
                         "Med3D bundle (.pt) or one of the names listed in the module's model menu")
    matching = models_for_task(candidates, task)
    if not matching:
        raise Med3DError(no_model_text(task, folder))
    return str(matching[0].path)
