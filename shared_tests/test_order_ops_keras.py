"""Keras: ops that order or accumulate the channels of each pixel (keras.ops.cumsum, cumprod,
tf.math.cumulative_logsumexp, keras.ops.sort, argsort, top_k, median, quantile), a channel picked by a scalar
index (tf.gather(x, 3, axis=-1), keras.ops.take), and the channels one by one (keras.ops.unstack(x, axis=-1)).
Along the channel axis they act per pixel (of a map, a vector of one position, (N, h*w, C) rows, a transposed map,
or a group axis of a map split into groups); convert() refused them (unknown ops, or a false "moves values between
patches").  CI equals Cp on every patch: float32 within TOL["float32"] = 1e-5 of the largest |Cp|, float64 within
1e-10; gradients too.  Along a position axis: refused, naming why."""

import numpy as np
import pytest

from conftest import TOL, max_rel_error


def _images(n=2, h=13, w=11, seed=0, dtype="float32"):
    """Random non-zero images whose size is no multiple of the stride product (2)."""
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(dtype)


def _net(body, patch=(10, 11), seed=0, dtype="float32"):
    """Cp: a convolution and a strided pooling to an 8-channel map, ``body`` on it in a Lambda, then a flatten and a
    Dense head."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input(patch + (3,), dtype=dtype)
    x = L.MaxPooling2D(2, dtype=dtype)(L.Conv2D(8, 3, dtype=dtype)(inp))
    y = L.Lambda(body, dtype=dtype)(x)
    return keras.Model(inp, L.Dense(5, dtype=dtype)(L.Flatten(dtype=dtype)(y)))


def _ops():
    import keras
    import tensorflow as tf
    return keras.ops, tf


def _cumulative(x):
    ops, tf = _ops()
    return ops.cumsum(x, axis=-1) * 0.3 + tf.math.cumprod(x, axis=3, exclusive=True) \
        - tf.math.cumulative_logsumexp(x, axis=-1, reverse=True)


def _sorts(x):
    ops, _ = _ops()
    values, indices = ops.top_k(x, 3)
    return ops.concatenate([ops.sort(x, axis=-1)[..., :3], values * ops.cast(indices, x.dtype),
                            ops.cast(ops.argsort(x), x.dtype)[..., :2] * 0.1], axis=-1)


def _median_quantile(x):
    ops, _ = _ops()
    return ops.concatenate([x - ops.median(x, axis=-1, keepdims=True),
                            x[..., :2] - ops.quantile(x, 0.3, axis=-1, keepdims=True, method="nearest"),
                            ops.quantile(x, 0.8, axis=-1)[..., None]], axis=-1)


def _scalar_gather(x):  # one channel by a scalar index: (N, h, w)
    ops, tf = _ops()
    return x * tf.gather(x, 3, axis=-1)[..., None] - ops.expand_dims(ops.take(x, 1, axis=-1), -1)


def _rows_sort(x):  # (N, h*w, C) rows of the positions, sorted along the channels
    ops, _ = _ops()
    return ops.reshape(ops.sort(ops.reshape(x, (-1, x.shape[1] * x.shape[2], 8))), (-1,) + tuple(x.shape[1:]))


def _transposed_cumsum(x):  # (N, C, h, w) by a transpose, cumsum along axis 1
    ops, _ = _ops()
    return ops.transpose(ops.cumsum(ops.transpose(x, (0, 3, 1, 2)), axis=1), (0, 2, 3, 1))


def _groups(x):  # along the last group axis of (N, h, w, 2, 4): cumsum, top_k, sort; one group by a scalar index
    ops, tf = _ops()
    g = ops.reshape(x, (-1,) + tuple(x.shape[1:3]) + (2, 4))
    parts = ops.concatenate([ops.cumsum(g, axis=4), ops.top_k(g, 2)[0], ops.sort(g)[..., 1:]], axis=-1)
    second = tf.gather(g, 1, axis=3)  # (N, h, w, 4): a map
    return ops.reshape(parts[..., 3:7], (-1,) + tuple(x.shape[1:3]) + (8,)) * ops.concatenate([second, second], -1)


def _unstack(x):  # the channels one by one: of the map, of a transposed map, of (N, h, w, 2, 4) groups
    ops, tf = _ops()
    channels = ops.unstack(x, axis=-1)
    t = tf.unstack(ops.transpose(x, (0, 3, 1, 2)), axis=1)
    a, b = ops.unstack(ops.reshape(x, (-1,) + tuple(x.shape[1:3]) + (2, 4)), axis=3)
    return ops.stack([channels[3] * t[1], channels[0] + t[7]] + list(channels[2:]), axis=-1) \
        * ops.concatenate([a, b * b], -1)


BODIES = {"cumulative": _cumulative, "sorts": _sorts, "median_quantile": _median_quantile,
          "scalar_gather": _scalar_gather, "rows_sort": _rows_sort, "transposed_cumsum": _transposed_cumsum,
          "groups": _groups, "unstack": _unstack}


@pytest.mark.parametrize("name", list(BODIES))
def test_keras_order_ops_are_exact(kb, name):
    """Float32, an even-by-odd patch, a size that is no multiple of the stride product, a batch of 2; tiled too."""
    net = _net(BODIES[name])
    images = _images()
    reference = kb.FDFE.dense_reference(net, images, (10, 11))
    ci = kb.FDFE.convert(net, (10, 11))
    assert max_rel_error(ci(images), reference) <= TOL["float32"]
    ci = kb.FDFE.convert(net, (10, 11), tile=(5, 6))
    assert max_rel_error(ci(images), reference) <= TOL["float32"]


@pytest.mark.parametrize("name", ["cumulative", "sorts", "median_quantile", "groups"])
def test_keras_order_ops_in_float64_and_at_a_step(kb, name):
    net = _net(BODIES[name], (11, 11), seed=1, dtype="float64")
    images = _images(1, 12, 9, seed=2, dtype="float64")
    ci = kb.FDFE.convert(net, 11)
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 11)) <= TOL["float64"]
    ci = kb.FDFE.convert(net, 11, output_stride=(2, 3))
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 11, output_stride=(2, 3))) \
        <= TOL["float64"]


def test_keras_order_ops_give_cps_gradients(kb):
    """Gradients with respect to the images and every weight equal Cp's on every patch (float64, GradientTape)."""
    import tensorflow as tf
    from test_training import _compare, keras_gradients
    for name in ("cumulative", "sorts", "median_quantile", "groups"):
        net = _net(BODIES[name], (10, 10), seed=3, dtype="float64")
        images = tf.constant(_images(2, 11, 9, seed=4, dtype="float64"))
        weights = tf.constant(np.random.default_rng(5).standard_normal((2, 11, 9, 5)))
        ci = kb.FDFE.convert(net, 10)
        _compare(keras_gradients(kb, net, images, 10, weights, ci=ci), keras_gradients(kb, net, images, 10, weights),
                 name)


def test_keras_order_ops_save_load_and_export(kb, tmp_path):
    """A CI that sorts, takes the top k and accumulates the channels, saved as .keras and loaded, and exported
    (ci.export, loaded with tf.saved_model.load), is exact at image sizes it was not traced for."""
    import keras
    import tensorflow as tf
    net = _net(lambda x: _sorts(x) + _cumulative(x)[..., :8], (10, 10), seed=6)
    ci = kb.FDFE.convert(net, 10)
    ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"))
    ci.export(str(tmp_path / "exported"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    for n, h, w in [(1, 17, 9), (3, 8, 15)]:
        images = _images(n, h, w, seed=h)
        reference = kb.FDFE.dense_reference(net, images, 10)
        assert max_rel_error(loaded(images), reference) <= TOL["float32"], (n, h, w)
        assert max_rel_error(served.serve(tf.constant(images)), reference) <= TOL["float32"], (n, h, w)


REFUSALS = {
    "cumsum along positions": (lambda x: _ops()[0].cumsum(x, axis=1), "Cumsum.*axis 1 of a 4x4x8 map, which mixes "
                                                                      "positions"),
    "top_k of a transposed map": (lambda x: _ops()[0].transpose(_ops()[0].top_k(_ops()[0].transpose(x, (0, 3, 1, 2)),
                                                                                 4)[0], (0, 2, 3, 1)),
                                  "TopKV2.*transposed map"),
    "top_k along a position axis of groups": (
        lambda x: _ops()[0].reshape(_ops()[0].top_k(_ops()[0].reshape(x, (-1, 4, 2, 4, 4)), 4)[0], (-1, 4, 4, 8)),
        "TopKV2.*mixes positions of the patch"),
    "unstack along positions": (lambda x: _ops()[0].stack(_ops()[0].unstack(x, axis=2), axis=-1)[..., 0],
                                "Unpack.*along axis 2, which mixes positions of the patch"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_keras_order_ops_along_positions_are_refused(kb, name):
    body, message = REFUSALS[name]
    with pytest.raises(kb.FDFE.ConversionError, match=message):
        kb.FDFE.convert(_net(body, (10, 10)), 10)


def test_keras_order_ops_are_listed(kb):
    listed = {name for names in kb.FDFE.supported_layers().values() for name in names}
    assert {f"tf.raw_ops.{op}" for op in ("Cumsum", "Cumprod", "CumulativeLogsumexp", "TopKV2", "Unpack")} <= listed
