"""Med3D multi-domain co-training: one shared 3D-ResNet encoder, one small branch per domain.

Each domain of a run config (see :mod:`med3dcore.domains`) keeps its own label space and gets its own branch, a
:class:`~med3dcore.nets.heads.CoarseSegHead` (1x1x1 convolution to the domain's classes, trilinear upsampling to
the input size). Every step trains on a batch of one domain: only the encoder and that domain's branch get
gradients; the other branches keep ``grad=None`` and Adam leaves them bit for bit unchanged. Loss:
cross-entropy + Dice (:func:`~med3dcore.train.ce_dice_loss`). The loop is :func:`med3dcore.train.train`
(checkpoints, exact resume, NaN stop, torchrun).

At the end the encoder is exported twice into the output folder:

- ``encoder_bundle.pt``: a Med3D bundle, task type ``"encoder"``; its head is the first domain's branch and
  ``extra["branches"]`` holds every branch; ``provenance`` records domains (cases, labels, spacing,
  preprocessing), steps, batch and patch size, and the final loss of each domain;
- ``medicalnet_resnet<depth>.pth``: ``{"state_dict": {"module.<key>": tensor}}``, read by
  :func:`~med3dcore.medicalnet.load_medicalnet` and by anything that reads MedicalNet weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from . import bundles, medicalnet
from .distributed import distributed_context, training_device
from .domains import RunConfig, load_run_config
from .errors import Med3DError
from .safe_io import os_reason
from .nets.heads import CoarseSegHead
from .nets.model import Med3DNet, build_encoder
from .progress import Reporter, make_event, null_reporter
from .train import TrainResult, train
from .training_data import PatchSampler, PreparedCases, domain_spec, validate_domains
from .training_setup import TrainConfig, ce_dice_loss, seed_everything

SAMPLING_KEYS = ("patch_size", "foreground_share", "domain_sampling")
DEFAULT_PATCH = (32, 32, 32)


class MultiDomainNet(nn.Module):
    """Shared encoder + one :class:`CoarseSegHead` per domain (``branches[name]``)."""

    def __init__(self, encoder: nn.Module, classes: Mapping[str, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.branches = nn.ModuleDict({name: CoarseSegHead(encoder.out_channels, int(n))
                                       for name, n in classes.items()})

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return self.branches[domain](self.encoder.features(x), x.shape[2:])


def pretrain_loss(model: MultiDomainNet, batch: Mapping[str, Any]):
    """``compute_loss`` for :func:`train`: the batch's domain branch, cross-entropy + Dice."""
    device = next(model.parameters()).device
    name = batch["domain_name"]
    logits = model(batch["image"].to(device, non_blocking=True), name)
    loss = ce_dice_loss(logits, batch["label"].to(device, non_blocking=True))
    return loss, {"domain": name}


@dataclass
class PretrainResult:
    bundle_path: Path
    medicalnet_path: Path
    final_losses: Dict[str, float]
    train: TrainResult


def final_losses(history: Sequence[Mapping[str, Any]], window: int = 10) -> Dict[str, float]:
    """Each domain's mean loss over its last ``window`` steps."""
    per: Dict[str, List[float]] = {}
    for record in history:
        per.setdefault(str(record.get("domain")), []).append(float(record["loss"]))
    return {name: sum(v[-window:]) / len(v[-window:]) for name, v in per.items()}


class _DomainLossReporter:
    """Adds a running (exponential average) loss per domain to progress events, for the bar and the JSON lines."""

    def __init__(self, inner: Reporter, names: Sequence[str]) -> None:
        self.inner = inner
        self.losses: Dict[str, float] = {}
        self.names = list(names)

    def __call__(self, event: Dict[str, Any]) -> None:
        metrics = event.get("metrics") or {}
        if event.get("kind") == "progress" and "domain" in metrics and "loss" in metrics:
            name, loss = metrics["domain"], float(metrics["loss"])
            old = self.losses.get(name)
            self.losses[name] = loss if old is None else 0.8 * old + 0.2 * loss
            event = dict(event, metrics={**metrics, **{f"loss[{n}]": self.losses[n] for n in self.names
                                                       if n in self.losses}})
        self.inner(event)


def split_training(training: Mapping[str, Any]) -> tuple:
    """A config's ``training`` section as (TrainConfig, sampling settings)."""
    sampling = {k: training[k] for k in SAMPLING_KEYS if k in training}
    rest = {k: v for k, v in training.items() if k not in SAMPLING_KEYS}
    try:
        sampling["patch_size"] = [int(p) for p in sampling.get("patch_size", DEFAULT_PATCH)]
        sampling["foreground_share"] = float(sampling.get("foreground_share", 0.5))
    except (TypeError, ValueError):
        raise Med3DError(f"training config: patch_size must be three whole numbers and foreground_share a number, "
                         f"got {sampling.get('patch_size')!r} and {sampling.get('foreground_share')!r}") from None
    return TrainConfig.from_dict(rest), sampling


def _backbone(run: RunConfig) -> Dict[str, Any]:
    """The config's ``model`` section as a backbone description (unknown keys and bad values are errors)."""
    model_cfg = dict(run.model)
    unknown = sorted(set(model_cfg) - {"depth", "shortcut_type", "preact"})
    if unknown:
        raise Med3DError(f"unknown model setting(s) {', '.join(unknown)}; known: depth, shortcut_type, preact")
    try:
        depth = int(model_cfg.get("depth", 10))
    except (TypeError, ValueError):
        raise Med3DError(f"model depth must be a whole number (10, 18, 34, ...), got {model_cfg.get('depth')!r}") \
            from None
    return {"depth": depth, "shortcut_type": str(model_cfg.get("shortcut_type", "B")),
            "preact": bool(model_cfg.get("preact", False))}


def _check_backbone(backbone: Mapping[str, Any]) -> None:
    """The checks :func:`~med3dcore.nets.resnet.resnet3d` makes, without building the network."""
    from .nets.resnet import DEPTHS, SHORTCUT_TYPES

    if backbone["depth"] not in DEPTHS:
        raise Med3DError(f"unknown ResNet depth {backbone['depth']!r} in the config's model section; choose one of: "
                         f"{', '.join(str(d) for d in DEPTHS)}")
    if backbone["shortcut_type"].upper() not in SHORTCUT_TYPES:
        raise Med3DError(f"unknown shortcut type {backbone['shortcut_type']!r} in the config's model section; "
                         f"choose 'A' or 'B'")


def build_pretrain_model(run: RunConfig) -> MultiDomainNet:
    return MultiDomainNet(build_encoder(_backbone(run)), {d.name: d.num_classes for d in run.domains})


def pretrain(config_path, out_dir, *, resume: bool = False, device: Optional[str] = None,
             reporter: Optional[Reporter] = None, cache_dir: Optional[Any] = "default",
             overrides: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> PretrainResult:
    """Run multi-domain pretraining from a run config into ``out_dir`` and export the encoder.

    ``cache_dir``: ``"default"`` = ``out_dir/cache``, ``None`` = no cache (every patch re-reads and resamples its
    volume), or a folder. ``overrides`` replace keys of the config's ``training`` section (e.g. ``steps``).
    Existing exports (``encoder_bundle.pt``, ``medicalnet_resnet<depth>.pth``) are replaced only with
    ``overwrite`` (checked before any work).
    """
    reporter = reporter or null_reporter
    run = load_run_config(config_path)
    training = dict(run.training, **dict(overrides or {}))
    if device is not None:
        training["device"] = device
    config, sampling = split_training(training)
    dev = training_device(config.device)
    _check_backbone(_backbone(run))  # a bad model section fails now, not after the data are read and cached
    ctx = distributed_context(dev)
    say = reporter if ctx.is_main else null_reporter
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Med3DError(f"--out {out} is a file, not a folder; give a folder for the checkpoints and the encoder")
    last = out / "checkpoints" / "last.pt"  # the training loop checks these too, but only after the data are cached
    if resume and not last.is_file():
        raise Med3DError(f"--resume was given but {last} does not exist; start without --resume")
    if not resume and last.exists():
        raise Med3DError(f"{last} exists from an earlier run; pass --resume to continue it or choose a new "
                         "output folder")
    bundle_path = out / "encoder_bundle.pt"
    medicalnet_path = out / f"medicalnet_resnet{_backbone(run)['depth']}.pth"
    for export in (bundle_path, medicalnet_path):
        if os.path.lexists(export) and not overwrite:
            raise Med3DError(f"{export} exists; choose another --out or pass --overwrite to replace it")
    if config.batch_size // ctx.world_size == 1 and min(sampling["patch_size"]) < 16:
        # The encoder shrinks a patch 8-fold; one sample of 1 voxel per channel leaves batch norm nothing to average.
        raise Med3DError(f"training config: patch_size {sampling['patch_size']} is too small for a batch of one "
                         "sample per process (the encoder reduces it 8-fold); use at least 16 voxels per axis or a "
                         "larger batch_size")

    say(make_event("pretrain", kind="message", message=f"checking {sum(len(d.cases) for d in run.domains)} cases "
                   f"of {len(run.domains)} domains"))
    spacings = validate_domains(run.domains)
    if ctx.is_main:  # only now: bad data leave no empty output folder behind
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Med3DError(f"cannot create the output folder {out}: {os_reason(exc)}; give an --out folder you "
                             "may write to") from None
    cache = out / "cache" if cache_dir == "default" else cache_dir
    data = PreparedCases(run.domains, spacings, cache)
    if cache is not None:
        if ctx.is_main:
            data.warm(say)
        if ctx.world_size > 1:
            torch.distributed.barrier()

    seed_everything(config.seed)
    model = build_pretrain_model(run)
    sampler = PatchSampler(data, sampling["patch_size"], config.batch_size, sampling["foreground_share"],
                           str(sampling.get("domain_sampling", "round_robin")), seed=config.seed,
                           rank=ctx.rank, world_size=ctx.world_size)
    names = [d.name for d in run.domains]
    result = train(model, config, sampler.next_batch, pretrain_loss, out, stateful={"sampler": sampler},
                   reporter=_DomainLossReporter(say, names) if ctx.is_main else null_reporter, resume=resume,
                   stage="pretrain", device=dev)
    losses = final_losses(result.history)
    if ctx.is_main:
        export_encoder(model, run, spacings, config, sampling, losses, bundle_path, medicalnet_path, ctx.world_size,
                       overwrite=overwrite)
        say(make_event("pretrain", kind="result", message=f"encoder written to {bundle_path} and {medicalnet_path}",
                       metrics={f"loss[{n}]": v for n, v in losses.items()}))
    return PretrainResult(bundle_path, medicalnet_path, losses, result)


def export_encoder(model: MultiDomainNet, run: RunConfig, spacings: Mapping[str, Sequence[float]],
                   config: TrainConfig, sampling: Mapping[str, Any], losses: Mapping[str, float],
                   bundle_path: Path, medicalnet_path: Path, world_size: int = 1, overwrite: bool = False) -> None:
    """Write the encoder as a Med3D bundle (task ``encoder``) and as a MedicalNet-layout file; existing files are
    replaced only with ``overwrite`` (and never one that another run created meanwhile)."""
    model = model.cpu().eval()
    first = run.domains[0]
    net = Med3DNet(model.encoder, model.branches[first.name])
    architecture = {"backbone": {"depth": int(run.model.get("depth", 10)),
                                 "shortcut_type": str(run.model.get("shortcut_type", "B")),
                                 "preact": bool(run.model.get("preact", False))},
                    "head": {"type": "coarse_seg", "num_classes": first.num_classes}}
    domains = [{"name": d.name, "modality": d.modality, "cases": len(d.cases), "labels": d.labels_list(),
                "spacing": list(spacings[d.name]), "preprocessing": domain_spec(d, spacings[d.name]).to_dict(),
                "final_loss": losses.get(d.name)} for d in run.domains]
    branches = {d.name: {"num_classes": d.num_classes, "labels": d.labels_list(),
                         "state_dict": {k: v.detach().clone() for k, v in model.branches[d.name].state_dict().items()}}
                for d in run.domains}
    bundles.save_bundle(
        bundle_path, net, architecture=architecture, task={"type": "encoder", "name": run.name},
        labels=[], preprocessing=None,
        provenance={"data": {"config": str(run.path), "domains": domains}, "steps": config.total_steps,
                    "batch_size": config.batch_size, "patch_size": list(sampling["patch_size"]),
                    "processes": world_size, "training": config.to_dict(),
                    "metrics": {f"final_loss[{n}]": v for n, v in losses.items()}},
        extra={"branches": branches, "head_is_branch_of": first.name}, overwrite=overwrite)
    medicalnet.export_medicalnet(model.encoder, medicalnet_path, overwrite=overwrite)
