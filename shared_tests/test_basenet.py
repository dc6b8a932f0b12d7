"""BaseNet: SlimNet (wired by hand) and convert() against Cp run on every patch, in each backend,
and PyTorch against TensorFlow on the same weights and images."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TOL, WEIGHTS_DIR, max_rel_error

# (batch, H, W, patch, strides): sizes not divisible by the stride product, smaller than the
# patch, odd / even / non-square patches, strides (2, 2), (2, 3), (3, 2).
CASES = [
    (1, 24, 31, (15, 15), (2, 2)),
    (3, 13, 10, (15, 15), (2, 2)),
    (1, 5, 3, (16, 16), (2, 2)),
    (2, 9, 14, (14, 17), (2, 2)),
    (1, 1, 1, (15, 15), (2, 2)),
    (1, 17, 19, (18, 21), (2, 3)),
    (2, 11, 8, (21, 20), (3, 2)),
]
IDS = [f"n{n}-{h}x{w}-p{p[0]}x{p[1]}-s{s[0]}{s[1]}" for n, h, w, p, s in CASES]


def _image(n, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((n, h, w, 1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,h,w,patch,strides", CASES, ids=IDS)
def test_torch_slimnet_and_convert_equal_cp(tb, torch_device, dtype, n, h, w, patch, strides):
    import torch
    net = tb.BaseNet.BaseNet(*strides).to(device=torch_device, dtype=getattr(torch, dtype))
    images = torch.from_numpy(_image(n, h, w).transpose(0, 3, 1, 2)).to(net.conv1.weight)
    ref = tb.FDFE.dense_reference(net, images, patch).cpu()
    for ci in (tb.SlimNet.SlimNet(net, *patch, *strides), tb.SlimNet.SlimNet(net, *patch, *strides, naive=True),
               tb.FDFE.convert(net, patch), tb.FDFE.convert(net, patch, naive=True)):
        with torch.no_grad():
            out = ci(images).cpu()
        assert out.shape == (n, 113, h, w)
        assert max_rel_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,h,w,patch,strides", CASES, ids=IDS)
def test_keras_slimnet_and_convert_equal_cp(kb, tf_scope, dtype, n, h, w, patch, strides):
    import tensorflow as tf
    net = kb.BaseNet.BaseNet(*strides, dtype=dtype)
    images = tf.constant(_image(n, h, w), dtype=dtype)
    ref = kb.FDFE.dense_reference(net, images, patch)
    for ci in (kb.SlimNet.SlimNet(net, *patch, *strides), kb.SlimNet.SlimNet(net, *patch, *strides, naive=True),
               kb.FDFE.convert(net, patch), kb.FDFE.convert(net, patch, naive=True)):
        out = ci(images)
        assert tuple(out.shape) == (n, h, w, 113)
        assert max_rel_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("n,h,w,patch,strides", CASES, ids=IDS)
def test_torch_equals_tensorflow(tb, kb, n, h, w, patch, strides):
    import tensorflow as tf
    import torch
    image = _image(n, h, w, seed=3).astype(np.float32)
    t_net = tb.BaseNet.BaseNet(*strides)
    k_net = kb.BaseNet.BaseNet(*strides)
    with torch.no_grad():
        t_out = tb.SlimNet.SlimNet(t_net, *patch, *strides)(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    k_out = kb.SlimNet.SlimNet(k_net, *patch, *strides)(tf.constant(image)).numpy()
    assert max_rel_error(t_out.numpy().transpose(0, 2, 3, 1), k_out) <= TOL["float32"]


def test_basenet_shares_weights_file(tb, kb):
    """Both backends read the same file; the kernels agree after the OIHW -> HWIO transpose."""
    t_net, k_net = tb.BaseNet.BaseNet(), kb.BaseNet.BaseNet()
    for name in ("conv1", "conv2", "conv3", "conv4"):
        t_w = getattr(t_net, name).weight.detach().numpy()
        k_w = getattr(k_net, name).kernel.numpy()
        np.testing.assert_array_equal(t_w.transpose(2, 3, 1, 0), k_w)
        assert np.abs(t_w).max() > 0


def _npz(path):
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def test_weights_script_is_deterministic(tb, tmp_path):
    """weights/make_weights.py, run into a temporary file, reproduces the committed weights/basenet.npz bit
    for bit (seed 10, PyTorch's default initialisation); so does the same seed in this process."""
    import torch
    out = tmp_path / "basenet.npz"
    run = subprocess.run([sys.executable, os.path.join(WEIGHTS_DIR, "make_weights.py"), str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout
    committed, fresh = _npz(os.path.join(WEIGHTS_DIR, "basenet.npz")), _npz(out)
    assert sorted(fresh) == sorted(committed) == sorted(tb.BaseNet.WEIGHT_SHAPES)
    for name, value in committed.items():
        assert value.dtype == fresh[name].dtype == np.float32, name
        assert value.shape == fresh[name].shape == tb.BaseNet.WEIGHT_SHAPES[name], name
        assert value.tobytes() == fresh[name].tobytes(), f"{name} differs from the committed file"

    assert os.path.samefile(tb.BaseNet.WEIGHTS_FILE, os.path.join(WEIGHTS_DIR, "basenet.npz"))
    stored = tb.BaseNet.load_weights()
    torch.manual_seed(10)
    in_process = tb.BaseNet.BaseNet(weights=None).state_dict()
    assert sorted(in_process) == sorted(stored) == sorted(committed)
    for name, value in stored.items():
        np.testing.assert_array_equal(in_process[name].numpy(), value)


@pytest.mark.parametrize("backend", ["tb", "kb"])
def test_one_weights_loader_for_both_backends(request, backend):
    """Each BaseNet.py re-exports weights/basenet_weights.py's names: one loader, one file, one module."""
    module = request.getfixturevalue(backend).BaseNet
    shared = sys.modules["basenet_weights"]
    assert os.path.samefile(shared.__file__, os.path.join(WEIGHTS_DIR, "basenet_weights.py"))
    assert module.load_weights is shared.load_weights
    assert module.WEIGHT_SHAPES is shared.WEIGHT_SHAPES
    assert module.WEIGHTS_FILE == shared.WEIGHTS_FILE
    assert os.path.samefile(module.WEIGHTS_FILE, os.path.join(WEIGHTS_DIR, "basenet.npz"))
