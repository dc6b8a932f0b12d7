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
    """Layers of Keras' layer library without a rule stay leaves refused by kind (UpSampling2D, Conv2DTranspose,
    an LSTM), and the supported kinds are listed once, at the end of the message (each refusal appended the whole
    list, about 4.8k characters: 16k for ConvNeXt's first stage)."""
    import keras
    L = keras.layers
    inp = keras.Input((6, 6, 1))
    x = L.Conv2DTranspose(2, 1)(L.UpSampling2D(1)(L.Conv2D(3, 3)(inp)))
    cp = keras.Model(inp, L.LSTM(3)(L.Reshape((16, 2))(x)))
    with pytest.raises(kb.FDFE.ConversionError) as info:
        kb.FDFE.convert(cp, 6)
    message = str(info.value)
    for kind in ("UpSampling2D", "Conv2DTranspose", "LSTM"):
        assert f"({kind}) is not supported by convert() (unknown layer kind)" in message, message
    assert message.count("Supported kinds -- ") == 1 and message.count(" Conv2D,") == 1, message
    assert "FDFE.supported_layers()" in message and len(message) < 2000, (len(message), message)
    one = keras.Sequential([keras.Input((3, 3, 1)), L.UpSampling2D(1), L.Flatten()])
    with pytest.raises(kb.FDFE.ConversionError, match=r"^layer 'up_sampling2d[_0-9]*' \(UpSampling2D\) is not "
                                                      r"supported by convert\(\) \(unknown layer kind\)\. Supported "
                                                      r"kinds -- Keras layers: .*Conv2D") as info:
        kb.FDFE.convert(one, 3)
    assert len(str(info.value)) < 1500, str(info.value)
