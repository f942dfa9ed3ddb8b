"""Progress events from the engine and the reporters that show them.

An event is a flat JSON-serialisable dict with at least ``stage`` (e.g. ``"pretrain"``), and usually ``step`` and
``total`` and a ``metrics`` dict. ``kind`` is ``"progress"`` (default), ``"message"``, ``"result"`` or ``"error"``.
The Slicer module reads them, one JSON object per line, from a background process (``--progress jsonl``).
"""
from __future__ import annotations

import json
import math
import sys
import time
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
    """A one-line terminal progress bar per stage, redrawn at most ten times a second."""

    def __init__(self, stream: Optional[TextIO] = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last_draw = 0.0
        self._open_stage: Optional[str] = None
        self._start: Dict[str, float] = {}

    def _end_line(self) -> None:
        if self._open_stage is not None:
            self.stream.write("\n")
            self._open_stage = None

    def __call__(self, event: Event) -> None:
        kind = event.get("kind", "progress")
        stage = str(event.get("stage", ""))
        if kind != "progress":
            self._end_line()
            text = event.get("message") or _format_metrics(event.get("metrics", {}))
            self.stream.write(f"[{stage}] {text}\n")
            self.stream.flush()
            return
        step, total = event.get("step"), event.get("total")
        now = time.monotonic()
        self._start.setdefault(stage, now)
        last = step is not None and total is not None and step >= total
        if self._open_stage == stage and not last and now - self._last_draw < 0.1:
            return
        if self._open_stage not in (None, stage):
            self._end_line()
        self._last_draw = now
        if total:
            frac = min(max((step or 0) / total, 0.0), 1.0)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            head = f"{stage} [{bar}] {step}/{total}"
        else:
            head = f"{stage} {step if step is not None else ''}"
        elapsed = now - self._start[stage]
        metrics = _format_metrics(event.get("metrics", {}))
        self.stream.write(f"\r{head} {elapsed:5.0f}s {metrics}\x1b[K")
        self._open_stage = stage
        if last:
            self._end_line()
        self.stream.flush()


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
