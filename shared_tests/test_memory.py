"""The memory guard: with no budget given, CI never asks for more memory than the process may still
allocate.  Run in subprocesses under an address-space limit (RLIMIT_AS), so that a failure cannot take
the test run down with it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")

#: a net that needs much memory and little arithmetic: 1x1 convolutions to 96 channels, max pooling,
#: a 64-vector per pixel; patch 4x4, stride product 4
PREAMBLE = """
import json, os, resource, sys
sys.path.append(os.path.join({root!r}, "shared_tests"))
from backends import load_backend

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

def limit_address_space(extra):
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + extra, resource.RLIM_INFINITY))
"""

TORCH_SCRIPT = PREAMBLE + """
import numpy as np, torch
torch.set_num_threads(2)
FDFE = load_backend("pytorch", "torch").FDFE
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 96, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                          torch.nn.Conv2d(96, 96, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                          torch.nn.Conv2d(96, 64, 1))
ci = FDFE.convert(net, 4, tile=None)           # untiled unless the guard says otherwise
images = torch.randn(1, 1, 1000, 1400)
need = ci.estimate_memory((1000, 1400))
limit_address_space(900 * 2**20)
result = {"need_mib": need / 2**20}
try:
    with torch.no_grad():
        ci.memory_guard = False
        ci(images)
    result["unguarded"] = "ran"
except (RuntimeError, MemoryError) as exc:
    result["unguarded"] = type(exc).__name__
ci.memory_guard = True
with torch.no_grad():
    out = ci(images)
    positions = np.array([[0, 0, 0], [0, 999, 1399], [0, 500, 700], [0, 3, 1398], [0, 998, 1]])
    ref = FDFE.patch_outputs(net, images, 4, positions)
got = out[positions[:, 0], :, positions[:, 1], positions[:, 2]]
result["error"] = float((got - ref).abs().max() / ref.abs().max())
try:
    with torch.no_grad():
        ci(torch.zeros(1, 1, 3000, 4000))       # the output alone (3 GB) cannot fit
    result["huge"] = "ran"
except MemoryError as exc:
    result["huge"] = str(exc)
print(json.dumps(result))
"""

KERAS_SCRIPT = PREAMBLE + """
import numpy as np
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf, keras
tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(2)
FDFE = load_backend("tensorflow", "tf").FDFE
keras.utils.set_random_seed(0)
L = keras.layers
net = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(96, 1, activation="relu"), L.MaxPooling2D(2),
                        L.Conv2D(96, 1, activation="relu"), L.MaxPooling2D(2), L.Conv2D(64, 1)])
ci = FDFE.convert(net, 4)
images = tf.random.normal((1, 1000, 1400, 1))
need = ci.estimate_memory((1000, 1400))
limit_address_space(1500 * 2**20)
result = {"need_mib": need / 2**20}
out = ci(images)
positions = np.array([[0, 0, 0], [0, 999, 1399], [0, 500, 700], [0, 3, 1398], [0, 998, 1]])
ref = FDFE.patch_outputs(net, images, 4, positions).numpy()
got = tf.gather_nd(out, positions).numpy()
result["error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
try:
    ci(tf.zeros((1, 3000, 4000, 1)))
    result["huge"] = "ran"
except MemoryError as exc:
    result["huge"] = str(exc)
print(json.dumps(result))
"""


def _run(script, timeout=240, **env):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script.replace("{root!r}", repr(ROOT)))], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_memory_guard_tiles_instead_of_failing(tb):
    result = _run(TORCH_SCRIPT)
    assert result["need_mib"] > 1500  # untiled, the image needs more than the limit allows...
    assert result["unguarded"] != "ran"  # ...and without the guard it fails
    assert result["error"] <= 1e-5  # with the guard it tiles, exactly
    assert result["huge"].startswith("CI on 1 image(s) of 3000x4000 (torch.float32) would need about ")
    assert "Use smaller images or batches; or set max_memory=" in result["huge"]


#: On CPUs where TensorFlow turns its oneDNN ops on (AVX512-VNNI / AVX512-BF16 / AMX), its CPU allocator
#: pools large blocks (a growing BFC pool) and never returns them: one 870 MiB tiled call left 2.1 GiB of
#: address space mapped, which no estimate of CI's own values can bound under an address-space limit.
#: TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (read by TensorFlow at start-up) makes it use malloc, as on other CPUs;
#: the README's Limits say so.
KERAS_ENV = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}


def test_keras_memory_guard_tiles_instead_of_failing(kb):
    result = _run(KERAS_SCRIPT, **KERAS_ENV)
    assert result["need_mib"] > 0.7 * 1500  # more than the guard's share (60%) of the 1500 MiB left
    assert result["error"] <= 1e-5
    assert "CI on 1 image(s) of 3000x4000 (float32) would need about " in result["huge"]  # Keras wraps it
    assert "memory_guard=False" in result["huge"]


def test_host_memory_available_reads_the_address_space_limit(tb, kb):
    """The guard's reading of the address-space limit, in a subprocess that sets one."""
    script = PREAMBLE + """
FDFE = load_backend("pytorch", "torch").FDFE
before = FDFE._host_memory_available()
limit_address_space(300 * 2**20)
after = FDFE._host_memory_available()
print(json.dumps({"before": before, "after": after}))
"""
    result = _run(script)
    assert result["before"] > 300 * 2**20
    assert 250 * 2**20 < result["after"] <= 300 * 2**20
    assert kb.FDFE._host_memory_available() > 0 and tb.FDFE._host_memory_available() > 0


# --- budgets that hold: the measured peak against max_memory, and the estimate against the untiled peak -----

#: a row of bench/memory_budget.py small enough for a test: Simo-Serra's net (64x64 patches, 128 maps) at
#: 360x480, whose output alone (84 MiB) is larger than the slack, so a tiling that keeps the output twice
#: (tiles, then their concatenation) would not fit
BUDGET_CASE = ("simo_serra", 360, 480)


def _measure(backend, budget):
    """bench/memory_budget.py's measurement in a fresh process: the resident-set high-water mark of one call
    of CI (``budget``: None, untiled; else max_memory in bytes) over the resident set just before it."""
    name, height, width = BUDGET_CASE
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory_budget.py"), "--child", backend,
                          name, str(height), str(width), "none" if budget is None else str(int(budget)),
                          "--repeats", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["reset"]:
        pytest.skip("/proc/self/clear_refs cannot reset the resident-set high-water mark here")
    return result


@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_budget_holds_and_the_estimate_bounds_the_peak(backend, request):
    """max_memory=B: the measured peak stays under B + MEMORY_SLACK; the untiled peak under estimate_memory.
    The budget leaves the tiles a quarter of the untiled working memory, above the output and the padded
    image (which the estimate of a 1x1 tile holds)."""
    fdfe = request.getfixturevalue("tb" if backend == "torch" else "kb").FDFE
    untiled = _measure(backend, None)
    estimate = untiled["estimate"]
    assert untiled["peak"] <= estimate, (untiled["peak"] / 2**20, estimate / 2**20)
    assert untiled["peak"] > estimate / 4  # the measurement sees the call (it is not all noise)
    fixed = untiled["fixed"]
    budget = fixed + (estimate - fixed) // 4
    tiled = _measure(backend, budget)
    assert tiled["tile"] is not None and tiled["budget"] == budget
    assert tiled["peak"] <= budget + fdfe.MEMORY_SLACK, (tiled["peak"] / 2**20, budget / 2**20, tiled["tile"])


# --- keep_freed_memory: glibc keeps freed blocks, so a second large allocation takes no fresh pages ---------

KEEP_SCRIPT = PREAMBLE + """
import ctypes
FDFE = load_backend({folder!r}, {module!r}).FDFE
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_fresh_block(size=200 * 2**20):  # over glibc's 32 MB mmap threshold
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(block)
    return after - before

result = {"default": [faults_of_a_fresh_block() for _ in range(2)]}
result["applied"] = FDFE.keep_freed_memory()
result["kept"] = [faults_of_a_fresh_block() for _ in range(2)]
print(json.dumps(result))
"""


def _glibc():
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
@pytest.mark.parametrize("folder,module", [("pytorch", "torch"), ("tensorflow", "tf")])
def test_keep_freed_memory_keeps_freed_blocks_for_the_next_allocation(folder, module):
    result = _run(KEEP_SCRIPT.replace("{folder!r}", repr(folder)).replace("{module!r}", repr(module)))
    pages = 200 * 2**20 // 4096
    assert result["applied"] is True
    assert min(result["default"]) > pages // 4  # glibc's default: every fresh block faults its pages in again
    assert result["kept"][1] < pages // 20  # kept: the second block reuses the first one's pages
