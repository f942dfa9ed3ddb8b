"""Inference users run every day: segmentation (lung; two-stage liver; any segmentation bundle) and nodule
classification, from a model bundle alone.

:func:`segment` and :func:`classify` are the stable entry points the command line and the Slicer module call.
A volume's journey: preprocessing recorded in the bundle (reorientation, resampling, windows, z-score) ->
sliding-window network (``sliding.py``) -> class probabilities back on the input's own grid -> argmax ->
anatomical clean-up (``clean_up.py``) -> a label map with exactly the input's geometry.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .bundles import Bundle, load_bundle, model_from_bundle
from .clean_up import clean_up, keep_largest_components
from .devices import describe_precision, resolve_device, resolve_precision
from .errors import Med3DError
from .model_choice import ModelLike, choose_method
from .nets.model import Med3DNet, build_model
from .nodule_size import measure_nodule
from .nodules import NoduleInputSpec, nodule_box, prepare_nodule
from .preprocess import PreprocessSpec, check_intensity_range, preprocess_image, restore_class_map
from .progress import Reporter, make_event, null_reporter
from .safe_io import regular_file
from .sliding import make_predictor, resolve_passes, sliding_window
from .volume import Volume, smallest_label_dtype

# Default tile: "auto" (sliding.choose_tile) = the whole preprocessed volume when it fits the voxel budget
# (sliding.TILE_VOXELS), else the fewest, smallest tiles within it. The network is fully convolutional, so a few
# large tiles with little overlap waste the least work.
DEFAULT_TILE = "auto"
DEFAULT_OVERLAP = 0.1
OUTPUT_STRIDE = 8  # MedicalNet encoders downsample by 8; tiles are multiples of it


@dataclass
class SegmentationResult:
    """``labels``: the label map on exactly the input's grid; ``label_info``: one dict per label
    {value, name, color, terminology}; ``warnings``: things the user should know (e.g. an MR given to a CT model)."""

    labels: Volume
    label_info: List[Dict[str, Any]]
    warnings: List[str] = field(default_factory=list)
    method: str = "model"  # "model" or "classical": what produced the labels


@dataclass
class ClassificationResult:
    """Class probabilities by name, the most probable class, the box the network was shown (LPS mm; given back as an
    ROI it gives the network's answer, ``image_probabilities``) and, when a mask marked the nodule, its measured
    size: equivalent-sphere diameter (mm) and volume (mL) (see ``nodule_size.py``). ``basis`` says what the
    probabilities come from: "image" (the network alone) or "image + mask measures" (see ``nodule_measures.py``);
    ``image_probabilities`` are the network's alone either way (what the box shown, given back as an ROI, gives).
    Without a mask, a bundle with a learnt nodule outline (``nodule_outline.py``) outlines the nodule in the box
    shown: basis "image + learnt outline measures", the size is the outline's (``size_from`` says which) and
    ``outline`` is that outline as a label map on the input's grid (1 = nodule; empty when nothing was found)."""

    probabilities: Dict[str, float]
    predicted: str
    roi_center_lps: Tuple[float, float, float]
    roi_size_mm: Tuple[float, float, float]
    warnings: List[str] = field(default_factory=list)
    diameter_mm: Optional[float] = None
    volume_ml: Optional[float] = None
    basis: str = "image"
    image_probabilities: Dict[str, float] = field(default_factory=dict)
    size_from: Optional[str] = None  # "mask" or "learnt outline" (an estimate)
    outline: Optional[Volume] = field(default=None, repr=False)  # the learnt outline on the input's grid


# ------------------------------------------------------------------------------------------------ bundles

def load_model(model: ModelLike) -> Bundle:
    """A loaded :class:`Bundle` from a bundle or a path (a MedicalNet backbone file is a clear error)."""
    if isinstance(model, Bundle):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise Med3DError(f"model must be a path to a Med3D model file or a loaded Bundle, got {type(model).__name__}")
    if not os.path.lexists(model):
        raise Med3DError(f"model file {model} does not exist; give the path of a model saved by med3d finetune "
                         "(med3d models list shows the models folder)")
    # os.stat before any open: a folder, a FIFO, a device or a link loop is one clear line, never a blocked read.
    regular_file(model, "model file", folder_hint="give the model file (.pt) inside it")
    return load_bundle(model)


def _where(bundle: Bundle) -> str:
    return str(bundle.path) if bundle.path else "the model"


def _require_task(bundle: Bundle, wanted: str, task: Optional[str]) -> None:
    kind = bundle.task.get("type")
    name = bundle.task.get("name", "?")
    if kind == "encoder":
        raise Med3DError(f"{_where(bundle)} is a pretrained encoder without a task head; fine-tune it first "
                         f"(med3d finetune --init {_where(bundle)})")
    if kind != wanted:
        other = "med3d classify (infer.classify)" if kind == "classification" else "med3d segment (infer.segment)"
        raise Med3DError(f"{_where(bundle)} is a {kind} model ('{name}'), not a {wanted} model; use it with {other}")
    if task is not None and task != name:
        raise Med3DError(f"{_where(bundle)} is a '{name}' model but task '{task}' was asked for; give a '{task}' "
                         f"model or leave the task out")


def _network(state: Mapping[str, Any], architecture: Mapping[str, Any]) -> Med3DNet:
    net = build_model(architecture)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise Med3DError(f"the model's coarse stage does not fit its architecture ({str(exc).splitlines()[0]}); "
                         "the file is damaged") from None
    return net.eval()


# ------------------------------------------------------------------------------------------------ segmentation

@dataclass
class _Options:
    tile: Union[str, Sequence[int], None] = DEFAULT_TILE
    overlap: float = DEFAULT_OVERLAP
    batch_size: int = 1
    precision: str = "auto"
    passes: Union[str, int] = "auto"
    blend: str = "gaussian"
    keep_largest: bool = True


def _options(options: Mapping[str, Any]) -> _Options:
    known = {f.name for f in _Options.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    unknown = sorted(set(options) - known)
    if unknown:
        raise Med3DError(f"unknown segmentation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    # None means "the default" for every option but the tile, where it means "the whole volume at once".
    return _Options(**{k: v for k, v in options.items() if v is not None or k == "tile"})


def _classes(volume: Volume, net: Med3DNet, spec: PreprocessSpec, device: torch.device, opts: _Options,
             reporter: Reporter, stage: str, input_size: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, int]:
    """The most probable class per voxel of ``volume``'s own grid (uint8 indices; the argmax of the class
    probabilities restored linearly to that grid) and the network's number of classes.

    With ``input_size`` the whole preprocessed volume is resized to it (a coarse stage trained that way);
    otherwise it goes through the sliding window.
    """
    array, prepared = preprocess_image(volume, spec)
    say = lambda text: reporter(make_event("segment", kind="message", message=f"{stage}: {text}"))  # noqa: E731
    si, sj, sk = (float(v) for v in (spec.spacing or volume.spacing))
    say(f"network input: {array.shape[0]} slices of {array.shape[1]}x{array.shape[2]} voxels, {si:g}x{sj:g} mm, "
        f"{sk:g} mm apart")
    precision = resolve_precision(opts.precision, device)
    passes = 1 if input_size is not None else resolve_passes(opts.passes, precision)
    shifted = f"; {passes} passes at shifted grid alignments, averaged" if passes > 1 else ""
    say(f"precision {describe_precision(precision, device)}{shifted}")
    predict = make_predictor(net, device, precision)
    image = torch.from_numpy(array)[None]
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        with torch.inference_mode():
            small = F.interpolate(image[None], size=size, mode="trilinear", align_corners=False)
            probs = predict(small.to(device)).cpu()
            probs = F.interpolate(probs, size=array.shape, mode="trilinear", align_corners=False)[0]
        reporter(make_event(stage, 1, 1))
    else:
        probs = sliding_window(predict, image, tile=opts.tile, overlap=opts.overlap, batch_size=opts.batch_size,
                               blend=opts.blend, multiple=OUTPUT_STRIDE, pad_value=float(array.min()),
                               device=device, reporter=reporter, stage=stage, passes=passes)
    del image, array
    say("putting the result back on the scan's own grid")  # seconds on a big scan: the bar stands still meanwhile
    return restore_class_map(probs.numpy(), prepared), int(probs.shape[0])


def _label_map(classes: np.ndarray, n_classes: int, values: Sequence[int]) -> np.ndarray:
    """Class indices mapped to the bundle's label values (class 0 is background), smallest integer dtype."""
    if len(values) + 1 != n_classes:
        raise Med3DError(f"the model lists {len(values)} labels but its network gives {n_classes} classes "
                         "(background + one per label); the file is damaged")
    table = np.asarray([0] + list(values), dtype=np.int64)
    table = table.astype(smallest_label_dtype(table))
    if np.array_equal(table, np.arange(len(table))) and classes.dtype == table.dtype:
        return classes  # values 1..n in class order: the indices are the labels
    return table[classes]


def _crop(volume: Volume, start: Sequence[int], stop: Sequence[int]) -> Volume:
    """The sub-volume of voxels start..stop (K, J, I), with its origin moved so every voxel keeps its place."""
    k0, j0, i0 = (int(s) for s in start)
    k1, j1, i1 = (int(s) for s in stop)
    origin = volume.ijk_to_lps() @ np.array([i0, j0, k0, 1.0])
    return Volume(volume.array[k0:k1, j0:j1, i0:i1], volume.spacing, tuple(origin[:3]), volume.direction.copy())


def _two_stage(volume: Volume, bundle: Bundle, fine: Med3DNet, device: torch.device, opts: _Options,
               reporter: Reporter, warnings: List[str]) -> np.ndarray:
    """Coarse ROI on the whole volume, crop with a margin, fine segmentation inside, paste back."""
    coarse = bundle.extra["coarse"]
    coarse_net = _network(coarse["state_dict"], coarse["architecture"])
    coarse_spec = PreprocessSpec.from_dict(coarse["preprocessing"])
    classes, _ = _classes(volume, coarse_net, coarse_spec, device, opts, reporter, "coarse", coarse.get("input_size"))
    foreground = keep_largest_components((classes > 0).astype(np.uint8), "foreground", 1)
    del classes
    labels = np.zeros(volume.shape, dtype=np.uint8)
    if not foreground.any():
        warnings.append(f"the coarse stage found no {bundle.task.get('name', 'organ')} in this scan; the label map "
                        "is empty (is it the right body region and modality?)")
        return labels
    found = np.argwhere(foreground)
    margin_mm = float(bundle.extra.get("margin_mm", 10.0))
    margin = [int(math.ceil(margin_mm / volume.spacing[2 - axis])) for axis in range(3)]  # (K, J, I) voxels
    start = np.maximum(found.min(axis=0) - margin, 0)
    stop = np.minimum(found.max(axis=0) + 1 + np.asarray(margin), volume.shape)
    roi = _crop(volume, start, stop)
    spec = PreprocessSpec.from_dict(bundle.preprocessing)
    fine_classes, n_classes = _classes(roi, fine, spec, device, opts, reporter, "fine")
    values = [int(info["value"]) for info in bundle.labels]
    fine_labels = _label_map(fine_classes, n_classes, values)
    labels = labels.astype(fine_labels.dtype)
    labels[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = fine_labels
    return labels


def segment(volume: Volume, model: Optional[ModelLike] = None, task: Optional[str] = None, device: str = "auto",
            reporter: Optional[Reporter] = None, method: str = "auto", synthetic_input: bool = False,
            **options: Any) -> SegmentationResult:
    """Segment ``volume`` with a segmentation bundle (a path or a loaded :class:`Bundle`) or, for lungs, with the
    weight-free classical method.

    ``method``: ``"model"``, ``"classical"`` (lungs: labels 1 right lung, 2 left lung; see ``classical_lung.py``)
    or ``"auto"`` (the given model, else the ``task`` model in the models folder, else classical for lungs);
    ``model_choice.choose_method`` says what it picks. ``task`` (e.g. ``"lung"``, ``"liver"``), when given, must be the
    bundle's task. A bundle with a coarse stage (``extra["coarse"]``, the liver model) runs both stages.
    ``options``: ``tile`` (K, J, I voxels, None = whole volume, ``"auto"`` = the whole volume when it fits the voxel
    budget, else the fewest tiles within it), ``overlap``, ``batch_size``, ``precision`` (auto/fp32/bf16/amp; auto =
    amp on CUDA, bf16 on CPUs with native bfloat16, else fp32), ``passes`` (1-8 tilings at shifted grid
    alignments, averaged; auto = 2 in bf16/amp, 1 in fp32: ``sliding.resolve_passes``), ``blend``
    (gaussian/constant), ``keep_largest`` (the anatomical clean-up, :func:`clean_up`, default on).
    A model trained only on synthetic phantoms warns that it is, unless ``synthetic_input`` says the scan is a
    phantom too (the demo's). Progress goes to ``reporter``; warnings (also sent as ``message`` events) are in
    the result. The label map has exactly the input's size, spacing, origin and direction.
    """
    from .pseudo_labels import SYNTHETIC_MODEL_WARNING, trained_only_on_synthetic

    reporter = reporter or null_reporter
    opts = _options(options)
    if not isinstance(volume, Volume):
        raise Med3DError(f"segment needs a Volume (see med3dcore.volume_files.read_volume), got "
                         f"{type(volume).__name__}")
    chosen, model = choose_method(model, task, method)
    if chosen == "classical":
        from .classical_lung import LUNG_LABELS, segment_lungs

        found = segment_lungs(volume, reporter)
        return SegmentationResult(found.labels, [dict(info) for info in LUNG_LABELS], found.warnings, "classical")
    bundle = load_model(model)
    _require_task(bundle, "segmentation", task)
    name = str(bundle.task.get("name", "segmentation"))
    spec = PreprocessSpec.from_dict(bundle.preprocessing)
    dev = resolve_device(device)
    warnings: List[str] = []
    checks = [check_intensity_range(volume.array, spec.modality)]
    if trained_only_on_synthetic(bundle.provenance) and not synthetic_input:
        checks.append(SYNTHETIC_MODEL_WARNING)
    for warning in filter(None, checks):
        warnings.append(warning)
        reporter(make_event("segment", kind="message", message=f"warning: {warning}"))
    net = model_from_bundle(bundle)
    if "coarse" in bundle.extra:
        labels = _two_stage(volume, bundle, net, dev, opts, reporter, warnings)
    else:
        classes, n_classes = _classes(volume, net, spec, dev, opts, reporter, name)
        labels = _label_map(classes, n_classes, [int(info["value"]) for info in bundle.labels])
        del classes
    if opts.keep_largest:
        labels = clean_up(volume, labels, bundle)
    label_info = [{"value": int(info["value"]), "name": str(info["name"]), "color": info.get("color"),
                   "terminology": info.get("terminology")} for info in bundle.labels]
    return SegmentationResult(volume.with_array(labels), label_info, warnings)


# ------------------------------------------------------------------------------------------------ classification

def probability_temperature(bundle: Bundle) -> float:
    """The temperature T a classification bundle's probabilities use, ``softmax(logits / T)``: fitted on the
    validation split at fine-tuning time (temperature scaling), 1 for bundles written before calibration."""
    from .bundle_checks import check_temperature

    if "temperature" not in bundle.extra:
        return 1.0
    return check_temperature(bundle.extra["temperature"], _where(bundle))


def classify(volume: Volume, model: ModelLike, roi: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
             mask: Union[Volume, np.ndarray, None] = None, device: str = "auto") -> ClassificationResult:
    """Classify the nodule in ``volume`` with a classification bundle (a path or a loaded :class:`Bundle`).

    Mark the nodule with ``roi`` = (centre, size), both LPS mm (size may be None: the whole cube is visible), or
    with ``mask`` (non-zero voxels on the image's grid), or neither when ``volume`` is itself a nodule crop.
    Returns the class probabilities by label name (calibrated by the bundle's temperature, see
    :func:`probability_temperature`; with a mask and a bundle fine-tuned on masks, from the image and the mask's
    measures, see :mod:`med3dcore.nodule_measures`; without a mask and a bundle with a learnt outline, from the
    image and the outline's measures, see :mod:`med3dcore.nodule_outline`) and the box used.
    """
    if not isinstance(volume, Volume):
        raise Med3DError(f"classify needs a Volume (see med3dcore.volume_files.read_volume), got "
                         f"{type(volume).__name__}")
    if roi is not None and mask is not None:
        raise Med3DError("give either an ROI (centre and size) or a mask, not both")
    bundle = load_model(model)
    _require_task(bundle, "classification", None)
    params = bundle.extra.get("nodule_input")
    warnings: List[str] = []
    warning = check_intensity_range(volume.array, "CT")
    if warning:
        warnings.append(warning)
    marks: Dict[str, Any] = {}
    if roi is not None:
        try:
            marks["center_lps"], marks["size_mm"] = roi
        except (TypeError, ValueError):
            raise Med3DError("roi must be (centre, size): centre x, y, z and size in LPS mm") from None
    elif mask is not None:
        marks["mask"] = mask
    low, high = nodule_box(volume, params=params, **marks)  # what the network was shown: give it back as --roi
    size = measure_nodule(volume, mask) if mask is not None else {}
    dev = resolve_device(device)
    net = model_from_bundle(bundle).to(dev)
    names = {int(info["value"]): str(info["name"]) for info in bundle.labels}

    def image_logits(shown: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = net(torch.from_numpy(shown)[None].to(dev)).float().cpu()[0].numpy()
        if len(names) != len(out):
            raise Med3DError(f"{_where(bundle)} lists {len(names)} labels but its network gives {len(out)} "
                             "classes; the file is damaged")
        return out

    basis, outline, p = "image", None, None
    if mask is None and "outline" in bundle.extra and len(names) == 2:
        from .nodule_outline import classify_in_outline_box, outline_on_image

        logits, (p, size, found), low, high = classify_in_outline_box(volume, bundle.extra, _where(bundle),
                                                                       image_logits, low, high, dev)
        outline = outline_on_image(volume, found, low, high, NoduleInputSpec.from_dict(params or {}))
        if p is None:
            warnings.append("the learnt outline found no nodule in the box shown: the probability is the image's "
                            "alone (is the nodule at the ROI's centre?)")
        else:
            basis = "image + learnt outline measures"
    else:
        logits = image_logits(prepare_nodule(volume, params=params, **marks))
    if mask is not None and "measured_fusion" in bundle.extra and len(names) == 2:
        from .nodule_measures import check_fusion, fused_probability, measure_features

        fusion = check_fusion(bundle.extra["measured_fusion"], _where(bundle))
        p = float(fused_probability(fusion, measure_features(volume, mask)[None], logits[1] - logits[0])[0])
        basis = "image + mask measures"
    image_probs = torch.softmax(torch.from_numpy(logits) / probability_temperature(bundle), dim=0).numpy()
    image_probabilities = {names[value]: float(image_probs[i]) for i, value in enumerate(sorted(names))}
    probs = image_probs if p is None else np.array([1.0 - p, p])
    box_centre = tuple(float(v) for v in (low + high) / 2.0)
    box_size = tuple(float(v) for v in high - low)
    probabilities = {names[value]: float(probs[i]) for i, value in enumerate(sorted(names))}
    predicted = max(probabilities, key=probabilities.get)  # type: ignore[arg-type]
    return ClassificationResult(probabilities, predicted, box_centre, box_size, warnings,  # type: ignore[arg-type]
                                diameter_mm=size.get("diameter_mm"), volume_ml=size.get("volume_ml"), basis=basis,
                                image_probabilities=image_probabilities,
                                size_from=("mask" if mask is not None else "learnt outline") if size else None,
                                outline=outline)
