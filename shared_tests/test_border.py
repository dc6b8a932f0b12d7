"""Border modes: the image extended by reflection or replication instead of zeros, exact against Cp on
patches of the image extended the same way, in both backends; odd and even patches, batches, sizes
not multiples of the stride product, tiles."""

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error

SPEC = [{"type": "conv", "out": 3, "k": [3, 3], "stride": [2, 2]}, {"type": "act", "fn": "tanh"},
        {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]}, {"type": "conv", "out": 4, "k": [2, 3]}]
PATCHES = [(11, 13), (12, 14)]  # odd and even
SIZES = [(2, 13, 17), (1, 9, 10)]


@pytest.mark.parametrize("border", ["reflect", "replicate", "zeros"])
@pytest.mark.parametrize("patch", PATCHES)
def test_torch_border_modes(tb, border, patch):
    import torch
    net = netspec.build_torch(SPEC, 2, patch, netspec.make_weights(SPEC, 2, patch, 1))
    for tile in (None, (4, 6)):
        ci = tb.FDFE.convert(net, patch, border=border, tile=tile)
        for n, h, w in SIZES:
            images = torch.from_numpy(netspec.random_images(n, 2, h, w, h).transpose(0, 3, 1, 2))
            with torch.no_grad():
                out = ci(images)
            assert max_rel_error(out, tb.FDFE.dense_reference(net, images, patch, border=border)) <= TOL["float64"]
    if border != "zeros":  # the border mode matters: zeros give other values near the edge
        zeros = tb.FDFE.dense_reference(net, images, patch)
        assert max_rel_error(out, zeros) > 1e-3


@pytest.mark.parametrize("border", ["reflect", "replicate"])
@pytest.mark.parametrize("patch", PATCHES)
def test_keras_border_modes(kb, border, patch, tmp_path):
    import keras
    import tensorflow as tf
    net = netspec.build_keras(SPEC, 2, patch, netspec.make_weights(SPEC, 2, patch, 1), kb.FDFE)
    for tile in (None, (4, 6)):
        ci = kb.FDFE.convert(net, patch, border=border, tile=tile)
        for n, h, w in SIZES:
            images = tf.constant(netspec.random_images(n, 2, h, w, h))
            ref = kb.FDFE.dense_reference(net, images, patch, border=border)
            assert max_rel_error(ci(images), ref) <= TOL["float64"]
    ci.save(str(tmp_path / "ci.keras"))
    assert keras.models.load_model(str(tmp_path / "ci.keras")).border == border


def test_border_modes_agree_across_backends(tb, kb):
    import tensorflow as tf
    import torch
    patch = (12, 14)
    weights = netspec.make_weights(SPEC, 2, patch, 1)
    images = netspec.random_images(2, 2, 13, 17, 3)
    for border in ("reflect", "replicate"):
        with torch.no_grad():
            t_out = tb.FDFE.convert(netspec.build_torch(SPEC, 2, patch, weights), patch, border=border)(
                torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        k_out = kb.FDFE.convert(netspec.build_keras(SPEC, 2, patch, weights, kb.FDFE), patch, border=border)(
            tf.constant(images)).numpy()
        assert max_rel_error(t_out, k_out) <= TOL["cross_float64"]


def test_bad_border_and_too_small_images_for_reflect(tb, kb):
    import tensorflow as tf
    import torch
    with pytest.raises(ValueError, match=r"border must be one of \('zeros', 'reflect', 'replicate'\), got 'mirror'"):
        tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, border="mirror")
    with pytest.raises(ValueError, match=r"border must be one of"):
        kb.FDFE.convert(kb.BaseNet.BaseNet(), 15, border="mirror")
    msg = r"border='reflect' mirrors the image .* needs images of at least 8x8, got 5x9"
    with pytest.raises(ValueError, match=msg):
        tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, border="reflect")(torch.zeros(1, 1, 5, 9))
    with pytest.raises(ValueError, match=msg):
        kb.FDFE.convert(kb.BaseNet.BaseNet(), 15, border="reflect")(tf.zeros((1, 5, 9, 1)))


def test_torch_compile_trains_exactly(tb):
    """torch.compile(ci), forward and backward: the image gradients equal Cp's on every patch (inductor's backward
    of the unfold form of space-to-batch once gave wrong ones, silently), with the zeros and reflect borders
    (replicate: inductor's backward of replication_pad2d fails on CI's channels-last copy, PyTorch 2.13)."""
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Flatten()).double()
    images = torch.randn(2, 2, 11, 13, dtype=torch.float64)
    for border in ("zeros", "reflect"):
        x = images.clone().requires_grad_(True)
        (tb.FDFE.dense_reference(net, x, 6, differentiable=True, border=border) ** 2).sum().backward()
        expected = x.grad
        torch._dynamo.reset()
        x = images.clone().requires_grad_(True)
        (torch.compile(tb.FDFE.convert(net, 6, border=border))(x) ** 2).sum().backward()
        assert max_rel_error(x.grad, expected) <= TOL["float64"], border
