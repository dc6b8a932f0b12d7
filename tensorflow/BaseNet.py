"""BaseNet: the example patch network Cp of the original port (TensorFlow / Keras).

15x15 one-channel patches -> 113-vector, channels last:

    conv 3x3 1->8, ReLU, max-pool sL1, conv 3x3 8->16, ReLU, max-pool sL2,
    conv 2x2 16->128, ReLU, conv 1x1 128->113

The weights are shared with the PyTorch backend through ``weights/basenet.npz`` (made by
``weights/make_weights.py``, read with numpy, no pickle, by ``weights/basenet_weights.py``,
one loader for both backends).  The file holds PyTorch's layout, so every kernel is
transposed when loaded:

    PyTorch convN.weight (out, in, kH, kW) "OIHW"  ->  Keras kernel (kH, kW, in, out) "HWIO"
        kernel = weight.transpose(2, 3, 1, 0)        (and back: kernel.transpose(3, 2, 0, 1))
    convN.bias (out,) is the same in both.

To use your own Cp, replace this class (any Keras model whose layers are supported works
with FDFE.convert), or keep the structure and adapt SlimNet.py by hand.
"""

import importlib.util
import os
import sys

import keras


def _weights_module():
    """weights/basenet_weights.py (../weights from this file), loaded by its path once per process as module
    "basenet_weights", shared by both backends.  Nothing goes on sys.path: the repository root must never
    come ahead of site-packages."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "weights", "basenet_weights.py"))
    module = sys.modules.get("basenet_weights")
    if module is None or os.path.realpath(getattr(module, "__file__", None) or "") != os.path.realpath(path):
        spec = importlib.util.spec_from_file_location("basenet_weights", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # FileNotFoundError naming the file where weights/ is missing
        sys.modules.setdefault("basenet_weights", module)
    return module


# From weights/basenet_weights.py, one loader for both backends:
#   WEIGHTS_FILE    weights/basenet.npz
#   WEIGHT_SHAPES   name -> shape in PyTorch's layout (OIHW for kernels), as stored in the file
#   load_weights(path=WEIGHTS_FILE) -> {name: array}: checks names, shapes and values (no pickle);
#                   FileNotFoundError where the file is missing, ValueError where it is corrupt or wrong
_weights = _weights_module()
WEIGHTS_FILE = _weights.WEIGHTS_FILE
WEIGHT_SHAPES = _weights.WEIGHT_SHAPES
load_weights = _weights.load_weights


@keras.saving.register_keras_serializable(package="FDFE_examples")
class BaseNet(keras.Model):
    """The example Cp.  Pooling strides sL1, sL2 (kernel = stride) as in the original port.

    Args:
        sL1, sL2: strides of the two max-pooling layers.
        weights: path of an .npz file (see :func:`load_weights`), or None to keep Keras'
            default random initialisation.
        dtype: the layers' dtype ("float32" or "float64").

    Shape:
        (B, pH, pW, 1) -> (B, 1, 1, 113) for the patch sizes the net reduces to one pixel
        (14 to 17 with sL1 = sL2 = 2).
    """

    def __init__(self, sL1: int = 2, sL2: int = 2, weights=WEIGHTS_FILE, dtype="float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        layers = keras.layers
        self.conv1 = layers.Conv2D(8, 3, name="conv1", dtype=dtype)
        self.relu1 = layers.ReLU(name="relu1", dtype=dtype)
        self.pool1 = layers.MaxPooling2D(sL1, sL1, name="pool1", dtype=dtype)
        self.conv2 = layers.Conv2D(16, 3, name="conv2", dtype=dtype)
        self.relu2 = layers.ReLU(name="relu2", dtype=dtype)
        self.pool2 = layers.MaxPooling2D(sL2, sL2, name="pool2", dtype=dtype)
        self.conv3 = layers.Conv2D(128, 2, name="conv3", dtype=dtype)
        self.relu3 = layers.ReLU(name="relu3", dtype=dtype)
        self.conv4 = layers.Conv2D(113, 1, name="conv4", dtype=dtype)
        self.build((None, None, None, 1))
        if weights is not None:
            arrays = load_weights(weights)
            for name in ("conv1", "conv2", "conv3", "conv4"):
                layer = getattr(self, name)
                layer.set_weights([arrays[f"{name}.weight"].transpose(2, 3, 1, 0), arrays[f"{name}.bias"]])

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in (self.conv1, self.pool1, self.conv2, self.pool2, self.conv3, self.conv4):
            layer.build(shape)
            shape = (None, None, None, layer.filters) if hasattr(layer, "filters") else shape
        super().build(input_shape)

    def get_config(self):
        """The structure only: a saved model's weights come from its file (weights=None here)."""
        return {"sL1": int(self.pool1.strides[0]), "sL2": int(self.pool2.strides[0]), "weights": None,
                "dtype": self.dtype_policy.name, "name": self.name}

    def call(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)
