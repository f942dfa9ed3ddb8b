"""Sliding-window engine: tile placement, blending weights, exactness against whole-volume inference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from med3dcore.errors import Med3DError
from med3dcore.progress import make_event
from med3dcore.sliding import (TILE_VOXELS, choose_tile, effective_tile, importance_map, make_predictor,
                               pass_shifts, resolve_passes, sliding_window, tile_starts)

torch.set_num_threads(2)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(10, 16, 0.5) == [0]
    assert tile_starts(16, 16, 0.5) == [0]
    assert tile_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert tile_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]
    assert tile_starts(100, 32, 0.0) == [0, 32, 64, 68]
    for size, tile, overlap in [(37, 8, 0.25), (5, 3, 0.9), (64, 16, 0.1)]:
        starts = tile_starts(size, tile, overlap)
        covered = set()
        for s in starts:
            covered.update(range(s, s + tile))
        assert covered == set(range(size))
        assert starts[-1] == size - tile


def test_importance_map_gaussian_peak_and_symmetry():
    w = importance_map((5, 8, 9))
    assert w.shape == (5, 8, 9) and w.dtype == torch.float32
    # 1 at the centre of the odd axes; the 8-voxel axis (sigma 1) has its centre between two voxels, 0.5 away.
    assert w.max().item() == pytest.approx(float(torch.exp(torch.tensor(-0.125))), abs=1e-6)
    assert w[2, 3, 4] == w.max() or w[2, 4, 4] == w.max()
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1)) and torch.allclose(w, w.flip(2))
    assert w.min().item() > 0
    # Far from the centre the weight stops at the floor (1e-3), so border-only voxels stay well defined.
    assert importance_map((64, 64, 64)).min().item() == pytest.approx(1e-3)
    # sigma = 0.125 * 16 = 2: one sigma from the (odd-length) centre the 1-D weight is exp(-1/2).
    w1 = importance_map((1, 1, 17))[0, 0]
    assert w1[8 + 2].item() == pytest.approx(float(torch.exp(torch.tensor(-0.5 * (2 / 2.125) ** 2))), rel=1e-5)
    assert torch.equal(importance_map((2, 3, 4), "constant"), torch.ones(2, 3, 4))
    with pytest.raises(Med3DError, match="blend"):
        importance_map((2, 2, 2), "median")


@pytest.mark.parametrize("tile", [(32, 96, 96), (5, 8, 9), (64, 64, 64)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_importance_map_equals_monai(tile, blend):
    """Same settings, same weights as MONAI's sliding_window_inference (its map, floored as it floors it)."""
    utils = pytest.importorskip("monai.data.utils")
    theirs = utils.compute_importance_map(tile, mode=blend, sigma_scale=0.125, device="cpu")
    assert torch.equal(importance_map(tile, blend), theirs)


def test_effective_tile_shrinks_and_rounds():
    assert effective_tile((30, 100, 100), (64, 64, 64), multiple=8) == (32, 64, 64)
    assert effective_tile((30, 100, 100), None, multiple=8) == (32, 104, 104)
    assert effective_tile((30, 100, 100), (10, 20, 30)) == (10, 20, 30)
    with pytest.raises(Med3DError, match="three positive"):
        effective_tile((30, 30, 30), (0, 8, 8))


def _work(size, tile, overlap):
    """Voxels the network computes for ``size`` covered by ``tile``."""
    count = 1
    for s, t in zip(size, tile):
        count *= len(tile_starts(max(s, t), t, overlap)) * t
    return count


def test_auto_tile_takes_the_whole_volume_when_it_fits():
    # The chest CT on the lung preset's 3x3x4 mm grid: one pass, rounded up to the stride.
    assert choose_tile((60, 97, 97), multiple=8) == (64, 104, 104)
    assert effective_tile((60, 97, 97), "auto", multiple=8) == (64, 104, 104)
    assert choose_tile((5, 6, 7)) == (5, 6, 7)


def test_auto_tile_splits_a_volume_slightly_larger_than_the_budget_in_two_halves():
    """A full 512x512x300 CT at 3x3x4 mm (75x171x171) is just above the budget: two half tiles along one axis,
    where a fixed 96x160x160 tile would compute four nearly whole tiles (the 171-voxel axes twice each)."""
    size = (75, 171, 171)
    tile = choose_tile(size, TILE_VOXELS, overlap=0.1, multiple=8)
    assert tile == (80, 96, 176)  # 88 would need three tiles at overlap 0.1 (stride 79)
    assert tile[0] * tile[1] * tile[2] <= TILE_VOXELS
    fixed = effective_tile(size, (96, 160, 160), multiple=8)
    assert _work(size, tile, 0.1) < 0.55 * _work(size, fixed, 0.1)
    assert len(tile_starts(171, 96, 0.1)) == 2 and len(tile_starts(171, 88, 0.1)) == 3


@pytest.mark.parametrize("size,budget", [((200, 300, 300), TILE_VOXELS), ((40, 500, 90), 30 * 64 * 64),
                                         ((9, 9, 9), 1)])
def test_auto_tile_fits_the_budget_and_covers(size, budget):
    tile = choose_tile(size, budget, overlap=0.25, multiple=8)
    assert all(t % 8 == 0 for t in tile)
    if budget >= 8 ** 3:
        assert tile[0] * tile[1] * tile[2] <= budget
    else:  # no tile is smaller than one stride: the smallest possible
        assert tile == (8, 8, 8)
    for s, t in zip(size, tile):
        starts = tile_starts(max(s, t), t, 0.25)
        assert starts[0] == 0 and starts[-1] + t >= s


def test_tile_names_are_checked():
    with pytest.raises(Med3DError, match="tile must be 'auto'"):
        effective_tile((8, 8, 8), "whole")


def _identity(batch):
    return batch.clone()


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_network_is_exact(blend, batch_size):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 13, 17, 11, generator=g)  # odd sizes, two channels
    out = sliding_window(_identity, image, tile=(8, 8, 8), overlap=0.5, batch_size=batch_size, blend=blend)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.allclose(out, image, atol=1e-5)


def test_constant_network_is_exact_with_padding():
    image = torch.zeros(1, 5, 6, 7)
    predict = lambda b: torch.full((b.shape[0], 3) + tuple(b.shape[2:]), 0.25)  # noqa: E731
    out = sliding_window(predict, image, tile=(16, 16, 16), multiple=8)  # volume smaller than a tile
    assert out.shape == (3, 5, 6, 7)
    assert torch.allclose(out, torch.full_like(out, 0.25))


def test_padding_uses_pad_value():
    image = torch.ones(1, 3, 3, 3)
    seen = []

    def predict(batch):
        seen.append(batch.clone())
        return batch

    sliding_window(predict, image, tile=None, multiple=8, pad_value=-7.0)
    assert seen[0].shape == (1, 1, 8, 8, 8)
    assert seen[0][0, 0, :3, :3, :3].eq(1).all() and seen[0][0, 0, 3:].eq(-7).all()


def test_equals_full_volume_inference_where_tiles_give_full_context():
    """A net of two valid 3x3x3 convs sees 2 voxels either side. Wherever a voxel lies at least 2 voxels inside
    the only tile that covers it, the tiled result must equal whole-volume inference exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Conv3d(4, 2, 3))
    image = torch.randn(1, 21, 19, 23)
    full = net(image[None])[0]  # (2, 17, 15, 19): output voxel v is centred on input voxel v + 2

    def predict(batch):  # back to the tile size so the engine can place it
        return nn.functional.pad(net(batch), (2,) * 6, mode="replicate")

    whole = sliding_window(predict, image, tile=None)
    assert torch.allclose(whole[:, 2:-2, 2:-2, 2:-2], full, atol=1e-5)
    tiled = sliding_window(predict, image, tile=(12, 12, 12), overlap=0.0, blend="constant")
    assert tiled.shape == (2, 21, 19, 23)
    # Second tiles start at K=9, J=7, I=11: these voxels lie in the first tile only, 2+ voxels from its border.
    assert torch.allclose(tiled[:, 2:9, 2:7, 2:10], full[:, 0:7, 0:5, 0:8], atol=1e-5)
    assert not torch.allclose(tiled[:, 9:12], whole[:, 9:12], atol=1e-3)  # border voxels do differ


def test_fully_convolutional_net_tiles_match_whole_volume():
    """A pointwise (1x1x1) network has no spatial context, so tiling with any overlap equals whole-volume
    inference exactly, for both blend modes and batch sizes."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(1, 5, 1), nn.Tanh(), nn.Conv3d(5, 3, 1))
    predict = make_predictor(net, "cpu", "fp32", activation="softmax")
    image = torch.randn(1, 19, 26, 31)
    whole = sliding_window(predict, image, tile=None)
    for blend in ("gaussian", "constant"):
        tiled = sliding_window(predict, image, tile=(8, 16, 8), overlap=0.3, batch_size=4, blend=blend)
        assert torch.allclose(tiled, whole, atol=1e-5)
    assert torch.allclose(whole.sum(0), torch.ones(19, 26, 31), atol=1e-5)  # softmax


def test_progress_events_one_per_batch():
    events = []
    sliding_window(_identity, torch.zeros(1, 16, 16, 16), tile=(8, 8, 8), overlap=0.0, batch_size=3,
                   reporter=events.append, stage="lung")
    assert [e["step"] for e in events] == [0, 1, 2, 3]  # step 0: the bar shows before the first tile
    assert events[-1] == make_event("lung", 3, 3, unit="tile")


def test_pass_shifts_spread_over_the_stride():
    assert pass_shifts(1, 8) == [0] and pass_shifts(1, 1) == [0]
    assert pass_shifts(2, 8) == [0, 4]
    assert pass_shifts(4, 8) == [0, 2, 4, 6]
    assert pass_shifts(3, 8) == [0, 2, 5]
    for bad, message in ((0, "at least 1"), (True, "whole number"), (2.0, "whole number"), (9, "stride of at least 9")):
        with pytest.raises(Med3DError, match=message):
            pass_shifts(bad, 8)


def test_auto_passes_follow_the_precision():
    assert resolve_passes("auto", "bf16") == 2 and resolve_passes("auto", "amp") == 2
    assert resolve_passes("auto", "fp32") == 1
    assert resolve_passes(3, "fp32") == 3
    for bad in ("two", 0, 9, 1.5, None):
        with pytest.raises(Med3DError, match="passes must be 'auto' or a whole number from 1 to 8"):
            resolve_passes(bad, "bf16")


def _grid_phase(batch):
    """A network that is not shift invariant: 1 where the tile's K index is a multiple of 8, else 0."""
    k = torch.arange(batch.shape[2])
    return (k % 8 == 0).float().view(1, 1, -1, 1, 1).expand(batch.shape[0], 1, -1, *batch.shape[3:]).clone()


@pytest.mark.parametrize("tile", [None, "auto"])  # one tile per pass: its grid starts at the pass's first voxel
def test_passes_average_the_network_at_shifted_grids(tile):
    image = torch.randn(1, 21, 13, 18)
    one = sliding_window(_grid_phase, image, tile=tile, overlap=0.0, blend="constant", multiple=8)
    two = sliding_window(_grid_phase, image, tile=tile, overlap=0.0, blend="constant", multiple=8, passes=2)
    k = torch.arange(21).view(-1, 1, 1).float()
    assert torch.equal(one[0], (k % 8 == 0).float().expand(21, 13, 18))
    # the second pass starts 4 voxels in: voxel k lands on its grid index k - 4; voxels it cut off (k, j or i
    # below 4) keep the first pass alone
    both = 0.5 * ((k % 8 == 0).float() + ((k - 4) % 8 == 0).float())
    expected = both.expand(21, 13, 18).clone()
    expected[:, :4] = one[0, :, :4]
    expected[:, :, :4] = one[0, :, :, :4]
    expected[:4] = one[0, :4]
    assert two.shape == (1, 21, 13, 18) and torch.equal(two[0], expected)
    # a shift-invariant network gives the same output in any number of passes
    assert torch.allclose(sliding_window(_identity, image, tile=tile, multiple=8, passes=4), image, atol=1e-5)


def test_later_passes_start_inside_at_the_same_cost_and_report_every_tile():
    seen, events = [], []

    def predict(batch):
        seen.append(batch.clone())
        return batch

    image = torch.arange(16.0 ** 3).view(1, 16, 16, 16)
    out = sliding_window(predict, image, tile=(8, 8, 8), overlap=0.0, multiple=8, pad_value=-7.0, passes=2,
                         reporter=events.append, stage="lung")
    assert torch.allclose(out, image)
    # pass 1: 2x2x2 tiles; pass 2: the volume from voxel 4 on (12^3), tiles starting at 0 and 4 (flush): 2x2x2
    assert len(seen) == 16 and all(t.shape == (1, 1, 8, 8, 8) for t in seen)
    assert torch.equal(seen[8][0], image[:, 4:12, 4:12, 4:12]) and torch.equal(seen[15][0], image[:, 8:, 8:, 8:])
    assert [e["step"] for e in events] == list(range(17)) and events[-1] == make_event("lung", 16, 16, unit="tile")
    # a volume thinner than the shift along an axis is not cut along it
    thin = torch.randn(1, 3, 16, 16)
    assert torch.allclose(sliding_window(_identity, thin, multiple=8, passes=2), thin, atol=1e-6)


def test_bad_arguments_are_clear():
    image = torch.zeros(1, 8, 8, 8)
    with pytest.raises(Med3DError, match="overlap"):
        sliding_window(_identity, image, overlap=1.0)
    with pytest.raises(Med3DError, match="batch size"):
        sliding_window(_identity, image, batch_size=0)
    with pytest.raises(Med3DError, match="channels, K, J, I"):
        sliding_window(_identity, torch.zeros(8, 8, 8))
    with pytest.raises(Med3DError, match="returned shape"):
        sliding_window(lambda b: b[:, :, :4], image)
    with pytest.raises(Med3DError, match="needs a CUDA"):
        make_predictor(nn.Identity(), "cpu", "amp")
    with pytest.raises(Med3DError, match="precision"):
        make_predictor(nn.Identity(), "cpu", "fp8")


def test_bf16_predictor_close_to_fp32():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 3, padding=1))
    image = torch.randn(1, 1, 8, 16, 16)
    ref = make_predictor(net, "cpu", "fp32")(image)
    fast = make_predictor(net, "cpu", "bf16")(image)  # converts net in place
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert (fast - ref).abs().max().item() < 0.05
    assert next(net.parameters()).dtype == torch.bfloat16
