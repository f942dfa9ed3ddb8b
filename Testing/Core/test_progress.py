"""The progress-event stream: JSON lines survive NaN losses and stray output; the bar draws and ends lines."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.progress import (BarReporter, JsonlReporter, decode_event, encode_event, make_event,
                                make_reporter)


def test_event_round_trip_with_numpy_and_nan() -> None:
    event = make_event("pretrain", step=3, total=10, metrics={"loss": np.float32(0.5), "dice": float("nan")})
    line = encode_event(event)
    assert "\n" not in line
    back = decode_event(line)
    assert back == {"kind": "progress", "stage": "pretrain", "step": 3, "total": 10,
                    "metrics": {"loss": 0.5, "dice": "nan"}}


@pytest.mark.parametrize("line", ["", "hello", "{not json", "[1, 2]", '{"step": 1}'])
def test_non_events_are_ignored(line: str) -> None:
    assert decode_event(line) is None


def test_jsonl_reporter_writes_one_line_per_event() -> None:
    stream = io.StringIO()
    reporter = JsonlReporter(stream)
    reporter(make_event("finetune", 1, 2, metrics={"loss": 1.0}))
    reporter(make_event("finetune", kind="message", message="saved best model"))
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["progress", "message"]


def test_bar_reporter_draws_and_finishes_line() -> None:
    stream = io.StringIO()
    bar = BarReporter(stream, width=100)
    bar(make_event("train", 0, 4, metrics={"loss": 2.0}))
    bar(make_event("train", 4, 4, metrics={"loss": 1.0}))
    bar(make_event("train", kind="message", message="done"))
    text = stream.getvalue()
    assert "train: 100%" in text and "4/4" in text and "loss=1" in text
    assert text.endswith("[train] done\n")


def test_bar_restarts_its_clock_per_run_and_shows_rate_eta_and_bytes() -> None:
    """Two runs of one stage (the demo's pretrained and scratch fine-tuning) each get their own elapsed time."""
    import time

    stream = io.StringIO()
    bar = BarReporter(stream, width=100)
    bar(make_event("finetune", 0, 3, kind="message", message="starting"))
    for step in (1, 2):
        time.sleep(0.3)
        bar(make_event("finetune", step, 3, metrics={"loss": 1.0}))
    time.sleep(1.1)
    bar(make_event("finetune", 0, 3, kind="message", message="starting again"))
    bar(make_event("finetune", 1, 3))
    frames = [f for f in stream.getvalue().replace("\n", "\r").split("\r") if f.startswith("finetune:")]
    assert "<00:00" in frames[2] and "step/s" in frames[2]  # rate and time left once steps arrived
    assert "[00:00<" in frames[-1]  # the second run's clock starts at zero, not at the first run's 1.7 s
    stream = io.StringIO()
    bar = BarReporter(stream, width=100)
    bar(make_event("download", 1_500_000, 3_000_000, unit="B"))
    bar(make_event("download", 3_000_000, 3_000_000, unit="B"))
    assert "3.00M/3.00M" in stream.getvalue() and "B/s" in stream.getvalue()


def test_unknown_mode() -> None:
    with pytest.raises(Med3DError, match="unknown progress mode 'xml'"):
        make_reporter("xml")
