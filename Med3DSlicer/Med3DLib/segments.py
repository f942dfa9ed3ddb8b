"""Label values -> Slicer segments: names, colours and terminology strings in Slicer's serialised format.

Slicer stores a segment's meaning as one string of seven ``~``-separated parts (terminology context, category,
type, type modifier, anatomic context, anatomic region, region modifier); each coded part is
``scheme^value^meaning``. The engine's label info carries only the type code (e.g. ``SCT^39607008^Lung``);
the category is derived here from a short table of the codes Med3D's tasks produce.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
ALTERED_STRUCTURE = "SCT^49755003^Morphologically Altered Structure"
TISSUE = "SCT^85756007^Tissue"
EMPTY_CODE = "^^"

# SNOMED CT type codes of lesions (category "Morphologically Altered Structure"); other codes are anatomy.
ALTERED_TYPES = {
    "108369006",  # Neoplasm (tumour)
    "27925004",   # Nodule
    "4147007",    # Mass
    "52988006",   # Lesion
}

# Distinct fallback colours (0-255) for labels a model gave none.
FALLBACK_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


class SegmentSpec(NamedTuple):
    """One segment to create: label value, name, colour (0..1 floats) and serialised terminology."""
    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str


def _parse_code(code: str) -> Optional[Tuple[str, str, str]]:
    parts = str(code).split("^")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], parts[2]


def terminology_string(type_code: Optional[str], name: str) -> str:
    """Slicer's serialised terminology entry for a type code like ``SCT^39607008^Lung``.

    Without a valid code the segment gets the generic "Tissue" type (category and type ``SCT^85756007^Tissue``,
    as in Slicer's General Anatomy list) so Slicer still shows a valid entry; the segment's name says the rest
    (a code's meaning is the code's, never the segment's name, or a DICOM export would carry a wrong meaning).
    """
    parsed = _parse_code(type_code) if type_code else None
    if parsed is None:
        category, type_part = TISSUE, TISSUE
    else:
        scheme, value, meaning = parsed
        category = ALTERED_STRUCTURE if value in ALTERED_TYPES else ANATOMICAL_STRUCTURE
        type_part = f"{scheme}^{value}^{meaning or name}"
    return "~".join([TERMINOLOGY_CONTEXT, category, type_part, EMPTY_CODE, ANATOMIC_CONTEXT, EMPTY_CODE,
                     EMPTY_CODE])


def parse_terminology(serialised: str) -> Dict[str, Any]:
    """The parts of a serialised terminology entry (the inverse of :func:`terminology_string`)."""
    parts = serialised.split("~")
    if len(parts) != 7:
        raise ValueError(f"a Slicer terminology entry has 7 '~'-separated parts, got {len(parts)}")
    names = ("context", "category", "type", "type_modifier", "anatomic_context", "region", "region_modifier")
    result: Dict[str, Any] = {}
    for key, part in zip(names, parts):
        result[key] = part if key.endswith("context") else tuple(part.split("^"))
    return result


def _color(entry: Mapping[str, Any], index: int) -> Tuple[float, float, float]:
    rgb = entry.get("color")
    try:
        values = [float(c) for c in rgb]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3:
        values = [float(c) for c in FALLBACK_COLORS[index % len(FALLBACK_COLORS)]]
    return tuple(min(max(c / 255.0, 0.0), 1.0) for c in values)  # type: ignore[return-value]


def labels_present(labels: np.ndarray) -> List[int]:
    """Sorted non-zero label values in a label map."""
    values = np.unique(np.asarray(labels))
    return [int(v) for v in values if v != 0]


def segment_specs(label_info: Iterable[Mapping[str, Any]], present: Sequence[int]) -> List[SegmentSpec]:
    """One :class:`SegmentSpec` per non-zero value in ``present``.

    Values the model described keep its name, colour and terminology; a value the model did not describe
    (should not happen, but a user's own model may) becomes "Label N" with a fallback colour, so nothing is
    dropped silently. Duplicate names get a numeric suffix: Slicer identifies imported segments by name.
    """
    info = {int(entry["value"]): entry for entry in label_info if "value" in entry}
    specs: List[SegmentSpec] = []
    used: Dict[str, int] = {}
    for index, value in enumerate(sorted(int(v) for v in present if int(v) != 0)):
        entry = info.get(value, {})
        name = str(entry.get("name") or f"Label {value}").strip() or f"Label {value}"
        if name in used:
            used[name] += 1
            name = f"{name} {used[name]}"
        else:
            used[name] = 1
        specs.append(SegmentSpec(value, name, _color(entry, index),
                                 terminology_string(entry.get("terminology"), name)))
    return specs


def missing_labels(label_info: Iterable[Mapping[str, Any]], present: Sequence[int]) -> List[str]:
    """Names of labels the model knows but the result does not contain (worth telling the user)."""
    values = set(int(v) for v in present)
    return [str(entry.get("name", entry["value"])) for entry in label_info
            if "value" in entry and int(entry["value"]) != 0 and int(entry["value"]) not in values]
