"""Published encoders (the engine's model catalog, ``med3dcore.catalog``) as starting points for fine-tuning, and
their download: asked first, run in the background as ``med3d models pull NAME --progress jsonl`` through
:mod:`jobs`, with the panel's progress bar, Cancel, and the model lists refreshed when the file is in place.

The catalog table is read in Slicer's process (it needs no torch); the download and every check of the file (size,
SHA-256, network) run in the engine's background process. A cancelled download keeps its partial file, and the
next Download resumes it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

import med3dcore.catalog as catalog
from med3dcore.errors import Med3DError

from . import jobs, runner
from .models import catalog_title as title, pending_name

def question(name: str, folder: str) -> str:
    """What the confirmation dialog asks before anything is downloaded."""
    model = catalog.known_model(name)
    return (f"Download {title(model)} ({model.approx_size}) from {model.page}?\n\n{model.description}. "
            f"Licence: {model.licence}. It is saved in {folder} and checked (size, SHA-256, network) before use; "
            "an interrupted download resumes where it stopped.")


def download_command(python: str, name: str) -> List[str]:
    return jobs.engine_command(python, "models") + ["pull", name, "--progress", "jsonl"]


class DownloadJob(jobs.Job):
    """``med3d models pull`` in the background; ``path`` is where the file lands."""

    what = "the download"

    def __init__(self, name: str, folder: str) -> None:
        model = catalog.known_model(name)
        super().__init__(download_command(runner.python_executable(), model.name))
        self.process.env["MED3D_MODELS"] = folder  # the folder the panel lists, whatever the child's default
        self.name, self.path = model.name, os.path.join(folder, model.file)


class DownloadControl:
    """The panel's Download button: asks, starts the job (then ``on_started()``, e.g. the panel's polling timer),
    shows its progress in the fine-tuning status line, turns into Cancel while it runs, and once the file is in
    place calls ``on_done()`` (the panel refreshes its lists) and chooses the new model as the starting model."""

    def __init__(self, ui: Any, start: Callable[[str], Optional[DownloadJob]], on_done: Callable[[], None],
                 on_started: Callable[[], None]) -> None:
        self.ui, self._start, self._on_done, self._on_started = ui, start, on_done, on_started
        self.job: Optional[DownloadJob] = None
        ui.startModelComboBox.connect("currentIndexChanged(int)", self.update_button)
        ui.downloadModelButton.connect("clicked(bool)", self.clicked)
        self.update_button()

    def chosen(self) -> Optional[str]:
        combo = self.ui.startModelComboBox
        return pending_name(combo.itemData(combo.currentIndex)) if combo.currentIndex >= 0 else None

    def update_button(self, *args: Any) -> None:
        running = self.job is not None
        self.ui.downloadModelButton.text = "Cancel download" if running else "Download"
        self.ui.downloadModelButton.enabled = running or self.chosen() is not None

    def clicked(self, *args: Any) -> None:
        if self.job is not None:
            self.job.cancel()
            return
        name = self.chosen()
        if name is None:
            return
        import slicer

        with slicer.util.tryWithErrorDisplay("Could not start the download.", waitCursor=True):
            job = self._start(name)
            if job is None:  # the user said no
                return
            self.job = job
            self.ui.finetuneProgressBar.value = 0
            self.ui.finetuneProgressBar.show()
            self.ui.finetuneStatusLabel.text = f"Downloading {title(catalog.known_model(name))}..."
            self._on_started()
        self.update_button()

    def poll(self) -> bool:
        """Called by the panel's timer; True while the download runs."""
        job = self.job
        if job is None:
            return False
        going = job.poll()
        state = job.state
        if state.fraction is not None:
            self.ui.finetuneProgressBar.value = int(round(100 * state.fraction))
            self.ui.finetuneStatusLabel.text = (f"Downloading {job.name}: {state.step / 1e6:.0f} of "
                                                f"{state.total / 1e6:.0f} MB")
        if going:
            return True
        self.job = None
        self.ui.finetuneProgressBar.hide()
        failure = job.failure()
        if job.cancelled:
            self.ui.finetuneStatusLabel.text = "Download cancelled; Download again resumes it."
        elif failure:
            self.ui.finetuneStatusLabel.text = f"Download failed: {failure}"
            import slicer

            slicer.util.errorDisplay(failure, windowTitle="Med3D download")
        else:
            self.ui.finetuneStatusLabel.text = f"Downloaded and checked {job.path}"
            self._on_done()
            combo = self.ui.startModelComboBox
            combo.setCurrentIndex(max(combo.findData(job.name), 0))
        self.update_button()
        return False

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job = None


def start_download(name: str, folder: str, ask: bool = True) -> Optional[DownloadJob]:
    """Ask (unless ``ask`` is False), then start the background download; None when the user declines."""
    catalog.known_model(name)  # an unknown name is an error before any question
    if ask:
        import slicer

        if not slicer.util.confirmOkCancelDisplay(question(name, folder), windowTitle="Med3D: download a model"):
            return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise Med3DError(f"cannot create the models folder {folder}: {error.strerror or error}") from None
    return DownloadJob(name, folder).start()
