"""Med3DLib.segments (names, colours, Slicer terminology strings) and Med3DLib.progress_reader (the JSON-lines
protocol the engine writes with ``--progress jsonl``)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from Med3DLib import progress_reader, segments
from med3dcore.progress import JsonlReporter, make_event

LUNG_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                    "~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^"
                    "~Anatomic codes - DICOM master list~^^~^^")


def test_terminology_string_in_slicers_seven_part_format() -> None:
    assert segments.terminology_string("SCT^39607008^Lung", "lung") == LUNG_TERMINOLOGY
    parts = segments.parse_terminology(LUNG_TERMINOLOGY)
    assert parts["category"] == ("SCT", "123037004", "Anatomical Structure")
    assert parts["type"] == ("SCT", "39607008", "Lung")


def test_lesion_codes_get_the_altered_structure_category() -> None:
    parts = segments.parse_terminology(segments.terminology_string("SCT^108369006^Neoplasm", "tumour"))
    assert parts["category"] == ("SCT", "49755003", "Morphologically Altered Structure")
    assert parts["type"] == ("SCT", "108369006", "Neoplasm")


@pytest.mark.parametrize("code", [None, "", "Lung", "SCT^^Lung", "a^b"])
def test_missing_or_malformed_codes_fall_back_to_tissue(code) -> None:
    parts = segments.parse_terminology(segments.terminology_string(code, "my organ"))
    assert parts["category"] == ("SCT", "85756007", "Tissue")
    assert parts["type"] == ("SCT", "85756007", "Tissue")  # a code keeps its standard meaning


def test_segment_specs_names_colours_and_unknown_labels() -> None:
    info = [{"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": "SCT^10200004^Liver"},
            {"value": 2, "name": "liver tumour", "color": [144, 238, 144], "terminology": "SCT^108369006^Neoplasm"}]
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 1, 2, 7
    present = segments.labels_present(labels)
    assert present == [1, 2, 7]
    specs = segments.segment_specs(info, present)
    assert [s.name for s in specs] == ["liver", "liver tumour", "Label 7"]
    np.testing.assert_allclose(specs[0].color, np.array([221, 130, 101]) / 255.0)
    assert specs[2].color == tuple(c / 255.0 for c in segments.FALLBACK_COLORS[2])
    assert "SCT^10200004^Liver" in specs[0].terminology
    assert segments.missing_labels(info, [1]) == ["liver tumour"]


def test_duplicate_names_are_made_unique() -> None:
    info = [{"value": 1, "name": "lung"}, {"value": 2, "name": "lung"}]
    assert [s.name for s in segments.segment_specs(info, [1, 2])] == ["lung", "lung 2"]


# -------------------------------------------------------------------------------------------- progress lines

def engine_lines(events) -> list:
    """Lines exactly as the engine's JSON-lines reporter writes them."""
    stream = io.StringIO()
    reporter = JsonlReporter(stream)
    for event in events:
        reporter(event)
    return stream.getvalue().splitlines()


def test_progress_state_follows_a_training_stream() -> None:
    events = [make_event("finetune", kind="message", message="3 training cases, 1 validation case"),
              make_event("train", 1, 4, metrics={"loss": 0.9, "lr": 0.001}),
              make_event("train", 2, 4, metrics={"loss": 0.7}),
              make_event("validate", 2, 4, metrics={"dice": 0.5})]
    state = progress_reader.ProgressState()
    lines = engine_lines(events)
    lines.insert(2, "UserWarning: something a library printed")
    decoded = [state.feed(line) for line in lines]
    assert decoded[2] is None and state.log == ["UserWarning: something a library printed"]
    assert state.losses == [(1, 0.9), (2, 0.7)]
    assert state.metrics == {"loss": 0.7, "lr": 0.001, "dice": 0.5}
    assert state.messages == ["3 training cases, 1 validation case"]
    assert state.fraction == 0.5 and state.stage == "validate"
    assert state.status_text() == "validate 2/4 loss=0.7"
    assert not state.diverged and state.result is None and state.error is None


def test_nan_loss_error_and_result_events() -> None:
    state = progress_reader.ProgressState()
    for line in engine_lines([make_event("train", 3, 10, metrics={"loss": float("nan")})]):
        state.feed(line)
    assert '"nan"' in engine_lines([make_event("train", 3, 10, metrics={"loss": float("nan")})])[0]
    assert state.diverged
    state.feed(engine_lines([make_event("finetune", kind="result", model="/m/new.pt")])[0])
    assert state.result["model"] == "/m/new.pt"
    state.feed(engine_lines([make_event("finetune", kind="error", message="loss is NaN at step 3")])[0])
    assert state.error == "loss is NaN at step 3"
    assert state.status_text() == "error: loss is NaN at step 3"


def test_steps_missing_fall_back_to_a_counter_and_fraction_is_none_without_total() -> None:
    state = progress_reader.ProgressState()
    state.feed('{"kind":"progress","stage":"train","metrics":{"loss":1.5}}')
    state.feed('{"kind":"progress","stage":"train","metrics":{"loss":1.0}}')
    assert state.losses == [(1, 1.5), (2, 1.0)]
    assert state.fraction is None
    assert state.feed('{"not an event": 1}') is None and state.feed("{broken json") is None
