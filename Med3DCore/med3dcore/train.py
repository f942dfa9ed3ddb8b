"""The one training loop, shared by multi-domain pretraining and fine-tuning.

:func:`train` runs ``config.total_steps`` optimisation steps of Adam on a model. What a step trains on and what
it minimises come from two callbacks, so the same loop serves every task:

- ``next_batch(step) -> batch``: this process's share of the global batch for ``step`` (1-based). Under torchrun
  each rank returns its own ``batch_size / world_size`` samples
  (see :func:`~med3dcore.distributed.distributed_context`).
- ``compute_loss(model, batch) -> (loss, metrics)``: a scalar tensor and a dict of floats (strings such as a
  domain name are passed through to progress events). It is called once per micro-batch (below).

Around them the loop provides: per-parameter-group learning rates
(:func:`~med3dcore.training_setup.param_groups`: pretrained encoder vs new layers), weight decay, warm-up +
constant/poly/cosine schedules, gradient clipping, mixed precision (CUDA: bf16, or fp16 with a GradScaler; a
CPU: bf16 autocast where it has native bfloat16, see ``devices.training_autocast``), atomic checkpoints every N
steps (``checkpoints/last.pt``), exact
resume (step, model, optimiser, scheduler, GradScaler, the state of every object in ``stateful`` such as the
sampler, and the python/numpy/torch random states), optional validation every N steps that keeps
``checkpoints/best.pt`` by a named metric, and progress events through the reporter.

A non-finite loss (or non-finite weights before a checkpoint) stops the run with a :class:`Med3DError` naming
the step (and domain, when the metrics carry one); ``last.pt`` is never overwritten with such weights, so the
last good checkpoint stays resumable.

Data parallel (torchrun): every rank draws the same step plan and trains on its own slice of the batch; gradients
are averaged with one all-reduce per step (gloo on CPU, NCCL on CUDA); rank 0 alone writes checkpoints and
reports. BatchNorm statistics are per micro-batch: the batch a process holds is split into micro-batches of
``config.micro_batch`` samples (default: all of them), each is forwarded and back-propagated on its own and the
gradients averaged; each micro-batch updates the BatchNorm running statistics from the same starting values and
the results are averaged (over micro-batches, then over ranks). So a single process with ``batch_size=4,
micro_batch=2`` computes what two torchrun ranks with two samples each compute (up to float summation order), and
MedicalNet's plain BatchNorm layers are kept unchanged (SyncBatchNorm is GPU-only and would change the result
with the number of processes). Gradients are averaged with explicit all-reduces rather
than ``DistributedDataParallel`` because a pretraining step uses one domain branch only: parameters without a
gradient must stay untouched (no zero-gradient Adam update), which explicit reduction of the parameters that do
have a gradient guarantees; every rank trains the same branch at a given step.

Fine-tuning uses it like this::

    model = build_model(architecture); load pretrained encoder weights
    groups = param_groups(model, lr=cfg.lr, pretrained_lr=cfg.pretrained_lr)   # "encoder." = pretrained
    result = train(model, cfg, next_batch=sampler.next_batch, compute_loss=seg_loss, out_dir=out,
                   groups=groups, validate=lambda m: {"dice": ...}, stateful={"sampler": sampler},
                   reporter=reporter, resume=args.resume, stage="finetune")
    best weights: result.best_path (or result.last_path); then save a bundle with bundles.save_bundle.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint_files import atomic_save, safe_load
from .bf16_guard import THIN, needs_thin_map_guard, thin_map_guard
from .devices import cpu_bf16_support, describe_device, training_autocast
from .distributed import average_grads_and_loss, broadcast_model, distributed_context, running_stats, training_device
from .errors import Med3DError
from .progress import Reporter, make_event, null_reporter
from .safe_io import clean_stale
from .training_setup import TrainConfig, lr_factor, make_adam, param_groups, rng_state, set_rng_state, training_layout


CHECKPOINT_FORMAT = "med3d-train-checkpoint"



@dataclass
class TrainResult:
    """What a finished run leaves: where its checkpoints are, the step reached and the per-step history."""
    out_dir: Path
    last_path: Path
    best_path: Optional[Path]
    step: int
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None
    validations: List[Dict[str, Any]] = field(default_factory=list)  # {"step", metric: value, ...} per validation



def _make_scaler(enabled: bool) -> Any:
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3



def split_batch(batch: Any, parts: int) -> List[Any]:
    """Split a batch (tensor, or dict/list/tuple of tensors; other values are shared) into ``parts`` equal
    micro-batches along dimension 0."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % parts:
            raise Med3DError(f"a batch of {batch.shape[0]} samples cannot be split into {parts} equal micro-batches; "
                             "make batch_size a multiple of micro_batch * number of processes")
        return list(torch.chunk(batch, parts, dim=0))
    if isinstance(batch, dict):
        pieces = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: pieces[k][i] for k in batch} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        pieces = [split_batch(v, parts) for v in batch]
        return [type(batch)(p[i] for p in pieces) for i in range(parts)]
    return [batch] * parts



def _batch_len(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None



def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())



def _nan_error(what: str, step: int, metrics: Mapping[str, Any], last_path: Path, last_step: int) -> Med3DError:
    """The NaN stop, naming the checkpoint to resume from only when one was written (a resume applies a new
    learning rate: see :func:`_apply_new_rates`)."""
    where = f"step {step}" + (f" (domain '{metrics['domain']}')" if "domain" in metrics else "")
    kept = (f"the last good checkpoint {last_path} (step {last_step}) is kept: resume from it with a lower "
            "learning rate (med3d pretrain --resume --set lr=..., med3d finetune --resume --lr ...), or for "
            "pretraining with gradient clipping (--set grad_clip=1)" if last_step > 0 and last_path.is_file() else
            "no checkpoint was written yet: start again with a lower learning rate or gradient clipping, or check "
            "the data" + (" of that domain" if "domain" in metrics else ""))
    return Med3DError(f"training stopped: {what} at {where}; {kept}")



def _apply_new_rates(optimizer: torch.optim.Optimizer, scheduler: Any, saved: Mapping[str, Any],
                     config: TrainConfig) -> Optional[str]:
    """On resume, learning rates asked for now replace the checkpoint's (the optimiser state would otherwise
    restore the old ones, and a run stopped by NaN would fail again). Returns a note, or None when unchanged."""
    if saved.get("lr") == config.lr and saved.get("pretrained_lr") == config.pretrained_lr:
        return None
    factor = lr_factor(scheduler.last_epoch, config)
    for index, group in enumerate(optimizer.param_groups):
        if group.get("name") == "pretrained":
            base = config.lr if config.pretrained_lr is None else config.pretrained_lr
        elif group.get("name") == "new":
            base = config.lr
        else:  # caller-made groups: scale by the change of the main rate
            base = scheduler.base_lrs[index] * config.lr / float(saved.get("lr") or config.lr)
        scheduler.base_lrs[index] = base
        group["initial_lr"] = base
        group["lr"] = base * factor
    return f"learning rate {config.lr:g} (the checkpoint had {saved.get('lr')})"



def train(model: nn.Module, config: TrainConfig, next_batch: Callable[[int], Any],
          compute_loss: Callable[[nn.Module, Any], Tuple[torch.Tensor, Dict[str, Any]]],
          out_dir, *, groups: Optional[List[Dict[str, Any]]] = None,
          validate: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
          stateful: Optional[Mapping[str, Any]] = None, reporter: Optional[Reporter] = None,
          resume: bool = False, stage: str = "train", device: Optional[torch.device] = None) -> TrainResult:
    """Train ``model`` for ``config.total_steps`` steps; see the module docstring for the callbacks.

    ``out_dir/checkpoints/last.pt`` is written every ``config.checkpoint_every`` steps and at the end;
    ``best.pt`` whenever validation improves ``config.best_metric``. ``stateful`` objects (e.g. the sampler) need
    ``state_dict()`` / ``load_state_dict(state)``; their states go into checkpoints. With ``resume=True`` training
    continues exactly from ``last.pt`` (an error if it is missing or from a different configuration); without it,
    an existing ``last.pt`` is an error rather than being overwritten.
    """
    reporter = reporter or null_reporter
    stateful = dict(stateful or {})
    device = device or training_device(config.device)
    ctx = distributed_context(device)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if ctx.is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. the output "folder" is an existing file
            raise Med3DError(f"cannot create the output folder {ckpt_dir}: {exc.strerror or exc}; give an --out "
                             "folder that is not a file and that you may write to") from None
        for stale in ckpt_dir.glob(".*.pt.*.tmp"):  # med3dcore 0.1's writes cut short by a kill
            stale.unlink()
        clean_stale(ckpt_dir)  # staging folders of killed runs (the real files are intact)
        clean_stale(out)

    model.to(device)
    if training_layout(model, device):
        model.to(memory_format=torch.channels_last_3d)  # same values; oneDNN's faster kernels (see the function)
    model.train()
    opt_groups = groups if groups is not None else param_groups(model, config.lr, config.pretrained_lr)
    optimizer = make_adam(opt_groups, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    amp_dtype = training_autocast(config.amp, device)
    guarded = needs_thin_map_guard(device, amp_dtype)
    scaler = _make_scaler(amp_dtype == torch.float16)

    start_step, history, best, rates_note = 0, [], None, None
    validations: List[Dict[str, Any]] = []
    if resume:
        if not last_path.is_file():
            raise Med3DError(f"--resume was given but {last_path} does not exist; start without --resume")
        ckpt = safe_load(last_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise Med3DError(f"{last_path} is not a Med3D training checkpoint; start a new run in another folder")
        saved = dict(ckpt["config"])
        mismatch = [k for k in ("batch_size", "micro_batch", "seed", "schedule")
                    if saved.get(k) != getattr(config, k)]
        if mismatch:
            raise Med3DError(f"cannot resume: the checkpoint was made with different {', '.join(mismatch)} "
                             f"({', '.join(f'{k}={saved.get(k)}' for k in mismatch)}); use the original settings")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise Med3DError(f"cannot resume: {last_path} holds a different network (e.g. other domains, classes or "
                             f"depth): {str(exc).splitlines()[0]}; resume with the original config") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        rates_note = _apply_new_rates(optimizer, scheduler, saved, config)
        scaler.load_state_dict(ckpt["scaler"])
        for name, obj in stateful.items():
            obj.load_state_dict(json.loads(ckpt["stateful"][name]))
        set_rng_state(ckpt["rng"])
        start_step = int(ckpt["step"])
        history = json.loads(ckpt["history"])
        validations = json.loads(ckpt.get("validations") or "[]")  # absent in checkpoints of med3dcore 0.1
        best = json.loads(ckpt["best"]) if ckpt.get("best") else None
    elif last_path.exists():
        raise Med3DError(f"{last_path} exists from an earlier run; pass --resume to continue it or choose a new "
                         "output folder")
    if ctx.world_size > 1:
        broadcast_model(model)

    last_saved_step = start_step if resume else 0

    def save_last(step: int) -> None:
        nonlocal last_saved_step
        if not _all_finite(model):  # checked on every rank (same weights), so all stop together
            raise _nan_error("the weights became NaN/inf", step, {}, last_path, last_saved_step)
        if not ctx.is_main:
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "step": step, "config": config.to_dict(),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "stateful": {n: json.dumps(o.state_dict()) for n, o in stateful.items()},
                     "rng": rng_state(), "history": json.dumps(history), "validations": json.dumps(validations),
                     "best": json.dumps(best) if best else None}, last_path)
        last_saved_step = step

    def run_validation(step: int) -> None:
        nonlocal best
        if validate is None or not ctx.is_main:
            return
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in validate(model).items()}
        model.train()
        validations.append({"step": step, **metrics})
        reporter(make_event(stage, step, config.total_steps, kind="message", message="validation " + ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items()), metrics=metrics))
        name = config.best_metric or next(iter(metrics), None)
        if name is None:
            return
        if name not in metrics:
            raise Med3DError(f"best_metric '{name}' is not among the validation metrics ({', '.join(metrics)})")
        value = metrics[name]
        better = best is None or (value > best["value"] if config.best_mode == "max" else value < best["value"])
        if better and math.isfinite(value):
            best = {"metric": name, "value": value, "step": step, "metrics": metrics}
            atomic_save({"format": CHECKPOINT_FORMAT + "-best", "step": step, "metrics": metrics,
                         "model": model.state_dict(), "config": config.to_dict()}, best_path)

    if ctx.is_main:
        reporter(make_event(stage, start_step, config.total_steps, kind="message",
                            message=(f"resuming at step {start_step}" if resume else "starting") +
                            (f" with {rates_note}" if rates_note else "") +
                            f" on {describe_device(device)}" +
                            (f", {str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype is not None else "") +
                            (", float32: this CPU's bf16 convolution gradients failed med3d's check (see "
                             "devices.cpu_bf16_gradients_ok)" if amp_dtype is None and config.amp == "auto"
                             and device.type == "cpu" and cpu_bf16_support() else "") +
                            (f" (convolutions over maps {THIN} voxels thin or less in float32: this CPU's bf16 "
                             "gradients there failed med3d's check)" if guarded else "") +
                            (f", {ctx.world_size} processes" if ctx.world_size > 1 else "")))
    per_rank = config.batch_size // ctx.world_size
    if per_rank * ctx.world_size != config.batch_size:
        raise Med3DError(f"batch_size {config.batch_size} is not divisible by the {ctx.world_size} processes")
    micro = config.micro_batch or per_rank
    if per_rank % micro:
        raise Med3DError(f"each process holds {per_rank} samples per step, not a multiple of micro_batch {micro}")
    parts = per_rank // micro
    bn_stats = running_stats(model)

    for step in range(start_step + 1, config.total_steps + 1):
        batch = next_batch(step)
        n = _batch_len(batch)
        if n is not None and n != per_rank:
            raise Med3DError(f"next_batch gave {n} samples at step {step}, expected {per_rank} per process")
        optimizer.zero_grad(set_to_none=True)  # None grads: Adam leaves those parameters untouched
        total_loss, metrics_sum, text = 0.0, {}, {}
        bn_start = [b.clone() for b in bn_stats] if parts > 1 else []
        bn_sum = [torch.zeros_like(b) for b in bn_start]
        for piece in split_batch(batch, parts):
            for b, b0 in zip(bn_stats, bn_start):  # every micro-batch updates from the same running statistics
                b.copy_(b0)
            autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast, thin_map_guard(device, amp_dtype):
                loss, metrics = compute_loss(model, piece)
            value = float(loss.detach())
            total_loss += value / parts
            for k, v in metrics.items():
                if isinstance(v, str):
                    text[k] = v
                else:  # numbers, numpy or one-element torch scalars: averaged over micro-batches
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / parts
            scaler.scale(loss / parts).backward()  # even when non-finite: ranks must reduce the same grads
            for acc, b in zip(bn_sum, bn_stats):
                acc += b
        for b, acc in zip(bn_stats, bn_sum):
            b.copy_(acc / parts)
        if ctx.world_size > 1:
            total_loss = average_grads_and_loss(model, total_loss, ctx.world_size, bn_stats)
        if not math.isfinite(total_loss):
            raise _nan_error(f"the loss became {total_loss}", step, text, last_path, last_saved_step)
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in opt_groups for p in g["params"] if p.grad is not None],
                                           config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        record = {"step": step, "loss": total_loss, **text, **metrics_sum}
        history.append(record)
        if ctx.is_main and (step % config.log_every == 0 or step == config.total_steps):
            reporter(make_event(stage, step, config.total_steps, metrics={
                "loss": total_loss, **text, **metrics_sum, "lr": optimizer.param_groups[-1]["lr"]}))
        if config.validate_every and step % config.validate_every == 0:
            run_validation(step)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step != config.total_steps:
            save_last(step)

    final_step = config.total_steps
    if validate is not None and (not config.validate_every or final_step % config.validate_every):
        run_validation(final_step)
    if start_step < final_step or not last_path.exists():
        save_last(final_step)
    if ctx.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
    if ctx.is_main:
        write_training_record(out, history, validations, stage, reporter, config.best_metric)
    return TrainResult(out_dir=out, last_path=last_path, best_path=best_path if best else None,
                       step=final_step, history=history, best=best, validations=validations)



HISTORY_NAME = "history.json"

CURVE_NAME = "training_curve.png"



def write_training_record(out: Path, history: Sequence[Mapping[str, Any]], validations: Sequence[Mapping[str, Any]],
                          stage: str, reporter: Reporter, metric: Optional[str] = None) -> None:
    """``out/history.json`` (loss per step, validation metrics, the metric that picks the best checkpoint) and
    ``out/training_curve.png`` (loss and that metric); a failure to write them is reported, never fatal: the
    trained weights are saved already."""
    from .plots import curves_from_history, write_curves
    from .safe_io import write_text

    try:
        write_text(out / HISTORY_NAME, json.dumps({"stage": stage, "history": list(history), "metric": metric,
                                                   "validations": list(validations)}, allow_nan=True),
                   overwrite=True, what="training history")
        write_curves(out / CURVE_NAME, {stage: curves_from_history(history, validations, metric)},
                     title=f"{stage}: {out.name}")
    except (Med3DError, OSError) as exc:
        reporter(make_event(stage, kind="message", message=f"could not write the training curve: {exc}"))
