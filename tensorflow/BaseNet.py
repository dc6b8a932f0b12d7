"""BaseNet: the example patch network Cp of the original port (TensorFlow / Keras).

15x15 one-channel patches -> 113-vector, channels last:

    conv 3x3 1->8, ReLU, max-pool sL1, conv 3x3 8->16, ReLU, max-pool sL2,
    conv 2x2 16->128, ReLU, conv 1x1 128->113

The weights are shared with the PyTorch backend through ``weights/basenet.npz`` (made by
``weights/make_weights.py``, read with numpy, no pickle).  The file holds PyTorch's layout,
so every kernel is transposed when loaded:

    PyTorch convN.weight (out, in, kH, kW) "OIHW"  ->  Keras kernel (kH, kW, in, out) "HWIO"
        kernel = weight.transpose(2, 3, 1, 0)        (and back: kernel.transpose(3, 2, 0, 1))
    convN.bias (out,) is the same in both.

To use your own Cp, replace this class (any Keras model whose layers are supported works
with FDFE.convert), or keep the structure and adapt SlimNet.py by hand.
"""

import os
import zipfile

import numpy as np
import keras

WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "weights", "basenet.npz")

#: name -> shape in PyTorch's layout (OIHW for kernels), as stored in the file
WEIGHT_SHAPES = {
    "conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,),
    "conv2.weight": (16, 8, 3, 3), "conv2.bias": (16,),
    "conv3.weight": (128, 16, 2, 2), "conv3.bias": (128,),
    "conv4.weight": (113, 128, 1, 1), "conv4.bias": (113,),
}


def load_weights(path: str = WEIGHTS_FILE) -> dict:
    """Read BaseNet's weights (OIHW) from an .npz file, checking names, shapes and values.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is corrupt, or does not hold BaseNet's weights.
    """
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BaseNet weights file not found: {path} (make it with "
                                f"'python weights/make_weights.py')")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"BaseNet weights file {path} is corrupt or not an .npz archive: {exc}") from exc
    missing = sorted(set(WEIGHT_SHAPES) - set(arrays))
    extra = sorted(set(arrays) - set(WEIGHT_SHAPES))
    if missing or extra:
        raise ValueError(f"BaseNet weights file {path} does not match BaseNet: missing {missing}, "
                         f"unexpected {extra}")
    for name, shape in WEIGHT_SHAPES.items():
        array = arrays[name]
        if array.shape != shape or array.dtype.kind != "f":
            raise ValueError(f"BaseNet weights file {path} does not match BaseNet: {name} has shape "
                             f"{array.shape} and dtype {array.dtype}, expected {shape} floating point")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"BaseNet weights file {path} is corrupt: {name} holds NaN or infinity")
    return arrays


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

    def call(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)
