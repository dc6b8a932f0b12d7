"""The last strided layer with its shifts left in place: where only per-pixel layers follow it (Cp ending in
max pooling and tanh, or a strided convolution, 1x1 convolutions and normalisation), CI runs it at stride 1
instead of stacking its shifts on the batch axis and unwarping them again.  Same values and gradients as Cp
on every patch, in both backends, with every output stride, tiles, batches and odd sizes; and only where
the layers after it are per-pixel."""

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error
from test_training import _check_keras, _check_torch

#: Cp ending in max pooling (3x3), tanh, a 1x1 convolution, ELU and unit length: strides (2, 2), (3, 3),
#: patch-level 1x1 at the end
POOL_TAIL = [{"type": "conv", "out": 3, "k": [3, 3]}, {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]},
             {"type": "act", "fn": "tanh"}, {"type": "conv", "out": 4, "k": [2, 2]},
             {"type": "pool", "kind": "max", "k": [3, 3], "stride": [3, 3]}, {"type": "act", "fn": "tanh"},
             {"type": "conv", "out": 5, "k": [1, 1]}, {"type": "act", "fn": "elu"}, {"type": "l2norm"}]
#: Cp ending in a strided convolution (2x3), then batch normalisation, flatten, a Linear and sigmoid
CONV_TAIL = [{"type": "conv", "out": 3, "k": [2, 2]}, {"type": "pool", "kind": "avg", "k": [2, 2], "stride": [2, 2]},
             {"type": "act", "fn": "elu"}, {"type": "conv", "out": 4, "k": [3, 2], "stride": [2, 3]},
             {"type": "bn"}, {"type": "flatten"}, {"type": "linear", "out": 3}, {"type": "act", "fn": "sigmoid"}]
#: Cp ending in overlapping average pooling (3x3, stride 2) after LP pooling, then sigmoid
AVG_TAIL = [{"type": "conv", "out": 3, "k": [3, 3]},
            {"type": "pool", "kind": "lp", "k": [2, 2], "stride": [2, 2], "p": 2.0},
            {"type": "conv", "out": 4, "k": [2, 2]},
            {"type": "pool", "kind": "avg", "k": [3, 3], "stride": [2, 2]}, {"type": "act", "fn": "sigmoid"}]
#: a 3x3 convolution after the last pooling: that layer reads neighbours, so the shifts are stacked
NO_TAIL = [{"type": "conv", "out": 3, "k": [3, 3]}, {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]},
           {"type": "act", "fn": "tanh"}, {"type": "conv", "out": 4, "k": [3, 3]}]
#: Cp's output is the flattening of the 2x3 map after its last pooling: unfolding it reads neighbouring
#: positions, so the shifts are stacked (Keras once left them in place here, and was wrong)
FLATTEN_TAIL = [{"type": "conv", "out": 3, "k": [2, 2]}, {"type": "pool", "kind": "max", "k": [2, 2], "stride": [2, 2]},
                {"type": "act", "fn": "tanh"}, {"type": "flatten"}]
CASES = [(POOL_TAIL, (11, 12), [(2, 2), (3, 3)]), (CONV_TAIL, (7, 8), [(2, 2), (2, 3)]),
         (AVG_TAIL, (10, 13), [(2, 2), (2, 2)]), (NO_TAIL, (8, 9), [(2, 2)]), (FLATTEN_TAIL, (6, 7), [(2, 2)])]
STEPS = [1, 2, 3, (2, 6), 4, 6]
CHANNELS = 2


def _torch_tail(ci):
    return [i for i, step in enumerate(ci.steps) if getattr(step, "dense_tail", False)]


def _keras_tail(ci):
    return [layer.name for layer in ci.core._flatten_layers(include_self=False)
            if getattr(layer, "shifts_in_place", False)]


@pytest.mark.parametrize("spec, patch, strides", CASES)
def test_torch_shifts_in_place_are_exact(tb, spec, patch, strides):
    import torch
    net = netspec.build_torch(spec, CHANNELS, patch, netspec.make_weights(spec, CHANNELS, patch, 3))
    images = torch.from_numpy(netspec.random_images(2, CHANNELS, 19, 23, 5).transpose(0, 3, 1, 2))
    ci = tb.FDFE.convert(net, patch)
    assert ci.strides == strides
    tail = spec is not NO_TAIL and spec is not FLATTEN_TAIL
    assert len(_torch_tail(ci)) == int(tail)
    assert ci._unwarp_strides() == (strides[:-1] if tail else strides)
    for step in STEPS:
        sy, sx = (step, step) if isinstance(step, int) else step
        ref = tb.FDFE.dense_reference(net, images, patch, output_stride=step)
        assert ref.shape[-2:] == (-(-19 // sy), -(-23 // sx))
        for naive, tile, layout in [(False, None, torch.contiguous_format), (True, None, torch.contiguous_format),
                                    (False, (7, 5), torch.contiguous_format), (False, None, torch.channels_last),
                                    (False, (6, 12), torch.channels_last)]:
            ci = tb.FDFE.convert(net, patch, output_stride=step, naive=naive, tile=tile)
            with torch.no_grad():
                out = ci(images.contiguous(memory_format=layout))
            assert out.shape == ref.shape
            assert max_rel_error(out, ref) <= TOL["float64"], (step, naive, tile, layout)
    with torch.no_grad():  # float32 Cp, with the separable max pooling of the forward pass
        net32 = net.float()
        out = tb.FDFE.convert(net32, patch)(images.float())
    assert max_rel_error(out, tb.FDFE.dense_reference(net32, images.float(), patch)) <= TOL["float32"]


@pytest.mark.parametrize("spec, patch, strides", CASES)
def test_keras_shifts_in_place_are_exact(kb, spec, patch, strides, tmp_path):
    import keras
    import tensorflow as tf
    net = netspec.build_keras(spec, CHANNELS, patch, netspec.make_weights(spec, CHANNELS, patch, 3), kb.FDFE)
    images = tf.constant(netspec.random_images(2, CHANNELS, 19, 23, 5))
    ci = kb.FDFE.convert(net, patch)
    assert ci.strides == strides
    tail = spec is not NO_TAIL and spec is not FLATTEN_TAIL
    assert len(_keras_tail(ci)) == int(tail) and ci.shifts_in_place == tail
    assert ci._unwarp_strides() == (strides[:-1] if tail else strides)
    for step in STEPS:
        ref = kb.FDFE.dense_reference(net, images, patch, output_stride=step)
        for naive, tile in [(False, None), (True, None), (False, (7, 5))]:
            ci = kb.FDFE.convert(net, patch, output_stride=step, naive=naive, tile=tile)
            assert max_rel_error(ci(images), ref) <= TOL["float64"], (step, naive, tile)
    ci = kb.FDFE.convert(net, patch)
    ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"))
    assert loaded.shifts_in_place == tail and len(_keras_tail(loaded)) == int(tail)
    np.testing.assert_array_equal(loaded(images).numpy(), ci(images).numpy())


@pytest.mark.parametrize("spec, patch", [(POOL_TAIL, (11, 12)), (CONV_TAIL, (7, 8))])
def test_gradients_through_shifts_in_place(tb, kb, spec, patch):
    """Training through CI: the gradients of the images and of every parameter equal Cp's on all patches."""
    modes = [(False, None), (False, (5, 7))]
    _check_torch(tb, spec, CHANNELS, patch, 2, 13, 17, 11, modes)
    _check_keras(kb, spec, CHANNELS, patch, 2, 13, 17, 11, modes)


def test_simo_serra_ends_with_shifts_in_place(tb, kb):
    """The paper's Simo-Serra net (max pooling 4x4, then tanh): its last pooling keeps its shifts in place in
    both backends, and the two agree."""
    import torch
    import tensorflow as tf
    import architectures
    t_net = architectures.build_torch("simo_serra")
    ci = tb.FDFE.convert(t_net, 64)
    assert ci._unwarp_strides() == [(2, 2), (3, 3)] and len(_torch_tail(ci)) == 1
    k_net = architectures.build_keras("simo_serra", t_net, kb.FDFE)
    k_ci = kb.FDFE.convert(k_net, 64)
    assert k_ci._unwarp_strides() == [(2, 2), (3, 3)] and k_ci.shifts_in_place
    images = torch.randn(2, 1, 29, 31)
    with torch.no_grad():
        out = ci(images)
    assert max_rel_error(out, tb.FDFE.dense_reference(t_net, images, 64)) <= TOL["float32"]
    k_out = k_ci(tf.constant(images.numpy().transpose(0, 2, 3, 1)))
    assert max_rel_error(k_out, out.numpy().transpose(0, 2, 3, 1)) <= TOL["float32"]


def test_exports_with_shifts_in_place(tb, kb, tmp_path):
    """Exported CI with its shifts in place, run by the real runtimes at sizes not seen at export: torch.export
    (N, H, W dynamic), ONNX Runtime, a Keras SavedModel and TFLite with built-in ops only."""
    import onnxruntime
    import tensorflow as tf
    import torch
    from torch.export import Dim
    spec, patch = POOL_TAIL, (11, 12)
    weights = netspec.make_weights(spec, CHANNELS, patch, 3)
    net = netspec.build_torch(spec, CHANNELS, patch, weights, "float32")
    ci = tb.FDFE.convert(net, patch)
    assert len(_torch_tail(ci)) == 1
    sizes = [(1, 1, 1), (2, 17, 23), (1, 8, 31)]

    def images(n, h, w, seed):
        return np.ascontiguousarray(netspec.random_images(n, CHANNELS, h, w, seed), dtype=np.float32)  # NHWC

    example = (torch.from_numpy(images(2, 14, 19, 1).transpose(0, 3, 1, 2)).contiguous(),)
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=1, max=4096), 3: Dim("W", min=1, max=4096)}
    program = torch.export.export(ci, example, dynamic_shapes={"images": dims}).module()
    path = str(tmp_path / "ci.onnx")
    torch.onnx.export(ci, example, path, dynamo=False, input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, (n, h, w) in enumerate(sizes):
        x = torch.from_numpy(images(n, h, w, 10 + seed).transpose(0, 3, 1, 2)).contiguous()
        ref = tb.FDFE.dense_reference(net, x, patch)
        with torch.no_grad():
            assert max_rel_error(program(x), ref) <= TOL["float32"], ("torch.export", (n, h, w))
        assert max_rel_error(session.run(None, {"images": x.numpy()})[0], ref) <= TOL["float32"], ("onnx", (n, h, w))

    k_net = netspec.build_keras(spec, CHANNELS, patch, weights, kb.FDFE, "float32")
    k_ci = kb.FDFE.convert(k_net, patch)
    assert k_ci.shifts_in_place
    k_ci.export(str(tmp_path / "saved"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # kept: its variables live as long as it does
    k_ci.export(str(tmp_path / "lite"), input_signature=[tf.TensorSpec([None, None, None, CHANNELS], tf.float32)],
                verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "lite"))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    index = interpreter.get_input_details()[0]["index"]
    for seed, (n, h, w) in enumerate(sizes):
        x = images(n, h, w, 10 + seed)
        ref = kb.FDFE.dense_reference(k_net, tf.constant(x), patch)
        assert max_rel_error(loaded.serve(tf.constant(x)), ref) <= TOL["float32"], ("SavedModel", (n, h, w))
        interpreter.resize_tensor_input(index, list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        assert max_rel_error(out, ref) <= TOL["float32"], ("TFLite", (n, h, w))


def test_parallel_poolings_at_one_depth_with_output_strides(tb, kb, tmp_path):
    """Two poolings of one map (the same depth), concatenated, then a convolution, the tail pooling and a
    channel slice: every output stride is exact without the self-check (Keras once counted strided layers
    instead of depths and skipped the shifts of the wrong ones), the tail is used in both backends, and the
    depths survive saving."""
    import keras
    import tensorflow as tf
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 3, 3), nn.Conv2d(6, 4, 2), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = torch.tanh(self.conv1(x))
            y = self.conv2(torch.cat([F.max_pool2d(x, 2), F.avg_pool2d(x, 2)], 1))
            return torch.sigmoid(self.conv3(F.max_pool2d(y, 3, 2)))[:, :2]

    torch.manual_seed(0)
    t_net = Parallel().eval()
    layers = keras.layers
    inputs = keras.Input((10, 10, 2))
    x = layers.Conv2D(3, 3, activation="tanh")(inputs)
    y = layers.Conv2D(4, 2)(layers.Concatenate()([layers.MaxPooling2D(2)(x), layers.AveragePooling2D(2)(x)]))
    y = layers.Conv2D(3, 1, activation="sigmoid")(layers.MaxPooling2D(3, 2)(y))
    k_net = keras.Model(inputs, layers.Lambda(lambda t: t[..., :2])(y))
    images = netspec.random_images(2, 2, 17, 23, 7).astype(np.float32)
    t_images, k_images = torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous(), tf.constant(images)
    for step in [1, 2, 3, 4, (2, 4), 8]:
        ci = tb.FDFE.convert(t_net, 10, output_stride=step, check=False)
        assert len(_torch_tail(ci)) == 1
        with torch.no_grad():
            out = ci(t_images)
        assert max_rel_error(out, tb.FDFE.dense_reference(t_net, t_images, 10, output_stride=step)) <= TOL["float32"]
        k_ci = kb.FDFE.convert(k_net, 10, output_stride=step, check=False)
        assert k_ci.shifts_in_place and k_ci.strided_depths == [1, 1, 2], step
        ref = kb.FDFE.dense_reference(k_net, k_images, 10, output_stride=step)
        assert max_rel_error(k_ci(k_images), ref) <= TOL["float32"], step
    k_ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"), safe_mode=False)  # the Lambda is ours
    assert loaded.strided_depths == [1, 1, 2]
    np.testing.assert_array_equal(loaded(k_images).numpy(), k_ci(k_images).numpy())
