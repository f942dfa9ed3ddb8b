"""A learnt nodule outline: the measured-size model for users who draw only an ROI.

With a mask, ``classify`` weighs the image against the mask's measures (:mod:`med3dcore.nodule_measures`); with an
ROI alone it had only the network, which loses to a ruler on the LIDC crops (cross-validated AUC about 0.84 against
0.89; with a mask 0.90). When every fine-tuning case has a mask, a second small network (ResNet-10 with a slim
decoder, :data:`OUTLINE_ARCHITECTURE`) learns to outline the nodule on the very cube the classifier sees, and the
bundle stores it as ``extra["outline"]`` with its own fusion record ``extra["outline_fusion"]``:

1. stage 1 learns malignancy from the six measures of the *true* masks on the cube grid (training and validation
   cases);
2. stage 2, on the validation cases only, weighs stage 1's logit of the *learnt* outline's measures against the
   classifier's logit, so the outline's errors are part of what it calibrates.

``classify`` without a mask then outlines the nodule (the connected component nearest the cube's centre, where the
ROI puts the nodule), reports the outline's size as an estimate and gives stage 2's probability. An empty outline
gives the image's probability with a warning. Measured on the shared folds: Testing/benchmarks/RESULTS.md.

Along the axes where the training crops end with their nodules (LIDC's: z), the box is then narrowed to the
outline's extent, as a mask would be shown (:func:`classify_in_outline_box`): the networks never saw slices beyond a
nodule, so an ROI drawn deeper than the nodule raised the answer (0.74 -> 0.92 on a real nodule with 8 mm more on
each side along z). The outline itself tends to fill the slices shown, so the narrowing recovers part of that, not
all (RESULTS.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from .errors import Med3DError
from .metrics import dice
from .nodule_measures import fit_fusion, fused_probability, measure_features
from .nodules import NoduleInputSpec, cube_points, prepare_nodule, visible_in_cube
from .progress import Reporter, make_event
from .volume import Volume

OUTLINE_ARCHITECTURE = {"backbone": {"depth": 10, "shortcut_type": "B"},
                        "head": {"type": "lung_decoder", "num_classes": 2, "channels": [64, 32, 16]}}
OUTLINE_LR = 1e-3  # Adam, poly schedule, batch 8: what bench_nodule_roi_segmentation.py measured
MAX_NARROWINGS = 3  # a bound on the looks: each narrowing only shrinks the box, by less each time


def central_component(mask: np.ndarray) -> np.ndarray:
    """The connected component of a boolean ``mask`` nearest the cube's centre (the ROI is centred on the nodule)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    centre = (np.array(mask.shape) - 1) / 2.0
    points = np.argwhere(components > 0)
    nearest = components[tuple(points[np.argmin(np.linalg.norm(points - centre, axis=1))])]
    return components == nearest


def cube_volume(cube: np.ndarray, spec: NoduleInputSpec) -> Volume:
    """A prepared (1, D, H, W) cube as a Volume in HU on its isotropic grid (values beyond the window stay
    clipped), so that :func:`~med3dcore.nodule_measures.measure_features` can measure masks on it."""
    low, high = spec.window
    hu = np.asarray(cube[0], np.float32) * (high - low) / 2.0 + (low + high) / 2.0
    step = float(spec.spacing_mm)
    return Volume(hu.astype(np.float32), (step, step, step), (0.0, 0.0, 0.0), np.eye(3))


def cube_measures(cube: np.ndarray, mask: np.ndarray, spec: NoduleInputSpec) -> Optional[np.ndarray]:
    """The six nodule measures of a boolean ``mask`` on a prepared cube; None when the mask is empty."""
    if not np.any(mask):
        return None
    return measure_features(cube_volume(cube, spec), mask.astype(np.uint8))


def outline_masks(net: torch.nn.Module, cubes: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Boolean outlines (N, D, H, W) of prepared cubes (N, 1, D, H, W): the argmax's component nearest the centre."""
    from .classification_finetune import evaluate_batches

    found = evaluate_batches(net, cubes, batch_size, lambda y: (y.argmax(1) > 0).cpu().numpy())
    if not found:
        return np.zeros((0, *cubes.shape[2:]), bool)
    return np.stack([central_component(f) for f in np.concatenate(found)])


def _mask_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    from .segmentation_finetune import segmentation_loss

    return segmentation_loss(model, {"image": batch["image"], "label": (batch["mask"][:, 0] >= 0.5).long()})


def train_outline(cubes: np.ndarray, masks: np.ndarray, labels: np.ndarray, steps: int, run_dir: Path, *,
                  batch_size: int = 8, seed: int = 0, device: str = "auto", amp: str = "auto",
                  augment: bool = True, reporter: Optional[Reporter] = None, resume: bool = False) -> torch.nn.Module:
    """Train the outline network on cubes and their mask cubes (both (N, 1, D, H, W)) for ``steps`` steps
    (cross-entropy + soft Dice, Adam at :data:`OUTLINE_LR`, poly schedule; checkpoints in ``run_dir/outline``,
    so an interrupted run resumes there). Returns the trained network in eval mode."""
    from .classification_finetune import CubeSampler
    from .nets import build_model
    from .train import train
    from .training_setup import TrainConfig, seed_everything

    seed_everything(seed)
    net = build_model(OUTLINE_ARCHITECTURE)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=OUTLINE_LR, weight_decay=1e-4, schedule="poly",
                         checkpoint_every=50, seed=seed, device=device, amp=amp)
    sampler = CubeSampler(cubes, labels, batch_size, seed, augment, masks=masks)
    out = Path(run_dir) / "outline"
    train(net, config, sampler.next_batch, _mask_loss, out, stateful={"sampler": sampler}, reporter=reporter,
          resume=resume and (out / "checkpoints" / "last.pt").is_file(), stage="outline")
    return net.cpu().eval()


def fit_outline_fusion(net: torch.nn.Module, spec: NoduleInputSpec, stage1: Tuple[np.ndarray, np.ndarray, np.ndarray],
                       val: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                       temperature: float = 1.0) -> Dict[str, Any]:
    """The outline's fusion record (see the module docstring) and what it gives on validation.

    ``stage1`` = (cubes, mask cubes, labels) of every labelled case; ``val`` = (cubes, mask cubes, labels, the
    classifier's logits (N, 2)) of the validation cases; ``temperature`` is the classifier's (what an empty
    outline leaves). Returns ``{"record", "validation_dice", "empty", "probabilities", "labels"}`` (probabilities of
    the validation cases as ``classify`` gives them without a mask) or, when the outline finds too few validation
    nodules of both classes to fit stage 2, ``{"note"}`` alone."""
    cubes, masks, labels = stage1
    true = [cube_measures(c, m[0] >= 0.5, spec) for c, m in zip(cubes, masks)]
    keep = [i for i, m in enumerate(true) if m is not None]
    val_cubes, val_masks, val_labels, val_logits = val
    found = outline_masks(net, val_cubes)
    dices = [dice(f, m[0] >= 0.5) for f, m in zip(found, val_masks)]
    learnt = [cube_measures(c, f, spec) for c, f in zip(val_cubes, found)]
    usable = [i for i, m in enumerate(learnt) if m is not None]
    image_logits = val_logits[:, 1] - val_logits[:, 0]
    if len(set(np.asarray(val_labels)[usable].tolist())) < 2 or len(set(np.asarray(labels)[keep].tolist())) < 2:
        return {"note": "no outline model: the learnt outline found too few validation nodules of both classes",
                "validation_dice": float(np.median(dices)) if dices else None}
    record = fit_fusion(np.stack([true[i] for i in keep]), np.asarray(labels)[keep],
                        np.stack([learnt[i] for i in usable]), image_logits[usable], np.asarray(val_labels)[usable])
    p = 1.0 / (1.0 + np.exp(-image_logits / temperature))  # an empty outline leaves the image's own answer
    p[usable] = fused_probability(record, np.stack([learnt[i] for i in usable]), image_logits[usable])
    return {"record": record, "validation_dice": float(np.median(dices)), "empty": len(learnt) - len(usable),
            "probabilities": p, "labels": np.asarray(val_labels)}


def outline_bundle_extra(net: torch.nn.Module, record: Mapping[str, Any]) -> Dict[str, Any]:
    """The bundle's ``extra`` entries for an outline network and its fusion record."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return {"outline": {"architecture": OUTLINE_ARCHITECTURE, "state_dict": state}, "outline_fusion": dict(record)}


def outline_network(extra: Mapping[str, Any], where: str) -> torch.nn.Module:
    """The outline network stored in a bundle's ``extra`` (checked at load by bundle_checks), in eval mode."""
    from .nets import build_model

    stored = extra["outline"]
    net = build_model(stored["architecture"])
    try:
        net.load_state_dict(stored["state_dict"])
    except RuntimeError as exc:
        raise Med3DError(f"{where}: its nodule outline network does not fit its architecture "
                         f"({str(exc).splitlines()[0]}); the file is damaged") from None
    return net.eval()


Answer = Tuple[Optional[float], Dict[str, float], np.ndarray]


def outline_answers(extra: Mapping[str, Any], where: str, cubes: np.ndarray, image_logits: Sequence[float],
                    device: torch.device, visible: Optional[np.ndarray] = None,
                    net: Optional[torch.nn.Module] = None) -> List[Answer]:
    """(malignant probability, outline size, outline) per cube (N, 1, D, H, W) prepared as the bundle's
    ``extra["nodule_input"]`` says, given the classifier's logits (malignant minus benign), as ``classify`` gives
    them without a mask: ``(None, {}, outline)`` where the outline is empty. Size: equivalent-sphere diameter (mm)
    and volume (mL) of the outline on the cube; outline: boolean (D, H, W) on the cube's grid, within ``visible``
    (N, D, H, W; the box shown, ``nodules.visible_in_cube``) where given, so what is measured is what is shown.
    ``net``: the bundle's outline network, when the caller has already built it."""
    from .nodule_measures import check_fusion
    from .nodule_size import measure_nodule

    record = check_fusion(extra["outline_fusion"], where)
    spec = NoduleInputSpec.from_dict(extra.get("nodule_input") or {})
    answers: List[Answer] = []
    outlines = outline_masks((net or outline_network(extra, where)).to(device), cubes)
    if visible is not None:
        outlines = np.stack([central_component(f & v) for f, v in zip(outlines, visible)])
    for cube, found, logit in zip(cubes, outlines, image_logits):
        measures = cube_measures(cube, found, spec)
        if measures is None:
            answers.append((None, {}, found))
            continue
        p = float(fused_probability(record, measures[None], np.array([float(logit)]))[0])
        answers.append((p, measure_nodule(cube_volume(cube, spec), found.astype(np.uint8)), found))
    return answers


def narrowed_axes(spec: NoduleInputSpec) -> np.ndarray:
    """The axes (x, y, z) along which the training crops showed nothing beyond their nodules (trained context 0),
    so that a box reaching further along them shows the network what it never saw (LIDC's crops: z)."""
    return np.asarray(spec.context_mm, float) * np.ones(3) == 0.0


def outline_box(found: np.ndarray, low: np.ndarray, high: np.ndarray,
                spec: NoduleInputSpec) -> Tuple[np.ndarray, np.ndarray]:
    """The box (low, high; LPS mm) with which a mask shaped like the non-empty outline ``found`` (on the cube shown
    for the box ``low``, ``high``) would be shown along the :func:`narrowed_axes`: its voxels' extent plus half a
    voxel, kept within the box it was found in. The other axes keep the box as it was."""
    points = cube_points(low, high, spec)[found.reshape(-1)]
    half, axes = float(spec.spacing_mm) / 2.0, narrowed_axes(spec)
    return (np.where(axes, np.maximum(points.min(axis=0) - half, low), low),
            np.where(axes, np.minimum(points.max(axis=0) + half, high), high))


def classify_in_outline_box(volume: Volume, extra: Mapping[str, Any], where: str,
                            image_logits: Callable[[np.ndarray], np.ndarray], low: np.ndarray, high: np.ndarray,
                            device: torch.device) -> Tuple[np.ndarray, Answer, np.ndarray, np.ndarray]:
    """Classify without a mask as a mask would be classified: outline the nodule in the box (``low``, ``high``; LPS
    mm), narrow the box to :func:`outline_box` along the :func:`narrowed_axes` and look again, until no side would
    move by a cube voxel (at most :data:`MAX_NARROWINGS` times). ``image_logits(cube)`` gives the classifier's
    logits for a prepared (1, D, H, W) cube. Returns the classifier's logits, the :func:`outline_answers` answer
    and the box they were computed on, which, given back as an ROI, gives the same answer once the box has
    settled. An empty outline keeps its box; a model trained with context on every axis narrows nothing."""
    spec = NoduleInputSpec.from_dict(extra.get("nodule_input") or {})
    net = outline_network(extra, where)
    for narrowed in range(MAX_NARROWINGS + 1):
        cube = prepare_nodule(volume, center_lps=(low + high) / 2.0, size_mm=high - low, params=spec)
        logits = image_logits(cube)
        answer = outline_answers(extra, where, cube[None], [float(logits[1] - logits[0])], device,
                                 visible=visible_in_cube(low, high, spec)[None], net=net)[0]
        if answer[0] is None or narrowed == MAX_NARROWINGS or not narrowed_axes(spec).any():
            break
        new_low, new_high = outline_box(answer[2], low, high, spec)
        # Settled once no side would move by a whole cube voxel (smaller moves only re-centre the grid a little).
        if np.max(np.abs(np.concatenate([new_low - low, new_high - high]))) < float(spec.spacing_mm):
            break
        low, high = new_low, new_high
    return logits, answer, low, high


def outline_on_image(volume: Volume, found: np.ndarray, low: np.ndarray, high: np.ndarray,
                     spec: NoduleInputSpec) -> Volume:
    """An outline found on the cube shown for the box (``low``, ``high``; LPS mm, as ``nodules.nodule_box`` gives
    it) as a label map on ``volume``'s grid (uint8, 1 = nodule): each voxel inside the box takes the value of the
    nearest cube voxel (the cube is axis-aligned in LPS, centred on the box; ``nodules.prepare_nodule``). Given
    back to ``classify`` as a mask, it marks the same nodule."""
    labels = np.zeros(volume.shape, np.uint8)
    if np.any(found):
        shape_ijk = np.array(volume.shape[::-1])
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        ijk = volume.lps_to_ijk(corners)
        first = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, shape_ijk - 1)
        last = np.clip(np.ceil(ijk.max(axis=0)).astype(int), 0, shape_ijk - 1)
        kk, jj, ii = np.meshgrid(*(np.arange(first[a], last[a] + 1) for a in (2, 1, 0)), indexing="ij")
        index = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
        lps = (volume.ijk_to_lps() @ index)[:3].T
        n, step = spec.cube, float(spec.spacing_mm)
        cell = np.rint((lps - (low + high) / 2.0) / step + (n - 1) / 2.0).astype(int)  # cube index (x, y, z)
        ok = np.all((lps >= low) & (lps <= high), axis=1) & np.all((cell >= 0) & (cell < n), axis=1)
        values = np.zeros(len(lps), np.uint8)
        values[ok] = found[cell[ok, 2], cell[ok, 1], cell[ok, 0]]
        labels[first[2]:last[2] + 1, first[1]:last[1] + 1, first[0]:last[0] + 1] = values.reshape(kk.shape)
    return volume.with_array(labels)


def report_outline(reporter: Reporter, fitted: Mapping[str, Any]) -> None:
    """One message about the fitted outline model (or why there is none)."""
    if "record" not in fitted:
        message = fitted["note"]
    else:
        from .classification_finetune import classification_metrics

        p, labels = fitted["probabilities"], fitted["labels"]
        metrics = classification_metrics(np.column_stack([1 - p, p]), labels)
        message = (f"nodule outline (classify without a mask): validation Dice median {fitted['validation_dice']:.3f}, "
                   f"AUC {metrics['auc']:.3f} (stage 2 fitted there), {fitted['empty']} empty outlines")
    reporter(make_event("finetune", kind="message", message=message))
