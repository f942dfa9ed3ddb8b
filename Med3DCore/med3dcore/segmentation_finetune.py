"""Segmentation fine-tuning: a (pre)trained encoder transferred to any label set, with lung and two-stage liver
presets (labels, colours, terminology, head, spacing, CT window, patch). The training itself is
:func:`med3dcore.train.train`; the split, initialisation, learning rates and bundle path are
:mod:`med3dcore.finetune`'s, shared with classification fine-tuning.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .devices import resolve_device, training_autocast
from .errors import Med3DError
from .finetune import (build_initialised_model, encoder_head_groups, freeze_encoder_parts, grouped_split,
                       learning_rates, run_bundle_path, start_fresh)
from .nets.model import Med3DNet
from .progress import Reporter, make_event, null_reporter

# Presets: label values, names, Slicer-like colours and SNOMED CT terminology; the head; the preprocessing
# (spacing I, J, K in mm; CT window); the training patch (K, J, I). The liver preset adds a coarse stage that
# finds the organ on a 4 mm grid; the fine stage segments liver and tumour inside the crop.
LUNG_LABEL = {"value": 1, "name": "lung", "color": [197, 165, 145], "terminology": "SCT^39607008^Lung"}
LIVER_LABEL = {"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": "SCT^10200004^Liver"}
TUMOUR_LABEL = {"value": 2, "name": "liver tumour", "color": [144, 238, 144], "terminology": "SCT^108369006^Neoplasm"}
PRESETS: Dict[str, Dict[str, Any]] = {
    # Lungs: a coarse 3 x 3 x 4 mm grid (a 64-voxel patch spans 19 cm, enough to tell trachea and gut gas from
    # lung; resampling a lung mask there and back keeps Dice above 0.98) and an air-to-bone window, so padding
    # values (-2048, -3024) and metal do not move the z-score.
    "lung": {"labels": [LUNG_LABEL], "head": {"type": "lung_decoder", "channels": [128, 64, 32]},
             "spacing": (3.0, 3.0, 4.0), "window": (-1000.0, 400.0), "modality": "CT", "patch": (32, 64, 64)},
    "liver": {"labels": [LIVER_LABEL, TUMOUR_LABEL], "head": {"type": "denseaspp"},
              "spacing": (1.5, 1.5, 3.0), "window": (-200.0, 250.0), "modality": "CT", "patch": (32, 64, 64),
              "coarse": {"spacing": (4.0, 4.0, 4.0), "patch": (32, 64, 64)}, "margin_mm": 10.0},
}
# Colours for labels of a custom label set, in order.
PALETTE = ([128, 174, 128], [241, 214, 145], [177, 122, 101], [111, 184, 210], [216, 101, 79], [221, 130, 101],
           [144, 238, 144], [192, 104, 88], [220, 245, 20], [78, 63, 0])


@dataclass
class SegmentationSettings:
    """Settings of a segmentation fine-tuning run (recorded in the bundle's provenance)."""

    steps: int = 200
    batch_size: int = 2
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    freeze: Tuple[str, ...] = ()
    val_fraction: float = 0.2
    validate_every: int = 50
    patch: Optional[Tuple[int, int, int]] = None       # K, J, I voxels; default the preset's or (32, 64, 64)
    spacing: Optional[Tuple[float, float, float]] = None  # default the preset's or the domain's median spacing
    foreground_share: float = 0.7
    rotate_deg: float = 10.0                           # augmentation: random in-plane rotation up to this angle
    coarse_steps: Optional[int] = None                 # liver: steps of the coarse stage (default: steps)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                     # mixed precision of the training steps (train.TrainConfig.amp)
    cache_dir: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["freeze"] = list(self.freeze)
        return out


def segmentation_labels(domain: Any, preset: Optional[str]) -> List[Dict[str, Any]]:
    """The bundle's label list: the preset's, or the domain's names with palette colours. The label values must
    be 1..n (the network's classes); remap other values with the domain's ``label_map``."""
    if preset is not None:
        labels = [dict(item) for item in PRESETS[preset]["labels"]]
        found = {int(v) for v in domain.label_names}
        wanted = {item["value"] for item in labels}
        if not found <= wanted:
            raise Med3DError(f"the '{preset}' preset has labels {sorted(wanted)} "
                             f"({', '.join(i['name'] for i in labels)}), the data has {sorted(found)}; map the "
                             f"data's values onto them (e.g. --label-map 5:1)")
        return labels
    values = sorted(int(v) for v in domain.label_names)
    if values != list(range(1, len(values) + 1)):
        raise Med3DError(f"label values must be 1..n to become network classes, got {values}; renumber them with "
                         f"a label map (e.g. --label-map 5:1,6:2)")
    return [{"value": v, "name": domain.label_names[v], "color": PALETTE[(v - 1) % len(PALETTE)]} for v in values]


class RotatingSampler:
    """Wraps a patch sampler: rotates each patch in the axial plane by a random angle (image linear, labels
    nearest) and flips it left-right at random. Randomness comes from (seed, step), so resuming is exact."""

    def __init__(self, sampler: Any, max_degrees: float, seed: int = 0) -> None:
        self.sampler, self.max_degrees, self.seed = sampler, float(max_degrees), int(seed)

    def next_batch(self, step: int) -> Dict[str, Any]:
        from scipy import ndimage

        batch = self.sampler.next_batch(step)
        if self.max_degrees <= 0:
            return batch
        rng = np.random.default_rng((self.seed, 7_919, step))
        images, labels = batch["image"].numpy().copy(), batch["label"].numpy().copy()
        for n in range(images.shape[0]):
            angle = float(rng.uniform(-self.max_degrees, self.max_degrees))
            fill = float(images[n].min())
            images[n, 0] = ndimage.rotate(images[n, 0], angle, axes=(1, 2), reshape=False, order=1, cval=fill)
            labels[n] = ndimage.rotate(labels[n], angle, axes=(1, 2), reshape=False, order=0, cval=0)
            if rng.random() < 0.5:
                images[n], labels[n] = images[n, :, :, :, ::-1], labels[n, :, :, ::-1]
        out = dict(batch)
        out["image"], out["label"] = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(
            np.ascontiguousarray(labels))
        return out

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def segmentation_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The pretraining loss (cross-entropy plus soft Dice over the foreground classes; Dice keeps small structures
    from vanishing) on one batch."""
    from .training_setup import ce_dice_loss

    device = next(model.parameters()).device
    return ce_dice_loss(model(batch["image"].to(device)), batch["label"].to(device)), {}


def volume_dice(model: torch.nn.Module, data: Any, values: Sequence[int]) -> Dict[str, float]:
    """Mean and per-label Dice of whole preprocessed validation volumes (every case of ``data``)."""
    from .metrics import dice_per_label

    device = next(model.parameters()).device
    scores: Dict[int, List[float]] = {v: [] for v in values}
    for c in range(len(data.domains[0].cases)):
        image, label = data.arrays(0, c)
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None].to(device)
        prediction = model(x).argmax(1)[0].cpu().numpy()
        for v, s in dice_per_label(prediction, np.asarray(label), values).items():
            scores[v].append(s)
    per_label = {f"dice_{v}": float(np.mean(s)) for v, s in scores.items()}
    return {"dice": float(np.mean(list(per_label.values()))), **per_label}


def _run_stage(domain: Any, val_domain: Any, spacing: Sequence[float], head: Mapping[str, Any], patch: Sequence[int],
               steps: int, settings: SegmentationSettings, init: Optional[str], backbone: Optional[Mapping[str, Any]],
               values: Sequence[int], run_dir: Path, reporter: Reporter, resume: bool, stage: str,
               rotate: bool) -> Tuple[Med3DNet, Dict[str, Any], Dict[str, Any]]:
    """Train one network (encoder + ``head``) on patches of ``domain`` at ``spacing``; best by validation Dice."""
    from . import checkpoint_files
    from .training_data import PatchSampler, PreparedCases
    from .train import train
    from .training_setup import TrainConfig, seed_everything

    cache = Path(settings.cache_dir) if settings.cache_dir else run_dir / "cache"
    spacings = {domain.name: tuple(spacing)}
    train_data = PreparedCases([domain], spacings, cache)
    val_data = PreparedCases([val_domain], {val_domain.name: tuple(spacing)}, cache) if val_domain.cases else None
    train_data.warm(reporter)
    if val_data is not None:
        val_data.warm(reporter)
    seed_everything(settings.seed)
    model, provenance = build_initialised_model(head, init, backbone)
    lr, head_lr = learning_rates(settings.lr, settings.head_lr, provenance["init"] != "scratch")
    frozen = freeze_encoder_parts(model, settings.freeze)
    sampler: Any = PatchSampler(train_data, patch, settings.batch_size, foreground_share=settings.foreground_share,
                                seed=settings.seed)
    if rotate:
        sampler = RotatingSampler(sampler, settings.rotate_deg, settings.seed)
    config = TrainConfig(steps=steps, batch_size=settings.batch_size, lr=head_lr, pretrained_lr=lr,
                         validate_every=settings.validate_every, best_metric="dice",
                         checkpoint_every=max(settings.validate_every, 25), seed=settings.seed, device=settings.device,
                         amp=settings.amp)
    result = train(model, config, sampler.next_batch, segmentation_loss, run_dir,
                   groups=encoder_head_groups(model, lr, head_lr),
                   validate=(lambda m: volume_dice(m, val_data, values)) if val_data is not None else None,
                   stateful={"sampler": sampler},
                   reporter=reporter, resume=resume, stage=stage)
    if result.best_path:
        model.load_state_dict(checkpoint_files.safe_load(result.best_path)["model"])
    model.cpu().eval()
    provenance.update({"frozen": sorted({n.split(".")[1] for n in frozen}), "best": result.best,
                       "learning_rates": {"encoder": lr, "head": head_lr}})
    spec = train_data.specs[0]
    return model, provenance, spec.to_dict()


def finetune_segmentation(domain: Any, out_dir: Path, name: str, *, preset: Optional[str] = None,
                          init: Optional[str] = None, backbone: Optional[Mapping[str, Any]] = None,
                          settings: Optional[SegmentationSettings] = None,
                          groups: Optional[Mapping[str, str]] = None,
                          val_cases: Optional[Sequence[str]] = None, reporter: Optional[Reporter] = None,
                          resume: bool = False, overwrite: bool = False,
                          label_sources: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Fine-tune a segmentation model on one domain (:class:`med3dcore.domains.Domain`) and write
    ``out_dir/<name>.pt``.

    ``preset`` ``"lung"`` or ``"liver"`` fixes labels, colours, terminology, head, spacing and CT window (liver:
    two stages, coarse ROI + DenseASPP); without a preset the domain's labels and median spacing are used with
    the lung decoder. ``groups`` maps case ids to patients for the grouped split (default: each case its own);
    ``val_cases`` (case ids) replaces the random split with a chosen validation set; ``settings.val_fraction``
    0 trains on every case without validation (the last weights are kept). ``label_sources`` (case id ->
    "real" | "classical" | "synthetic", default "real") is recorded in the bundle's provenance.
    """
    from . import bundles
    from .training_data import validate_domains
    from .pseudo_labels import label_sources_record

    settings = settings or SegmentationSettings()
    reporter = reporter or null_reporter
    out_dir = Path(out_dir)
    bundle_path = run_bundle_path(out_dir, name, overwrite, resume)
    if preset is not None and preset not in PRESETS:
        raise Med3DError(f"unknown preset '{preset}'; choose {', '.join(PRESETS)}")
    cfg: Dict[str, Any] = dict(PRESETS[preset]) if preset else {"head": {"type": "lung_decoder"}, "window": None,
                                                                "modality": None, "patch": (32, 64, 64)}
    labels = segmentation_labels(domain, preset)
    values = [item["value"] for item in labels]
    if preset:
        domain = dataclasses.replace(domain, window=domain.window or cfg["window"], modality=cfg["modality"])
    spacings = validate_domains([domain])
    spacing = settings.spacing or cfg.get("spacing") or spacings[domain.name]
    patch = tuple(settings.patch or cfg["patch"])
    case_groups = [(groups or {}).get(c.case_id, c.case_id) for c in domain.cases]
    if val_cases is None and settings.val_fraction > 0 and len(set(case_groups)) < 2:
        reporter(make_event("finetune", kind="message", message=f"the data hold one patient only ({case_groups[0]}): "
                            "training on all of it without validation (the last weights are kept); add cases "
                            "from more patients for a validated model"))
    if val_cases is None and (settings.val_fraction == 0 or len(set(case_groups)) < 2):
        train_idx, val_idx = list(range(len(domain.cases))), []
    elif val_cases is None:
        train_idx, val_idx = grouped_split(case_groups, settings.val_fraction, seed=settings.seed)
    else:
        val_idx = [i for i, c in enumerate(domain.cases) if c.case_id in set(val_cases)]
        train_idx = [i for i, c in enumerate(domain.cases) if c.case_id not in set(val_cases)]
        shared = {case_groups[i] for i in val_idx} & {case_groups[i] for i in train_idx}
        if len(val_idx) != len(set(val_cases)) or not train_idx or shared:
            raise Med3DError(f"validation cases {list(val_cases)} must be case ids of the data, leave training "
                             f"cases, and share no patient with them (shared: {sorted(shared)})")
    train_domain = dataclasses.replace(domain, cases=[domain.cases[i] for i in train_idx])
    val_domain = dataclasses.replace(domain, name=domain.name + "-validation",
                                     cases=[domain.cases[i] for i in val_idx])
    head = dict(cfg["head"], num_classes=len(values) + 1)
    run_dir = out_dir / name
    if init not in (None, "", "scratch"):
        build_initialised_model(head, init, backbone)  # a bad --init fails before anything is removed
    training_autocast(settings.amp, resolve_device(settings.device))  # so do a device or amp this machine lacks
    start_fresh(run_dir, overwrite, resume)
    extra: Dict[str, Any] = {}
    coarse_info = None
    if "coarse" in cfg:
        coarse = cfg["coarse"]
        coarse_model, coarse_prov, coarse_spec = _run_stage(
            train_domain, val_domain, coarse["spacing"], {"type": "coarse_seg", "num_classes": len(values) + 1},
            coarse["patch"], settings.coarse_steps or settings.steps, settings, init, backbone, values,
            run_dir / "coarse", reporter, resume, "finetune-coarse", rotate=False)
        extra["coarse"] = {"architecture": coarse_prov["architecture"], "preprocessing": coarse_spec,
                           "state_dict": {k: v.detach().cpu() for k, v in coarse_model.state_dict().items()},
                           "input_size": None}
        extra["margin_mm"] = float(cfg["margin_mm"])
        coarse_info = {"best": coarse_prov["best"], "spacing": list(coarse["spacing"])}
    fine_dir = run_dir / "fine" if coarse_info else run_dir
    # A run interrupted during the coarse stage has no fine-stage checkpoint yet: that stage starts afresh.
    fine_resume = resume and (not coarse_info or (fine_dir / "checkpoints" / "last.pt").exists())
    model, provenance, spec = _run_stage(train_domain, val_domain, spacing, head, patch, settings.steps, settings,
                                         init, backbone, values, fine_dir, reporter, fine_resume, "finetune",
                                         rotate=preset == "liver")
    metrics = (provenance["best"] or {}).get("metrics", {})
    bundles.save_bundle(
        bundle_path, model, architecture=provenance["architecture"],
        task={"type": "segmentation", "name": preset or name}, labels=labels, preprocessing=spec,
        provenance={"data": {"domain": domain.name, "train_cases": [c.case_id for c in train_domain.cases],
                             "validation_cases": [c.case_id for c in val_domain.cases],
                             **label_sources_record([c.case_id for c in domain.cases], label_sources)},
                    "init": provenance["init"], "steps": settings.steps, "settings": settings.to_dict(),
                    "frozen": provenance["frozen"], "learning_rates": provenance["learning_rates"],
                    "best": provenance["best"], "metrics": metrics, "coarse": coarse_info},
        extra=extra, overwrite=overwrite or resume)
    reporter(make_event("finetune", kind="result", message=f"saved {bundle_path}", metrics=metrics,
                        path=str(bundle_path)))
    return {"bundle": bundle_path, "metrics": metrics, "coarse": coarse_info}
