"""CI as a model of its framework: copied, pickled, saved and loaded, the copy gives bitwise the same
output; exported artifacts are exact at image sizes not seen at export."""

import copy
import io
import os
import pickle

import numpy as np
import pytest

import netspec
from conftest import TOL, max_rel_error

#: max, average and LP pooling, a strided convolution, an MLP head
SPEC = [{"type": "conv", "out": 4, "k": [3, 3], "stride": [2, 2]}, {"type": "act", "fn": "relu"},
        {"type": "pool", "kind": "max", "k": [2, 2], "stride": [1, 1]},
        {"type": "conv", "out": 5, "k": [2, 2]}, {"type": "act", "fn": "sigmoid"},
        {"type": "pool", "kind": "lp", "k": [2, 2], "stride": [2, 2], "p": 2.0},
        {"type": "conv", "out": 6, "k": [2, 2]}, {"type": "act", "fn": "tanh"},
        {"type": "pool", "kind": "avg", "k": [2, 2], "stride": [2, 2]},
        {"type": "flatten"}, {"type": "linear", "out": 7}, {"type": "act", "fn": "relu"},
        {"type": "linear", "out": 3}]
CHANNELS = 2


def _patch():
    # smallest patch that brings SPEC to a 2x2 map before the flatten
    for size in range(8, 40):
        try:
            shapes = netspec.shapes(SPEC, CHANNELS, (size, size))
        except ValueError:
            continue
        if shapes[9][1:] == (2, 2):
            return (size, size)
    raise AssertionError("no patch size fits SPEC")


PATCH = _patch()


def _torch_ci(tb, **kwargs):
    net = netspec.build_torch(SPEC, CHANNELS, PATCH, netspec.make_weights(SPEC, CHANNELS, PATCH, 3), "float32")
    return net, tb.FDFE.convert(net, PATCH, **kwargs)


def _keras_ci(kb, **kwargs):
    net = netspec.build_keras(SPEC, CHANNELS, PATCH, netspec.make_weights(SPEC, CHANNELS, PATCH, 3), kb.FDFE,
                              "float32")
    return net, kb.FDFE.convert(net, PATCH, **kwargs)


def test_torch_copies_and_checkpoints_are_exact(tb, tmp_path):
    import torch
    net, ci = _torch_ci(tb)
    images = torch.from_numpy(netspec.random_images(2, CHANNELS, 37, 41, 1).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        ref = ci(images)
    assert max_rel_error(ref, tb.FDFE.dense_reference(net, images, PATCH)) <= TOL["float32"]

    def torch_save(module):
        path = tmp_path / "ci.pt"
        torch.save(module, path)
        return torch.load(path, weights_only=False)

    def state_dict_round_trip(module):
        other_net = netspec.build_torch(SPEC, CHANNELS, PATCH, netspec.make_weights(SPEC, CHANNELS, PATCH, 9),
                                        "float32")
        other = tb.FDFE.convert(other_net, PATCH)
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer, weights_only=True))
        return other

    for name, make_copy in [("deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m))),
                            ("pickle protocol 2", lambda m: pickle.loads(pickle.dumps(m, protocol=2))),
                            ("torch.save", torch_save), ("state_dict", state_dict_round_trip)]:
        clone = make_copy(ci)
        for _ in range(2):  # twice: a copy must also survive its own in-place plan
            with torch.no_grad():
                out = clone(images)
            assert torch.equal(out, ref), name
        if name == "deepcopy":  # a true copy: training it leaves the original alone
            with torch.no_grad():
                next(clone.parameters()).add_(1.0)
                assert torch.equal(ci(images), ref)


def test_keras_copies_and_saved_models_are_exact(kb, tmp_path):
    import keras
    import tensorflow as tf
    net, ci = _keras_ci(kb)
    images = tf.constant(netspec.random_images(2, CHANNELS, 37, 41, 1), tf.float32)
    ref = ci(images).numpy()
    assert max_rel_error(ref, kb.FDFE.dense_reference(net, images, PATCH)) <= TOL["float32"]

    def keras_file(model):
        path = str(tmp_path / "ci.keras")
        model.save(path)
        return keras.models.load_model(path)

    def with_weights(model):
        model.set_weights(ci.get_weights())
        return model

    for name, make_copy in [("clone_model", lambda m: with_weights(keras.models.clone_model(m))),
                            ("get_config/from_config", lambda m: with_weights(type(m).from_config(m.get_config()))),
                            (".keras", keras_file), ("deepcopy", copy.deepcopy),
                            ("pickle", lambda m: pickle.loads(pickle.dumps(m)))]:
        clone = make_copy(ci)
        np.testing.assert_array_equal(clone(images).numpy(), ref, err_msg=name)
        assert (clone.patch_size, clone.strides, clone.naive) == (ci.patch_size, ci.strides, ci.naive), name


def test_torch_export_with_automatic_dynamic_sizes(tb):
    """torch.export.export with Dim.AUTO for N, H and W: one untiled graph, exact at sizes not seen at
    export (not multiples of the stride product, other batches).  Sizes up to the stride product are
    refused by the exported program's own guard (an error, never a wrong answer)."""
    import torch
    from torch.export import Dim
    net, ci = _torch_ci(tb)  # default tile="auto": export takes the untiled path
    example = torch.randn(2, CHANNELS, 30, 33)
    program = torch.export.export(ci, (example,), dynamic_shapes={"images": {0: Dim.AUTO, 2: Dim.AUTO,
                                                                             3: Dim.AUTO}})
    exported = program.module()
    for shape in [(1, CHANNELS, 17, 23), (3, CHANNELS, 64, 45), (2, CHANNELS, 29, 26)]:
        images = torch.from_numpy(netspec.random_images(shape[0], CHANNELS, shape[2], shape[3], 5)
                                  .transpose(0, 3, 1, 2)).float()
        with torch.no_grad():
            out = exported(images)
        assert out.shape == (shape[0], 3, shape[2], shape[3])
        assert max_rel_error(out, tb.FDFE.dense_reference(net, images, PATCH)) <= TOL["float32"]
    with pytest.raises(AssertionError, match="Guard failed"):
        exported(torch.randn(1, CHANNELS, 3, 3))


def test_keras_saved_model_serves_any_image_size(kb, tmp_path):
    """ci.export() and tf.saved_model.save(ci): the serving signature takes (None, None, None, C); the
    reloaded artifact is exact at sizes not seen before (not multiples of the stride product, batch 3)."""
    import tensorflow as tf
    net, ci = _keras_ci(kb)
    ci.export(str(tmp_path / "exported"))
    tf.saved_model.save(ci, str(tmp_path / "saved"))
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    signatures = [exported.signatures["serving_default"],
                  tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]]
    for fn in signatures:
        spec = fn.structured_input_signature
        specs = list(spec[0]) + list(spec[1].values())
        assert [tuple(s.shape) for s in specs] == [(None, None, None, CHANNELS)]
    served = signatures + [exported.serve]
    for n, h, w in [(1, 17, 23), (3, 9, 31)]:
        images = tf.constant(netspec.random_images(n, CHANNELS, h, w, 6), tf.float32)
        ref = kb.FDFE.dense_reference(net, images, PATCH)
        for fn in served:
            out = fn(images)
            out = out if tf.is_tensor(out) else next(iter(out.values()))
            assert tuple(out.shape) == (n, h, w, 3)
            assert max_rel_error(out, ref) <= TOL["float32"]


def test_torch_jit_trace_of_ci_is_refused(tb):
    """torch.jit.trace would freeze the image size into CI's reshapes (wrong values at other sizes):
    refused with the way out, and so is the TorchScript-based ONNX exporter, which traces."""
    import torch
    _, ci = _torch_ci(tb)
    with pytest.raises(RuntimeError, match=r"CI cannot be traced by torch\.jit\.trace .*torch\.export\.export"):
        torch.jit.trace(ci, torch.randn(1, CHANNELS, 20, 21))
