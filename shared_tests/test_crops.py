"""Crops: a constant crop of a patch-level map is a translation of the dense map, so nets that crop
(central streams, crop-and-add residual connections) convert exactly, in both backends; padding stays
refused."""

import numpy as np
import pytest

from conftest import TOL, max_rel_error

SIZES = [(2, 13, 11), (1, 9, 16)]  # (batch, H, W): not multiples of the stride products


def _torch_nets():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class CentralCrop(nn.Module):  # crop before pooling, then a tower (the central stream of siam2stream)
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 5, 3)

        def forward(self, x):
            x = x[:, :, 4:-4, 3:11]
            x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
            return self.conv2(x).flatten(1)

    class CropAfterPooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(2, 6, 3, stride=2), nn.Conv2d(3, 4, 2)

        def forward(self, x):
            x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
            x = x[..., 1:3, 0:2].narrow(1, 2, 3)  # crop after the strides, and a channel slice
            return self.conv2(x)

    class CropAndAdd(nn.Module):  # residual connections over valid convolutions crop the skip path
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 3, 3)

        def forward(self, x):
            x = self.conv1(x)
            x = x[:, :, 1:-1, 1:-1] + F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            return self.conv3(x)[:, :2]

    return [(CentralCrop(), (16, 14)), (CropAfterPooling(), (15, 16)), (CropAndAdd(), (10, 11))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_crops_are_exact(tb, dtype):
    import torch
    torch.manual_seed(0)
    for net, patch in _torch_nets():
        net = net.to(getattr(torch, dtype)).eval()
        for naive, tile in [(False, None), (True, None), (False, (4, 5))]:
            ci = tb.FDFE.convert(net, patch, naive=naive, tile=tile)
            for n, h, w in SIZES:
                images = torch.randn(n, 2, h, w, dtype=getattr(torch, dtype))
                with torch.no_grad():
                    out = ci(images)
                ref = tb.FDFE.dense_reference(net, images, patch)
                assert max_rel_error(out, ref) <= TOL[dtype], (type(net).__name__, naive, tile)


def test_torch_slices_that_cannot_be_made_dense_are_refused(tb):
    import torch
    import torch.nn as nn

    class Strided(nn.Module):
        def forward(self, x):
            return x[:, :, ::2, ::2].amax((2, 3))

    class Batch(nn.Module):
        def forward(self, x):
            return x[:1].amax((2, 3))
    with pytest.raises(tb.FDFE.ConversionError, match=r"takes every 2th element of axis 2; only contiguous "
                                                      r"slices can be made dense"):
        tb.FDFE.convert(Strided(), 4, in_channels=1)
    with pytest.raises(tb.FDFE.ConversionError, match=r"slices the batch of patches"):
        tb.FDFE.convert(Batch(), 4, in_channels=1)


def _keras_nets(dtype):
    import keras
    L = keras.layers
    central = keras.Sequential([keras.Input((16, 14, 2), dtype=dtype), L.Cropping2D(((4, 4), (3, 3)), dtype=dtype),
                                L.Conv2D(4, 3, activation="tanh", dtype=dtype), L.MaxPooling2D(2, dtype=dtype),
                                L.Conv2D(5, 3, dtype=dtype), L.Flatten(dtype=dtype)])
    x = keras.Input((10, 11, 2), dtype=dtype)
    y = L.Conv2D(4, 3, dtype=dtype)(x)
    y = L.Add(dtype=dtype)([L.Cropping2D(1, dtype=dtype)(y), L.Conv2D(4, 3, activation="relu", dtype=dtype)(y)])
    y = L.MaxPooling2D(2, dtype=dtype)(y)
    crop_and_add = keras.Model(x, L.Conv2D(3, 3, dtype=dtype)(y))
    after_pooling = keras.Sequential([keras.Input((15, 16, 2), dtype=dtype), L.Conv2D(6, 3, strides=2, dtype=dtype),
                                      L.AveragePooling2D(2, dtype=dtype), L.Cropping2D(((1, 0), (0, 1)), dtype=dtype),
                                      L.Conv2D(4, 2, dtype=dtype)])
    return [(central, (16, 14)), (crop_and_add, (10, 11)), (after_pooling, (15, 16))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_crops_are_exact(kb, dtype):
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    for net, patch in _keras_nets(dtype):
        for naive, tile in [(False, None), (True, None), (False, (4, 5))]:
            ci = kb.FDFE.convert(net, patch, naive=naive, tile=tile)
            for n, h, w in SIZES:
                images = tf.constant(np.random.default_rng(n + h).standard_normal((n, h, w, 2)), dtype)
                ref = kb.FDFE.dense_reference(net, images, patch)
                assert max_rel_error(ci(images), ref) <= TOL[dtype], (net.name, naive, tile)
