"""Reader for the engine's progress-line protocol (one JSON event per line, ``--progress jsonl``).

Lines are decoded with ``med3dcore.progress.decode_event``; lines that are not events (stray prints, warnings)
are kept as log text. The reader folds events into a state the panel shows: stage, step/total, the loss
curve, the last message, the final result or error.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from med3dcore.progress import decode_event


def _number(value: Any) -> Optional[float]:
    # NaN/inf arrive as strings ("nan", "inf") because JSON cannot hold them.
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


class ProgressState:
    """What a background run has reported so far."""

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key
        self.stage: Optional[str] = None
        self.step: Optional[int] = None
        self.total: Optional[int] = None
        self.losses: List[Tuple[int, float]] = []      # (step, training loss)
        self.metrics: Dict[str, float] = {}             # the latest value of every metric
        self.messages: List[str] = []
        self.log: List[str] = []                        # lines that were not events
        self.result: Optional[Dict[str, Any]] = None
        self.error: Optional[str] = None
        self._count = 0

    @property
    def fraction(self) -> Optional[float]:
        """Progress of the current stage in 0..1, or None when the stage has no known total."""
        if not self.total or self.step is None:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def feed(self, line: str) -> Optional[Dict[str, Any]]:
        """Take one line; returns the decoded event, or None for a non-event line (kept in ``log``)."""
        event = decode_event(line)
        if event is None:
            text = line.rstrip("\n")
            if text.strip():
                self.log.append(text)
            return None
        self._apply(event)
        return event

    def _apply(self, event: Dict[str, Any]) -> None:
        kind = event.get("kind", "progress")
        self.stage = str(event.get("stage", self.stage))
        if kind == "error":
            self.error = str(event.get("message") or event)
            return
        if kind == "result":
            self.result = event
        if kind == "message" and event.get("message"):
            self.messages.append(str(event["message"]))
        if "step" in event:
            self.step = int(event["step"])
        if "total" in event:
            self.total = int(event["total"])
        metrics = event.get("metrics") or {}
        for name, value in metrics.items():
            number = _number(value)
            if number is not None:
                self.metrics[str(name)] = number
        loss = _number(metrics.get(self.loss_key))
        if kind == "progress" and loss is not None:
            self._count += 1
            x = self.step if self.step is not None else self._count
            self.losses.append((x, loss))

    @property
    def diverged(self) -> bool:
        """True when the latest loss is NaN or infinite."""
        return bool(self.losses) and not math.isfinite(self.losses[-1][1])

    def status_text(self) -> str:
        """One line for the panel, e.g. ``train 12/40 loss=0.4132``."""
        if self.error:
            return f"error: {self.error}"
        parts = [self.stage or "starting"]
        if self.step is not None:
            parts.append(f"{self.step}/{self.total}" if self.total else str(self.step))
        if self.losses:
            parts.append(f"{self.loss_key}={self.losses[-1][1]:.4g}")
        return " ".join(parts)
