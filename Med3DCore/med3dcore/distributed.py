"""Data-parallel training under torchrun: the process's place in the job, the device it trains on, and the collective
operations of the loop in :mod:`med3dcore.train` (start from rank 0's weights; average gradients, BatchNorm
running statistics and the loss over ranks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from .devices import resolve_device
from .errors import Med3DError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def distributed_context(device: Optional[torch.device] = None) -> DistContext:
    """The process's place in a torchrun job (rank 0 of 1 without torchrun).

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process group is started on first use: NCCL when
    ``device`` is CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist
    if not dist.is_available():
        raise Med3DError("torchrun started several processes, but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))



def training_device(name: str = "auto") -> torch.device:
    """The device this process trains on: under torchrun on CUDA, the GPU of its ``LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device



def broadcast_model(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    import torch.distributed as dist
    for tensor in list(model.state_dict().values()):
        dist.broadcast(tensor, src=0)



def running_stats(model: nn.Module) -> List[torch.Tensor]:
    """BatchNorm running means and variances: averaged over micro-batches and ranks after every step."""
    stats = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            stats += [module.running_mean, module.running_var]
    return stats



def average_grads_and_loss(model: nn.Module, loss: float, world_size: int,
                            stats: Sequence[torch.Tensor] = ()) -> float:
    """Average over all ranks the gradients that exist (the same parameters on every rank, since all ranks train
    the same branch), the BatchNorm running statistics and the loss; returns the mean loss."""
    import torch.distributed as dist
    tensors = [p.grad for p in model.parameters() if p.grad is not None] + list(stats)
    device = tensors[0].device if tensors else next(model.parameters()).device
    flat = torch.cat([t.reshape(-1).float() for t in tensors] +
                     [torch.tensor([loss], dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return float(flat[-1])
