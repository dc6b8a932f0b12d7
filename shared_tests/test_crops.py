"""Crops: a constant crop of a patch-level map is a translation of the dense map, so nets that crop
(central streams, crop-and-add residual connections) convert exactly, in both backends; padding stays
refused."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

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

    class Strided(nn.Module):  # (of a map, x[:, :, ::2, ::2] is a subsampling: test_convert.py; of rows of
        def forward(self, x):  # positions it is not)
            return x.flatten(2)[:, :, ::2].amax(2)

    class Batch(nn.Module):
        def forward(self, x):
            return x[:1].amax((2, 3))
    with pytest.raises(tb.FDFE.ConversionError, match=r"slices axis 2 with step 2; only contiguous "
                                                      r"slices of positions can be made dense"):
        tb.FDFE.convert(Strided(), 4, in_channels=1)
    with pytest.raises(tb.FDFE.ConversionError, match=r"slices the batch of patches"):
        tb.FDFE.convert(Batch(), 4, in_channels=1)


def test_strided_slices_that_keep_one_element_are_crops_in_both_backends(tb, kb):
    """x[:, :, ::3, ::2] of a 2x2 or 3x2 map keeps its top-left element, x[:, :, 1::5] its second row, and
    x[:, ::2, ::2] of a 2x2 Keras map its top-left element: crops, which both backends make dense (their
    other strided slices of maps are subsamplings: test_convert.py)."""
    import keras
    import torch
    import torch.nn as nn

    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            y = torch.tanh(self.conv(x))
            return torch.cat([y[:, :, ::3, ::2].flatten(1), y[:, :, 1::5, 1:2].flatten(1)], 1)

    torch.manual_seed(3)
    net = Picked().double().eval()
    images = torch.randn(2, 2, 9, 7, dtype=torch.float64)
    for patch in [(4, 4), (5, 4)]:  # maps of 2x2 and 3x2
        ci = tb.FDFE.convert(net, patch)
        with torch.no_grad():
            assert max_rel_error(ci(images), tb.FDFE.dense_reference(net, images, patch)) <= TOL["float64"]
    L = keras.layers
    inp = keras.Input((4, 4, 2), dtype="float64")
    y = L.Conv2D(3, 3, activation="tanh", dtype="float64")(inp)
    out = L.Flatten(dtype="float64")(L.Lambda(lambda t: t[:, ::2, ::2, :], dtype="float64")(y))
    k_images = images.numpy().transpose(0, 2, 3, 1)
    k_ci = kb.FDFE.convert(keras.Model(inp, out), 4)
    assert max_rel_error(k_ci(k_images), kb.FDFE.dense_reference(keras.Model(inp, out), k_images, 4)) <= TOL["float64"]


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


def _torch_two_stream(merge):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TwoStream(nn.Module):
        """siam2stream in small: a central stream on the centre crop, a surround stream on the 2x
        downsampled patch (strides [2] and [2, 2]), merged as 1x1 vectors."""

        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 5, 3)
            self.s1, self.s2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 5, 3)
            self.head = nn.Linear(10 if merge == "cat" else 5, 3)

        def forward(self, x):
            central = self.c2(F.max_pool2d(F.relu(self.c1(x[:, :, 4:12, 4:12])), 2))
            surround = self.s2(F.max_pool2d(F.relu(self.s1(F.avg_pool2d(x, 2))), 2))
            merged = {"cat": lambda: torch.cat([central, surround], 1), "add": lambda: central + surround,
                      "mul": lambda: central * torch.tanh(surround)}[merge]()
            return self.head(F.normalize(merged.flatten(1), dim=1))
    return TwoStream()


@pytest.mark.parametrize("merge", ["cat", "add", "mul"])
def test_torch_two_streams_with_different_strides(tb, merge):
    import torch
    torch.manual_seed(1)
    net = _torch_two_stream(merge).double().eval()
    for naive, tile in [(False, None), (True, None), (False, (5, 6))]:
        ci = tb.FDFE.convert(net, 16, naive=naive, tile=tile)
        assert ci.stride_product == (4, 4) and ci.strides == []
        for n, h, w in SIZES:
            images = torch.randn(n, 1, h, w, dtype=torch.float64)
            with torch.no_grad():
                out = ci(images)
            assert max_rel_error(out, tb.FDFE.dense_reference(net, images, 16)) <= TOL["float64"], (naive, tile)


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_keras_two_streams_with_different_strides(kb, merge, tmp_path):
    import keras
    import tensorflow as tf
    L = keras.layers
    keras.utils.set_random_seed(2)
    x = keras.Input((16, 16, 1), dtype="float64")
    central = L.Cropping2D(4, dtype="float64")(x)
    central = L.Conv2D(5, 3, dtype="float64")(L.MaxPooling2D(2, dtype="float64")(
        L.Conv2D(4, 3, activation="relu", dtype="float64")(central)))
    surround = L.AveragePooling2D(2, dtype="float64")(x)
    surround = L.Conv2D(5, 3, dtype="float64")(L.MaxPooling2D(2, dtype="float64")(
        L.Conv2D(4, 3, activation="relu", dtype="float64")(surround)))
    merged = (L.Concatenate(dtype="float64") if merge == "cat" else L.Add(dtype="float64"))([central, surround])
    net = keras.Model(x, L.Dense(3, dtype="float64")(L.Flatten(dtype="float64")(merged)))
    for naive, tile in [(False, None), (True, None), (False, (5, 6))]:
        ci = kb.FDFE.convert(net, 16, naive=naive, tile=tile)
        assert ci.stride_product == (4, 4) and ci.strides == []
        for n, h, w in SIZES:
            images = tf.constant(np.random.default_rng(h).standard_normal((n, h, w, 1)))
            assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 16)) <= TOL["float64"]
    ci.save(str(tmp_path / "two_stream.keras"))
    loaded = keras.models.load_model(str(tmp_path / "two_stream.keras"))
    np.testing.assert_array_equal(loaded(images).numpy(), ci(images).numpy())



def test_siam2stream_strides_and_channels(tb, kb):
    """siam2stream (shared_tests/architectures.py; exactness in test_architectures.py): two streams that
    pool differently, padded to the least common multiple of their stride products."""
    import architectures
    t_ci = tb.FDFE.convert(architectures.build_torch("siam2stream"), 64)
    assert t_ci.stride_product == (16, 16) and t_ci.strides == [] and t_ci.out_channels == 384
    k_ci = kb.FDFE.convert(architectures.build_keras("siam2stream", architectures.build_torch("siam2stream"),
                                                     kb.FDFE), 64)
    assert k_ci.stride_product == (16, 16) and k_ci.strides == [] and k_ci.out_channels == 384


@st.composite
def two_stream_nets(draw):
    """A random two-stream Cp: a central stream on a crop of the patch, a surround stream on the patch
    average-pooled by s, each a small tower ending in a 1x1 map, merged by concatenation or addition."""
    channels = draw(st.sampled_from([1, 2]))
    patch = (draw(st.integers(6, 16)), draw(st.integers(6, 16)))
    crop = [draw(st.integers(0, 2)) for _ in range(4)]
    down = draw(st.sampled_from([1, 2, 3]))
    towers = []
    for size in [(patch[0] - crop[0] - crop[1], patch[1] - crop[2] - crop[3]), (patch[0] // down, patch[1] // down)]:
        k = draw(st.integers(1, 3))
        pool = draw(st.sampled_from([1, 2, 3]))
        h, w = (size[0] - k + 1) // pool, (size[1] - k + 1) // pool
        assume(1 <= h <= 5 and 1 <= w <= 5)
        towers.append({"k": k, "pool": pool, "pool_kind": draw(st.sampled_from(["max", "avg"])), "final": (h, w)})
    merge = draw(st.sampled_from(["cat", "add"]))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return channels, patch, crop, down, towers, merge, (n, h, w)


def _two_stream_torch(channels, patch, crop, down, towers, merge):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList()
            for t in towers:
                self.convs.append(nn.ModuleList([nn.Conv2d(channels, 3, t["k"]), nn.Conv2d(3, 4, t["final"])]))

        def forward(self, x):
            inputs = [x[:, :, crop[0]:x.shape[2] - crop[1], crop[2]:x.shape[3] - crop[3]], F.avg_pool2d(x, down)]
            outs = []
            for t, (c1, c2), y in zip(towers, self.convs, inputs):
                y = torch.tanh(c1(y))
                y = F.max_pool2d(y, t["pool"]) if t["pool_kind"] == "max" else F.avg_pool2d(y, t["pool"])
                outs.append(c2(y))
            merged = torch.cat(outs, 1) if merge == "cat" else outs[0] + outs[1]
            return merged.flatten(1)
    return Net().double().eval()


def _two_stream_keras(channels, patch, crop, down, towers, merge):
    import keras
    L = keras.layers
    x = keras.Input((*patch, channels), dtype="float64")
    inputs = [L.Cropping2D(((crop[0], crop[1]), (crop[2], crop[3])), dtype="float64")(x),
              L.AveragePooling2D(down, dtype="float64")(x)]
    outs = []
    for t, y in zip(towers, inputs):
        y = L.Conv2D(3, t["k"], activation="tanh", dtype="float64")(y)
        pool = L.MaxPooling2D if t["pool_kind"] == "max" else L.AveragePooling2D
        y = pool(t["pool"], dtype="float64")(y)
        outs.append(L.Conv2D(4, t["final"], dtype="float64")(y))
    merged = (L.Concatenate if merge == "cat" else L.Add)(dtype="float64")(outs)
    return keras.Model(x, L.Flatten(dtype="float64")(merged))


@settings(max_examples=10)
@given(two_stream_nets(), st.sampled_from([(False, None), (True, None), (False, (3, 5))]))
def test_random_two_stream_nets_both_backends(tb, kb, case, mode):
    import keras
    import tensorflow as tf
    import torch
    channels, patch, crop, down, towers, merge, (n, h, w) = case
    naive, tile = mode
    torch.manual_seed(0)
    t_net = _two_stream_torch(channels, patch, crop, down, towers, merge)
    images = np.random.default_rng(h * w).standard_normal((n, h, w, channels))
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        t_out = tb.FDFE.convert(t_net, patch, naive=naive, tile=tile)(t_images)
    assert max_rel_error(t_out, tb.FDFE.dense_reference(t_net, t_images, patch)) <= TOL["float64"]
    keras.utils.set_random_seed(0)
    k_net = _two_stream_keras(channels, patch, crop, down, towers, merge)
    k_out = kb.FDFE.convert(k_net, patch, naive=naive, tile=tile)(tf.constant(images))
    assert max_rel_error(k_out, kb.FDFE.dense_reference(k_net, tf.constant(images), patch)) <= TOL["float64"]


def test_keras_slicing_in_call_converts(kb):
    """A crop written as slicing in call() (x[:, 1:-1, 1:-1, :], a residual over a valid convolution)
    is recognised and made dense as a crop."""
    import keras
    import tensorflow as tf
    L = keras.layers

    @keras.saving.register_keras_serializable(package="tests")
    class SliceAndAdd(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv1, self.conv2 = L.Conv2D(4, 3, dtype="float64"), L.Conv2D(4, 3, dtype="float64")
            self.add, self.pool = L.Add(dtype="float64"), L.MaxPooling2D(2, dtype="float64")
            self.conv3 = L.Conv2D(3, 3, dtype="float64")

        def call(self, x):
            x = self.conv1(x)
            x = self.add([x[:, 1:-1, 1:-1, :], self.conv2(x)])
            return self.conv3(self.pool(x[:, :, 1:, :]))

    keras.utils.set_random_seed(3)
    net = SliceAndAdd()
    net(tf.zeros((1, 10, 12, 2), tf.float64))
    ci = kb.FDFE.convert(net, (10, 12), in_channels=2)
    for n, h, w in SIZES:
        images = tf.constant(np.random.default_rng(h).standard_normal((n, h, w, 2)))
        assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, (10, 12))) <= TOL["float64"]


def test_torch_negative_padding_is_a_crop(tb):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class NegativePad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 2, 2)

        def forward(self, x):
            x = F.max_pool2d(F.pad(torch.relu(self.conv1(x)), (-1, -2, 0, -1)), 2)
            return self.conv2(x)

    class PositivePad(NegativePad):
        def forward(self, x):
            return self.conv2(F.max_pool2d(F.pad(self.conv1(x), (1, -1, 0, 0)), 2))
    torch.manual_seed(0)
    net = NegativePad().double()
    ci = tb.FDFE.convert(net, (7, 9))
    images = torch.randn(2, 1, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_error(ci(images), tb.FDFE.dense_reference(net, images, (7, 9))) <= TOL["float64"]
    with pytest.raises(tb.FDFE.ConversionError, match=r"F\.pad cannot be made dense exactly: it pads an activation"):
        tb.FDFE.convert(PositivePad().double(), (7, 9))


def _band_ops(kind):
    """Bands of rows and columns of a 5x5 map (split, chunk, tensor_split; tf.split, keras.ops.split), each pooled
    (two of them cropped and added first): (N, 32) per patch."""
    if kind == "torch":
        import torch
        return lambda y: torch.cat([p.amax((2, 3)) for p in y.split([2, 3], dim=2)]
                                   + [p.mean((2, 3)) for p in y.chunk(2, -1)]
                                   + [p.mean((2, 3)) for p in torch.tensor_split(y, [1, 3], dim=-1)]
                                   + [sum(p[:, :, :2] for p in y.split(2, 2)[:2]).mean((2, 3))], 1)
    import keras
    import tensorflow as tf
    ops = keras.ops
    return lambda y: ops.concatenate([ops.max(p, axis=(1, 2)) for p in tf.split(y, [2, 3], axis=1)]
                                     + [ops.mean(p, axis=(1, 2)) for p in ops.split(y, 5, axis=2)]
                                     + [ops.mean(sum(p[:, :2] for p in tf.split(y, [2, 2, 1], axis=-3)[:2]),
                                                 axis=(1, 2))], -1)


def test_splits_into_bands_of_rows_or_columns_are_crops_in_both_backends(tb, kb):
    """A split of a map along a spatial axis (torch.split / chunk / tensor_split along dim 2 or 3; tf.split /
    keras.ops.split along axis 1 or 2) gives crops of the map: CI equals Cp on every patch (float64), also tiled
    and at a step, and its gradients too; it was refused as "mixes positions of the patch"."""
    import keras
    import tensorflow as tf
    import torch
    import torch.nn as nn
    from test_training import _compare, keras_gradients, torch_gradients

    class Bands(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.head = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 2), nn.Linear(32, 3)
            self.bands = _band_ops("torch")

        def forward(self, x):
            return self.head(self.bands(self.conv2(nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2))))
    torch.manual_seed(3)
    cp = Bands().double().eval()
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 2, 15, 13)))
    ref = tb.FDFE.dense_reference(cp, images, 14)
    for options in ({}, {"tile": (6, 5)}, {"output_stride": (2, 3)}):
        ci = tb.FDFE.convert(cp, 14, **options)
        want = ref[..., ::2, ::3] if options.get("output_stride") else ref
        assert max_rel_error(ci(images).detach(), want) <= TOL["float64"], options
    weights = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 15, 13)))
    _compare(torch_gradients(tb, cp, images, 14, weights, ci=tb.FDFE.convert(cp, 14)),
             torch_gradients(tb, cp, images, 14, weights), "bands")

    L, d = keras.layers, "float64"
    keras.utils.set_random_seed(3)
    inp = keras.Input((14, 14, 2), dtype=d)
    x = L.Conv2D(4, 2, dtype=d)(L.MaxPooling2D(2, dtype=d)(L.Conv2D(4, 3, activation="tanh", dtype=d)(inp)))
    net = keras.Model(inp, L.Dense(3, dtype=d)(L.Lambda(_band_ops("keras"), dtype=d)(x)))
    images = tf.constant(np.random.default_rng(1).standard_normal((2, 15, 13, 2)))
    ref = kb.FDFE.dense_reference(net, images, 14)
    for options in ({}, {"tile": (6, 5)}, {"output_stride": (2, 3)}):
        ci = kb.FDFE.convert(net, 14, **options)
        want = ref[:, ::2, ::3] if options.get("output_stride") else ref
        assert max_rel_error(ci(images), want) <= TOL["float64"], options
    weights = tf.constant(np.random.default_rng(2).standard_normal((2, 15, 13, 3)))
    _compare(keras_gradients(kb, net, images, 14, weights, ci=kb.FDFE.convert(net, 14)),
             keras_gradients(kb, net, images, 14, weights), "bands")
