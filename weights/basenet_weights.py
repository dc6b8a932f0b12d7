"""BaseNet's weights file, framework-neutral: where it is, what it holds, and a checked loader.

One loader for both backends (pytorch/BaseNet.py and tensorflow/BaseNet.py load this file by its
path and re-export these names) and for weights/make_weights.py.  numpy and the standard library only.

The file ``weights/basenet.npz`` holds PyTorch's layout, float32, in a plain .npz (no pickle):

    convN.weight  (out, in, kH, kW)   "OIHW"
    convN.bias    (out,)
"""

import os
import zipfile

import numpy as np

WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "basenet.npz")

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
