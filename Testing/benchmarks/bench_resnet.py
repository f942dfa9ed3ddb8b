"""MedicalNet backbones: med3dcore's resnet3d vs MONAI's ResNet, same MedicalNet weights, same input, one process.

    python Testing/benchmarks/bench_resnet.py [--size 64] [--repeats 3] [--threads 2] [--depths 10,18,50]

For each depth: build both networks, load one MedicalNet-layout file into both (ours through
``medicalnet.load_medicalnet``, MONAI through ``torch.load`` + ``load_state_dict``, its documented way), then time the
encoder forward pass (median of --repeats, the two alternated, eval, no_grad) on a (1, 1, S, S, S) input. MONAI's ResNet (stem set to
MedicalNet's 7x7x7 stride 2, ``bias_downsample=False`` so the keys match) keeps stride 2 in layer3/layer4 without
dilation: it loads the same weights but computes a different, coarser network (output stride 32, not 8), which the
feature shapes printed show. Also timed: loading the file (safe_load + strict checks vs a plain load).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

from med3dcore.medicalnet import export_medicalnet, load_medicalnet
from med3dcore.nets import resnet3d

RELEASED_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}


def _paired_medians(ours: Callable[[], object], peer: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Median seconds of each, runs alternated so drifting load from other work hits both sides alike."""
    ours(), peer()  # warm-up: first calls pick kernels
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (peer, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _monai_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = getattr(net, "act", None) or getattr(net, "relu")
    x = net.maxpool(act(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def bench_depth(depth: int, size: int, repeats: int, folder: Path) -> None:
    from monai.networks.nets import resnet as monai_resnet

    shortcut = RELEASED_SHORTCUT[depth]
    torch.manual_seed(depth)
    source = resnet3d(depth, shortcut, num_seg_classes=None).eval()
    path = folder / f"resnet_{depth}.pth"
    export_medicalnet(source, path, overwrite=True)

    ours = resnet3d(depth, shortcut, num_seg_classes=None).eval()
    peer = getattr(monai_resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, conv1_t_size=7,
                                                     conv1_t_stride=2, shortcut_type=shortcut, feed_forward=False,
                                                     bias_downsample=False).eval()

    def monai_load() -> None:
        state = torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]
        peer.load_state_dict({k[len("module."):]: v for k, v in state.items()}, strict=True)

    t_ours_load, t_peer_load = _paired_medians(lambda: load_medicalnet(ours, path), monai_load, repeats)
    x = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        ours_feats, peer_feats = ours.features(x), _monai_features(peer, x)
        same_weights = all(torch.equal(v, peer.state_dict()[k]) for k, v in ours.state_dict().items())
        t_ours, t_peer = _paired_medians(lambda: ours.features(x), lambda: _monai_features(peer, x), repeats)
    print(f"| ResNet-{depth} {shortcut} | {size}^3 | {tuple(ours_feats.shape[2:])} | {tuple(peer_feats.shape[2:])} "
          f"| {t_ours:.3f} s | {t_peer:.3f} s | {t_ours / t_peer:.2f}x | {t_ours_load:.2f} s | {t_peer_load:.2f} s "
          f"| {same_weights} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", default="10,18,50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| network | input | our feature grid | MONAI feature grid | ours forward | MONAI forward | ours / MONAI "
          "| ours load (checked) | MONAI load | same weights loaded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in (int(d) for d in args.depths.split(",")):
            bench_depth(depth, args.size, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
