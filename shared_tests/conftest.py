"""Test harness: loads both backends side by side and parametrizes over every available device.

The backends are loaded by backends.py (cached, under unique module names: fdfe_torch, fdfe_tf, ...),
so both live in one process without clashes, and nothing puts the repository root ahead of
site-packages (tensorflow/ must never shadow the real tensorflow package).
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # backends, netspec: appended, never ahead of site-packages

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from backends import ROOT, WEIGHTS_DIR, load_backend, real_tensorflow  # noqa: E402, F401  (re-exported for the tests)

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tb():
    """The PyTorch backend (skipped where PyTorch is not installed).  On GPUs, float32 means float32:
    TF32 tensor cores (cuDNN's default for convolutions) would round to 10-bit mantissas."""
    torch = pytest.importorskip("torch")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return load_backend("pytorch", "torch")


@pytest.fixture(scope="session")
def kb():
    """The TensorFlow / Keras backend (skipped where TensorFlow is not installed)."""
    if real_tensorflow() is None:
        pytest.skip("TensorFlow is not installed")
    return load_backend("tensorflow", "tf")


def torch_devices():
    try:
        import torch
    except ImportError:
        return ["cpu"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tf_devices():
    tf = real_tensorflow()
    return ["cpu"] + (["gpu"] if tf is not None and tf.config.list_physical_devices("GPU") else [])


def pytest_generate_tests(metafunc):
    if "torch_device" in metafunc.fixturenames:
        metafunc.parametrize("torch_device", torch_devices())
    if "tf_device" in metafunc.fixturenames:
        metafunc.parametrize("tf_device", tf_devices())


@pytest.fixture
def tf_scope(tf_device):
    import tensorflow as tf
    with tf.device(f"/{tf_device.upper()}:0"):
        yield tf_device


def max_rel_error(got, ref):
    """max |got - ref| / max |ref|, in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), "non-finite values in the output"
    scale = np.abs(ref).max()
    assert scale > 0, "reference is all zeros: the test could not fail"
    return float(np.abs(got - ref).max() / scale)


#: tolerances on max|CI - Cp| / max|Cp|.  "cross_float64" compares PyTorch with Keras in float64:
#: Keras evaluates some activations with float32 constants even in float64 (GELU is off by 5e-9),
#: so the two frameworks' Cp differ by more than float64 rounding.
TOL = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-2, "bfloat16": 5e-2, "cross_float64": 1e-7}
