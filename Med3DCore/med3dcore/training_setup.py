"""What a training run is made of, around the loop in :mod:`med3dcore.train`: its settings (:class:`TrainConfig`),
seeding and the random state, optimiser groups and Adam, the learning-rate schedule, the memory layout, and the
segmentation loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .devices import AMP_MODES
from .errors import Med3DError


SCHEDULES = ("constant", "poly", "cosine")




@dataclass
class TrainConfig:
    """Settings of one training run (all JSON-able, recorded in every checkpoint).

    Give ``steps``, or ``epochs`` and ``steps_per_epoch`` (then steps = epochs * steps_per_epoch).
    ``batch_size`` is the global batch over all processes; ``micro_batch`` is the BatchNorm group size.
    """
    steps: int = 100
    epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    batch_size: int = 2
    micro_batch: Optional[int] = None
    lr: float = 1e-3
    pretrained_lr: Optional[float] = None
    weight_decay: float = 0.0
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    amp: str = "auto"
    checkpoint_every: int = 50
    validate_every: int = 0
    best_metric: Optional[str] = None
    best_mode: str = "max"
    log_every: int = 1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self._coerce_numbers()
        if self.epochs is not None:
            if not self.steps_per_epoch or self.epochs < 1 or self.steps_per_epoch < 1:
                raise Med3DError("epochs needs steps_per_epoch >= 1 (and epochs >= 1); or give steps instead")
            self.steps = int(self.epochs) * int(self.steps_per_epoch)
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.micro_batch is None or self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.pretrained_lr is None or self.pretrained_lr >= 0, "pretrained_lr must not be negative"),
            (self.weight_decay >= 0, f"weight_decay must not be negative, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"schedule '{self.schedule}' unknown; choose {', '.join(SCHEDULES)}"),
            (self.amp in AMP_MODES, f"amp '{self.amp}' unknown; choose {', '.join(AMP_MODES)}"),
            (self.warmup_steps >= 0, "warmup_steps must not be negative"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive (or null for none)"),
            (self.checkpoint_every >= 0, "checkpoint_every must not be negative (0: only at the end)"),
            (self.validate_every >= 0, "validate_every must not be negative (0: only at the end)"),
            (self.best_mode in ("max", "min"), f"best_mode must be 'max' or 'min', got '{self.best_mode}'"),
            (self.log_every >= 1, "log_every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise Med3DError(f"training config: {message}")

    def _coerce_numbers(self) -> None:
        # Config files give strings at times (YAML reads 1e-3 as text): convert, or say which setting is wrong.
        ints = ("steps", "epochs", "steps_per_epoch", "batch_size", "micro_batch", "warmup_steps",
                "checkpoint_every", "validate_every", "log_every", "seed")
        floats = ("lr", "pretrained_lr", "weight_decay", "poly_power", "grad_clip")
        for name in ints + floats:
            value = getattr(self, name)
            if value is None:
                continue
            try:
                number = float(value)
                if name in ints:
                    if number != int(number):
                        raise ValueError
                    number = int(number)
            except (TypeError, ValueError, OverflowError):
                kind = "a whole number" if name in ints else "a number"
                raise Med3DError(f"training config: {name} must be {kind}, got {value!r}") from None
            if not math.isfinite(number):  # lr=inf would turn every weight into NaN at the first update
                raise Med3DError(f"training config: {name} must be a finite number, got {value!r}")
            setattr(self, name, number)

    @property
    def total_steps(self) -> int:
        return int(self.steps)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a config file's ``training`` section; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise Med3DError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**dict(values))
        except TypeError as exc:
            raise Med3DError(f"training config: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)



def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building a model so initial weights are reproducible)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)



def param_groups(model: nn.Module, lr: float, pretrained_lr: Optional[float] = None,
                 pretrained_prefix: str = "encoder.") -> List[Dict[str, Any]]:
    """Optimiser groups: parameters under ``pretrained_prefix`` at ``pretrained_lr`` (default ``lr``), the rest
    (new layers) at ``lr``. Frozen parameters (``requires_grad=False``) are left out."""
    pretrained, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (pretrained if name.startswith(pretrained_prefix) else new).append(p)
    groups = []
    if pretrained:
        groups.append({"name": "pretrained", "params": pretrained, "lr": lr if pretrained_lr is None else pretrained_lr})
    if new:
        groups.append({"name": "new", "params": new, "lr": lr})
    if not groups:
        raise Med3DError("the model has no trainable parameters; unfreeze some layers before training")
    return groups



ADAM_KINDS = ("auto", "fused", "foreach", "loop")



def make_adam(groups: Sequence[Dict[str, Any]], lr: float, weight_decay: float, kind: str = "auto"
              ) -> torch.optim.Adam:
    """Adam in its fastest form this torch build has for the parameters' device: ``fused`` (one kernel over all
    parameters; on CPU 4-5x faster than the per-parameter loop, Testing/benchmarks/bench_train_step.py), else
    ``foreach`` (multi-tensor), else ``loop`` (torch's default on CPU). The update is the same up to float
    rounding. ``kind`` forces one form (benchmarks, tests); ``auto`` tries them in that order."""
    if kind not in ADAM_KINDS:
        raise Med3DError(f"unknown Adam form '{kind}'; choose one of: {', '.join(ADAM_KINDS)}")
    forms = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    order = ["fused", "foreach", "loop"] if kind == "auto" else [kind]
    groups = list(groups)
    for index, name in enumerate(order):
        try:
            return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, **forms[name])
        except (RuntimeError, TypeError, ValueError):  # this build or device lacks the form (e.g. fused on CPU
            if index == len(order) - 1:               # before torch 2.4): the next one
                raise
    raise AssertionError("unreachable")



def training_layout(model: nn.Module, device: torch.device) -> bool:
    """Whether training runs channels-last 3D: on CPU for networks with a full-resolution decoder (segmentation
    heads that upsample), where oneDNN's channels-last kernels make a step faster; not for classifiers on small
    cubes, where it measured no gain (Testing/benchmarks/bench_train_step.py)."""
    from .nets.heads import LungDecoderHead

    head = getattr(model, "head", None)
    return device.type == "cpu" and isinstance(head, LungDecoderHead)



def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate for the update of ``step`` (0-based count of updates done)."""
    total, warm = config.total_steps, config.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    progress = min(max((step - warm) / max(total - warm, 1), 0.0), 1.0)
    if config.schedule == "poly":
        return (1.0 - progress) ** config.poly_power
    return 0.5 * (1.0 + math.cos(math.pi * progress))



def rng_state() -> Dict[str, Any]:
    """The python, numpy, torch (and CUDA) random states in a form a checkpoint holds (JSON text and tensors),
    so a resumed run draws what the uninterrupted run would have drawn."""
    np_state = np.random.get_state()
    state = {"python": json.dumps(random.getstate()),
             "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state



def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the random states :func:`rng_state` saved."""
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice loss for segmentation logits (N, C, K, J, I) and labels (N, K, J, I).

    Dice is computed per sample and per foreground class (smoothed, so a class absent from both prediction and
    truth counts as a match) and averaged; both terms are means over samples, so splitting a batch into equal
    micro-batches and averaging gives the same loss.
    """
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits, labels)
    if logits.shape[1] < 2:
        return ce
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (2, 3, 4)
    smooth = 1.0
    dice = (2 * (probs * onehot).sum(dims) + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return ce + (1.0 - dice.mean())
