"""Load both backends side by side, once: for the tests (conftest.py), bench/bench.py and weights/make_golden.py.

Each backend's files (FDFE.py, BaseNet.py, SlimNet.py, StridedNet.py) are loaded from their paths under unique
module names (fdfe_torch, basenet_torch, slimnet_torch, stridednet_torch, fdfe_tf, ...), so both live in one process without
clashes; a backend's ``import FDFE`` resolves to its own FDFE.  Nothing here puts the repository root
ahead of site-packages (tensorflow/ must never shadow the real tensorflow package).  Loading is cached:
every call for the same backend returns the same namespace and never re-executes its files.

Standard library only (no pytest, no hypothesis), so scripts can import it cheaply.
"""

import importlib.util
import os
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ROOT, "weights")

_BACKENDS = {}  # (folder, suffix) -> namespace


def _load(path, name, fdfe=None):
    """Load a backend file as module ``name``; its ``import FDFE`` resolves to ``fdfe``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("FDFE")
    if fdfe is not None:
        sys.modules["FDFE"] = fdfe
    try:
        spec.loader.exec_module(module)
    finally:
        if fdfe is not None:
            if saved is None:
                sys.modules.pop("FDFE", None)
            else:
                sys.modules["FDFE"] = saved
    sys.modules[name] = module
    return module


def load_backend(folder, suffix):
    """The backend in ``ROOT/folder`` ("pytorch" or "tensorflow") as a namespace with the modules FDFE,
    BaseNet, SlimNet and StridedNet, loaded as fdfe_<suffix>, basenet_<suffix>, slimnet_<suffix> and
    stridednet_<suffix>.

    Cached: loading the same backend again returns the same namespace.  A failed load (its framework
    is not installed) raises ImportError and is not cached."""
    key = (folder, suffix)
    if key not in _BACKENDS:
        for other_folder, other_suffix in _BACKENDS:
            if other_suffix == suffix:
                raise ValueError(f"suffix {suffix!r} already names the backend in {other_folder}/")
        base = os.path.join(ROOT, folder)
        fdfe = _load(os.path.join(base, "FDFE.py"), f"fdfe_{suffix}")
        _BACKENDS[key] = types.SimpleNamespace(
            FDFE=fdfe,
            BaseNet=_load(os.path.join(base, "BaseNet.py"), f"basenet_{suffix}", fdfe),
            SlimNet=_load(os.path.join(base, "SlimNet.py"), f"slimnet_{suffix}", fdfe),
            StridedNet=_load(os.path.join(base, "StridedNet.py"), f"stridednet_{suffix}", fdfe),
        )
    return _BACKENDS[key]


def real_tensorflow():
    """The installed tensorflow package, or None.  Where none is installed, ``import tensorflow``
    from the repository root finds the tensorflow/ folder as an empty namespace package."""
    try:
        import tensorflow
    except ImportError:
        return None
    if getattr(tensorflow, "__file__", None) is None or not hasattr(tensorflow, "config"):
        sys.modules.pop("tensorflow", None)
        return None
    return tensorflow
