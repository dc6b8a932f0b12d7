"""Both backends against golden outputs (weights/golden.npz, made by weights/make_golden.py from a float64
run that both frameworks agreed on): a machine with one framework still cross-checks the other, and
CUDA / TensorFlow GPUs are checked against outputs computed on the CPU."""

import json
import os

import numpy as np
import pytest

import netspec
from conftest import TOL, WEIGHTS_DIR, max_rel_error


@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(WEIGHTS_DIR, "golden.npz"), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _mixed(golden):
    spec = json.loads(str(golden["mixed/spec"]))
    weights = {k[len("mixed/w/"):]: v for k, v in golden.items() if k.startswith("mixed/w/")}
    return spec, int(golden["mixed/channels"]), tuple(int(p) for p in golden["mixed/patch"]), weights


def _dtypes(device):
    return ["float32", "float64"] + (["float16"] if device in ("cuda", "gpu") else [])


def test_torch_against_golden(tb, golden, torch_device):
    import torch
    for dtype in _dtypes(torch_device):
        tdt = getattr(torch, dtype)
        base = tb.BaseNet.BaseNet().to(device=torch_device, dtype=tdt)
        image = torch.from_numpy(golden["basenet/image"].transpose(0, 3, 1, 2)).to(device=torch_device, dtype=tdt)
        spec, channels, patch, weights = _mixed(golden)
        mixed = netspec.build_torch(spec, channels, patch, weights, "float64").to(device=torch_device, dtype=tdt)
        mixed_image = torch.from_numpy(golden["mixed/image"].transpose(0, 3, 1, 2)).to(device=torch_device, dtype=tdt)
        with torch.no_grad():
            outputs = {
                "basenet/convert": (tb.FDFE.convert(base, 15)(image), "basenet/output"),
                "basenet/slimnet": (tb.SlimNet.SlimNet(base, 15, 15)(image), "basenet/output"),
                "basenet/naive": (tb.FDFE.convert(base, 15, naive=True)(image), "basenet/output"),
                "mixed/convert": (tb.FDFE.convert(mixed, patch)(mixed_image), "mixed/output"),
            }
        for name, (out, key) in outputs.items():
            got = out.double().cpu().numpy().transpose(0, 2, 3, 1)
            assert max_rel_error(got, golden[key]) <= TOL[dtype], (name, dtype)


def test_keras_against_golden(kb, golden, tf_scope):
    import tensorflow as tf
    for dtype in _dtypes(tf_scope):
        base = kb.BaseNet.BaseNet(dtype=dtype)
        image = tf.constant(golden["basenet/image"], dtype=dtype)
        spec, channels, patch, weights = _mixed(golden)
        mixed = netspec.build_keras(spec, channels, patch, weights, kb.FDFE, dtype)
        outputs = {
            "basenet/convert": (kb.FDFE.convert(base, 15)(image), "basenet/output"),
            "basenet/slimnet": (kb.SlimNet.SlimNet(base, 15, 15)(image), "basenet/output"),
            "mixed/convert": (kb.FDFE.convert(mixed, patch)(tf.constant(golden["mixed/image"], dtype=dtype)),
                              "mixed/output"),
        }
        for name, (out, key) in outputs.items():
            got = tf.cast(out, tf.float64).numpy()
            assert max_rel_error(got, golden[key]) <= TOL[dtype], (name, dtype)


def test_golden_is_not_trivial(golden):
    for key in ("basenet/output", "mixed/output"):
        out = golden[key]
        assert np.all(np.isfinite(out)) and np.std(out) > 1e-3, key
        assert out.shape[:3] == golden[key.replace("output", "image")].shape[:3]
