"""The stereo example's patch network Cp in TensorFlow / Keras (channels last), and its dense form CI.

The same network as stereo_torch.py, with the same weights file (weights/stereo.npz, PyTorch's
layout: every kernel is transposed when loaded, OIHW -> HWIO):

    conv 3x3 1->32, ReLU, conv 3x3 32->32, ReLU, max-pool 2x2 (stride 2),
    conv 3x3 32->32, ReLU, conv 3x3 32->32, ReLU, conv 3x3 32->32, flatten, L2 normalisation
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)  # stereo_matching (appended: never ahead of site-packages)
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # backends: loads tensorflow/FDFE.py by its path

import stereo_matching as sm  # noqa: E402
from backends import load_backend  # noqa: E402

FDFE = load_backend("tensorflow", "tf").FDFE


class StereoPatchNet(keras.Model):
    """Cp: (B, 18, 18, 1) -> (B, 32) unit descriptors."""

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        layers = keras.layers
        for name, (out, _, kh, kw) in sm.CONV_SHAPES.items():
            setattr(self, name, layers.Conv2D(out, (kh, kw), name=name))
        self.relu = [layers.ReLU(name=f"relu{i}") for i in range(1, 5)]
        self.pool = layers.MaxPooling2D(2, 2, name="pool")
        self.flatten = layers.Flatten(name="flatten")
        self.unit = layers.UnitNormalization(axis=-1, name="unit")
        self(np.zeros((1,) + sm.PATCH + (1,), np.float32))  # creates the weights
        if weights is not None:
            self.load_arrays(weights)

    def call(self, x):
        x = self.relu[0](self.conv1(x))
        x = self.relu[1](self.conv2(x))
        x = self.pool(x)
        x = self.relu[2](self.conv3(x))
        x = self.relu[3](self.conv4(x))
        x = self.conv5(x)
        return self.unit(self.flatten(x))

    def load_arrays(self, arrays):
        """Set the kernels (transposed from the file's OIHW to Keras' HWIO) and biases."""
        for name in sm.CONV_SHAPES:
            getattr(self, name).set_weights([arrays[f"{name}.weight"].transpose(2, 3, 1, 0),
                                             arrays[f"{name}.bias"]])
        return self


def load(path=sm.WEIGHTS_FILE):
    """(Cp with the weights of ``path``, the weights dict)."""
    weights = sm.load_weights(path)
    return StereoPatchNet(weights), weights


def dense(ci, images):
    """CI on a list of normalised grey (H, W) arrays: a list of (K, H, W) float32 numpy descriptors
    (CI gives (N, H, W, K); transposed to the layout stereo_matching expects)."""
    out = np.asarray(ci(np.stack(images)[..., None]))
    return [np.ascontiguousarray(o.transpose(2, 0, 1)) for o in out]
