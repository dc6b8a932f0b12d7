"""Write weights/basenet.npz: BaseNet's weights, one framework-neutral file for both backends.

Deterministic: torch.manual_seed(10) and PyTorch's default initialisation, as the original
port did (torch 2.13.0 pinned in requirements.txt).  Arrays are stored in PyTorch's layout
(OIHW kernels), float32, in a plain .npz (no pickle).  Run from anywhere:

    python weights/make_weights.py              # writes weights/basenet.npz
    python weights/make_weights.py OUT.npz      # writes OUT.npz instead
"""

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "pytorch"))

from basenet_weights import WEIGHT_SHAPES, WEIGHTS_FILE  # noqa: E402  (this folder)
from BaseNet import BaseNet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=WEIGHTS_FILE, help="the .npz file to write (default: %(default)s)")
    path = p.parse_args(argv).out
    torch.manual_seed(10)
    net = BaseNet(weights=None)
    arrays = {name: t.detach().numpy().astype(np.float32) for name, t in net.state_dict().items()}
    assert {k: v.shape for k, v in arrays.items()} == WEIGHT_SHAPES
    np.savez(path, **arrays)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
