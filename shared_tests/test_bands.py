"""PyTorch's CPU executor works on large maps band by band: the stride-1 max pooling of multipooling runs its
passes on a few rows at a time in the input's own memory, and the unwarping into the contiguous output goes
through a small channels-last buffer.  Benchmark images fill many bands, test images one; here the band
sizes are shrunk to a few rows, so that every band boundary (between rows, between images of a batch) is
crossed, and the results must equal F.max_pool2d and Cp on every patch."""

import itertools

import pytest

import netspec
from conftest import TOL, max_rel_error

#: two max poolings (2x2 and 3x2 windows), a 2x2 convolution after them: both strides are unwarped
MAX_NET = [{"type": "conv", "out": 3, "k": [3, 3]}, {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]},
           {"type": "act", "fn": "tanh"}, {"type": "conv", "out": 4, "k": [2, 2]},
           {"type": "pool", "kind": "max", "k": [3, 2], "stride": [3, 2]}, {"type": "act", "fn": "tanh"},
           {"type": "conv", "out": 5, "k": [2, 2]}]
PATCH = (16, 12)


@pytest.mark.parametrize("band", [1, 7, 40, 1 << 19])
def test_banded_max_pool_equals_max_pool2d(tb, monkeypatch, band):
    """Every layout, window, dtype and buffer reuse, with NaN (which both propagate), at several band
    sizes (1 element: one row per band)."""
    import torch
    import torch.nn.functional as F
    monkeypatch.setattr(tb.FDFE, "_POOL_BAND_ELEMENTS", band)
    gen = torch.Generator().manual_seed(0)
    for shape, kernel, layout, dtype in itertools.product(
            [(3, 5, 9, 11), (1, 1, 7, 6), (2, 13, 6, 9)], [(1, 2), (2, 1), (3, 3), (4, 2), (5, 6)],
            ["channels_last", "contiguous", "crop"], [torch.float32, torch.float64]):
        x = torch.randn(shape, generator=gen, dtype=dtype)
        x[0, 0, 1, 1] = float("nan")
        if layout == "crop":
            x = x.contiguous(memory_format=torch.channels_last)[:, :, 1:, :-1]
        elif layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if kernel[0] > x.shape[2] or kernel[1] > x.shape[3]:
            continue
        ref = F.max_pool2d(x, kernel, 1)
        for reuse in (False, True):
            before = x.clone()
            source = before.clone() if reuse else x  # a crop stays a crop (the passes on the whole map)
            got = tb.FDFE._separable_max_pool(source, kernel, reuse)
            case = (shape, kernel, layout, dtype, reuse)
            assert got.shape == ref.shape, case
            assert torch.equal(got.isnan(), ref.isnan()), case
            assert torch.equal(got.nan_to_num(), ref.nan_to_num()), case
            if not reuse:  # the input is left as it was
                assert torch.equal(x.nan_to_num(), before.nan_to_num()), case
            elif layout != "crop" and x.numel() >= 4 * band:  # banded: the result is written into the input
                assert got.untyped_storage().data_ptr() == source.untyped_storage().data_ptr(), case


@pytest.mark.parametrize("tile, output_stride", [(None, 1), ((8, 12), 1), (None, 2), ((8, 12), 2)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ci_with_small_bands_is_exact(tb, monkeypatch, tile, output_stride, dtype):
    """CI with bands of a few rows, on a batch of two images whose sizes are no multiple of the stride
    product (6x4), untiled and tiled, every pixel and every second one, against Cp on every patch; the
    unwarping by bands did run (tiles at a step unwarp in the stacked layout first)."""
    import torch
    monkeypatch.setattr(tb.FDFE, "_POOL_BAND_ELEMENTS", 50)
    monkeypatch.setattr(tb.FDFE, "_UNWARP_BAND_ELEMENTS", 300)
    calls = []
    original = tb.FDFE._unwarp_across_layouts
    monkeypatch.setattr(tb.FDFE, "_unwarp_across_layouts", lambda *args: calls.append(1) or original(*args))
    net = netspec.build_torch(MAX_NET, 2, PATCH, netspec.make_weights(MAX_NET, 2, PATCH, 4), dtype)
    images = torch.from_numpy(netspec.random_images(2, 2, 29, 23, 6).transpose(0, 3, 1, 2).astype(dtype)).contiguous()
    ci = tb.FDFE.convert(net, PATCH, tile=tile, check=False, output_stride=output_stride)
    assert ci.strides == [(2, 2), (3, 2)]
    with torch.no_grad():
        got = ci(images)
    ref = tb.FDFE.dense_reference(net, images, PATCH, output_stride=output_stride)
    assert got.shape == ref.shape == (2, 5, -(-29 // output_stride), -(-23 // output_stride))
    assert got.is_contiguous()
    assert max_rel_error(got.numpy(), ref.numpy()) < TOL[dtype]
    assert calls or (tile is not None and output_stride != 1), "the banded unwarping was not used"
