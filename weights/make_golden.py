"""Write weights/golden.npz: fixed inputs and CI's float64 outputs, agreed on by both backends.

A machine with only one framework (the GPU machine has PyTorch but no TensorFlow) compares its
CI with these outputs, so it still cross-checks against the other framework.  Every output is
computed by PyTorch's CI in float64 and written only if TensorFlow's CI and Cp on every patch
(dense_reference) agree with it to 1e-12.  Layout: images and outputs (N, H, W, C) / (N, H, W, K).

    python weights/make_golden.py              # writes weights/golden.npz
    python weights/make_golden.py OUT.npz      # writes OUT.npz instead
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))

from backends import load_backend  # noqa: E402  (loads both backends under distinct names)
import netspec  # noqa: E402

#: a second net that exercises what BaseNet does not: 3 channels, a strided convolution, average
#: and power-average pooling with kernel != stride, batch normalisation, an MLP head.
MIXED = [{"type": "conv", "out": 6, "k": 3, "stride": 2}, {"type": "bn"}, {"type": "act", "fn": "tanh"},
         {"type": "pool", "kind": "avg", "k": 3, "stride": 2}, {"type": "conv", "out": 5, "k": 2},
         {"type": "act", "fn": "sigmoid"}, {"type": "pool", "kind": "lp", "k": 2, "stride": 3, "p": 2.0},
         {"type": "flatten"}, {"type": "linear", "out": 8}, {"type": "act", "fn": "relu"},
         {"type": "linear", "out": 4}]
MIXED_PATCH, MIXED_CHANNELS = (21, 22), 3


def _agree(a, b, what):
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= 1e-12, f"{what}: {err}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=os.path.join(HERE, "golden.npz"),
                   help="the .npz file to write (default: %(default)s)")
    path = p.parse_args(argv).out
    import tensorflow as tf
    import torch
    tb, kb = load_backend("pytorch", "torch"), load_backend("tensorflow", "tf")
    rng = np.random.default_rng(2017)
    arrays = {}

    image = rng.standard_normal((1, 19, 23, 1))
    t_net = tb.BaseNet.BaseNet().double()
    t_img = torch.from_numpy(image.transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = tb.FDFE.convert(t_net, 15)(t_img).numpy().transpose(0, 2, 3, 1)
    _agree(tb.FDFE.dense_reference(t_net, t_img, 15).numpy().transpose(0, 2, 3, 1), out, "basenet Cp")
    _agree(kb.FDFE.convert(kb.BaseNet.BaseNet(dtype="float64"), 15)(tf.constant(image)).numpy(), out,
           "basenet Keras")
    arrays.update({"basenet/image": image, "basenet/output": out, "basenet/patch": np.array([15, 15])})

    weights = netspec.make_weights(MIXED, MIXED_CHANNELS, MIXED_PATCH, seed=7)
    image = rng.standard_normal((2, 9, 13, MIXED_CHANNELS))
    t_net = netspec.build_torch(MIXED, MIXED_CHANNELS, MIXED_PATCH, weights)
    t_img = torch.from_numpy(image.transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = tb.FDFE.convert(t_net, MIXED_PATCH)(t_img).numpy().transpose(0, 2, 3, 1)
    _agree(tb.FDFE.dense_reference(t_net, t_img, MIXED_PATCH).numpy().transpose(0, 2, 3, 1), out, "mixed Cp")
    k_net = netspec.build_keras(MIXED, MIXED_CHANNELS, MIXED_PATCH, weights, kb.FDFE)
    _agree(kb.FDFE.convert(k_net, MIXED_PATCH)(tf.constant(image)).numpy(), out, "mixed Keras")
    arrays.update({"mixed/image": image, "mixed/output": out, "mixed/patch": np.array(MIXED_PATCH),
                   "mixed/spec": np.array(json.dumps(MIXED)), "mixed/channels": np.array(MIXED_CHANNELS)})
    arrays.update({f"mixed/w/{k}": v for k, v in weights.items()})

    np.savez(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


if __name__ == "__main__":
    main()
