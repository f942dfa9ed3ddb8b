"""Sliding-window inference for fully convolutional 3D networks.

A volume larger than one network input is covered by equal-sized tiles; each tile's prediction is weighted by an
importance map (a Gaussian centred on the tile, so tile borders, where the network sees little context, count
less) and the weighted sum is divided by the summed weights. Tile positions follow the common scheme (stride =
tile * (1 - overlap), the last tile flush with the far border), so results match other tools with the same
settings. Volumes smaller than a tile are padded; the output is cropped back to the input size.

Speed (measured on CPU, see Testing/benchmarks/RESULTS.md): the network is fully convolutional, so few large
tiles with little overlap do far less redundant work than many small ones; ``tile="auto"`` (:func:`choose_tile`)
takes the whole volume when it fits a voxel budget and otherwise the fewest, smallest tiles that cover it, so a
volume slightly larger than a tile is not computed twice. :func:`make_predictor` runs the network in its
inference form (``nets/fused.py``: BatchNorm folded, ReLU and residual additions fused, every convolution on
oneDNN), channels-last, in the precision the hardware does fastest (``devices.resolve_precision``). Blending adds
each tile in place (one multiply-add, no tile-sized temporaries); a single tile is returned as it is.

A stride-8 network is not shift invariant: where its grid falls on the anatomy moves lung-border voxels (on a
real chest CT, single passes at twelve alignments agree with MONAI's reference tiling to label Dice 0.988-0.993,
two averaged passes 0.991; Testing/benchmarks/RESULTS.md). ``passes`` averages whole tilings at grid shifts
spread over the stride; ``passes="auto"`` (:func:`resolve_passes`) takes two where the network runs in native low
precision.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .devices import resolve_precision
from .errors import Med3DError
from .lowmem import slab_forward, supports_slabs
from .nets.fused import prepare_for_inference
from .progress import Reporter, make_event, null_reporter

Predictor = Callable[[torch.Tensor], torch.Tensor]
BLENDS = ("gaussian", "constant")
MIN_WEIGHT = 1e-3
SLAB = 32  # output slices per slab of the lung decoder's full-resolution group (see lowmem.py)
# Voxel budget of one tile for tile="auto": 96x160x160, the largest tile measured for ResNet-10 + lung decoder
# within about 1 GB of inference memory in float32 on CPU (Testing/benchmarks/RESULTS.md).
TILE_VOXELS = 96 * 160 * 160
MAX_PASSES = 8  # shifts of a stride-8 grid
TileSpec = Union[str, Sequence[int], None]


def tile_starts(size: int, tile: int, overlap: float) -> List[int]:
    """Start indices of tiles of length ``tile`` covering ``size`` voxels with the given fractional overlap."""
    if tile >= size:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def importance_map(tile: Sequence[int], blend: str = "gaussian", sigma_scale: float = 0.125) -> torch.Tensor:
    """Per-voxel weight of a tile's prediction: a separable Gaussian exp(-d^2 / (2 sigma^2)) of the distance d
    from the tile's centre (sigma = sigma_scale * tile; 1 at the centre of an odd-sized tile), floored at
    :data:`MIN_WEIGHT`, or all ones for ``constant`` (plain averaging). Computed in float32 and floored as MONAI
    does, so the same settings blend to the same probabilities."""
    if blend not in BLENDS:
        raise Med3DError(f"unknown blend mode '{blend}'; choose one of: {', '.join(BLENDS)}")
    if blend == "constant":
        return torch.ones(tuple(int(t) for t in tile), dtype=torch.float32)
    axes = []
    for length in tile:
        d = torch.arange(int(length), dtype=torch.float32) - (int(length) - 1) / 2.0
        sigma = max(sigma_scale * length, 1e-3)
        axes.append(torch.exp(d ** 2 / (-2.0 * sigma ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    # The floor: voxels that only tile borders see keep a well-defined, non-vanishing weight.
    return weights.clamp(min=MIN_WEIGHT)


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _axis_tile(size: int, count: int, overlap: float, multiple: int) -> int:
    """The smallest tile (a multiple of ``multiple``) that covers ``size`` voxels with at most ``count`` tiles."""
    tile = _round_up(max(1, math.ceil(size / count)), multiple)
    while tile < size and len(tile_starts(size, tile, overlap)) > count:
        tile += multiple
    return min(tile, _round_up(size, multiple))


def choose_tile(size: Sequence[int], max_voxels: int = TILE_VOXELS, overlap: float = 0.1,
                multiple: int = 1) -> Tuple[int, int, int]:
    """The tile for ``tile="auto"``: the whole volume (rounded up to ``multiple``) when it has at most
    ``max_voxels`` voxels; otherwise the axis with the longest tile is split into one more tile at a time, each
    split taking the smallest tile that still covers the axis with ``overlap``, until a tile fits the budget.
    A volume slightly larger than a fixed tile is thus covered by two half-size tiles instead of two full ones."""
    size = tuple(int(s) for s in size)
    counts = [1, 1, 1]
    tiles = [_axis_tile(s, 1, overlap, multiple) for s in size]
    while math.prod(tiles) > max_voxels:
        axis = max(range(3), key=lambda a: (tiles[a], -a))
        if tiles[axis] <= multiple:
            break  # cannot shrink further; the budget is smaller than one stride-sized tile
        counts[axis] += 1
        tiles[axis] = _axis_tile(size[axis], counts[axis], overlap, multiple)
    return tiles[0], tiles[1], tiles[2]


def effective_tile(size: Sequence[int], tile: TileSpec, multiple: int = 1, overlap: float = 0.1,
                   max_voxels: int = TILE_VOXELS) -> Tuple[int, int, int]:
    """The tile actually used: ``tile`` (None = the whole volume, ``"auto"`` = :func:`choose_tile`), never larger
    than the volume needs, and a multiple of ``multiple`` (the network's total stride) along every axis."""
    if isinstance(tile, str):
        if tile != "auto":
            raise Med3DError(f"tile must be 'auto', None (the whole volume) or three voxel counts, got {tile!r}")
        return choose_tile(size, max_voxels, overlap, multiple)
    if tile is None:
        tile = size
    tile = tuple(int(t) for t in tile)
    if len(tile) != 3 or min(tile) < 1:
        raise Med3DError(f"tile size must be three positive integers (K, J, I), got {tile}")
    return tuple(_round_up(min(t, s), multiple) for t, s in zip(tile, size))  # type: ignore[return-value]


def _tiles(size: Sequence[int], tile: Sequence[int], overlap: float) -> Iterator[Tuple[slice, slice, slice]]:
    for k in tile_starts(size[0], tile[0], overlap):
        for j in tile_starts(size[1], tile[1], overlap):
            for i in tile_starts(size[2], tile[2], overlap):
                yield (slice(k, k + tile[0]), slice(j, j + tile[1]), slice(i, i + tile[2]))


def pass_shifts(passes: int, multiple: int) -> List[int]:
    """Voxels the grid is shifted by (along every axis) in each of ``passes`` passes: evenly spread over the
    network's stride ``multiple``. A stride-8 network's output depends on where its grid falls on the anatomy;
    averaging passes at different alignments lessens that dependence."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise Med3DError(f"passes must be a whole number of at least 1, got {passes!r}")
    if passes > max(multiple, 1):
        raise Med3DError(f"{passes} passes need a network stride of at least {passes} voxels to shift by "
                         f"distinct amounts; this one has {multiple}")
    return [p * multiple // passes for p in range(passes)]


def resolve_passes(passes: Union[str, int], precision: str) -> int:
    """``"auto"``: two passes (grid shifted by half the stride) where the network runs in native low precision
    (``bf16``, ``amp``), whose speed pays for the second pass; one in ``fp32``. A number is used as it is."""
    if passes == "auto":
        return 2 if precision in ("bf16", "amp") else 1
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= MAX_PASSES:
        raise Med3DError(f"passes must be 'auto' or a whole number from 1 to {MAX_PASSES}, got {passes!r}")
    return passes


def sliding_window(predict: Predictor, image: Union[torch.Tensor, np.ndarray], tile: TileSpec = None,
                   overlap: float = 0.25, batch_size: int = 1, blend: str = "gaussian", sigma_scale: float = 0.125,
                   multiple: int = 1, pad_value: float = 0.0, device: Union[str, torch.device, None] = None,
                   out_device: Union[str, torch.device] = "cpu", reporter: Optional[Reporter] = None,
                   stage: str = "infer", max_tile_voxels: int = TILE_VOXELS, passes: int = 1) -> torch.Tensor:
    """Run ``predict`` over ``image`` (C, K, J, I) in tiles and blend the results.

    ``predict`` maps a batch (B, C, k, j, i) to (B, N, k, j, i) (e.g. class probabilities). ``tile`` is in voxels
    (None = the whole volume at once, ``"auto"`` = :func:`choose_tile` within ``max_tile_voxels``); it is shrunk
    to the volume where the volume is smaller and rounded up to ``multiple`` (padding with ``pad_value``). Tiles
    are sent to ``device`` (default: the image's) in batches of ``batch_size``; the float32 output (N, K, J, I) is
    accumulated on ``out_device`` (CPU by default, which keeps GPU memory to one batch). ``passes`` > 1 repeats
    the tiling on the volume less its first :func:`pass_shifts` voxels along every axis (the network's grid then
    falls elsewhere) and averages the passes voxel by voxel (the voxels cut off keep the passes that saw them).
    Progress goes to ``reporter`` as ``stage`` events (``unit`` ``"tile"``): step 0 before the first batch, then
    one per batch of every pass.
    """
    if not 0.0 <= overlap < 1.0:
        raise Med3DError(f"overlap must be in [0, 1), got {overlap}; 0.25 is a common choice")
    if batch_size < 1:
        raise Med3DError(f"batch size must be at least 1, got {batch_size}")
    image = torch.as_tensor(image)
    if image.dim() != 4:
        raise Med3DError(f"sliding-window input must be (channels, K, J, I), got shape {tuple(image.shape)}")
    reporter = reporter or null_reporter
    size = tuple(int(s) for s in image.shape[1:])
    plans = []  # per pass: voxels cut from the front of each axis, tile, padded size, tile windows
    for shift in pass_shifts(passes, multiple):
        # A later pass starts ``shift`` voxels in (the grid falls elsewhere on the anatomy) rather than padding
        # in front: the same network input size as the first pass, so the same cost.
        cut = tuple(shift if s > shift else 0 for s in size)
        part = tuple(s - c for s, c in zip(size, cut))
        pass_tile = effective_tile(part, tile, multiple, overlap, max_tile_voxels)
        padded = tuple(max(s, t) for s, t in zip(part, pass_tile))
        plans.append((cut, pass_tile, padded, list(_tiles(padded, pass_tile, overlap))))
    total = sum(math.ceil(len(windows) / batch_size) for *_, windows in plans)
    reporter(make_event(stage, 0, total, unit="tile"))  # the bar (and its clock) starts before the first tile
    blender = _Blender(predict, batch_size, blend, sigma_scale, device or image.device, out_device, reporter, stage,
                       total)
    output: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None  # passes per voxel, once a later pass has added its part
    for cut, pass_tile, padded, windows in plans:
        region = (slice(None),) + tuple(slice(c, None) for c in cut)
        part_image = image[region]
        pads: List[int] = []
        for s, p in zip(reversed(part_image.shape[1:]), reversed(padded)):
            pads += [0, p - s]
        if any(pads):
            part_image = F.pad(part_image, pads, mode="constant", value=pad_value)
        probs = blender.run(part_image, pass_tile, padded, windows)
        probs = probs[:, :size[0] - cut[0], :size[1] - cut[1], :size[2] - cut[2]]
        if output is None:  # the first pass (no cut) covers every voxel
            output = probs
            continue
        if count is None:
            count = torch.ones(size, dtype=torch.float32, device=output.device)
        output[region].add_(probs)
        count[region[1:]] += 1
    assert output is not None
    if count is not None:
        output /= count
    return output


class _Blender:
    """One tiling pass: tiles through the network in batches, blended by the importance map."""

    def __init__(self, predict: Predictor, batch_size: int, blend: str, sigma_scale: float,
                 device: Union[str, torch.device], out_device: Union[str, torch.device], reporter: Reporter,
                 stage: str, total: int) -> None:
        self.predict, self.batch_size, self.blend, self.sigma_scale = predict, batch_size, blend, sigma_scale
        self.device, self.out_device = torch.device(device), torch.device(out_device)
        self.reporter, self.stage, self.total, self.step = reporter, stage, total, 0

    def run(self, image: torch.Tensor, tile: Tuple[int, int, int], padded: Tuple[int, ...],
            windows: List[Tuple[slice, slice, slice]]) -> torch.Tensor:
        single = len(windows) == 1  # one tile: its prediction is the output, no weights needed
        weight = None if single else importance_map(tile, self.blend, self.sigma_scale).to(self.out_device)
        weight_sum = None if single else torch.zeros(padded, dtype=torch.float32, device=self.out_device)
        output: Optional[torch.Tensor] = None
        # Only the network runs in inference mode: its outputs cannot be updated in place, but the accumulators
        # below are ordinary tensors that callers may modify.
        with torch.no_grad():
            for first in range(0, len(windows), self.batch_size):
                batch_windows = windows[first:first + self.batch_size]
                batch = torch.stack([image[(slice(None),) + w] for w in batch_windows]).to(self.device)
                with torch.inference_mode():
                    result = self.predict(batch)
                if (result.dim() != 5 or tuple(result.shape[2:]) != tuple(tile)
                        or result.shape[0] != len(batch_windows)):
                    raise Med3DError(f"the network returned shape {tuple(result.shape)} for input "
                                     f"{tuple(batch.shape)}; a segmentation model must return one map per class "
                                     "at the input size")
                result = result.to(device=self.out_device, dtype=torch.float32)
                if single:
                    output = result[0].clone() if result.is_inference() else result[0]
                else:
                    if output is None:
                        output = torch.zeros((result.shape[1],) + tuple(padded), dtype=torch.float32,
                                             device=self.out_device)
                    for b, w in enumerate(batch_windows):
                        output[(slice(None),) + w].addcmul_(result[b], weight)  # in place: no tile-sized temporary
                        weight_sum[w] += weight
                del result
                self.step += 1
                self.reporter(make_event(self.stage, self.step, self.total, unit="tile"))
            assert output is not None
            if not single:
                output /= weight_sum
        return output


def make_predictor(model: nn.Module, device: Union[str, torch.device], precision: str = "auto",
                   activation: str = "softmax", slabs: bool = True, fuse: bool = True) -> Predictor:
    """Wrap a network for :func:`sliding_window`: inference form on ``device``, chosen precision, activation.

    ``precision`` (``devices.resolve_precision``): ``fp32``; ``bf16`` (bfloat16 weights and inputs: 2-5x faster
    on CPUs with AVX512_BF16 or AMX, slower than fp32 on CPUs without; label maps agree to Dice >= 0.995 on the
    real chest CTs); ``amp`` (float16 autocast, CUDA only); ``auto`` = ``amp`` on CUDA, ``bf16`` on a CPU with
    native bfloat16, ``fp32`` elsewhere. The model is changed in place for inference and must not be trained
    afterwards: eval mode, moved to ``device``, with ``fuse`` BatchNorm folded into the convolutions and ReLU /
    residual additions fused into them (``nets/fused.py``; exact up to float rounding), then converted to the
    precision's dtype, channels-last on CPU. ``activation``: ``softmax`` over classes, ``sigmoid`` or ``none``.
    Outputs are float32. ``slabs``: run a lung decoder's full-resolution group in slabs (``lowmem.py``; identical
    values, lower peak memory).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if activation not in ("softmax", "sigmoid", "none"):
        raise Med3DError(f"unknown activation '{activation}'; choose softmax, sigmoid or none")
    model = model.eval().to(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if fuse:  # folded in float32 (the weights' own precision), then converted
        prepare_for_inference(model, device, dtype)
    # Channels-last 3D lets oneDNN run the convolutions without layout copies: 10-30% faster on CPU, same values.
    layout = torch.channels_last_3d if device.type == "cpu" or precision == "bf16" else torch.contiguous_format
    model = model.to(dtype=dtype, memory_format=layout)

    # The lung decoder's full-resolution group runs in slabs: same values, a fraction of the peak memory.
    forward = (lambda x: slab_forward(model, x, SLAB)) if slabs and supports_slabs(model) else model  # noqa: E731

    def predict(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device=device, dtype=dtype).contiguous(memory_format=layout)
        if precision == "amp":
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                logits = forward(batch)
        else:
            logits = forward(batch)
        logits = logits.float()
        if activation == "softmax":
            return torch.softmax(logits, dim=1)
        if activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    return predict
