"""Which model or method ``infer.segment`` uses: the model given, the task's model in the models folder
(``catalog.models_dir()``), or the weight-free classical method for lungs; a combination that cannot work is one
clear line saying what to give instead."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

from .bundles import Bundle, list_models
from .errors import Med3DError

ModelLike = Union[str, "os.PathLike[str]", Bundle]

# How segment() finds the labels: "model" a Med3D bundle; "classical" the weight-free lung method
# (classical_lung.py); "auto" the given model, else the task's model in the models folder, else classical (lung).
METHODS = ("auto", "model", "classical")
CLASSICAL_TASKS = ("lung",)


def find_task_model(task: str) -> Optional[Path]:
    """The one segmentation model for ``task`` in the models folder (``catalog.models_dir()``), None when there is
    none; several are a Med3DError (the user must choose)."""
    from .catalog import models_dir

    folder = models_dir()
    found = [m for m in list_models(folder)
             if m.error is None and m.task.get("type") == "segmentation" and m.task.get("name") == task]
    if len(found) > 1:
        names = ", ".join(m.path.name for m in found)
        raise Med3DError(f"several '{task}' models in {folder} ({names}); choose one with --model")
    return found[0].path if found else None


def choose_method(model: Optional[ModelLike], task: Optional[str], method: str = "auto"
                  ) -> Tuple[str, Optional[ModelLike]]:
    """("model", the model or the task's model from the models folder) or ("classical", None), as
    ``infer.segment`` decides for ``method`` (see :data:`METHODS`); a combination that cannot work is a Med3DError
    saying what to give instead."""
    from .catalog import models_dir

    if method not in METHODS:
        raise Med3DError(f"unknown segmentation method {method!r}; choose {', '.join(METHODS)}")
    if method == "classical":
        if task is not None and task not in CLASSICAL_TASKS:
            raise Med3DError(f"the classical method segments lungs only, not '{task}'; use --task lung, or "
                             f"--method model with a '{task}' model")
        if model is not None:
            raise Med3DError("--method classical uses no model; leave out --model, or use --method model")
        return "classical", None
    if model is not None:
        return "model", model
    found = find_task_model(task) if task else None
    if found is not None:
        return "model", found
    if method == "auto" and task in CLASSICAL_TASKS:
        return "classical", None
    if not task:
        raise Med3DError("give a model (--model FILE), or a task (--task lung, liver, ...) to use a model from the "
                         "models folder")
    hint = "; or use --method classical (no weights)" if task in CLASSICAL_TASKS else ""
    raise Med3DError(f"no --model given and no '{task}' segmentation model in {models_dir()} (set MED3D_MODELS to "
                     f"use another folder); make one with `med3d finetune --task {task} ...` and pass --model FILE "
                     f"or copy the .pt file there{hint}")
