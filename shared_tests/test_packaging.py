"""tensorflow/ never shadows the real package; both backends live in one process; the samples run."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _is_repo_folder(path):
    """True if ``path`` lies in the repository's own tensorflow/ folder."""
    return os.path.realpath(path).startswith(os.path.realpath(os.path.join(ROOT, "tensorflow")) + os.sep)


def test_tensorflow_folder_is_not_a_package():
    assert not os.path.exists(os.path.join(ROOT, "tensorflow", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "pytorch", "__init__.py"))


def test_import_tensorflow_from_the_repository_root_gets_the_real_package():
    from conftest import real_tensorflow
    if real_tensorflow() is None:
        pytest.skip("TensorFlow is not installed")
    code = "import tensorflow, os; print(os.path.realpath(tensorflow.__file__)); print(tensorflow.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    path, version = out.stdout.split()
    assert not _is_repo_folder(path) and "site-packages" in path, path
    assert version[0].isdigit()


def test_tensorflow_in_this_process_is_the_real_package(kb):
    import tensorflow
    assert not _is_repo_folder(tensorflow.__file__) and "site-packages" in tensorflow.__file__
    assert hasattr(tensorflow, "nn")


def test_both_backends_in_one_process(tb, kb):
    assert tb.FDFE is not kb.FDFE
    assert tb.FDFE.__file__ != kb.FDFE.__file__
    assert tb.SlimNet.FDFE is tb.FDFE and kb.SlimNet.FDFE is kb.FDFE
    assert "FDFE" not in sys.modules or sys.modules["FDFE"] in (tb.FDFE, kb.FDFE)
    assert all(not p or os.path.realpath(p) != os.path.realpath(ROOT) for p in sys.path[1:])


def test_backend_loader_is_cached(tb):
    """Loading a backend again (as architectures.py and bench.py do) gives the same modules: FDFE.py is
    executed once, so its classes are the same everywhere."""
    import architectures
    import backends
    assert backends.load_backend("pytorch", "torch") is tb
    assert sys.modules["fdfe_torch"] is tb.FDFE and sys.modules["basenet_torch"] is tb.BaseNet
    assert type(architectures.build_torch("original_basenet")) is tb.BaseNet.BaseNet
    with pytest.raises(ValueError, match=r"suffix 'torch' already names the backend in pytorch/"):
        backends.load_backend("tensorflow", "torch")


def _imported_by(code):
    """The top-level modules that running ``code`` imports in a fresh interpreter (outside the repository)."""
    code = ("import sys\nbefore = set(sys.modules)\n" + code + "\nnew = sorted({m.split('.')[0] for m in "
            "set(sys.modules) - before})\nimport json\nprint(json.dumps(new))")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(ROOT), capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_backends_module_needs_only_the_standard_library():
    shared_tests = os.path.join(ROOT, "shared_tests")
    modules = _imported_by(f"import sys; sys.path.append({shared_tests!r}); import backends")
    assert modules - set(sys.stdlib_module_names) == {"backends"}


@pytest.mark.parametrize("script", ["bench/bench.py", "weights/make_golden.py"])
def test_scripts_load_backends_without_pytest(script):
    """bench.py and make_golden.py get the loader from backends.py, not from conftest: importing them
    (which does not run them) brings in neither pytest nor hypothesis."""
    folder, name = os.path.split(os.path.join(ROOT, script))
    modules = _imported_by(f"import sys; sys.path.append({folder!r}); import {name[:-3]}")
    assert "backends" in modules and name[:-3] in modules
    assert not modules & {"pytest", "_pytest", "hypothesis", "conftest"}, modules


@pytest.mark.parametrize("backend", ["pytorch", "tensorflow"])
def test_sample_code_runs_and_matches(backend, tmp_path):
    from conftest import real_tensorflow
    if backend == "pytorch":
        pytest.importorskip("torch")
    elif real_tensorflow() is None:
        pytest.skip("TensorFlow is not installed")
    figure = tmp_path / "figure.png"
    cmd = [sys.executable, f"{backend}/sample_code.py", "--imH", "37", "--imW", "29", "--pH", "16", "--pW", "17",
           "--samples", "300", "--net", "convert", "--device", "cpu", "--figure", str(figure)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout
    for expected in ("Total time for C_I:", "Averaged time for C_P per Patch without warm up:",
                     "aggregated difference percentage =", "maximal abs difference =", "speedup",
                     "random sample of 300 of the 1073 patches"):
        assert expected in lines, lines
    max_diff = float(lines.split("maximal abs difference = ")[1].split()[0])
    assert max_diff <= 1e-5
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one patch: its comparison, and no speedup extrapolated from one cold call of Cp
    single = subprocess.run(cmd[:2] + ["--imH", "37", "--imW", "29", "--mode", "singlePatch", "--patch_i_center", "5",
                                       "--patch_j_center", "28", "--device", "cpu", "--figure", str(figure)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "the patch at i=5, j=28" in single.stdout and "speedup of C_I:" not in single.stdout, single.stdout
    assert float(single.stdout.split("maximal abs difference = ")[1].split()[0]) <= 1e-5
