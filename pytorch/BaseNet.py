"""BaseNet: the example patch network Cp of the original port (PyTorch).

15x15 one-channel patches -> 113-vector:

    conv 3x3 1->8, ReLU, max-pool sL1, conv 3x3 8->16, ReLU, max-pool sL2,
    conv 2x2 16->128, ReLU, conv 1x1 128->113

The weights are the ones the original port used (torch.manual_seed(10), PyTorch's
default initialisation), stored once for both backends in ``weights/basenet.npz``
(made by ``weights/make_weights.py``, read with numpy, no pickle, by
``weights/basenet_weights.py``, one loader for both backends).  The file holds
PyTorch's layout:

    convN.weight  (out, in, kH, kW)   "OIHW"
    convN.bias    (out,)

The Keras backend reads the same file and transposes each kernel to (kH, kW, in, out),
"HWIO": ``kernel = weight.transpose(2, 3, 1, 0)``.

To use your own Cp, replace this class (any nn.Module works with FDFE.convert), or
keep the structure and adapt SlimNet.py by hand.
"""

import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn as nn


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
