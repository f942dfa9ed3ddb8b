"""A scan stored flipped or transposed on disk gives the same segmentation in world space.

A real CT (the abdomen crop) is written in several storage orders (axes flipped, axes transposed, both), read
back from disk and segmented by the same fixed network; each label map, resampled in world space onto the
original scan's grid, must equal the original's result. The network is deterministic (fixed random weights, its
output bias set so that about half the scan is labelled), so any difference comes from orientation handling.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from med3dcore import infer
from med3dcore.bundles import load_bundle, model_from_bundle, save_bundle
from med3dcore.phantoms import store_as
from med3dcore.preprocess import PreprocessSpec, preprocess_image, resample_to_reference
from med3dcore.volume_files import read_volume, write_volume
from test_infer import segmentation_bundle

TILE = (24, 64, 64)

STORAGE = [  # (array axes flipped, then transposed as np.transpose, file type)
    ((0, 2), None, ".nii.gz"),
    ((), (0, 2, 1), ".nrrd"),
    ((1,), (2, 1, 0), ".mha"),
]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("geometry")
    scan = read_volume(data_dir / "ct" / "abdomen_ct_small.nii.gz")
    spec = PreprocessSpec(spacing=(4.0, 4.0, 4.0), window=(-1000.0, 400.0), modality="CT")
    bundle = load_bundle(segmentation_bundle(folder / "random.pt", spec=spec, seed=7))
    net = model_from_bundle(bundle)
    array, _ = preprocess_image(scan, spec)
    with torch.no_grad():
        logits = net(torch.from_numpy(array)[None, None])[0]
        net.head.classify.bias[1] -= float(torch.median(logits[1] - logits[0]))  # about half lung, half not
    model = save_bundle(folder / "net.pt", net, architecture=bundle.architecture, task=bundle.task,
                        labels=bundle.labels, preprocessing=spec, provenance={"data": "calibrated random weights"})
    # fp32: the calibrated random network's two logits differ by little everywhere, so bf16's rounding (auto on a
    # CPU with native bf16) would move voxels across the threshold and hide what this test looks at.
    result = infer.segment(scan, model, device="cpu", tile=TILE, overlap=0.25, precision="fp32")
    return folder, scan, model, result.labels


def test_reference_result_is_not_trivial(reference):
    _, scan, _, labels = reference
    fraction = float(np.mean(labels.array > 0))
    assert 0.02 < fraction < 0.98, f"a fixed network that labels {fraction:.0%} cannot show orientation errors"


@pytest.mark.parametrize("flip,permute,suffix", STORAGE)
def test_flipped_or_transposed_scan_gives_same_world_result(reference, flip, permute, suffix):
    folder, scan, model, expected = reference
    stored = store_as(scan, flip, permute)
    path = write_volume(stored, folder / f"scan_{len(flip)}_{permute is not None}{suffix}", overwrite=True)
    on_disk = read_volume(path)
    assert on_disk.shape != scan.shape or not np.array_equal(on_disk.array, scan.array)  # really stored differently
    labels = infer.segment(on_disk, model, device="cpu", tile=TILE, overlap=0.25, precision="fp32").labels
    assert labels.same_geometry(on_disk)  # the result comes back in the file's own geometry
    in_reference_grid = resample_to_reference(labels, scan, is_label=True)
    agreement = float(np.mean(in_reference_grid.array == expected.array))
    assert agreement > 0.999, f"only {agreement:.4%} of voxels agree in world space"
