"""Keras: maps with their channels split into groups.  A reshape of a map (N, h, w, C) to (N, h, w, g1, ..., gk)
(maxout, ShuffleNet's channel shuffle, a grouped softmax) or a stack of maps along a new axis after their positions
(selective-kernel attention) acts per pixel; convert() refused them as "mixes positions of the patch".  CI holds such
values with the same axes, (B, H, W, g1, ..., gk), and replays the ops along the group axes: CI equals Cp on every
patch (float32 within TOL["float32"] = 1e-5 of the largest |Cp|, float64 within 1e-10), its gradients are Cp's (ties
of a max included), and it saves, loads and exports.  What would mix positions is refused, naming the grouped map."""

import numpy as np
import pytest

from conftest import TOL, max_rel_error

GROUPED = r"a map with its channels split into groups \(4x4 positions, 4x2 channels\)"


def _images(n=2, h=13, w=11, seed=0, dtype="float32"):
    """Random non-zero images whose size is no multiple of the stride product (2)."""
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(dtype)


def _net(body, patch=(10, 10), seed=0, dtype="float32"):
    """Cp: a convolution and a strided pooling to a 4x4x8 map, ``body`` on it (its (h, w, C) given), then a flatten
    and a Dense head."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input(patch + (3,), dtype=dtype)
    x = L.MaxPooling2D(2, dtype=dtype)(L.Conv2D(8, 3, dtype=dtype)(inp))
    y = body(x, *x.shape[1:])
    return keras.Model(inp, L.Dense(5, dtype=dtype)(L.Flatten(dtype=dtype)(y)))


def _assert_exact(kb, net, patch, images=None, dtype="float32", **options):
    """CI of ``net`` equals Cp on every patch of ``images``."""
    images = _images(dtype=dtype) if images is None else images
    ci = kb.FDFE.convert(net, patch, **options)
    reference = kb.FDFE.dense_reference(net, images, patch, **{k: v for k, v in options.items()
                                                               if k == "output_stride"})
    assert max_rel_error(ci(images), reference) <= TOL[dtype], options
    return ci


# --- the idioms --------------------------------------------------------------------------------------------------

def _maxout_ops(x, h, w, c):  # keras.ops.reshape, a max over the last axis (the members of each group)
    import keras
    return keras.ops.max(keras.ops.reshape(x, (-1, h, w, c // 2, 2)), axis=-1)


def _maxout_axis3(x, h, w, c):  # groups of 4 channels, the max over axis 3 (channel i against channel i + 4)
    import keras
    return keras.ops.max(keras.ops.reshape(x, (-1, h, w, 2, c // 2)), axis=3)


def _maxout_layers(x, h, w, c):  # a Reshape layer, then tf.reduce_max / min / sum / mean in a Lambda
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops
    g = L.Reshape((h, w, c // 2, 2))(x)
    return L.Lambda(lambda t: ops.concatenate([tf.reduce_max(t, -1), ops.min(t, axis=4), tf.reduce_sum(t, 3),
                                               ops.mean(t, axis=(3,), keepdims=False)[..., :3]], -1))(g)


def _shuffle_ops(x, h, w, c):  # ShuffleNet's channel shuffle with keras.ops.transpose
    import keras
    ops = keras.ops
    return ops.reshape(ops.transpose(ops.reshape(x, (-1, h, w, 2, c // 2)), (0, 1, 2, 4, 3)), (-1, h, w, c))


def _shuffle_layers(x, h, w, c):  # the same with Reshape and Permute layers, then tf.transpose in a Lambda
    import keras
    import tensorflow as tf
    L = keras.layers
    y = L.Reshape((h, w, c))(L.Permute((1, 2, 4, 3))(L.Reshape((h, w, 2, c // 2))(x)))
    return L.Lambda(lambda t: tf.reshape(tf.transpose(tf.reshape(t, (-1, h, w, 4, 2)), (0, 1, 2, 4, 3)),
                                         (-1, h, w, c)))(y)


def _shuffle_maxout(x, h, w, c):
    import keras
    y = _shuffle_ops(keras.layers.Conv2D(c, 1)(x), h, w, c)
    return _maxout_ops(keras.layers.Conv2D(c, 1, activation="tanh")(y), h, w, c)


def _grouped_softmax(x, h, w, c):  # Reshape -> Softmax(-1) -> Reshape; keras.ops.softmax / log_softmax along axis 3
    import keras
    L, ops = keras.layers, keras.ops
    y = L.Reshape((h, w, c))(L.Softmax(axis=-1)(L.Reshape((h, w, c // 2, 2))(x)))
    z = ops.reshape(ops.softmax(ops.reshape(x, (-1, h, w, 2, c // 2)), axis=3), (-1, h, w, c))
    v = ops.reshape(ops.log_softmax(ops.reshape(x, (-1, h, w, 4, 2)), axis=-2), (-1, h, w, c))
    return L.Concatenate()([y, z, v])


def _dense_on_groups(x, h, w, c):  # Dense along the last group axis (a product over each group's members)
    import keras
    L, ops = keras.layers, keras.ops
    y = L.Dense(3, activation="tanh")(L.Reshape((h, w, c // 2, 2))(x))
    y = L.UnitNormalization(axis=-1)(L.LeakyReLU(0.2)(L.Rescaling(2.0, offset=[0.5, -1.0, 0.25])(y)))
    return ops.reshape(L.ELU()(L.Activation("relu")(y) - 0.5), (-1, h, w, 3 * c // 2))


def _sliced_groups(x, h, w, c):  # slices of the group axes: a member of every group, a range of groups, ...
    import keras
    L, ops = keras.layers, keras.ops
    attention = L.Softmax(axis=-1)(ops.stack([x, L.Conv2D(c, 1)(x)], axis=-1))  # (N, h, w, C, 2)
    g = ops.reshape(x, (-1, h, w, c // 2, 2))
    return L.Lambda(lambda t: ops.concatenate([
        t[0][..., 0] * t[1] + t[0][..., 1], ops.reshape(t[2][:, :, :, 1:3], (-1, h, w, 4)), t[2][..., 1, 0:1],
        ops.expand_dims(t[2][:, :, :, 3, 1], -1), ops.max(t[2][:, :, :, ::2, ::-1], axis=-1)], axis=-1))(
        [attention, x, g])


def _stacks(x, h, w, c):  # keras.ops.stack of two maps along axis -1 and 3, then max, sum, softmax; a regrouping
    import keras
    L, ops = keras.layers, keras.ops
    a, b = L.Conv2D(c, 1)(x), L.Conv2D(c, 1, activation="relu")(x)
    top = ops.max(ops.stack([a, b], axis=-1), axis=-1)
    total = ops.sum(ops.stack([a, -b], axis=3), axis=3)
    soft = ops.reshape(ops.softmax(ops.stack([a, b], axis=-1), axis=-1), (-1, h, w, 2 * c))
    regrouped = ops.min(ops.reshape(ops.stack([a, b], axis=3), (-1, h, w, 4, c // 2)), axis=(3,))
    return ops.concatenate([top, total, soft, regrouped], axis=-1)


def _selective_kernel(x, h, w, c):
    """Selective-kernel attention per pixel: two branches stacked along a new axis 3, a softmax over the branches of
    logits computed per pixel, and the branches weighted by it and summed."""
    import keras
    L, ops = keras.layers, keras.ops
    a, b = L.Conv2D(c, 1)(x), L.Conv2D(c, 1, activation="tanh")(x)
    branches = ops.stack([a, b], axis=3)  # (N, h, w, 2, C)
    z = L.Dense(c, activation="relu")(a + b)
    attention = L.Softmax(axis=3)(ops.stack([L.Dense(c)(z), L.Dense(c)(z)], axis=3))
    return ops.sum(branches * attention, axis=3)


def _normalised_groups(x, h, w, c):
    """Group sums and means with keepdims broadcast back (x / sum over the group), constants along the group axes
    (of shape (1, 1, 1, 4, 2), (2,) and of the whole value's shape), where, l2-normalisation, a reduction over every
    group axis without keepdims, expand_dims and a concatenation along a group axis, a flattening of the groups."""
    import keras
    import tensorflow as tf
    ops = keras.ops

    def fn(x):
        g = ops.abs(ops.reshape(x, (-1, h, w, c // 2, 2))) + 0.1
        y = g / ops.sum(g, axis=-1, keepdims=True)
        y = y - ops.mean(y, axis=(3, 4), keepdims=True)
        y = y * np.arange(1.0, 9.0, dtype="float32").reshape(1, 1, 1, 4, 2) + np.array([0.5, -0.25], "float32")
        y = ops.where(y > 0, y, 0.1 * y) + tf.ones_like(y) * 0.5
        y = tf.math.l2_normalize(y, axis=3)
        y = ops.concatenate([y, ops.expand_dims(ops.max(g, axis=-1), -1)], axis=-1)  # (N, h, w, 4, 3)
        total = ops.expand_dims(ops.sum(g, axis=(3, 4)), -1)  # (N, h, w) -> (N, h, w, 1)
        flat = ops.reshape(y, (-1, h * w * 12))  # a flattening of the map the groups hold
        return ops.concatenate([ops.reshape(flat, (-1, h, w, 12)), total], axis=-1)
    return keras.layers.Lambda(fn)(x)


IDIOMS = [_maxout_ops, _maxout_axis3, _maxout_layers, _shuffle_ops, _shuffle_layers, _grouped_softmax,
          _dense_on_groups, _sliced_groups, _stacks,
          _selective_kernel, _normalised_groups]


@pytest.mark.parametrize("body", IDIOMS, ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("patch", [(10, 10), (11, 9)])
def test_keras_channel_groups_are_exact(kb, body, patch):
    """Each idiom, with an even and an odd patch, on 2 images of 13x11 (no multiple of the stride product 2)."""
    _assert_exact(kb, _net(body, patch), patch)


def test_keras_channel_groups_with_tiles_steps_naive_and_float64(kb):
    """CI of a shuffle then maxout equals Cp tiled, with an output stride and on the paper's per-shift path; a float64
    Cp (grouped softmax and selective kernel) within 1e-10; a larger batch."""
    net = _net(_shuffle_maxout, (11, 10))
    for options in ({"tile": (7, 6)}, {"output_stride": 2}, {"naive": True}):
        _assert_exact(kb, net, (11, 10), **options)
    _assert_exact(kb, net, (11, 10), _images(n=3, h=9, w=16, seed=4))

    def body(x, h, w, c):
        return _selective_kernel(x, h, w, c) + _grouped_softmax(x, h, w, c)[..., :c]
    _assert_exact(kb, _net(body, (10, 11), dtype="float64"), (10, 11), dtype="float64")


def test_keras_channel_groups_after_the_last_pooling_and_as_the_output(kb):
    """Maxout and a shuffle after the last pooling of a Cp whose output is one position (CI leaves that pooling's
    shifts in place: the grouped values are per pixel), and a Cp that returns its vector split into groups,
    (N, 1, 1, 1, K): exact, also with an output stride and tiles."""
    import keras
    L, ops = keras.layers, keras.ops
    keras.utils.set_random_seed(2)
    inp = keras.Input((10, 9, 3))
    x = L.MaxPooling2D(2)(L.Conv2D(8, (7, 6))(L.Conv2D(6, 3)(inp)))  # (N, 1, 1, 8)
    y = _maxout_ops(_shuffle_ops(x, 1, 1, 8), 1, 1, 8)
    for out in (L.Flatten()(y), ops.reshape(y, (-1, 1, 1, 1, 4))):
        net = keras.Model(inp, out)
        ci = _assert_exact(kb, net, (10, 9))
        assert ci.shifts_in_place  # (the pooling leaves its shifts in place)
        for options in ({"output_stride": 2}, {"tile": (6, 5)}):
            _assert_exact(kb, net, (10, 9), **options)


# --- gradients ---------------------------------------------------------------------------------------------------

def _tied_maxout(x, h, w, c):
    """Maxout whose groups hold two equal channels (a convolution's output channels duplicated): every max is a tie,
    through a reshape (channel i against channel i + 4, axis 3) and through a stack (axis -1)."""
    import keras
    L, ops = keras.layers, keras.ops
    y = L.Conv2D(c // 2, 1)(x)
    a = ops.max(ops.reshape(ops.concatenate([y, y], axis=-1), (-1, h, w, 2, c // 2)), axis=3)
    b = ops.max(ops.stack([y, y], axis=-1), axis=-1)
    return ops.concatenate([a, b], axis=-1)


@pytest.mark.parametrize("body", [_tied_maxout, _shuffle_maxout], ids=["tied_maxout", "shuffle_maxout"])
def test_keras_channel_groups_give_cps_gradients(kb, body):
    """The gradients of CI with respect to the images are those of Cp on every patch (GradientTape): where the max of
    a group ties, TensorFlow shares the gradient among the tied members in Cp and in CI alike."""
    import tensorflow as tf
    patch = (10, 10)
    net = _net(body, patch, seed=3)
    images = tf.constant(_images(seed=5))
    ci = kb.FDFE.convert(net, patch)
    weights = tf.constant(np.random.default_rng(6).standard_normal((1, 13, 11, 5)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(images)
        loss = tf.reduce_sum(tf.square(ci(images)) * weights)
        expected = tf.reduce_sum(tf.square(kb.FDFE.dense_reference(net, images, patch, differentiable=True)) * weights)
    got, want = tape.gradient(loss, images), tape.gradient(expected, images)
    assert float(tf.reduce_max(tf.abs(want))) > 0
    assert max_rel_error(got, want) <= TOL["float32"]
    trained = tape.gradient(loss, net.trainable_weights)
    for g, w in zip(trained, tape.gradient(expected, net.trainable_weights)):
        assert max_rel_error(g, w) <= 1e-4


# --- saving, loading and exports -------------------------------------------------------------------------------

def test_keras_channel_groups_save_load_and_export(kb, tmp_path):
    """A CI of a shuffle then maxout, saved as .keras and loaded, and exported (ci.export, loaded with
    tf.saved_model.load), is exact at image sizes it was not traced for; its reshapes read the image size where they
    run.  Also TFLite with built-in ops, resized to a new image size."""
    import keras
    import tensorflow as tf
    patch = (11, 10)
    net = _net(_shuffle_maxout, patch, seed=1)
    ci = kb.FDFE.convert(net, patch)
    ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"))
    ci.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    for n, h, w in [(1, 17, 9), (3, 8, 15)]:
        images = _images(n, h, w, seed=h)
        reference = kb.FDFE.dense_reference(net, images, patch)
        assert max_rel_error(loaded(images), reference) <= TOL["float32"], (n, h, w)
        assert max_rel_error(served.serve(tf.constant(images)), reference) <= TOL["float32"], (n, h, w)
    config = next(layer for layer in loaded.core.layers if type(layer).__name__ == "_ChannelGroups").get_config()
    assert set(config) >= {"groups"} and isinstance(config["groups"], list)

    path = str(tmp_path / "lite")
    ci.export(path, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)], verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    images = _images(2, 12, 14, seed=9)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, images)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert max_rel_error(out, kb.FDFE.dense_reference(net, images, patch)) <= TOL["float32"]


# --- refusals ------------------------------------------------------------------------------------------------------

def _grouped(x, h, w, c):
    import keras
    return keras.ops.reshape(x, (-1, h, w, 4, 2))


def _back(g):
    import keras
    return keras.ops.reshape(g, (-1, 4, 4, 8))


REFUSALS = {
    # (Keras' Conv2D and MaxPooling2D take no 5-D input: Conv3D and MaxPooling3D would read the groups as positions)
    "convolution": (lambda x, h, w, c: keras_layers().Conv3D(2, 1)(_grouped(x, h, w, c)),
                    r"layer 'conv3d.*' \(Conv3D\) cannot be made dense exactly: it is applied to " + GROUPED +
               r", the channels of every position split into axes of their own.*reshape it back to \(N, h, w, C\)"),
    "pooling": (lambda x, h, w, c: keras_layers().MaxPooling3D((2, 2, 1))(_grouped(x, h, w, c)),
                r"\(MaxPooling3D\) cannot be made dense exactly: it is applied to " + GROUPED +
                r".*only ops along those group axes"),
    "spatial_reduction": (lambda x, h, w, c: keras_ops().max(_grouped(x, h, w, c), axis=1),
                          r"\(Max.*cannot be made dense exactly: it reduces " + GROUPED +
                          r" over axes \[1\], which mixes positions of the patch; only reductions over its group axes"
                          r" \(3, 4\)"),
    "spatial_transpose": (lambda x, h, w, c: keras_ops().transpose(_grouped(x, h, w, c), (0, 3, 2, 1, 4)),
                          r"\(Transpose.*cannot be made dense exactly: it transposes " + GROUPED +
                          r" \(perm \[0, 3, 2, 1, 4\]\), which moves the positions of the patch"),
    "spatial_softmax": (lambda x, h, w, c: keras_layers().Softmax(axis=1)(_grouped(x, h, w, c)),
                        r"\(Softmax\) cannot be made dense exactly: it works along axes 1 of " + GROUPED +
                        r", which mixes positions of the patch"),
    "slice_of_positions": (lambda x, h, w, c: _grouped(x, h, w, c)[:, 1:3, 1:3],
                           r"\(StridedSlice.*cannot be made dense exactly: it slices " + GROUPED +
                           r" across its positions \(or patches\); only slices of its group axes"),
    "constant_per_position": (lambda x, h, w, c: _grouped(x, h, w, c) * np.arange(128.0, dtype="float32").reshape(
        4, 4, 4, 2), r"it combines " + GROUPED + r" with a constant of shape \[4, 4, 4, 2\], which differs per "
                     r"position of the patch"),
}


def keras_layers():
    import keras
    return keras.layers


def keras_ops():
    import keras
    return keras.ops


@pytest.mark.parametrize("name", list(REFUSALS))
def test_keras_channel_groups_refusals_name_the_grouped_map_and_why(kb, name):
    """A map split into groups given to an op that is not along its group axes (a convolution, a pooling, a
    reduction, softmax or transpose over positions, a constant per position) is refused naming the grouped map and
    why; no other rule reads its group axes as positions or channels."""
    body, message = REFUSALS[name]
    with pytest.raises(kb.FDFE.ConversionError, match=message):
        kb.FDFE.convert(_net(body), 10)


def test_keras_channel_groups_are_listed_and_a_gate_of_the_patch_refused(kb):
    """supported_layers() lists the ops and layers that follow a map split into groups; a grouped map multiplied by
    grouped values of the whole patch (a gate from a global pooling) is refused with the reason."""
    import keras
    kinds = kb.FDFE.supported_layers()
    label = next(label for label in kinds if label.startswith("maps with their channels split into groups"))
    assert {"tf.raw_ops.Transpose", "tf.raw_ops.Max", "tf.raw_ops.Reshape", "tf.raw_ops.Pack", "Softmax", "Permute",
            "Reshape"} <= set(kinds[label])
    assert kb.FDFE.GROUPS == "groups"
    geom = kb.FDFE._Geom(kb.FDFE.GROUPS, 8, (4, 4), groups=(4, 2))
    assert geom.describe() == "a map with its channels split into groups (4x4 positions, 4x2 channels)"

    def body(x, h, w, c):
        gate = keras.ops.reshape(keras.ops.mean(x, axis=(1, 2)), (-1, 1, 1, 4, 2))
        return _back(_grouped(x, h, w, c) * gate)
    with pytest.raises(kb.FDFE.ConversionError, match=r"it combines " + GROUPED + r" with a map with its channels "
                                                      r"split into groups \(1x1 positions, 4x2 channels\); values that "
                                                      r"cover different parts of the patch"):
        kb.FDFE.convert(_net(body), 10)


def test_keras_global_reductions_of_grouped_maps_and_one_problem_each(kb):
    """A reduction over every axis of a map split into groups (keras.ops.max(ops.reshape(x, (-1, h, w, G, K)),
    axis=(1, 2, 3, 4))) is the map's global one, as for the reshapes of a map before groups were held (converted
    then, refused as 'mixes positions' with the groups, found by a fuzzer); a maxout after a refused op is not reported
    as a second problem (the map split after the refusal was not recognised as one)."""
    import keras
    L, ops = keras.layers, keras.ops

    def global_max(x, h, w, c):
        return ops.expand_dims(ops.max(ops.reshape(x, (-1, h, w, c // 2, 2)), axis=(1, 2, 3, 4)), -1)

    def global_sum(x, h, w, c):
        return ops.sum(ops.reshape(ops.tanh(x), (-1, h, w, 2, c // 2)), axis=(-1, -2, -3, -4), keepdims=True)
    for body in (global_max, global_sum):
        _assert_exact(kb, _net(body), (10, 10))

    def refused_then_maxout(x, h, w, c):
        g = L.Conv3D(2, 1)(ops.reshape(x, (-1, h, w, c // 2, 2)))
        y = L.Conv2D(8, 1)(ops.reshape(g, (-1, h, w, c)))
        return ops.max(ops.reshape(y, (-1, h, w, c // 2, 2)), axis=-1)
    with pytest.raises(kb.FDFE.ConversionError) as info:
        kb.FDFE.convert(_net(refused_then_maxout), 10)
    assert "(Conv3D)" in str(info.value) and "problems" not in str(info.value), str(info.value)


def test_keras_fusions_tensorflow_cannot_run_are_named(kb):
    """TensorFlow 2.21's oneDNN graph optimizer fuses a convolution, sigmoid(x) * x and a LeakyReLU into an op it has
    no kernel for; Cp fails as a graph too.  convert raised TensorFlow's UnimplementedError from its self-check; it
    names the fused ops and the way round (found by a fuzzer).  Where TensorFlow runs the graph, CI is exact."""
    import keras
    import tensorflow as tf
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 14, 1))
    x = L.Conv2D(12, 1)(L.MaxPooling2D(2, strides=3)(L.Conv2D(8, 2, strides=3)(inp)))
    x = L.LeakyReLU(0.3)(L.Lambda(lambda t: keras.ops.sigmoid(t) * t)(x))
    cp = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    try:
        tf.function(cp)(tf.zeros((1, 12, 14, 1)))
    except tf.errors.UnimplementedError:
        with pytest.raises(kb.FDFE.ConversionError, match=r"convert's self-check could not run CI, a TensorFlow "
                           r"graph: Fusion is not implemented: \[BiasAdd,_MklSwish,LeakyRelu\] -- .*"
                           r"TF_ENABLE_ONEDNN_OPTS=0"):
            kb.FDFE.convert(cp, (12, 14))
        return
    images = np.random.default_rng(0).standard_normal((2, 13, 11, 1)).astype("float32")
    assert max_rel_error(kb.FDFE.convert(cp, (12, 14))(images), kb.FDFE.dense_reference(cp, images, (12, 14))) \
        <= TOL["float32"]


def test_keras_ops_along_one_group_axis(kb):
    """keras.ops.argmax / argmin, flip (tf.reverse), take (tf.gather with constant indices) and split along group axes
    of a map split into groups: the same op per pixel, as PyTorch's argmax, flip, index_select and split (they were
    refused, found by a README check); along a position axis refused."""
    import keras
    import tensorflow as tf
    L, ops = keras.layers, keras.ops

    def along(x, h, w, c):
        def body(t):
            g = ops.reshape(t, (-1, h, w, c // 2, 2))
            first, second = ops.split(g, 2, axis=3)
            return ops.concatenate([
                ops.cast(ops.argmax(g, axis=-1), t.dtype), ops.cast(ops.argmin(g, axis=3), t.dtype),
                ops.reshape(ops.flip(g, axis=-1) * tf.reverse(g, [3, 4]), (-1, h, w, c)),
                ops.reshape(ops.take(g, [1, 0, 1], axis=-1), (-1, h, w, 3 * c // 2)),
                ops.reshape(tf.gather(g, [3, 0], axis=3) + first, (-1, h, w, 4)),
                ops.squeeze(ops.split(g, 2, axis=-1)[1], -1) * ops.squeeze(tf.split(g, [1, 1], axis=-1)[0], -1),
                ops.reshape(second, (-1, h, w, c // 2))], axis=-1)
        return L.Lambda(body, output_shape=(h, w, 38))(x)  # (c = 8: 4 + 2 + 8 + 12 + 4 + 4 + 4 channels)
    for patch in ((10, 10), (11, 9)):
        _assert_exact(kb, _net(along, patch), patch)

    def flip_positions(x, h, w, c):
        return L.Lambda(lambda t: ops.reshape(ops.flip(ops.reshape(t, (-1, h, w, c // 2, 2)), axis=1),
                                              (-1, h, w, c)))(x)
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(ReverseV2, created at .*it works along axes \[1\] of "
                       + GROUPED + r", which mixes positions of the patch"):
        kb.FDFE.convert(_net(flip_positions), 10)
