"""Progress events from the engine and the reporters that show them.

An event is a flat JSON-serialisable dict with at least ``stage`` (e.g. ``"pretrain"``), and usually ``step`` and
``total`` and a ``metrics`` dict. ``kind`` is ``"progress"`` (default), ``"message"``, ``"result"`` or ``"error"``.
The Slicer module reads them, one JSON object per line, from a background process (``--progress jsonl``).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable, Dict, Optional, TextIO

Event = Dict[str, Any]
Reporter = Callable[[Event], None]

PROGRESS_MODES = ("bar", "jsonl", "none")


def make_event(stage: str, step: Optional[int] = None, total: Optional[int] = None,
               kind: str = "progress", **fields: Any) -> Event:
    """Build an event; ``fields`` may hold ``metrics`` (name -> float), ``message`` and anything JSON-able."""
    event: Event = {"kind": kind, "stage": stage}
    if step is not None:
        event["step"] = int(step)
    if total is not None:
        event["total"] = int(total)
    event.update(fields)
    return event


def _json_safe(value: Any) -> Any:
    # NaN/inf are not JSON; send them as strings so a reader never chokes on a diverging loss.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def encode_event(event: Event) -> str:
    """One line of JSON, no newline inside."""
    return json.dumps(_json_safe(event), separators=(",", ":"), allow_nan=False)


def decode_event(line: str) -> Optional[Event]:
    """Parse one line of a progress stream; returns None for lines that are not events (e.g. stray prints)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or "stage" not in event:
        return None
    return event


class JsonlReporter:
    """Writes each event as one JSON line and flushes, so a reading process sees it at once."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        self.stream.write(encode_event(event) + "\n")
        self.stream.flush()


def _format_metrics(metrics: Dict[str, Any]) -> str:
    parts = []
    for name, value in metrics.items():
        parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


class BarReporter:
    """Terminal progress bars (tqdm): one bar per stage run, with the stage's own elapsed time, rate and ETA.

    A bar ends when its stage reaches its total, when another stage reports, or when the same stage starts over
    (a lower step or another total: the next of two fine-tuning runs gets a fresh clock). Messages are printed
    above the bar. Events may carry ``unit`` (``"B"`` for downloads: sizes and speeds in kB/MB; ``"tile"``).
    """

    def __init__(self, stream: Optional[TextIO] = None, width: Optional[int] = None) -> None:
        from tqdm import tqdm  # only a terminal needs it: the Slicer module's jsonl stream does not

        self._tqdm = tqdm
        self.stream = stream or sys.stderr
        self.width = width
        self._bar: Any = None
        self._key: Optional[tuple] = None

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._key = None, None

    def _open(self, stage: str, total: Optional[int], unit: str, initial: Optional[int]) -> None:
        self._close()
        byte_sizes = unit == "B"
        # initial: a bar opened at step n counts its rate from there, not as n steps in no time
        self._bar = self._tqdm(total=total, initial=initial or 0, desc=stage, unit=unit, unit_scale=byte_sizes,
                               unit_divisor=1000, file=self.stream, ncols=self.width,
                               dynamic_ncols=self.width is None, mininterval=0.1, leave=True,
                               ascii=not getattr(self.stream, "isatty", lambda: False)())
        self._key = (stage, total, unit)

    def _is_new(self, stage: str, step: Optional[int], total: Optional[int], unit: str) -> bool:
        return self._bar is None or self._key != (stage, total, unit) or (step is not None and step < self._bar.n)

    def __call__(self, event: Event) -> None:
        kind = event.get("kind", "progress")
        stage = str(event.get("stage", ""))
        step, total = event.get("step"), event.get("total")
        unit = str(event.get("unit") or "step")
        if kind != "progress":
            text = event.get("message") or _format_metrics(event.get("metrics", {}))
            line = f"[{stage}] {text}"
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
            if kind == "message" and total is not None and self._is_new(stage, step, total, unit):
                self._open(stage, total, unit, step)  # e.g. "starting": the stage's clock starts now
                self._bar.refresh()
            return
        if self._is_new(stage, step, total, unit):
            self._open(stage, total, unit, step)
        bar = self._bar
        metrics = _format_metrics(event.get("metrics", {}))
        if metrics:
            bar.set_postfix_str(metrics, refresh=False)
        if step is not None and step != bar.n:
            bar.update(step - bar.n)
        if total is not None and step is not None and step >= total:
            bar.refresh()
            self._close()
        elif step in (0, None):
            bar.refresh()  # a new bar shows at once; tqdm paces the redraws that follow

    def close(self) -> None:
        """End an open bar (e.g. before printing a summary)."""
        self._close()


def null_reporter(event: Event) -> None:
    """Discards events."""


def make_reporter(mode: str = "bar") -> Reporter:
    """Reporter for a ``--progress`` mode: ``bar`` (stderr), ``jsonl`` (stdout) or ``none``."""
    if mode == "bar":
        return BarReporter()
    if mode == "jsonl":
        return JsonlReporter()
    if mode == "none":
        return null_reporter
    from .errors import Med3DError
    raise Med3DError(f"unknown progress mode '{mode}'; choose one of: {', '.join(PROGRESS_MODES)}")
