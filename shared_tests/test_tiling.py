"""Exact tiling: tiled CI equals untiled CI (and Cp) for every tile size, in both backends."""

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error

TILES = [(4, 4), (5, 7), (8, 12), (64, 64)]
SPEC = [{"type": "conv", "out": 4, "k": 3, "stride": 2}, {"type": "act", "fn": "tanh"},
        {"type": "pool", "kind": "avg", "k": 3, "stride": 3}, {"type": "conv", "out": 3, "k": 2}]
PATCH = (14, 15)


def test_torch_tiling_is_exact(tb, torch_device):
    import torch
    net = netspec.build_torch(SPEC, 2, PATCH, netspec.make_weights(SPEC, 2, PATCH)).to(torch_device)
    images = torch.from_numpy(netspec.random_images(2, 2, 23, 31).transpose(0, 3, 1, 2)).to(torch_device)
    ref = tb.FDFE.dense_reference(net, images, PATCH).cpu()
    ci = tb.FDFE.convert(net, PATCH)
    with torch.no_grad():
        full = ci(images).cpu()
        assert max_rel_error(full, ref) <= TOL["float64"]
        for tile in TILES:
            ci.tile = tile
            assert max_rel_error(ci(images).cpu(), full) <= 1e-13, tile


def test_keras_tiling_is_exact(kb, tf_scope):
    import tensorflow as tf
    net = netspec.build_keras(SPEC, 2, PATCH, netspec.make_weights(SPEC, 2, PATCH), kb.FDFE)
    images = tf.constant(netspec.random_images(2, 2, 23, 31))
    ref = kb.FDFE.dense_reference(net, images, PATCH)
    ci = kb.FDFE.convert(net, PATCH)
    full = ci(images)
    assert max_rel_error(full, ref) <= TOL["float64"]
    for tile in TILES:
        ci.tile = tile
        assert max_rel_error(ci(images), full) <= 1e-13, tile


def test_tiled_basenet_float32(tb, kb):
    import tensorflow as tf
    import torch
    image = np.random.default_rng(2).standard_normal((1, 45, 38, 1)).astype(np.float32)
    t_ci = tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, tile=(16, 12))
    k_ci = kb.FDFE.convert(kb.BaseNet.BaseNet(), 15, tile=(16, 12))
    with torch.no_grad():
        t_out = t_ci(torch.from_numpy(image.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    t_ci.tile = None
    with torch.no_grad():
        t_full = t_ci(torch.from_numpy(image.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    k_out = k_ci(tf.constant(image)).numpy()
    assert max_rel_error(t_out, t_full) <= TOL["float32"]
    assert max_rel_error(k_out, t_out) <= TOL["float32"]


@pytest.mark.parametrize("tile,error,match", [
    ((0, 4), ValueError, r"tile must be at least 1, got \(0, 4\)"),
    ((4, -1), ValueError, r"tile must be at least 1, got \(4, -1\)"),
    ("big", TypeError, r"tile must be an int or a pair of ints, got 'big'"),
])
def test_bad_tile(tb, tile, error, match):
    with pytest.raises(error, match=match):
        tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, tile=tile)


def test_memory_budget_picks_tiles_and_stays_exact(tb, kb):
    """max_memory: the estimate of the chosen tiling fits the budget; the result is unchanged."""
    import tensorflow as tf
    import torch
    image = np.random.default_rng(3).standard_normal((1, 70, 90, 1)).astype(np.float32)
    t_ci = tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, tile=None)
    k_ci = kb.FDFE.convert(kb.BaseNet.BaseNet(), 15)
    for ci in (t_ci, k_ci):
        full = ci.estimate_memory((70, 90))
        budget = full // 2
        tile = ci.tile_for_memory(budget, (70, 90))
        assert tile is not None and ci.estimate_memory((70, 90), tile=tile) <= budget
        assert ci.tile_for_memory(full, (70, 90)) is None
        with pytest.raises(MemoryError, match=r"CI needs about [\d.]+ [KM]iB even with \d+x\d+ tiles .*; "
                                              r"the budget is 0\.977 KiB"):  # three digits: never alike
            ci.tile_for_memory(1000, (70, 90))
    with torch.no_grad():
        t_img = torch.from_numpy(image.transpose(0, 3, 1, 2))
        ref = t_ci(t_img)
        t_ci.max_memory = t_ci.estimate_memory((70, 90)) // 2
        assert max_rel_error(t_ci(t_img), ref) <= TOL["float32"]
    k_ci.max_memory = k_ci.estimate_memory((70, 90)) // 2
    assert max_rel_error(k_ci(tf.constant(image)), ref.numpy().transpose(0, 2, 3, 1)) <= TOL["float32"]


def test_a_budget_that_fits_the_images_also_passes_convert(tb, kb):
    """convert(..., max_memory=B) with B enough for the user's images: the self-check's own small image runs
    untiled whatever B (PyTorch raised MemoryError at convert where the check image needed more than B)."""
    import keras
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, stride=4))
    images = torch.randn(1, 1, 5, 5)
    budget = tb.FDFE.convert(net, 11, check=False).estimate_memory((5, 5), 1) + 1
    with torch.no_grad():
        assert max_rel_error(tb.FDFE.convert(net, 11, max_memory=budget)(images),
                             tb.FDFE.dense_reference(net, images, 11)) <= TOL["float32"]
    L = keras.layers
    knet = keras.Sequential([keras.Input((11, 11, 1)), L.Conv2D(4, 3, strides=4), L.ReLU(), L.Conv2D(2, 3, strides=4)])
    budget = kb.FDFE.convert(knet, 11, check=False).estimate_memory((5, 5), 1) + 1
    kimages = images.numpy().transpose(0, 2, 3, 1)
    assert max_rel_error(kb.FDFE.convert(knet, 11, max_memory=budget)(kimages),
                         kb.FDFE.dense_reference(knet, kimages, 11)) <= TOL["float32"]


def test_the_least_tile_that_errors_name_is_tried(tb, kb):
    """An image 11 rows high: tiles of ceil(11 / ny) rows skip 8, the least tile height; a budget that fits the
    8x8 tiles the MemoryError names now gets such tiles (it was refused, the message contradicting itself)."""
    import keras
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    ci = tb.FDFE.convert(net, 5)
    knet = keras.Sequential([keras.Input((5, 5, 1)), keras.layers.Conv2D(8, 3), keras.layers.ReLU(),
                             keras.layers.Conv2D(4, 3)])
    kci = kb.FDFE.convert(knet, 5)
    for model in (ci, kci):
        budget = model.estimate_memory((11, 40), 1, tile=(8, 8)) + 1
        tile = model.tile_for_memory(budget, (11, 40))
        assert tile[0] == 8 and model.estimate_memory((11, 40), 1, tile=tile) <= budget
    images = torch.randn(1, 1, 11, 40)
    ci.max_memory = ci.estimate_memory((11, 40), 1, tile=(8, 8)) + 1
    with torch.no_grad():
        assert max_rel_error(ci(images), tb.FDFE.dense_reference(net, images, 5)) <= TOL["float32"]
