"""Keras: what call() does between layers.  convert() traces Cp's call() into a TensorFlow graph and reads
the ops between its layers (keras.ops, tf.*, arithmetic on tensors, casts, slices, reductions) with one
rule per op kind; CI must equal Cp on every patch.  Ops that cannot be exact are refused, every problem
of the net in one message.  Also: NaN and Inf pixels give Cp's non-finite pattern and values, images
given as lists, no tf.function retracing warnings, and converting while another thread runs Keras."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import TOL, max_rel_error

N, H, W = 2, 20, 23  # batch 2, a size that is no multiple of the stride products


def _images(channels, seed=0):
    return np.random.default_rng(seed).standard_normal((N, H, W, channels)).astype("float32")


def _assert_exact(kb, net, patch, channels, **options):
    """CI of ``net`` equals Cp on every patch of two random images (float32)."""
    images = _images(channels)
    ci = kb.FDFE.convert(net, patch, in_channels=channels, **options)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, patch)) <= TOL["float32"], options
    return ci


def _built(net, patch, channels):
    import tensorflow as tf
    net(tf.zeros((1, *patch, channels)))
    return net


# --- ops between layers that convert ---------------------------------------------------------------------

def _mixed_ops_net():
    """keras.ops, tf.* and Python arithmetic between layers: activations, arithmetic with constants and
    between values, concatenation on channels, casts, a strided pooling, a flatten by tf.reshape at the end."""
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops

    class MixedOps(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv1, self.pool, self.conv2 = L.Conv2D(4, 3), L.MaxPooling2D(2), L.Conv2D(3, 3)
            self.head = L.Dense(5)

        def call(self, x):
            y = self.conv1(x)
            y = ops.relu(y) + tf.nn.tanh(y) * 0.5 - ops.abs(y) / 3.0 + ops.square(ops.sigmoid(y))
            y = ops.sqrt(ops.abs(y) + 1.0) - y
            y = ops.concatenate([y, tf.math.exp(-y), -y, y * 2], axis=-1)
            y = tf.cast(tf.cast(self.pool(y), tf.float64) + 1, tf.float32)
            z = self.conv2(y)
            z = ops.subtract(ops.add(z, ops.multiply(z, 2.0)), tf.constant([1.0, 2.0, 3.0]))
            z = tf.concat([z, ops.maximum(z, 0.1), tf.math.minimum(z, -0.1)], -1)
            return self.head(tf.reshape(z, [tf.shape(z)[0], -1]))  # a flatten whose shape is computed
    return MixedOps()


@pytest.mark.parametrize("patch", [(11, 10), (10, 10)])
def test_keras_ops_tf_ops_and_arithmetic_between_layers(kb, patch):
    import keras
    keras.utils.set_random_seed(0)
    net = _built(_mixed_ops_net(), patch, 2)
    _assert_exact(kb, net, patch, 2)
    if patch == (10, 10):
        _assert_exact(kb, net, patch, 2, naive=True, tile=(7, 9))
        images = _images(2)
        stepped = kb.FDFE.convert(net, patch, output_stride=2)
        assert stepped._grid[0] == 1  # the pooling after the ops runs without its shifts
        assert max_rel_error(stepped(images), kb.FDFE.dense_reference(net, images, patch, output_stride=2)) \
            <= TOL["float32"]


def _reductions_net():
    """Activations written with keras.ops, a strided convolution, then reductions: global pooling by
    keras.ops / tf.reduce_* over H, W (with and without keepdims), over channels, a slice of channels,
    squeeze and softmax."""
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops

    class Reductions(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = L.Conv2D(4, 3), L.Conv2D(6, 2, strides=2)

        def call(self, x):
            y = ops.silu(ops.gelu(self.conv1(x)))
            y = ops.hard_sigmoid(y) + ops.relu6(ops.leaky_relu(y, 0.1)) + ops.log1p(ops.abs(ops.elu(y)))
            y = self.conv2(y[:, 1:, :-1, :])
            m = ops.mean(y, axis=(1, 2))
            top = ops.squeeze(ops.max(y, axis=(1, 2), keepdims=True), axis=(1, 2))
            low, total = tf.reduce_min(y, axis=[1, 2]), tf.reduce_sum(y[..., 1:4], axis=[1, 2])
            channel = ops.mean(ops.mean(y, axis=-1, keepdims=True), axis=(1, 2))
            # the (N, h, w) of a channel reduction without keepdims, over its positions (refused as "mixes positions")
            views = ops.stack([ops.mean(ops.max(y, axis=-1), axis=(1, 2)),
                               tf.reduce_min(tf.reduce_sum(y, -1), axis=[-1, -2])], -1)
            return ops.concatenate([m, top, low, total, channel, ops.softmax(m), y[:, 0, 1, :2], views], axis=-1)
    return Reductions()


@pytest.mark.parametrize("patch, channels", [((9, 9), 1), ((10, 9), 2)])
def test_keras_reductions_slices_and_global_pooling_written_as_ops(kb, patch, channels):
    import keras
    keras.utils.set_random_seed(1)
    _assert_exact(kb, _built(_reductions_net(), patch, channels), patch, channels)


def test_keras_functional_lambda_and_custom_layers_are_read(kb, tmp_path):
    """keras.ops in a functional model, a Lambda, a user layer with a weight (traced through: CI reads the
    weight at every call, so it follows Cp's training), x @ w on a pixel vector and on a flattened map;
    the CI saves and loads."""
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops

    class Scale(L.Layer):
        def build(self, shape):
            self.log_scale = self.add_weight(shape=(shape[-1],), initializer="zeros")

        def call(self, x):
            return x * ops.exp(self.log_scale) + 1.0

    keras.utils.set_random_seed(2)
    inp = keras.Input((9, 8, 1))
    x = L.Conv2D(4, 3)(inp)
    x = L.Lambda(lambda t: t * 2 + tf.nn.relu(t))(ops.relu(x) - 0.5)
    scale = Scale()
    x = L.MaxPooling2D(2)(scale(x))
    x = ops.reshape(x[:, 1:, :, 1:], (-1, 2 * 3 * 3))
    x = ops.matmul(x, tf.constant(np.random.default_rng(0).standard_normal((18, 6)), tf.float32))
    out = ops.matmul(ops.tanh(x), tf.ones((6, 3))) + tf.constant([0.5, -0.5, 1.0])
    net = keras.Model(inp, out)
    ci = _assert_exact(kb, net, (9, 8), 1)
    scale.log_scale.assign(np.log([0.5, 2.0, 3.0, 0.25]).astype("float32"))
    images = tf.constant(_images(1))
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, (9, 8))) <= TOL["float32"]
    ci.save(str(tmp_path / "ops.keras"))
    np.testing.assert_array_equal(keras.models.load_model(str(tmp_path / "ops.keras"))(images).numpy(),
                                  ci(images).numpy())


def test_keras_float64_layers_under_the_float32_policy_with_python_scalars(kb):
    """A Cp whose layers are float64 while the global dtype policy stays float32, with arithmetic on Python
    scalars after a pooling (t * 1.5, t - 0.25): FDFE's layers declare their input's dtype, so the ops
    after them are built in float64 too, and CI equals Cp in float64."""
    import keras
    L = keras.layers
    assert keras.config.dtype_policy().name == "float32"
    keras.utils.set_random_seed(4)
    inp = keras.Input((7, 7, 2), dtype="float64")
    x = L.Conv2D(3, 3, dtype="float64")(inp)
    x = L.Lambda(lambda t: t * 1.5 - 0.25, dtype="float64")(L.MaxPooling2D(3, 2, dtype="float64")(x))
    net = keras.Model(inp, L.Flatten(dtype="float64")(L.Conv2D(2, 2, dtype="float64")(x)))
    images = np.random.default_rng(4).standard_normal((N, H, W, 2))
    ci = kb.FDFE.convert(net, 7)
    out = ci(images)
    assert out.dtype.name == "float64"
    assert max_rel_error(out, kb.FDFE.dense_reference(net, images, 7)) <= TOL["float64"]


def test_keras_tf_nn_convolution_and_pooling_in_call(kb):
    """tf.nn.conv2d / depthwise_conv2d with Cp's weights and tf.nn.max_pool2d / avg_pool2d in call(), unpadded
    and at stride 1, run as they are on the dense map; strided ones are refused with the way out."""
    import keras
    import tensorflow as tf

    class Net(keras.Model):
        def __init__(self, stride=1):
            super().__init__()
            self.stride = stride
            self.kernel = self.add_weight(shape=(3, 3, 2, 4), initializer="glorot_uniform")
            self.depthwise = self.add_weight(shape=(2, 2, 4, 1), initializer="glorot_uniform")
            self.head = keras.layers.Conv2D(3, 3)

        def call(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, self.kernel, self.stride, "VALID"))
            y = tf.nn.max_pool2d(tf.nn.depthwise_conv2d(y, self.depthwise, [1, 1, 1, 1], "VALID"), 2, 1, "VALID")
            return self.head(tf.nn.avg_pool2d(y, 2, 1, "VALID"))
    keras.utils.set_random_seed(10)
    _assert_exact(kb, _built(Net(), (8, 8), 2), (8, 8), 2)
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(Conv2D, created at test_keras_ops.py:\d+\).*it strides "
                                                      r"\(strides=\[1, 2, 2, 1\]\); write it as a Keras layer"):
        kb.FDFE.convert(_built(Net(stride=2), (13, 13), 2), 13)


def test_keras_streams_that_pool_differently_merged_by_ops(kb):
    """Two float64 streams that end in one vector per position, one pooled (stride 2), one a central crop
    written as a slice, merged by + and keras.ops (unwarped to the image grid first, as for Add layers)."""
    import keras
    L, ops, d = keras.layers, keras.ops, "float64"
    keras.utils.set_random_seed(8)
    inp = keras.Input((12, 12, 1), dtype=d)
    pooled = L.Conv2D(4, 5, dtype=d)(L.MaxPooling2D(2, dtype=d)(L.Conv2D(3, 3, dtype=d)(inp)))
    central = L.Conv2D(4, 6, dtype=d)(inp[:, 3:9, 3:9, :])
    merged = ops.concatenate([pooled + central, ops.maximum(pooled, central) * 2.0], axis=-1)
    net = keras.Model(inp, ops.reshape(merged, (-1, 8)))
    images = np.random.default_rng(9).standard_normal((N, H, W, 1))
    ref = kb.FDFE.dense_reference(net, images, 12)
    for options in ({}, {"naive": True, "tile": (5, 6)}):
        assert max_rel_error(kb.FDFE.convert(net, 12, **options)(images), ref) <= TOL["float64"], options


# --- refusals -------------------------------------------------------------------------------------------

def _net_with(body, patch=7, channels=1):
    """A subclassed Cp (conv a, conv b, dense d) whose call() is ``body(self, x)``."""
    import keras
    L = keras.layers

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.d = L.Conv2D(4, 3), L.Conv2D(3, 3), L.Dense(3)

        def call(self, x):
            return body(self, x)
    return _built(Net(), (patch, patch), channels)


@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer")  # Net.d unused in most cases
def test_keras_op_refusals_name_the_op_and_why(kb):
    import keras
    import tensorflow as tf
    ops = keras.ops
    cases = [
        (lambda s, x: s.b((s.a(x) - ops.mean(s.a(x), axis=(1, 2), keepdims=True)) / ops.std(s.a(x), axis=(1, 2),
                                                                                          keepdims=True)),
         r"TensorFlow op '.*/sub' \(Sub, created at test_keras_ops.py:\d+\).*cannot be made dense exactly: it "
         r"combines a 5x5x4 map with a 1x1x4 map, a value of the whole patch \(such as its mean or standard "
         r"deviation\) used at every position, as per-patch normalisation does; every patch is normalised"),
        (lambda s, x: s.b(s.a(x)[:, ::-1, :, :]), r"\(StridedSlice.*it takes a reversed or reordered slice"),
        (lambda s, x: s.b(s.a(x)[:1]), r"\(StridedSlice.*it slices the batch of patches"),
        (lambda s, x: s.b(s.a(x) + tf.random.normal((1, 5, 5, 4))),
         r"\(AddV2.*computes a constant with RandomStandardNormal .*a random or stateful op"),
        (lambda s, x: s.b(s.a(x) * tf.reshape(tf.range(100, dtype=x.dtype), (5, 5, 4))),
         r"\(Mul.*with a constant of shape \[5, 5, 4\], which differs per position of the patch"),
        (lambda s, x: s.d(ops.softmax(ops.reshape(s.b(s.a(x)), (-1, 27)))),
         r"\(Softmax.*along the last axis of a flattened 3x3x3 map, which mixes positions of the patch"),
        (lambda s, x: s.b(s.a(x) if float(tf.reduce_sum(x)) > 0 else -s.a(x)),
         r"(?s)call\(\) cannot be traced into a TensorFlow graph .*a forward that reads values of tensors"),
        (lambda s, x: s.b(tf.pad(s.a(x), [[0, 0], [1, 1], [1, 1], [0, 0]])),
         r"\(Pad.*it pads a value inside Cp; inside Cp the padded border"),
        (lambda s, x: tf.ones((2, 3)), r"Cp's output does not depend on its input patch"),
    ]
    for body, match in cases:
        with pytest.raises(kb.FDFE.ConversionError, match=match):
            kb.FDFE.convert(_net_with(body), 7, in_channels=1)


def test_keras_every_problem_of_the_call_at_once(kb):
    """Padding, a statistic of the patch subtracted from the map, an op without a rule and a Keras layer
    without one (an LSTM after a keras.ops reshape): one message naming them all."""
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.lstm = L.Conv2D(4, 3), L.LSTM(3)

        def call(self, x):
            y = self.a(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]) - ops.mean(x, axis=(1, 2), keepdims=True))
            return self.lstm(ops.reshape(tf.roll(y, 1, axis=1), (-1, 5, 20)))
    with pytest.raises(kb.FDFE.ConversionError) as info:
        kb.FDFE.convert(_built(Net(), (5, 5), 1), 5)
    message = str(info.value)
    assert message.startswith("Cp cannot be made dense exactly; 4 problems:"), message
    for part in [r"\(Pad, created at test_keras_ops.py:\d+\).*it pads a value inside Cp",
                 r"\(Sub, created at test_keras_ops.py:\d+\).*as per-patch normalisation does",
                 r"\(Roll, created at test_keras_ops.py:\d+\) is not supported by convert\(\) \(unknown op\)",
                 r"layer 'lstm[_0-9]*' \(LSTM\) is not supported by convert\(\) \(unknown layer kind\)"]:
        assert __import__("re").search(part, message), (part, message)


# --- NaN and Inf pixels ---------------------------------------------------------------------------------

_NAN_NETS = ["max pooling k3 s2", "conv, max pooling", "average pooling", "power-average pooling",
             "global max pooling", "global average pooling", "maximum, global max pooling",
             "keras.ops max, min, mean"]


def _nan_net(name, fdfe):
    """One net per pooling kind (and merge) of the Keras backend, named as in _NAN_NETS."""
    import keras
    L, ops = keras.layers, keras.ops

    def head():
        return [L.Conv2D(3, 2), L.Flatten(), L.Dense(4)]
    if name == "maximum, global max pooling":
        inp = keras.Input((7, 7, 2))
        return keras.Model(inp, L.GlobalMaxPooling2D()(L.Maximum()([L.Conv2D(3, 3)(inp), L.Conv2D(3, 3)(inp)])))
    if name == "keras.ops max, min, mean":
        inp = keras.Input((6, 6, 2))
        return keras.Model(inp, ops.concatenate([ops.max(inp, axis=(1, 2)), ops.min(L.Conv2D(2, 2)(inp), axis=(1, 2)),
                                                 ops.mean(inp, axis=(1, 2))], axis=-1))
    layers = {
        "max pooling k3 s2": [keras.Input((9, 9, 2)), L.MaxPooling2D(3, 2)] + head(),
        "conv, max pooling": [keras.Input((8, 8, 2)), L.Conv2D(3, 2), L.MaxPooling2D(2)] + head(),
        "average pooling": [keras.Input((9, 9, 2)), L.AveragePooling2D(3, 2)] + head(),
        "power-average pooling": [keras.Input((8, 8, 2)), fdfe.LPPooling2D(2, 2)] + head(),
        "global max pooling": [keras.Input((6, 6, 2)), L.GlobalMaxPooling2D()],
        "global average pooling": [keras.Input((6, 6, 2)), L.Conv2D(3, 2), L.GlobalAveragePooling2D()],
    }[name]
    return keras.Sequential(layers)


def _non_finite_images():
    """Random images with NaN, +Inf and -Inf pixels, and a 7x7 block of -Inf (windows of only -Inf)."""
    images = _images(2, seed=3)
    images[0, 3, 4, 0] = images[1, 15, 2, 1] = np.nan
    images[0, 12, 17, :] = images[1, 2, 20, 0] = np.inf
    images[0, 6, 9, 1] = images[1, 9, 9, :] = -np.inf
    images[1, 10:17, 12:19, :] = -np.inf
    return images


@pytest.mark.parametrize("name", _NAN_NETS)
def test_keras_nan_and_inf_pixels_give_cps_outputs(kb, name):
    """Every pooling kind: CI has Cp's NaN, +Inf and -Inf pixels exactly and its finite values elsewhere
    (tf.nn.max_pool2d skips NaN and never returns -Inf, while Keras' global max pooling and keras.ops.max
    propagate NaN and keep -Inf)."""
    import keras
    keras.utils.set_random_seed(4)
    net = _nan_net(name, kb.FDFE)
    patch = tuple(net.inputs[0].shape[1:3])
    images = _non_finite_images()
    ref = kb.FDFE.dense_reference(net, images, patch).numpy()
    assert (~np.isfinite(ref)).any(), "no non-finite output: the test could not fail"
    for naive in (False, True):
        got = kb.FDFE.convert(net, patch, naive=naive)(images).numpy()
        for what, mask in [("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)]:
            assert np.array_equal(mask(got), mask(ref)), (name, naive, what, int((mask(got) != mask(ref)).sum()))
        finite = np.isfinite(ref)
        assert np.abs(got[finite] - ref[finite]).max() <= TOL["float32"] * np.abs(ref[finite]).max(), (name, naive)


# --- images, retracing, threads -------------------------------------------------------------------------

def test_keras_images_as_lists_arrays_and_tensors(kb):
    """Lists of numbers are converted like numpy arrays (float64 cast to the net's float32, as Keras does);
    other objects are refused naming the expected type, integer ones with how to convert them."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(5)
    net = keras.Sequential([keras.Input((5, 5, 1)), keras.layers.Conv2D(3, 3), keras.layers.Conv2D(2, 3)])
    ci = kb.FDFE.convert(net, 5)
    images = np.random.default_rng(6).standard_normal((2, 7, 6, 1))
    expected = ci(tf.constant(images, tf.float32)).numpy()
    for given in (images, images.astype("float32"), images.tolist(), tuple(images.tolist())):
        out = ci(given)
        assert out.dtype == tf.float32 and np.allclose(out.numpy(), expected, rtol=0, atol=1e-6), type(given)
    assert max_rel_error(kb.FDFE.dense_reference(net, images.tolist(), 5), expected) <= TOL["float32"]
    with pytest.raises(TypeError, match=r"images must be a tensor or numpy array of shape \(N, H, W, C\); the list "
                                        r"given cannot be converted"):
        ci([[[[1.0]], [[2.0], [3.0]]]])
    with pytest.raises(TypeError, match=r"images must be a tensor or numpy array of shape \(N, H, W, C\) holding "
                                        r"numbers; the list given holds <U1 values"):
        ci([[[["a"]]]])
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor, got dtype int64; convert it first"):
        ci([[[[1]]]])
    with pytest.raises(TypeError, match=r"images must be a tensor or numpy array of shape \(N, H, W, C\), got str"):
        ci("image.png")
    # a one-element list of a tensor or array, as a Functional Cp with one input accepts (ci([x]) read it as a
    # batch of one 5-D image; predict([x]) failed converting a symbolic tensor); mask=None as Keras' models take
    for given in ([images], (tf.constant(images),), {"patch": images}, {"patch": list(images)}):
        out = ci(given, mask=None)
        assert np.allclose(out.numpy(), expected, rtol=0, atol=1e-6), type(given)
    for given in ([images[1]], [tf.constant(images[1])]):  # a list of one (H, W, C) image: a batch of one
        assert np.allclose(ci(given).numpy(), expected[1:], rtol=0, atol=1e-6), type(given)
    assert np.allclose(ci.predict([images.astype("float32")], verbose=0), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="CI takes no mask"):
        ci(images, mask=tf.ones(images.shape[:3], bool))


_RETRACING_SCRIPT = """
import logging, os, sys
import numpy as np
sys.path.append(os.path.join({root!r}, "shared_tests"))
from backends import load_backend
FDFE = load_backend("tensorflow", "tf").FDFE
import keras, tensorflow as tf
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
tf.get_logger().addHandler(handler)
for i in range(7):
    net = keras.Sequential([keras.Input((5, 5, 1)), keras.layers.Conv2D(2, 3), keras.layers.MaxPooling2D(1 + i % 2),
                            keras.layers.Flatten(), keras.layers.Dense(2)])
    FDFE.convert(net, 5)(np.zeros((2, 9, 8, 1), "float32"))
print("retracing warnings:", sum("retracing" in m for m in messages))
"""


def test_keras_converting_several_nets_prints_no_retracing_warning():
    """Each CI (and each convert's trace) is its own tf.function: no "triggered tf.function retracing" warning
    however many nets are converted and run.  In a fresh process: TensorFlow prints that warning at most
    twice per function and process."""
    from conftest import ROOT, real_tensorflow
    if real_tensorflow() is None:
        pytest.skip("TensorFlow is not installed")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _RETRACING_SCRIPT.format(root=ROOT)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retracing warnings: 0" in result.stdout, result.stdout + result.stderr[-3000:]


def test_keras_ops_convert_while_another_thread_runs_keras(kb):
    """convert() records only its own thread: another thread running a model with keras.ops meanwhile
    changes nothing."""
    import keras
    import tensorflow as tf
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    stop, calls = threading.Event(), []

    def busy():
        x = tf.zeros((1, 8, 8, 3))
        while not stop.is_set():
            keras.ops.relu(other(x) * 2.0)
            calls.append(1)
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        keras.utils.set_random_seed(7)
        _assert_exact(kb, _built(_mixed_ops_net(), (10, 10), 2), (10, 10), 2)
    finally:
        stop.set()
        thread.join()
    assert calls


def test_keras_augmentation_layers_are_the_identity_at_inference(kb):
    """Keras' augmentation layers (RandomFlip, RandomRotation, ...), built into a model as Keras' guides do, were
    refused as unknown kinds; CI runs Cp in inference mode, where they return their input.  Each is checked to be
    the identity at convert (a subclass that is not is refused), and Cp calling one with training=True whatever its
    mode is refused, as for dropout."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(3)
    augment = [L.RandomFlip("horizontal"), L.RandomRotation(0.1),
               L.Pipeline([L.RandomZoom(0.1), L.RandomContrast(0.2)]),  # (as Keras' guides chain them)
               L.RandomTranslation(0.1, 0.1), L.RandomCrop(9, 8)]
    inp = keras.Input((9, 8, 2))
    x = inp
    for layer in augment:
        x = layer(x)
    x = L.Conv2D(6, 3, activation="relu")(x)
    x = L.MaxPooling2D(2)(x)
    x = L.Conv2D(4, (2, 3))(x)
    out = L.Flatten()(x)
    cp = keras.Model(inp, out)
    ci = kb.FDFE.convert(cp, (9, 8))
    images = _images(2)[:, :13, :11]
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, (9, 8))) <= TOL["float32"]

    class Brighter(L.RandomFlip):  # not the identity at inference
        def transform_images(self, images, transformation, training=True):
            return super().transform_images(images, transformation, training) + 1.0
    for layer, match in ((Brighter(), "does not return its input unchanged at inference"),):
        net = keras.Sequential([keras.Input((5, 5, 1)), layer, L.Conv2D(2, 5)])
        with pytest.raises(kb.FDFE.ConversionError, match=match):
            kb.FDFE.convert(net, 5)

    class Forced(keras.Model):
        def __init__(self):
            super().__init__()
            self.flip, self.conv = L.RandomFlip(), L.Conv2D(2, 5)

        def call(self, x):
            return self.conv(self.flip(x, training=True))
    forced = Forced()
    forced(np.zeros((1, 5, 5, 1), "float32"))
    with pytest.raises(kb.FDFE.ConversionError, match="calls it with training=True whatever Cp's mode"):
        kb.FDFE.convert(forced, 5)
    # layers taken out of a Pipeline or a Sequential after convert: CI ran the old layers, silently (3.5 off)
    pipe = L.Pipeline([L.RandomFlip(), L.Rescaling(2.0)])
    seq = keras.Sequential([L.Conv2D(3, 3), L.Rescaling(0.5)])
    inp = keras.Input((5, 5, 1))
    net = keras.Model(inp, L.Flatten()(L.Conv2D(2, 3)(seq(pipe(inp)))))
    for container in (pipe, seq):
        ci = kb.FDFE.convert(net, 5)
        container.layers.pop() if container is pipe else container.pop()
        kind = type(container).__name__
        with pytest.raises(ValueError, match=rf"Cp changed after convert: '{container.name}' \({kind}\) holds "
                                             rf"other layers than at convert \(\d then, \d now"):
            ci(_images(1))


def test_keras_activation_functions_that_change_the_channel_count_or_are_not_element_wise(kb):
    """keras.ops.glu, or a glu of one's own, given as a layer's activation= was refused: the per-pixel test built
    maps of the layer's output channel count, which glu halves.  A softmax of one's own (an Activation layer)
    after a Flatten passed the per-pixel test though its entries are positions of the patch: convert's self-check
    caught it with "please report it"; it is now refused by name (on flattened maps the function must be
    element-wise, which is tested)."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(6)

    def my_glu(t):
        a, b = keras.ops.split(t, 2, axis=-1)
        return a * keras.ops.sigmoid(b)
    for act in (keras.ops.glu, my_glu):  # (last: Keras' own shape inference misses glu's halving)
        body = [keras.Input((9, 8, 3)), L.Conv2D(8, 3), L.MaxPooling2D(2)]
        for last in ([L.Conv2D(6, 3, activation=act), L.Flatten()], [L.Conv2D(6, 3), L.Activation(act), L.Flatten()],
                     [L.Conv2D(4, 2), L.Flatten(), L.Dense(6, activation=act)]):
            assert _assert_exact(kb, keras.Sequential(body + last), (9, 8), 3)(_images(3)).shape[-1] == 3
    for act in (lambda t: keras.ops.softmax(t), lambda t: t / keras.ops.max(keras.ops.abs(t), -1, keepdims=True)):
        net = keras.Sequential([keras.Input((5, 5, 1)), L.Conv2D(2, 3), L.Flatten(), L.Activation(act)])
        with pytest.raises(kb.FDFE.ConversionError, match=r"its activation '<lambda>' is applied to a flattened "
                                                          r"3x3x2 map.*it is not element-wise"):
            kb.FDFE.convert(net, 5)
    net = keras.Sequential([keras.Input((5, 5, 1)), L.Conv2D(4, 3), L.Flatten(), L.Activation("sparsemax")])
    with pytest.raises(kb.FDFE.ConversionError, match=r"its activation 'sparsemax' is applied to a flattened "
                                                      r"3x3x4 map.*it is not element-wise"):  # (Keras' own, too)
        kb.FDFE.convert(net, 5)
    net = keras.Sequential([keras.Input((5, 5, 1)), L.Conv2D(2, 3), L.Flatten(),  # element-wise: accepted
                            L.Activation(lambda t: keras.ops.tanh(t) * 2.0)])
    _assert_exact(kb, net, 5, 1)


def test_keras_per_channel_layers_on_positions_reshaped_to_rows(kb):
    """Per-channel layers on a map reshaped to (N, h*w, C) rows of positions (LayerNormalization, Softmax,
    UnitNormalization, Dense, and BatchNormalization or PReLU built for such rows) act per pixel; they were refused
    as mixing positions (Dense: "flatten the map first").  A PReLU with slopes per position stays refused."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(7)
    bn = L.BatchNormalization()
    rows = [L.LayerNormalization(), bn, L.PReLU(shared_axes=[1]), L.Softmax(), L.UnitNormalization(),
            L.PReLU(shared_axes=[1, 2]), L.Dense(5, activation="softmax"), L.Dense(6)]  # (Dense: per row)
    net = keras.Sequential([keras.Input((8, 7, 2)), L.Conv2D(6, 3), L.MaxPooling2D(2), L.Reshape((6, 6))] + rows +
                           [L.Flatten(), L.Dense(4)])
    bn.moving_mean.assign(np.linspace(-0.2, 0.3, 6))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 6))
    _assert_exact(kb, net, (8, 7), 2)
    net = keras.Sequential([keras.Input((8, 7, 2)), L.Conv2D(6, 3), L.MaxPooling2D(2), L.Reshape((6, 6)), L.PReLU(),
                            L.Flatten(), L.Dense(4)])
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(PReLU\).*its slopes differ per position \(use "
                                                      r"shared_axes=\[1\]\)"):
        kb.FDFE.convert(net, (8, 7))


def test_keras_matrix_products_over_the_channels_of_every_pixel(kb):
    """``x @ w`` of a map, or of (N, h*w, C) rows of its positions, with a (C, K) weight is a product per pixel (it
    was refused as an unknown op, BatchMatMulV2); keras.ops.matmul / tensordot of a map, which TensorFlow lowers to
    a reshape to (N*h*w, C), are refused with a hint to write x @ w."""
    import keras

    class Products(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 5), initializer="glorot_uniform", name="w")
            self.v = self.add_weight(shape=(5, 4), initializer="glorot_uniform", name="v")

        def call(self, x):
            y = keras.ops.tanh(x @ self.w)  # (N, h, w, 5)
            return keras.ops.reshape(y, (-1, y.shape[1] * y.shape[2], 5)) @ self.v  # rows (N, h*w, 4)
    L = keras.layers
    keras.utils.set_random_seed(9)
    net = keras.Sequential([keras.Input((8, 7, 2)), L.Conv2D(6, 3), L.MaxPooling2D(2), Products(), L.Flatten(),
                            L.Dense(3)])
    _assert_exact(kb, net, (8, 7), 2)

    class Tensordot(Products):
        def call(self, x):
            return keras.ops.tensordot(x, self.w, axes=1)
    net = keras.Sequential([keras.Input((5, 5, 2)), L.Conv2D(6, 3), Tensordot(), L.Flatten(), L.Dense(3)])
    with pytest.raises(kb.FDFE.ConversionError, match=r"reshapes \(\d, 3, 3, 6\) to \(\d+, 6\).*for a product over "
                                                      r"the channels of every pixel write x @ w"):
        kb.FDFE.convert(net, 5)


def test_keras_arg_max_and_min_over_the_channels(kb):
    """keras.ops.argmax / argmin over the channels of a map or of a vector of one position (TensorFlow lowers argmax
    through a Bitcast and BitwiseAnd testing the sign of zeros) give the channel index at every pixel, as PyTorch's
    argmax does; they were refused as unknown ops.  Over positions they stay refused."""
    import keras
    L, ops = keras.layers, keras.ops

    def args(x):
        indices = ops.concatenate([ops.argmax(x, axis=-1)[..., None], ops.argmin(x, -1, keepdims=True)], -1)
        return x + ops.cast(indices[..., :1] - indices[..., 1:], x.dtype)
    keras.utils.set_random_seed(10)
    inp = keras.Input((8, 7, 2))
    x = L.Lambda(args)(L.MaxPooling2D(2)(L.Conv2D(6, 3)(inp)))
    v = L.Dense(5)(L.Flatten()(x))
    out = L.Lambda(lambda v: v * ops.cast(ops.argmax(v, axis=1)[:, None] + 1, v.dtype))(v)
    _assert_exact(kb, keras.Model(inp, out), (8, 7), 2)
    inp = keras.Input((5, 5, 2))
    x = L.Lambda(lambda x: ops.cast(ops.argmax(x, axis=1), x.dtype))(L.Conv2D(4, 3)(inp))
    with pytest.raises(kb.FDFE.ConversionError, match=r"takes the arg max of a 3x3x4 map along axis 1; only the "
                                                      r"channel axis \(-1\)"):
        kb.FDFE.convert(keras.Model(inp, L.Flatten()(x)), 5)


# --- settings of Cp changed after convert ---------------------------------------------------------------

def test_keras_lambda_arguments_changed_after_convert_are_refused(kb):
    """A Lambda's ``arguments`` were not among the settings compared where CI runs: reassigned, or changed in
    place, after convert, Cp used the new value and CI the old one (3.0 off), silently.  They are compared by value
    now (arrays too; other objects by identity), and CI refuses to run, naming the layer and the setting."""
    import keras
    L = keras.layers
    images = _images(1)[:, :9, :11]
    changes = [(lambda lam: setattr(lam, "arguments", {"t": 5.0, "v": lam.arguments["v"]}), r"'t': 5.0"),
               (lambda lam: lam.arguments.__setitem__("t", -1.0), r"'t': -1.0"),
               (lambda lam: lam.arguments["v"].__setitem__(1, 7.0), r"'v': array\(\[1\., 7\., 3\.\]")]
    for change, now in changes:
        keras.utils.set_random_seed(0)
        lam = L.Lambda(lambda x, t, v: x * t + v, arguments={"t": 2.0, "v": np.array([1.0, 2.0, 3.0], "float32")})
        cp = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(3, 3), lam, L.Flatten(), L.Dense(2)])
        ci = kb.FDFE.convert(cp, 6)
        lam.arguments = dict(lam.arguments)  # the same values: followed
        assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 6)) <= TOL["float32"]
        change(lam)
        with pytest.raises(ValueError, match=r"Cp changed after convert: layer 'lambda.*' changed its arguments from "
                                             r"\{'t': 2.0, 'v': array\(\[1\., 2\., 3\.\].*to \{.*" + now +
                                             r".*convert Cp again"):
            ci(images)


def test_keras_dicts_and_arrays_of_ones_own_layers_changed_after_convert_are_refused(kb, tmp_path):
    """Attributes of one's own layers held in a dict or a numpy array (``self.cfg = {"t": 2.0}``, ``self.w =
    np.array(...)``) were not compared: changed in place or reassigned after convert, CI kept the old values (1.9
    off), silently.  They are compared by value now, as numbers are; a dict that call() fills as it runs (state)
    is not compared, and neither training CI nor saving it is refused."""
    import keras
    L = keras.layers

    class Scale(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.cfg, self.w, self.seen = {"t": 2.0}, np.array([1.0, 2.0, 3.0], "float32"), {}

        def call(self, x):
            self.seen[len(self.seen)] = tuple(x.shape)  # state: changes at every call
            return x * self.cfg["t"] * self.w + 0.5
    images = _images(1)[:, :9, :11]
    changes = [(lambda s: s.cfg.__setitem__("t", 5.0), r"cfg from \{'t': 2.0\} to \{'t': 5.0\}"),
               (lambda s: setattr(s, "cfg", {"t": 5.0}), r"cfg from \{'t': 2.0\} to \{'t': 5.0\}"),
               (lambda s: s.w.__setitem__(slice(None), [3.0, -1.0, 0.5]), r"w from array\(\[1\., 2\., 3\.\]"),
               (lambda s: setattr(s, "w", np.array([3.0, -1.0, 0.5], "float32")), r"w from array\(\[1\., 2\., 3\.\]")]
    for change, message in changes:
        keras.utils.set_random_seed(0)
        scale = Scale()
        cp = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(3, 3), scale, L.Flatten(), L.Dense(2)])
        ci = kb.FDFE.convert(cp, 6)
        scale.cfg, scale.w = dict(scale.cfg), scale.w.copy()  # the same values: followed
        assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 6)) <= TOL["float32"]
        change(scale)
        with pytest.raises(ValueError, match=r"Cp changed after convert: layer 'scale.*' changed its " + message +
                                             r".*convert Cp again"):
            ci(images)
    ci = kb.FDFE.convert(cp, 6)  # (the changed values, converted again)
    ci.compile(optimizer="sgd", loss="mse")
    ci.fit(images, np.zeros((N, 9, 11, 2), "float32"), epochs=1, verbose=0)
    ci.save(str(tmp_path / "ci.keras"))
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 6)) <= TOL["float32"]


def test_keras_tensors_and_functions_of_ones_own_models_replaced_after_convert_are_refused(kb, tmp_path):
    """A tensor or a function that one's own model or layer holds (``self.gain = tf.constant(...)``, ``self.act =
    keras.activations.relu``, a functools.partial) was not compared: replaced after convert, CI kept the old one (2.9
    off for the gain, 8.6 for the activation), silently.  They are compared by identity now; fit, compile and save
    of Cp or CI (which set functions in Keras' attributes) are not refused."""
    import functools
    import keras
    import tensorflow as tf
    L = keras.layers

    class Cp(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv, self.pool = L.Conv2D(4, 3), L.GlobalAveragePooling2D()
            self.gain, self.act = tf.constant([1.0, 2.0, 3.0, 4.0]), keras.activations.relu
            self.shift = keras.ops.convert_to_tensor(np.ones(4, "float32"))
            self.leaky, self.calls = functools.partial(tf.nn.leaky_relu, alpha=0.1), 0

        def call(self, x):
            self.calls += 1  # (state)
            return self.pool(self.leaky(self.act(self.conv(x)) * self.gain + self.shift))
    images = _images(1)[:, :9, :11]
    changes = [(lambda c: setattr(c, "gain", tf.constant([5.0, 2.0, 3.0, 4.0])), r"gain from a tensor of shape "
                                                                                  r"\(4,\)"),
               (lambda c: setattr(c, "act", keras.activations.tanh), r"act from 'relu' to 'tanh'"),
               (lambda c: setattr(c, "shift", tf.zeros(4)), r"shift from a tensor"),
               (lambda c: setattr(c, "leaky", tf.nn.relu), r"leaky from functools.partial")]
    for change, message in changes:
        cp = Cp()
        cp(np.zeros((1, 10, 10, 1), "float32"))
        ci = kb.FDFE.convert(cp, 10)
        assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]
        change(cp)
        with pytest.raises(ValueError, match=r"Cp changed after convert: layer 'cp.*' changed its " + message +
                                             r".*convert Cp again"):
            ci(images)
    class Held(L.Layer):  # tensors and functions in a list and a dict
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.gains, self.fns = [tf.constant(2.0), 1.5], {"act": tf.nn.relu}

        def call(self, x):
            return self.fns["act"](x) * self.gains[0] * self.gains[1]
    for change, message in [(lambda h: h.gains.__setitem__(0, tf.constant(3.0)), r"gains from \(a tensor"),
                            (lambda h: h.fns.__setitem__("act", tf.nn.elu), r"fns from \{'act': 'relu'\}")]:
        held = Held()
        net = keras.Sequential([keras.Input((5, 5, 1)), L.Conv2D(4, 3), held, L.Flatten(), L.Dense(3)])
        ci = kb.FDFE.convert(net, 5)
        change(held)
        with pytest.raises(ValueError, match=r"layer 'held.*' changed its " + message):
            ci(images)

    class Monitored(keras.Model):  # a tensor train_step stores, which call() does not read: not compared
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv, self.pool, self.last_loss = L.Conv2D(4, 3), L.GlobalAveragePooling2D(), tf.constant(0.0)

        def call(self, x):
            return self.pool(self.conv(x))

        def train_step(self, data):
            out = super().train_step(data)
            self.last_loss = out["loss"]
            return out
    monitored = Monitored()
    monitored(np.zeros((1, 10, 10, 1), "float32"))
    ci = kb.FDFE.convert(monitored, 10)
    monitored.compile(optimizer="sgd", loss="mse")
    monitored.fit(np.zeros((2, 10, 10, 1), "float32"), np.zeros((2, 4), "float32"), epochs=1, verbose=0)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(monitored, images, 10)) <= TOL["float32"]

    class MyNorm(L.Normalization):  # Keras' own statistics tensors (rebuilt by finalize_state): not compared
        pass
    norm = MyNorm(axis=-1)
    norm.adapt(np.random.default_rng(1).standard_normal((20, 5, 5, 1)).astype("float32"))
    normed = keras.Sequential([keras.Input((5, 5, 1)), norm, L.Conv2D(4, 3), L.Flatten(), L.Dense(3)])
    ci = kb.FDFE.convert(normed, 5)
    norm.adapt(np.random.default_rng(2).standard_normal((20, 5, 5, 1)).astype("float32") * 3 + 1)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(normed, images, 5)) <= TOL["float32"]

    cp = Cp()
    cp(np.zeros((1, 10, 10, 1), "float32"))
    ci = kb.FDFE.convert(cp, 10)
    cp.compile(optimizer="sgd", loss="mse")
    cp.fit(np.zeros((2, 10, 10, 1), "float32"), np.zeros((2, 4), "float32"), epochs=1, verbose=0)
    ci.compile(optimizer="sgd", loss="mse")
    ci.fit(images, np.zeros(images.shape[:3] + (4,), "float32"), epochs=1, verbose=0)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]


def test_keras_explicit_padding_of_nothing_converts(kb):
    """tf.nn.conv2d with explicit paddings of zeros pads nothing: it converts (it was refused as padding); explicit
    paddings that pad stay refused."""
    import keras
    import tensorflow as tf
    weight = np.random.default_rng(0).standard_normal((3, 3, 2, 4)).astype("float32")

    class Cp(keras.Model):
        def __init__(self, pads, **kwargs):
            super().__init__(**kwargs)
            self.pads = pads

        def call(self, x):
            return keras.ops.max(tf.nn.conv2d(x, weight, 1, self.pads), axis=(1, 2))
    _assert_exact(kb, Cp([[0, 0]] * 4), (8, 8), 2)
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(Conv2D, created at .*it pads its input "
                                                      r"\(padding='EXPLICIT'\)"):
        kb.FDFE.convert(Cp([[0, 0], [1, 1], [1, 1], [0, 0]]), 8, in_channels=2)


def test_keras_gathers_of_one_channel_of_transposed_maps_and_bfloat16_nan_constants(kb):
    """keras.ops.take(t, 2, axis=1) of a transposed map (one channel by a scalar index: the map's values) converts (it
    was refused as "indices computed from the patch"); a gather with 2-D indices is refused naming them (it crashed
    inside the self-check); keras.ops.median under mixed_bfloat16, whose NaN constants are bfloat16, converts (they
    were taken for values that change with the batch size)."""
    import keras
    import tensorflow as tf
    L, ops, d = keras.layers, keras.ops, "float64"
    inp = keras.Input((10, 10, 3), dtype=d)
    x = L.MaxPooling2D(2, dtype=d)(L.Conv2D(5, 3, dtype=d)(inp))
    y = L.Lambda(lambda y: ops.expand_dims(ops.take(ops.transpose(y, (0, 3, 1, 2)), 2, axis=1), -1) * y
                 + tf.gather(ops.transpose(y, (0, 3, 1, 2)), 4, axis=1)[..., None], dtype=d)(x)
    net = keras.Model(inp, L.Dense(3, dtype=d)(L.Flatten(dtype=d)(y)))
    images = np.random.default_rng(0).standard_normal((2, 13, 11, 3))
    assert max_rel_error(kb.FDFE.convert(net, 10)(images), kb.FDFE.dense_reference(net, images, 10)) \
        <= TOL["float64"]
    inp = keras.Input((5, 5, 3))
    y = L.Lambda(lambda y: ops.reshape(tf.gather(y, [[1, 2]], axis=-1), (-1, 3, 3, 2)))(L.Conv2D(5, 3)(inp))
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(GatherV2, .*it gathers with indices of 2 dims"):
        kb.FDFE.convert(keras.Model(inp, L.Dense(2)(L.Flatten()(y))), 5)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        inp = keras.Input((6, 6, 3))
        y = L.Lambda(lambda t: ops.median(t, axis=-1, keepdims=True) + t)(L.Conv2D(4, 3)(inp))
        net = keras.Model(inp, L.Dense(2, dtype="float32")(L.Flatten()(y)))
        images = np.random.default_rng(1).standard_normal((1, 9, 8, 3)).astype("float32")
        ci = kb.FDFE.convert(net, 6)
        assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 6)) <= TOL["bfloat16"]
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_keras_ops_that_do_not_broadcast_with_constants_of_the_maps_shape(kb, tmp_path):
    """TensorFlow's Select (tf.compat.v1.where, and inside tf.clip_by_norm), ClipByValue with tensor bounds and
    AddN (tf.add_n) take operands of one shape.  A constant of the map's shape (``tf.zeros_like(h)``) becomes its
    value per channel in CI, [1, 1, 1, C], which these ops did not accept: convert failed inside TensorFlow
    ("must have the same size and shape").  CI broadcasts such constants to the dense map's shape now: exact."""
    import keras
    import tensorflow as tf
    L = keras.layers

    def body(h):
        h = tf.clip_by_norm(h, 1.0, axes=[-1])  # (per pixel: the L2 norm over the channels)
        h = tf.compat.v1.where(h > 0.1, h, tf.zeros_like(h) - 0.5)
        h = tf.raw_ops.ClipByValue(t=h, clip_value_min=tf.zeros_like(h) - 0.3, clip_value_max=tf.ones_like(h))
        return tf.add_n([h, tf.ones_like(h), h * h])

    def transposed(h):  # a map with its channels moved to axis 1 and back
        t = tf.clip_by_norm(tf.transpose(h, (0, 3, 1, 2)), 0.5, axes=[1])
        return tf.transpose(tf.add_n([t, tf.ones_like(t)]), (0, 2, 3, 1))
    keras.utils.set_random_seed(11)
    inp = keras.Input((8, 7, 2))
    x = L.Lambda(body)(L.Conv2D(4, 3)(inp) * 3.0)
    x = L.Lambda(transposed)(L.Conv2D(5, 2)(L.MaxPooling2D(2)(x)))
    cp = keras.Model(inp, L.Flatten()(x))
    ci = _assert_exact(kb, cp, (8, 7), 2)
    _assert_exact(kb, cp, (8, 7), 2, naive=True, tile=(6, 7))
    images = _images(2)
    ci.save(str(tmp_path / "clip.keras"))
    loaded = keras.models.load_model(str(tmp_path / "clip.keras"))
    assert max_rel_error(loaded(images), kb.FDFE.dense_reference(cp, images, (8, 7))) <= TOL["float32"]


def test_keras_rescaling_by_arrays_of_the_patchs_positions(kb, tmp_path):
    """A Rescaling whose scale is an array of the patch's shape, (h, w, 1), was reused on the dense map: convert's
    self-check failed inside TensorFlow ("Incompatible shapes"), and with check=False images whose dense map
    broadcast against it gave wrong values, silently.  A scale or offset that differs per position of the patch
    is refused now, naming the layer; one that holds one value per channel at every position (of a map or of a
    flattened map) gives those values, exact."""
    import keras
    L = keras.layers
    per_position = np.arange(16, dtype="float32").reshape(4, 4, 1) / 10 + 1
    for layers, shape in (([L.Conv2D(3, 3), L.Rescaling(scale=per_position)], r"\(4, 4, 1\)"),
                          ([L.Conv2D(3, 3), L.Flatten(), L.Rescaling(scale=per_position.ravel().repeat(3))],
                           r"\(48,\)")):
        net = keras.Sequential([keras.Input((6, 6, 2))] + layers + [L.Flatten()])
        for check in (True, False):
            with pytest.raises(kb.FDFE.ConversionError, match=r"layer 'rescaling.*' \(Rescaling\) cannot be made "
                                                              r"dense exactly: its scale \(shape " + shape +
                                                              r"\) differs per position of the patch"):
                kb.FDFE.convert(net, 6, check=check)
    keras.utils.set_random_seed(12)
    uniform = L.Rescaling(scale=np.full((3, 3, 1), 2.0, "float32"), offset=np.tile([0.5, -1.0, 2.0], (3, 3, 1)))
    net = keras.Sequential([keras.Input((8, 9, 2)), L.Conv2D(3, 3), L.MaxPooling2D(2), uniform, L.Conv2D(4, 2),
                            L.Flatten(), L.Rescaling(scale=np.tile([1.0, -2.0, 3.0, 0.5], 4)), L.Dense(3)])
    ci = _assert_exact(kb, net, (8, 9), 2)
    images = _images(2)
    ci.save(str(tmp_path / "rescaling.keras"))
    np.testing.assert_array_equal(keras.models.load_model(str(tmp_path / "rescaling.keras"))(images).numpy(),
                                  ci(images).numpy())
    uniform.offset[0, 0, 0] = 1.5  # (compared by value where CI runs)
    with pytest.raises(ValueError, match=r"layer 'rescaling.*' changed its offset"):
        ci(images)
    # one value per channel held by a tensor or a variable (an ImageNet-style input layer): reused as it is (the
    # first version of the above refused them)
    import tensorflow as tf
    std = tf.Variable([[[0.5, 2.0]]])
    net = keras.Sequential([keras.Input((6, 6, 2)), L.Rescaling(std, offset=tf.constant([[[[-1.0, 0.25]]]])),
                            L.Conv2D(3, 3), L.Flatten(), L.Dense(2)])
    ci = _assert_exact(kb, net, 6, 2)
    std.assign([[[1.5, -1.0]]])  # (followed)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 6)) <= TOL["float32"]


@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer")  # Net.d unused in the refused nets
def test_keras_ops_that_compute_with_the_batch_size_are_refused(kb):
    """``x * tf.cast(tf.shape(x)[0], ...)`` computes with the number of patches in Cp's batch, which the traced
    graph holds as a constant: convert's self-check said "internal check failed ... Please report it", and with
    check=False CI was 0.98 off, silently.  Such ops are refused now, naming the op and the batch size; sizes of
    the patch's maps and the channel count, reshapes to (tf.shape(x)[0], -1) and constants of the map's shape are
    the same for any batch, and convert."""
    import keras
    import tensorflow as tf

    def legit(s, x):
        h = s.a(x)
        size = tf.cast(tf.shape(h)[1] * tf.shape(h)[2], h.dtype) / tf.cast(tf.shape(h)[-1], h.dtype)
        h = h * size + tf.fill(tf.shape(h), 0.5) * h.shape[-1] - tf.ones_like(h)
        return s.d(tf.reshape(s.b(h), [tf.shape(h)[0], -1]))
    keras.utils.set_random_seed(13)
    _assert_exact(kb, _net_with(legit), 7, 1)
    for body in (lambda s, x: s.b(s.a(x) * tf.cast(tf.shape(x)[0], tf.float32)),
                 lambda s, x: s.b(s.a(x) / x.shape[0]),
                 lambda s, x: s.b(s.a(x) + tf.fill(tf.shape(s.a(x)), tf.cast(tf.shape(x)[0], tf.float32)))):
        for check in (True, False):
            with pytest.raises(kb.FDFE.ConversionError, match=r"TensorFlow op '.*' \((Mul|RealDiv|AddV2), created at "
                                                              r"test_keras_ops.py:\d+\) cannot be made dense exactly: "
                                                              r"its operand '.' is computed from the batch size"):
                kb.FDFE.convert(_net_with(body), 7, in_channels=1, check=check)


def test_keras_two_cis_of_one_cp_in_one_model(kb, tmp_path):
    """Every CI of a Cp was named "<cp>_dense", so a model using two of them (full resolution and a step) failed:
    'The name "..._dense" is used 2 times in the model'.  CIs are named uniquely now, as Keras names its layers
    (the first "<cp>_dense", then "<cp>_dense_1", ...); the model computes both, and each saves and loads."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(14)
    cp = keras.Sequential([keras.Input((9, 9, 2)), L.Conv2D(6, 3, activation="relu"), L.MaxPooling2D(2),
                           L.Conv2D(4, 3), L.Flatten()])
    ci, stepped = kb.FDFE.convert(cp, 9), kb.FDFE.convert(cp, 9, output_stride=3)
    assert ci.name.startswith(f"{cp.name}_dense") and stepped.name.startswith(f"{cp.name}_dense")
    assert ci.name != stepped.name
    inp = keras.Input((None, None, 2))
    model = keras.Model(inp, [ci(inp), stepped(inp)])
    images = _images(2)
    ref = np.asarray(kb.FDFE.dense_reference(cp, images, 9))
    full, coarse = model(images)
    assert max_rel_error(full, ref) <= TOL["float32"] and max_rel_error(coarse, ref[:, ::3, ::3]) <= TOL["float32"]
    for net, want in ((ci, full), (stepped, coarse)):  # (each alone: two CIs share Cp's layers, saved once)
        net.save(str(tmp_path / f"{net.name}.keras"))
        np.testing.assert_array_equal(keras.models.load_model(str(tmp_path / f"{net.name}.keras"))(images).numpy(),
                                      want.numpy())


def test_keras_same_padding_of_1x1_convolutions_and_poolings_in_call(kb):
    """keras.ops.conv / tf.nn.conv2d with a 1x1 kernel and padding="same" in call() was refused as padding, though
    it pads nothing (the Conv2D layer with padding="same" and a 1x1 kernel converts); so were depthwise_conv2d and
    max_pool2d of 1x1 windows.  They convert now, exact; "same" on a larger kernel stays refused."""
    import keras
    import tensorflow as tf

    class Net(keras.Model):
        def __init__(self, size=1):
            super().__init__()
            self.size, self.conv = size, keras.layers.Conv2D(4, 3)
            self.k = self.add_weight(shape=(size, size, 4, 3), initializer="glorot_uniform")
            self.d = self.add_weight(shape=(1, 1, 3, 2), initializer="glorot_uniform")

        def call(self, x):
            y = keras.ops.relu(keras.ops.conv(self.conv(x), self.k, 1, "same"))
            y = tf.nn.depthwise_conv2d(y, self.d, [1, 1, 1, 1], "SAME")
            return keras.ops.reshape(tf.nn.max_pool2d(y, 1, 1, "SAME") + tf.nn.avg_pool2d(y, 1, 1, "SAME"), (-1, 54))
    keras.utils.set_random_seed(15)
    _assert_exact(kb, _built(Net(), (5, 5), 2), (5, 5), 2)
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(Conv2D, created at test_keras_ops.py:\d+\).*it pads its "
                                                      r"input \(padding='SAME'\)"):
        kb.FDFE.convert(_built(Net(size=3), (5, 5), 2), 5)


def test_keras_axes_computed_by_ops_from_constants(kb):
    """An axis computed by ops from constants alone (tf.add(2, 1), a perm built with tf.range, as tf.nn.softmax(t,
    axis=1) builds one) is that constant: concatenations, reductions, splits, reversals, gathers and arg maxima
    along it convert (once refused as "computed from the patch"; a first version of this crashed with KeyError)."""
    import keras
    import tensorflow as tf
    L = keras.layers

    def axis():
        return tf.add(tf.constant(2), tf.constant(1))  # 3, the channels
    ops = [lambda a, b: tf.concat([a, b], axis=axis()),
           lambda a, b: tf.concat([tf.reduce_max(a, axis=axis(), keepdims=True), b], -1),
           lambda a, b: tf.concat(tf.split(a, 2, axis=axis()) + [b], -1),
           lambda a, b: tf.reverse(a, axis=tf.reshape(axis(), [1])) + b,
           lambda a, b: tf.gather(a, [3, 2, 1, 0], axis=axis()) + b,
           lambda a, b: tf.concat([tf.cast(tf.expand_dims(tf.argmax(a, axis=axis()), -1), tf.float32), b], -1)]
    for op in ops:
        inp = keras.Input((5, 5, 2))
        a, b = L.Conv2D(4, 3)(inp), L.Conv2D(4, 3)(inp)
        y = L.Lambda(lambda t, op=op: op(t[0], t[1]))([a, b])
        _assert_exact(kb, keras.Model(inp, L.Dense(3)(L.Flatten()(y))), (5, 5), 2)
