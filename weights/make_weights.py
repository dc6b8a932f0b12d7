"""Write weights/basenet.npz: BaseNet's weights, one framework-neutral file for both backends.

Deterministic: torch.manual_seed(10) and PyTorch's default initialisation, as the original
port did (torch 2.13.0 pinned in requirements.txt).  Arrays are stored in PyTorch's layout
(OIHW kernels), float32, in a plain .npz (no pickle).  Run from anywhere:

    python weights/make_weights.py
"""

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "pytorch"))

from BaseNet import BaseNet, WEIGHT_SHAPES  # noqa: E402


def main():
    torch.manual_seed(10)
    net = BaseNet(weights=None)
    arrays = {name: t.detach().numpy().astype(np.float32) for name, t in net.state_dict().items()}
    assert {k: v.shape for k, v in arrays.items()} == WEIGHT_SHAPES
    path = os.path.join(HERE, "basenet.npz")
    np.savez(path, **arrays)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
