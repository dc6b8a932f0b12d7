"""Keras: the layers, preprocessing and idioms of keras.applications' trunks.  Layers that keras.applications
defines itself (ConvNeXt's LayerScale and StochasticDepth, InceptionResNetV2's CustomScaleLayer) are traced
through like the user's own layers; preprocess_input in "caffe" mode stacks channel slices; padding="same" that
pads nothing at Cp's sizes is the "valid" layer; Normalization statistics set without finalize_state(); the
wording of refusals; output_stride with branches cropped differently before a strided layer.  CI must equal Cp
on every patch (dense_reference), or be refused with a message naming the problem."""

import numpy as np
import pytest

from conftest import TOL, max_rel_error


def _images(channels, seed=0, shape=(2, 37, 29), scale=1.0):
    """Images whose size is no multiple of the stride products."""
    return (np.random.default_rng(seed).standard_normal(shape + (channels,)) * scale).astype("float32")


def _assert_exact(kb, cp, patch, images, **options):
    """CI of ``cp`` equals Cp on every patch of ``images``; returns CI."""
    ci = kb.FDFE.convert(cp, patch, **options)
    stride = options.get("output_stride", 1)
    error = max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, patch, output_stride=stride))
    assert error <= TOL["float32"], (options, error)
    return ci


# --- 1. layers that keras.applications defines: traced through, not refused as unknown kinds ---------------------

def test_keras_applications_layers_are_traced_through(kb):
    """ConvNeXt's LayerScale (x * gamma per channel) and StochasticDepth (the identity at inference) and
    InceptionResNetV2's CustomScaleLayer (a + b * scale) live in keras.src.applications; they were refused as
    "unknown layer kind" (every class whose module starts with "keras." counted as a layer of Keras' library),
    though a copy of the same class in user code converts.  Their ops are read like a user layer's: exact, the
    gamma followed after training, and a changed setting refused where CI runs, as for a user's layer."""
    import keras
    from keras.src.applications.convnext import LayerScale, StochasticDepth
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 4, strides=4)(inp)
    y = LayerScale(0.5, 8)(L.Conv2D(8, 1)(x))
    x = L.Add()([x, StochasticDepth(0.1)(y)])
    scale = CustomScaleLayer(0.17)
    x = scale([x, L.Conv2D(8, 1, activation="relu")(x)])
    cp = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    images = _images(3)
    ci = _assert_exact(kb, cp, 12, images)
    ci = _assert_exact(kb, cp, 12, images, output_stride=2)
    layer_scale = next(layer for layer in cp.layers if isinstance(layer, LayerScale))
    layer_scale.gamma.assign(np.linspace(-1, 2, 8).astype("float32"))  # trained: CI follows the variable
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 12, output_stride=2)) <= TOL["float32"]
    scale.scale = 0.5
    with pytest.raises(ValueError, match=r"layer 'custom_scale_layer[_0-9]*' changed its scale from 0\.17 to 0\.5"):
        ci(images)


def test_keras_library_layers_without_a_rule_are_refused_once_briefly(kb):
    """Layers of Keras' layer library without a rule stay leaves refused by kind (Masking, an LSTM), each in one
    short line that points to FDFE.supported_layers() (each
    refusal appended the whole list of supported kinds, about 4.8k characters: 16k for ConvNeXt's first stage).
    (UpSampling2D and Conv2DTranspose, once examples of these, are refused by name: test_errors.)"""
    import keras
    L = keras.layers
    inp = keras.Input((6, 6, 1))
    x = L.Masking(0.0)(L.Conv2D(2, 3)(inp))
    cp = keras.Model(inp, L.LSTM(3)(L.Reshape((16, 2))(x)))
    with pytest.raises(kb.FDFE.ConversionError) as info:
        kb.FDFE.convert(cp, 6)
    message = str(info.value)
    for kind in ("Masking", "LSTM"):
        assert f"({kind}) is not supported by convert() (unknown layer kind)" in message, message
    assert "FDFE.supported_layers()" in message and len(message) < 1000, (len(message), message)
    one = keras.Sequential([keras.Input((3, 3, 1)), L.Masking(0.0), L.Flatten()])
    with pytest.raises(kb.FDFE.ConversionError, match=r"^layer 'masking[_0-9]*' \(Masking\) is not "
                                                      r"supported by convert\(\) \(unknown layer kind\): no rule "
                                                      r"makes it dense\. FDFE\.supported_layers\(\)") as info:
        kb.FDFE.convert(one, 3)
    assert len(str(info.value)) < 300, str(info.value)


# --- 2. keras.ops.stack of one-channel values along the channel axis ----------------------------------------------

@pytest.mark.parametrize("app", ["resnet50", "vgg16"])
def test_preprocess_input_caffe_mode_in_a_lambda(kb, app):
    """keras.applications' preprocess_input in "caffe" mode (ResNet50, VGG16, VGG19) turns RGB into BGR with
    keras.ops.stack([x[..., 2], x[..., 1], x[..., 0]], axis=-1) (a Pack op, refused as unknown), then subtracts the
    ImageNet mean: per pixel, a concatenation of one-channel maps.  Exact on 0..255 pixels, also at a step."""
    import importlib
    import keras
    L = keras.layers
    preprocess = importlib.import_module(f"keras.applications.{app}").preprocess_input
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, strides=2)(L.Lambda(preprocess)(inp))
    cp = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(0).uniform(0, 255, (2, 23, 17, 3)).astype("float32")
    _assert_exact(kb, cp, 10, images)
    _assert_exact(kb, cp, (10, 11), images, output_stride=2)


def test_stack_of_one_channel_values(kb):
    """Stacks along a new last axis of one-channel values of a map after a strided layer (a channel slice, a
    reduction over the channels, an element-wise op of one) and of vectors of one position, in a subclassed Cp:
    exact.  Stacks along other axes, or of vectors of several channels, are refused with the reason; stacks of maps
    along a new last axis (maps with their channels split into groups) are exact."""
    import keras
    L, ops = keras.layers, keras.ops

    class Stacked(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.head = L.Conv2D(4, 3), L.MaxPooling2D(2), L.Dense(3)

        def call(self, x):
            y = self.pool(self.conv(x))
            y = ops.stack([y[..., 3], ops.max(y, axis=-1), ops.tanh(y[..., 0]) * 2.0], axis=-1)
            v = ops.mean(y, axis=(1, 2))
            v = ops.stack([ops.sum(v, axis=-1), v[:, 1]], axis=-1)
            return self.head(v)
    keras.utils.set_random_seed(0)
    cp = Stacked()
    cp(np.zeros((1, 12, 12, 2), "float32"))
    images = _images(2, shape=(2, 23, 19))
    _assert_exact(kb, cp, 12, images)
    _assert_exact(kb, cp, 12, images, output_stride=2)

    class Streams(keras.Model):  # one number per patch from streams that pool differently, and a stack of one
        def __init__(self):  # value (it crashed inside FDFE; the streams were refused)
            super().__init__()
            self.a, self.b, self.head = L.Conv2D(4, 3, strides=2), L.Conv2D(4, 3), L.Dense(3)

        def call(self, x):
            va, vb = ops.mean(self.a(x), axis=(1, 2)), ops.max(self.b(x), axis=(1, 2))
            one = ops.mean(ops.stack([self.b(x)[..., 0]], axis=-1), axis=(1, 2))
            return self.head(ops.concatenate([ops.stack([va[:, 0], vb[:, 1]], axis=-1), one], -1))
    cp = Streams()
    cp(np.zeros((1, 9, 9, 2), "float32"))
    _assert_exact(kb, cp, 9, images)
    _assert_exact(kb, cp, 9, images, output_stride=2)
    for stack, reason in [(lambda y: ops.stack([y[..., 0], y[..., 1]], axis=1),
                           r"stacks 2 values of shape \(2, 4, 4\) along axis 1 of its \(2, 2, 4, 4\) result, which "
                           r"puts them between positions of the patch"),
                          (lambda y: ops.stack([ops.mean(y, axis=(1, 2)), ops.max(y, axis=(1, 2))], axis=-1),
                           r"stacks a flattened 1x1x4 map \(shape \(2, 4\)\)"),
                          (lambda y: ops.stack([y[..., 0], ops.zeros_like(y[..., 0])], axis=-1),
                           r"stacks a constant with values computed from the patch")]:
        inp = keras.Input((6, 6, 1))
        refused = keras.Model(inp, L.Flatten()(L.Lambda(stack)(L.Conv2D(4, 3)(inp))))
        with pytest.raises(kb.FDFE.ConversionError, match=r"\(Pack, created at test_keras_applications\.py:\d+\) "
                                                          r"cannot be made dense exactly: it " + reason):
            kb.FDFE.convert(refused, 6)
    inp = keras.Input((6, 6, 1))  # maps stacked along a new last axis: a map with its channels split into groups
    stacked = keras.Model(inp, L.Flatten()(L.Lambda(lambda y: ops.stack([y, y * 2.0], axis=-1))(L.Conv2D(4, 3)(inp))))
    _assert_exact(kb, stacked, 6, _images(1, shape=(2, 11, 9)))


# --- 3. padding="same" that pads nothing at Cp's sizes ----------------------------------------------------------

def _same_net(padding, patch=16):
    """A ConvNeXt-like patchify stem (4x4 at stride 4, LayerNormalization) and strided 2x2 convolutions of each kind
    at stride 2, all with ``padding``, on even maps; ZeroPadding2D(0) and tf.pad of nothing between."""
    import keras
    import tensorflow as tf
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((patch, patch, 3))
    x = L.LayerNormalization(epsilon=1e-6)(L.Conv2D(8, 4, strides=4, padding=padding)(inp))
    x = L.ZeroPadding2D(0)(x)
    a = L.Conv2D(4, 2, strides=2, padding=padding)(x)
    b = L.DepthwiseConv2D(2, strides=2, padding=padding, depth_multiplier=2)(x)
    c = L.SeparableConv2D(4, 2, strides=2, padding=padding)(L.Lambda(lambda t: tf.pad(t, [[0, 0]] * 4))(x))
    x = L.Concatenate()([a, b, c])
    return keras.Model(inp, L.Dense(5)(L.Flatten()(x)))


def test_same_padding_that_pads_nothing_is_valid(kb, tmp_path):
    """padding="same" of convolutions whose windows end inside the map at Cp's sizes (4x4 at stride 4 on a 16x16
    patch, 2x2 at stride 2 on the 4x4 map) pads nothing: Cp computes what the "valid" layers compute, and CI must
    compute it with valid convolutions on whole images (the layer itself would pad the dense map).  They were
    refused with "it pads its input"; ZeroPadding2D(0) and tf.pad of nothing too.  Exact, at a step, naive, and
    loaded from a .keras file; where the windows overhang (a 15x15 patch) it still pads: refused."""
    import keras
    same, valid = _same_net("same"), _same_net("valid")
    patches = _images(3, shape=(4, 16, 16))
    assert np.array_equal(np.asarray(same(patches)), np.asarray(valid(patches)))  # the same net for Cp
    images = _images(3)
    ci = _assert_exact(kb, same, 16, images)
    _assert_exact(kb, same, 16, images, output_stride=4)
    _assert_exact(kb, same, 16, images, output_stride=2, naive=True)
    valid_ci = kb.FDFE.convert(valid, 16)
    assert np.array_equal(np.asarray(ci(images)), np.asarray(valid_ci(images)))
    configs = [layer.get_config() for layer in valid_ci._flatten_layers() if isinstance(layer, kb.FDFE.multiConv)]
    assert configs and not any("input_size" in c for c in configs)  # (a CI of valid layers saves what it saved)
    ci.save(tmp_path / "ci.keras")
    loaded = keras.models.load_model(tmp_path / "ci.keras")
    assert max_rel_error(loaded(images), ci(images)) == 0
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(Conv2D\) cannot be made dense exactly: it pads its input "
                                                      r"\(padding='same'\)"):
        kb.FDFE.convert(_same_net("same", 15), 15)
    one = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, strides=2, padding="same"),
                            keras.layers.Flatten()])  # 3x3 windows at stride 2 of 8: the last one overhangs
    with pytest.raises(kb.FDFE.ConversionError, match=r"it pads its input \(padding='same'\)"):
        kb.FDFE.convert(one, 8)


# --- 4. Normalization statistics set without finalize_state() -------------------------------------------------------

def _normalized_net():
    """EfficientNet's include_preprocessing: Rescaling, then a Normalization whose statistics are variables (no mean
    and variance given), then a strided convolution."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = L.Normalization(axis=-1)(L.Rescaling(1.0 / 255.0)(inp))
    x = L.Conv2D(4, 3, strides=2)(x)
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def test_normalization_statistics_set_without_finalize_state(kb):
    """Keras' Normalization normalises with a copy of its statistics that finalize_state() makes (adapt(), building
    and loading call it); set_weights() or assign() change the variables, which CI reads, but not that copy, so Cp
    keeps computing with the old statistics.  convert failed with "internal check failed ... please report it", and
    set after convert CI silently differed from Cp by 1.3.  Refused instead, at convert and where CI runs, naming
    the layer and finalize_state(), which makes Cp compute with the statistics it holds (as the same Cp saved and
    loaded does); CI then follows them without converting again."""
    cp = _normalized_net()
    norm = cp.layers[2]
    stats = [np.array([0.5, 0.2, 0.7], "float32"), np.array([0.04, 0.25, 0.09], "float32"), np.array(0)]
    images = np.random.default_rng(0).uniform(0, 255, (2, 23, 17, 3)).astype("float32")
    norm.set_weights(stats)
    with pytest.raises(kb.FDFE.ConversionError, match=r"^layer 'normalization[_0-9]*' \(Normalization\) cannot be "
                                                      r"made dense exactly: Cp does not compute with the statistics "
                                                      r"it holds: .*set_weights\(\) or assign\(\).*call "
                                                      r"finalize_state\(\) on layer 'normalization[_0-9]*'"):
        kb.FDFE.convert(cp, 8)
    norm.finalize_state()
    ci = _assert_exact(kb, cp, 8, images)

    norm.adapt_variance.assign(np.array([1.0, 4.0, 0.25], "float32"))  # after convert
    for run in (lambda: ci(images), lambda: ci.predict(images, verbose=0)):
        with pytest.raises(ValueError, match=r"Cp changed after convert: layer 'normalization[_0-9]*' "
                                             r"\(Normalization\) no longer computes with the statistics it holds, "
                                             r"which CI reads: its statistics variables \(variance: .*call "
                                             r"finalize_state\(\) on layer"):
            run()
    norm.finalize_state()
    assert max_rel_error(ci(images), kb.FDFE.dense_reference(cp, images, 8)) <= TOL["float32"]
    norm.adapt(images[:, :8, :8] / 255.0)  # (adapt() finalizes: followed)
    assert max_rel_error(ci.predict(images, verbose=0), kb.FDFE.dense_reference(cp, images, 8)) <= TOL["float32"]


# --- 5. what the refusals of padded pooling and of a too small patch say ------------------------------------------

def test_padded_pooling_refusal_says_what_is_true(kb):
    """TensorFlow's max and average pooling ignore padded cells: a padded window at the patch border pools fewer
    pixels than the same window of a whole image.  The refusal said the border "sees zeros"."""
    import keras
    import tensorflow as tf
    L = keras.layers
    for pool, kind, padding in [(L.MaxPooling2D(3, strides=2, padding="same"), "max", "same"),
                                (L.AveragePooling2D(2, padding="same"), "average", "same"),
                                (L.Lambda(lambda t: tf.nn.max_pool2d(t, 3, 1, "SAME")), "max", "SAME")]:
        cp = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 2), pool, L.Flatten()])
        with pytest.raises(kb.FDFE.ConversionError) as info:
            kb.FDFE.convert(cp, 6)
        message = str(info.value)
        assert f"pads its input (padding='{padding}'); inside Cp the windows that overhang the patch border pool " \
               f"only the pixels inside the patch ({kind} pooling ignores the padded cells" in message, message
        assert "the padded windows at the patch border differ from the dense image's" in message, message
        assert "zeros" not in message, message


def test_too_small_patch_is_named(kb):
    """A patch too small for Cp's layers surfaced Keras' own shape error ("Computed output size would be negative",
    or "Negative dimension size" when Cp runs eagerly on the empty map but cannot be traced) with no hint; convert
    now tries Cp on larger patches and says the patch is too small.  A failure that larger patches share keeps the
    general hint.  An unbuilt Sequential stays usable after a wrong patch."""
    import keras
    L = keras.layers
    convs = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(4, 3), L.Conv2D(4, 3), L.Conv2D(4, 3),
                              L.GlobalAveragePooling2D()])
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)running Cp on a batch of 5x5x3 patches failed: .* the "
                                                      r"patch 5x5 may be smaller \(or larger\) than the net needs: it "
                                                      r"is likely too small, since Cp runs on 10x10 patches .*pass the "
                                                      r"patch_size Cp was trained on"):
        kb.FDFE.convert(convs, 5)
    pooled = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(4, 3), L.MaxPooling2D(2), L.Conv2D(4, 3),
                               L.GlobalAveragePooling2D()])  # (eagerly, the last convolution gives an empty map)
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)cannot be traced into a TensorFlow graph .*-- the patch "
                                                      r"6x6 is likely too small, since Cp can be traced on 12x12 "
                                                      r"patches"):
        kb.FDFE.convert(pooled, 6)

    class FixedSize(keras.Model):  # a Dense built for 7x7 maps fails on every other size
        def __init__(self):
            super().__init__()
            self.conv, self.head = L.Conv2D(2, 3), L.Dense(3)

        def call(self, x):
            return self.head(keras.ops.reshape(self.conv(x), (-1, 50)))
    fixed = FixedSize()
    fixed(np.zeros((1, 7, 7, 1), "float32"))
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)the patch 5x5 may be smaller \(or larger\) than the net "
                                                      r"needs; check patch_size against the size Cp was trained on$"):
        kb.FDFE.convert(fixed, 5, in_channels=1)

    class Unbuilt(keras.Model):  # never called: larger patches would build its Dense for their size and break Cp
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = L.Conv2D(4, 5), L.Conv2D(4, 5), L.Dense(3)

        def call(self, x):
            return self.head(L.Flatten()(self.b(self.a(x))))
    unbuilt = Unbuilt()
    with pytest.raises(kb.FDFE.ConversionError, match=r"the patch 8x8 may be smaller"):
        kb.FDFE.convert(unbuilt, 8, in_channels=3)  # (a typo: Cp takes 12x12 patches)
    images = np.random.default_rng(0).standard_normal((1, 15, 14, 3)).astype("float32")
    assert max_rel_error(kb.FDFE.convert(unbuilt, 12, in_channels=3)(images),
                         kb.FDFE.dense_reference(unbuilt, images, 12)) <= TOL["float32"]

    class Built(keras.Model):  # in_channels inferred (rightly) from its first Conv2D: the probe ran Cp with them, so
        def __init__(self):    # the message does not point at the channels
            super().__init__()
            self.a, self.b, self.pool = L.Conv2D(3, 3), L.Conv2D(2, 3), L.GlobalAveragePooling2D()

        def call(self, x):
            return self.pool(self.b(L.MaxPooling2D(2)(self.a(x))))
    built = Built()
    built(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(kb.FDFE.ConversionError, match=r"likely too small, since Cp runs on 8x8 patches") as refused:
        kb.FDFE.convert(built, 4)
    assert "in_channels" not in str(refused.value), str(refused.value)

    # an unbuilt Sequential (no keras.Input): Keras built it for the too-small patch, batch included, and kept that
    # input, so convert with the right patch failed too ("already configured to use input shape (2, 6, 6, 3)"), as
    # did every later call of Cp; now its input is undone, and a copy of it is probed on larger patches
    sequential = keras.Sequential([L.Conv2D(4, 3), L.MaxPooling2D(2), L.Conv2D(8, 3), L.Flatten(), L.Dense(5)])
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)running Cp on a batch of 6x6x3 patches failed: .*Computed "
                                                      r"output size would be zero or negative.* it is likely too "
                                                      r"small, since Cp runs on 12x12 patches"):
        kb.FDFE.convert(sequential, 6, in_channels=3)
    images = np.random.default_rng(1).standard_normal((2, 15, 14, 3)).astype("float32")
    assert max_rel_error(kb.FDFE.convert(sequential, 12, in_channels=3)(images),
                         kb.FDFE.dense_reference(sequential, images, 12)) <= TOL["float32"]
    assert tuple(sequential(images[:, :12, :12]).shape) == (2, 5)


# --- 6. output_stride with branches cropped differently before strided layers ----------------------------------------

def test_output_stride_with_branches_cropped_before_strided_layers(kb):
    """A shortcut cropped by one pixel before its strided layer and cropped to the main branch's size after it
    (16x16 patch: main 3x3 at stride 2 gives 7x7 of a 14x14 stride-1 map; the shortcut's 1x1 window at stride 2 gives
    8x8 of 15x15, cropped to 7x7).  With an output_stride that skips their shifts, CI ran them as ordinary strided
    layers, which give ceil(L / s) positions where multipooling's shift (0, 0) gives L // s (L: the stride-1 size):
    the branches met with different sizes (InvalidArgumentError in Add).  Each kind of strided layer
    (Conv2D, DepthwiseConv2D, pooling) in the shortcut; exact at every step."""
    import keras
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(4, 1)(inp)
    branches = [L.Conv2D(4, 3, strides=2)(x)]
    for strided in (L.Conv2D(4, 1, strides=2), L.DepthwiseConv2D(1, strides=2), L.MaxPooling2D(1, strides=2)):
        branches.append(L.Cropping2D(((0, 1), (0, 1)))(strided(L.Cropping2D(((1, 0), (1, 0)))(x))))
    cp = keras.Model(inp, L.Dense(5)(L.Flatten()(L.Add()(branches))))
    images = _images(3)
    for step in (2, 4, (2, 4), 3):
        _assert_exact(kb, cp, 16, images, output_stride=step)
    _assert_exact(kb, cp, 16, images, output_stride=2, naive=True, tile=(9, 11))
