"""BaseNet: the example patch network Cp of the original port (PyTorch).

15x15 one-channel patches -> 113-vector:

    conv 3x3 1->8, ReLU, max-pool sL1, conv 3x3 8->16, ReLU, max-pool sL2,
    conv 2x2 16->128, ReLU, conv 1x1 128->113

The weights are the ones the original port used (torch.manual_seed(10), PyTorch's
default initialisation), stored once for both backends in ``weights/basenet.npz``
(made by ``weights/make_weights.py``, read with numpy, no pickle).  The file holds
PyTorch's layout:

    convN.weight  (out, in, kH, kW)   "OIHW"
    convN.bias    (out,)

The Keras backend reads the same file and transposes each kernel to (kH, kW, in, out),
"HWIO": ``kernel = weight.transpose(2, 3, 1, 0)``.

To use your own Cp, replace this class (any nn.Module works with FDFE.convert), or
keep the structure and adapt SlimNet.py by hand.
"""

import os
import zipfile

import numpy as np
import torch
import torch.nn as nn

WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "weights", "basenet.npz")

#: name -> shape in PyTorch's layout (OIHW for kernels)
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


class BaseNet(nn.Module):
    """The example Cp.  Pooling strides sL1, sL2 (kernel = stride) as in the original port.

    Args:
        sL1, sL2: strides of the two max-pooling layers.
        weights: path of an .npz file (see :func:`load_weights`), or None to keep PyTorch's
            default random initialisation.

    Shape:
        (B, 1, pH, pW) -> (B, 113, 1, 1) for the patch sizes the net reduces to one pixel
        (14 to 17 with sL1 = sL2 = 2).
    """

    def __init__(self, sL1: int = 2, sL2: int = 2, weights=WEIGHTS_FILE):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(sL1, sL1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(sL2, sL2)
        self.conv3 = nn.Conv2d(16, 128, kernel_size=2)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(128, 113, kernel_size=1)
        if weights is not None:
            arrays = load_weights(weights)
            self.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()})

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)
