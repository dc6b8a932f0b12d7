"""FDFE's building blocks wired by hand (as in SlimNet) for nets other than BaseNet: max, average and
power-average pooling, kernel != stride, strides 2 and 3, non-square strides, a strided convolution
instead of a pool, a layer norm over the channels written with transposes (reused as it is); 1 and 3 channels, batches of 1 and 3.  Checked against Cp run on every patch in
each backend, and across backends."""

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error

SPECS = {
    "max_avg_k3s2": [{"type": "conv", "out": 6, "k": 3}, {"type": "act", "fn": "relu"},
                     {"type": "pool", "kind": "avg", "k": 3, "stride": 2}, {"type": "conv", "out": 5, "k": 2},
                     {"type": "pool", "kind": "max", "k": 2, "stride": 2}, {"type": "conv", "out": 4, "k": 2}],
    "strided_conv": [{"type": "conv", "out": 4, "k": 3, "stride": 2}, {"type": "act", "fn": "tanh"},
                     {"type": "conv", "out": 6, "k": 3, "stride": 3}, {"type": "act", "fn": "sigmoid"},
                     {"type": "conv", "out": 3, "k": 2}],
    "lp_s3": [{"type": "conv", "out": 5, "k": 2}, {"type": "pool", "kind": "lp", "k": 2, "stride": 2, "p": 2.0},
              {"type": "conv", "out": 4, "k": 2}, {"type": "pool", "kind": "max", "k": 3, "stride": 3},
              {"type": "conv", "out": 3, "k": 2}],
    "nonsquare_stride": [{"type": "conv", "out": 4, "k": [3, 2]}, {"type": "act", "fn": "elu"},
                         {"type": "pool", "kind": "max", "k": [2, 3], "stride": [2, 3]}, {"type": "channel_ln"},
                         {"type": "conv", "out": 3, "k": [2, 2]}],
}

# (spec, channels, batch, H, W, patch): odd, even and non-square patches; sizes not divisible by the
# stride product and smaller than the patch.
CASES = [
    ("max_avg_k3s2", 1, 1, 13, 11, (13, 13)),
    ("max_avg_k3s2", 3, 3, 6, 9, (14, 14)),
    ("strided_conv", 3, 1, 10, 7, (15, 15)),
    ("strided_conv", 1, 3, 4, 5, (13, 18)),
    ("lp_s3", 3, 2, 11, 13, (17, 17)),
    ("lp_s3", 1, 1, 2, 3, (20, 20)),
    ("nonsquare_stride", 3, 1, 9, 10, (6, 8)),
    ("nonsquare_stride", 1, 2, 5, 4, (7, 9)),
]


def _setup(name, channels, patch):
    spec = SPECS[name]
    assert netspec.shapes(spec, channels, patch)[-1][1:] == (1, 1), (spec, patch)
    return spec, netspec.make_weights(spec, channels, patch, seed=len(name))


IDS = [f"{c[0]}-C{c[1]}-N{c[2]}-{c[3]}x{c[4]}-p{c[5][0]}x{c[5][1]}" for c in CASES]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,channels,batch,h,w,patch", CASES, ids=IDS)
def test_torch_hand_wired_equals_cp(tb, torch_device, dtype, name, channels, batch, h, w, patch):
    import torch
    spec, weights = _setup(name, channels, patch)
    net = netspec.build_torch(spec, channels, patch, weights, dtype).to(torch_device)
    images = torch.from_numpy(netspec.random_images(batch, channels, h, w).transpose(0, 3, 1, 2))
    images = images.to(device=torch_device, dtype=getattr(torch, dtype))
    ref = tb.FDFE.dense_reference(net, images, patch).cpu()
    for naive in (False, True):
        with torch.no_grad():
            out = netspec.hand_wired_torch(net, spec, patch, tb.FDFE, naive)(images).cpu()
        assert out.shape == ref.shape == (batch, spec[-1]["out"], h, w)
        assert max_rel_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,channels,batch,h,w,patch", CASES, ids=IDS)
def test_keras_hand_wired_equals_cp(kb, tf_scope, dtype, name, channels, batch, h, w, patch):
    import tensorflow as tf
    spec, weights = _setup(name, channels, patch)
    net = netspec.build_keras(spec, channels, patch, weights, kb.FDFE, dtype)
    images = tf.constant(netspec.random_images(batch, channels, h, w), dtype=dtype)
    ref = kb.FDFE.dense_reference(net, images, patch)
    for naive in (False, True):
        out = netspec.hand_wired_keras(net, spec, patch, kb.FDFE, naive)(images)
        assert tuple(out.shape) == tuple(ref.shape) == (batch, h, w, spec[-1]["out"])
        assert max_rel_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("name,channels,batch,h,w,patch", CASES, ids=IDS)
def test_hand_wired_torch_equals_keras(tb, kb, name, channels, batch, h, w, patch):
    import tensorflow as tf
    import torch
    spec, weights = _setup(name, channels, patch)
    images = netspec.random_images(batch, channels, h, w).astype(np.float32)
    t_net = netspec.build_torch(spec, channels, patch, weights, "float32")
    k_net = netspec.build_keras(spec, channels, patch, weights, kb.FDFE, "float32")
    with torch.no_grad():
        t_out = netspec.hand_wired_torch(t_net, spec, patch, tb.FDFE)(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    k_out = netspec.hand_wired_keras(k_net, spec, patch, kb.FDFE)(tf.constant(images))
    assert max_rel_error(t_out.numpy().transpose(0, 2, 3, 1), k_out) <= TOL["float32"]


def test_unwarp_is_the_papers_index_map(tb, kb):
    """Stacked shifts (y_n, x_n, ..., y_1, x_1, N) land at row q*SH + ... + s_1*y_2 + y_1 (paper 3.3)."""
    import tensorflow as tf
    import torch
    strides = [(2, 3), (3, 2)]
    n, h, w = 2, 2, 3
    sizes = [3, 2, 2, 3]  # (y_2, x_2, y_1, x_1)
    stacked = np.zeros(sizes + [n, h, w], np.int64)
    for y2, x2, y1, x1, b, q, r in np.ndindex(*stacked.shape):
        row = q * 6 + 2 * y2 + y1
        col = r * 6 + 3 * x2 + x1
        stacked[y2, x2, y1, x1, b, q, r] = b * 10000 + row * 100 + col
    flat = stacked.reshape(-1, 1, h, w).astype(np.float64)
    expected = np.zeros((n, 1, h * 6, w * 6))
    for b, y, x in np.ndindex(n, h * 6, w * 6):
        expected[b, 0, y, x] = b * 10000 + y * 100 + x
    for naive in (False, True):
        got = tb.FDFE.unwarp(torch.from_numpy(flat), strides, naive).numpy()
        np.testing.assert_array_equal(got, expected)
        got = kb.FDFE.unwarp(tf.constant(flat.transpose(0, 2, 3, 1)), strides, naive).numpy()
        np.testing.assert_array_equal(got, expected.transpose(0, 2, 3, 1))


def test_torch_separable_max_pool_equals_max_pool2d(tb):
    """The CPU forward's stride-1 max pooling from maxima of shifted views equals F.max_pool2d: every
    window from 1x1 to 5x4, contiguous and channels-last inputs, NaN and +-Inf propagating alike; it
    applies only where no gradient is recorded through the input."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(5)
    for shape in [(2, 3, 9, 11), (1, 1, 5, 4)]:
        for kh in range(1, 6):
            for kw in range(1, 5):
                if kh > shape[2] or kw > shape[3]:
                    continue
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
                    x[0, 0, 1, 1], x[-1, -1, 0, 0], x[0, -1, -1, -1] = float("nan"), float("inf"), -float("inf")
                    want = F.max_pool2d(x, (kh, kw), 1)
                    got = tb.FDFE._pool(x, "max", (kh, kw), (1, 1), (1, 1), 2.0, None)
                    assert got.shape == want.shape, (shape, kh, kw)
                    assert torch.equal(got.nan_to_num(-7.0), want.nan_to_num(-7.0)), (shape, kh, kw, fmt)
                    assert torch.equal(got.isnan(), want.isnan()), (shape, kh, kw, fmt)
    x = torch.randn(1, 2, 6, 6, generator=gen, requires_grad=True)
    assert not tb.FDFE._separable_max_applies(x, (2, 2), (1, 1), (1, 1))  # a tape: max_pool2d's gradient
    with torch.no_grad():
        assert tb.FDFE._separable_max_applies(x, (2, 2), (1, 1), (1, 1))
    assert not tb.FDFE._separable_max_applies(x.detach(), (2, 2), (2, 2), (1, 1))
    assert not tb.FDFE._separable_max_applies(x.detach(), [1, 1], 1, 1)  # 1x1: max_pool2d (a new tensor)
