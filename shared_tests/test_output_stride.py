"""Dense features at a step (output_stride): out[..., i, j] = Cp at pixel (sy * i, sx * j), exact for
every step in both backends; aligned steps skip the shifts no output pixel uses."""

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error

#: strides (2, 2) then (3, 3): aligned steps 2 and 6, others computed at a divisor and subsampled
SPEC = [{"type": "conv", "out": 3, "k": [3, 3]}, {"type": "act", "fn": "tanh"},
        {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]},
        {"type": "conv", "out": 4, "k": [2, 2], "stride": [3, 3]}, {"type": "act", "fn": "relu"},
        {"type": "pool", "kind": "avg", "k": [2, 2], "stride": [1, 1]}, {"type": "conv", "out": 5, "k": [1, 1]}]
STEPS = [1, 2, 3, 6, (2, 6), (4, 3), 5, 12]
PATCHES = [(12, 13), (13, 14)]


def _patch_ok(patch):
    return netspec.shapes(SPEC, 2, patch)[-1][1:] == (1, 1)


@pytest.mark.parametrize("patch", PATCHES)
def test_torch_output_stride_is_exact(tb, patch):
    import torch
    assert _patch_ok(patch)
    net = netspec.build_torch(SPEC, 2, patch, netspec.make_weights(SPEC, 2, patch, 4))
    images = torch.from_numpy(netspec.random_images(2, 2, 23, 19, 4).transpose(0, 3, 1, 2))
    for step in STEPS:
        sy, sx = (step, step) if isinstance(step, int) else step
        ref = tb.FDFE.dense_reference(net, images, patch, output_stride=step)
        assert ref.shape == (2, 5, -(-23 // sy), -(-19 // sx))
        for naive, tile in [(False, None), (True, None), (False, (7, 5))]:
            ci = tb.FDFE.convert(net, patch, output_stride=step, naive=naive, tile=tile)
            with torch.no_grad():
                out = ci(images)
            assert max_rel_error(out, ref) <= TOL["float64"], (step, naive, tile)
    assert tb.FDFE.convert(net, patch, output_stride=6)._grid == (2, (6, 6), (1, 1))  # both layers skip shifts
    assert tb.FDFE.convert(net, patch, output_stride=4)._grid == (1, (2, 2), (2, 2))


@pytest.mark.parametrize("patch", PATCHES)
def test_keras_output_stride_is_exact(kb, patch, tmp_path):
    import keras
    import tensorflow as tf
    net = netspec.build_keras(SPEC, 2, patch, netspec.make_weights(SPEC, 2, patch, 4), kb.FDFE)
    images = tf.constant(netspec.random_images(2, 2, 23, 19, 4))
    for step in STEPS:
        ref = kb.FDFE.dense_reference(net, images, patch, output_stride=step)
        for naive, tile in [(False, None), (True, None), (False, (7, 5))]:
            ci = kb.FDFE.convert(net, patch, output_stride=step, naive=naive, tile=tile)
            assert max_rel_error(ci(images), ref) <= TOL["float64"], (step, naive, tile)
    ci = kb.FDFE.convert(net, patch, output_stride=6)
    ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"))
    np.testing.assert_array_equal(loaded(images).numpy(), ci(images).numpy())
    assert loaded.output_stride == (6, 6) and loaded._grid == (2, (6, 6), (1, 1))


def test_output_stride_set_after_conversion(tb, kb):
    """ci.output_stride = s after conversion (called before and after) equals converting with s, in both
    backends (Keras once kept the step it was built with, silently)."""
    import tensorflow as tf
    import torch
    patch = PATCHES[0]
    weights = netspec.make_weights(SPEC, 2, patch, 4)
    t_net, k_net = netspec.build_torch(SPEC, 2, patch, weights), netspec.build_keras(SPEC, 2, patch, weights, kb.FDFE)
    array = netspec.random_images(2, 2, 23, 19, 4)
    t_ci, k_ci = tb.FDFE.convert(t_net, patch), kb.FDFE.convert(k_net, patch)
    for step in [6, (2, 3), 1, [4, 3]]:
        with torch.no_grad():
            t_ci(torch.from_numpy(array.transpose(0, 3, 1, 2)))  # a call with the old step first
            k_ci(tf.constant(array))
            t_ci.output_stride = k_ci.output_stride = step
            t_out = t_ci(torch.from_numpy(array.transpose(0, 3, 1, 2)))
        k_out = k_ci(tf.constant(array))
        ref = kb.FDFE.dense_reference(k_net, tf.constant(array), patch,
                                      output_stride=(step, step) if isinstance(step, int) else tuple(step))
        assert max_rel_error(k_out, ref) <= TOL["float64"], step
        assert max_rel_error(t_out.numpy().transpose(0, 2, 3, 1), ref.numpy()) <= TOL["float64"], step
    with pytest.raises(ValueError, match="output_stride"):
        k_ci.output_stride = 0


def test_output_stride_with_two_streams_and_borders(tb, kb):
    """Streams that pool differently: computed at step 1 and subsampled; with a border mode too."""
    import torch
    import tensorflow as tf
    import architectures
    t_net = architectures.build_torch("siam2stream")
    ci = tb.FDFE.convert(t_net, 64, output_stride=(3, 2), border="replicate")
    images = torch.randn(1, 1, 11, 9)
    with torch.no_grad():
        out = ci(images)
    assert max_rel_error(out, tb.FDFE.dense_reference(t_net, images, 64, output_stride=(3, 2),
                                                       border="replicate")) <= TOL["float32"]
    k_net = architectures.build_keras("siam2stream", t_net, kb.FDFE)
    k_ci = kb.FDFE.convert(k_net, 64, output_stride=(3, 2), border="replicate")
    k_images = tf.constant(images.numpy().transpose(0, 2, 3, 1))
    assert max_rel_error(k_ci(k_images), kb.FDFE.dense_reference(k_net, k_images, 64, output_stride=(3, 2),
                                                                 border="replicate")) <= TOL["float32"]


def test_torch_output_stride_with_streams_cropped_before_a_strided_layer(tb):
    """A shortcut aligned by a crop before its strided 1x1 convolution (x[:, :, 1:, 1:], as valid ResNet blocks
    write it) converts at every output stride: a strided layer run without its shifts keeps L // s positions, as
    multipooling's first shift does (it gave ceil(L / s), and the add of the two streams failed with a size
    mismatch inside convert's self-check, at every image size)."""
    import torch
    import torch.nn as nn
    torch.manual_seed(4)

    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.short = nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(3, 4, 1, stride=2)
            self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            m = self.main(x)
            s = self.short(x[:, :, 1:, 1:])[:, :, :m.shape[2], :m.shape[3]]
            return self.fc(self.pool(torch.relu(m + s)).flatten(1))

    net = Shortcut().double().eval()
    for size in ((17, 13), (16, 16), (3, 2)):
        images = torch.from_numpy(netspec.random_images(2, 3, *size, seed=size[0]).transpose(0, 3, 1, 2))
        for step in (2, 4, 3, (2, 4)):
            for options in ({}, {"tile": (8, 8)}, {"border": "replicate"}):
                ci = tb.FDFE.convert(net, (15, 16), output_stride=step, **options)
                reference = tb.FDFE.dense_reference(net, images, (15, 16), output_stride=step,
                                                    **{k: v for k, v in options.items() if k != "tile"})
                with torch.no_grad():
                    assert max_rel_error(ci(images), reference) <= TOL["float64"], (size, step, options)
