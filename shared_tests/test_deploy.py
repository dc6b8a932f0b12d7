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


#: image sizes (N, H, W) not seen at export: 1x1 and sizes below the patch, not multiples of the
#: stride product, other batches
UNSEEN = [(1, 1, 1), (3, 2, 5), (2, 17, 23), (1, 29, 26), (1, 40, 33)]


def _torch_images(n, h, w, seed):
    import torch
    return torch.from_numpy(netspec.random_images(n, CHANNELS, h, w, seed).transpose(0, 3, 1, 2)).float().contiguous()


def _check_torch_artifact(tb, net, run, name):
    """``run`` (an exported CI) gives Cp's output on every patch at every size of UNSEEN."""
    import torch
    for seed, (n, h, w) in enumerate(UNSEEN):
        images = _torch_images(n, h, w, 10 + seed)
        with torch.no_grad():
            out = torch.as_tensor(np.asarray(run(images)))
        assert tuple(out.shape) == (n, 3, h, w), (name, (n, h, w))
        assert max_rel_error(out, tb.FDFE.dense_reference(net, images, PATCH)) <= TOL["float32"], (name, (n, h, w))


def test_torch_export_over_the_whole_size_range(tb):
    """torch.export.export with N, H and W dynamic from 1 up (Dim ranges as a user writes them): one
    untiled graph without guards on the image size, exact at sizes not seen at export, also with the
    default tiles and channels-last layout that eager CI uses on this machine."""
    import torch
    from torch.export import Dim
    net, ci = _torch_ci(tb)
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=1, max=8192), 3: Dim("W", min=1, max=8192)}
    program = torch.export.export(ci, (_torch_images(2, 30, 33, 4),), dynamic_shapes={"images": dims})
    _check_torch_artifact(tb, net, program.module(), "torch.export")


@pytest.mark.parametrize("step", [(2, 3), (2, 2), (1, 2)])
def test_torch_export_with_an_output_stride(tb, tmp_path, step):
    """CI at a step (sy, sx) through torch.export and the dynamo ONNX exporter: exact at sizes not seen
    at export, down to the smallest the README's ranges allow (H >= sy + 1, W >= sx + 1: torch.export guards
    an output size of 1, as it does for any strided slice).  ONNX once lost the last row and column at odd sizes
    (its integer division of ceil(H / s), written -(-H // s), rounded toward zero), and torch.export at (1, 2)
    served only widths of the example's parity (the step's strided view added a guard)."""
    import onnxruntime
    import torch
    from torch.export import Dim
    net, ci = _torch_ci(tb, output_stride=step)
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=3, max=8192), 3: Dim("W", min=4, max=8192)}
    example = (_torch_images(2, 30, 33, 4),)
    program = torch.export.export(ci, example, dynamic_shapes={"images": dims})
    path = str(tmp_path / "ci_step.onnx")
    torch.onnx.export(ci, example, path, dynamo=True, input_names=["images"], output_names=["features"],
                      dynamic_shapes={"images": dims})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, (n, h, w) in enumerate([(1, 3, 4), (3, 11, 7), (1, 26, 40), (2, 9, 25)]):
        images = _torch_images(n, h, w, 20 + seed)
        ref = tb.FDFE.dense_reference(net, images, PATCH, output_stride=step)
        assert tuple(ref.shape) == (n, 3, -(-h // step[0]), -(-w // step[1]))
        with torch.no_grad():
            got = program.module()(images)
        assert max_rel_error(got, ref) <= TOL["float32"], (n, h, w)
        assert max_rel_error(session.run(None, {"images": images.numpy()})[0], ref.numpy()) <= TOL["float32"]


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("net_name", ["one_channel", "layer_scale"])
def test_torch_export_at_every_lower_bound(tb, step, net_name):
    """torch.export of CIs whose element-wise ops read one-channel maps (a grey image, a one-channel output through
    tanh) or a transposed 1x1 map (ConvNeXt's layer scale gamma * x.permute(0, 2, 3, 1) after strides 2 and 2):
    every Dim lower bound from the README's (1, or sy + 1 with a step) exports, and the program is exact.  Such
    maps were channels-last while exporting, whose strides tie an axis of size 1 with another; ordering them
    added a guard on the image size that torch.export could not prove for some bounds ("Constraints violated" at
    min=3 and 5, not at 4 and 6)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.export import Dim
    torch.manual_seed(3)

    class OneChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.last = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 1, 3)

        def forward(self, x):
            return torch.tanh(self.last(F.max_pool2d(torch.relu(self.conv(torch.sigmoid(x))), 2))).flatten(1)

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.down = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 2, stride=2)
            self.depthwise, self.head = nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 3, 1)
            self.gamma = nn.Parameter(torch.rand(4))

        def forward(self, x):  # a 1x1 transposed map times gamma
            y = self.depthwise(self.down(F.max_pool2d(self.conv(x), 2))).permute(0, 2, 3, 1)
            return self.head((self.gamma * y).permute(0, 3, 1, 2)).flatten(1)
    net, patch = (OneChannel(), 8) if net_name == "one_channel" else (LayerScale(), 16)
    net = net.eval()
    ci = tb.FDFE.convert(net, patch, in_channels=1, output_stride=step)
    for low in range(step + 1, step + 5):
        dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=low, max=4096), 3: Dim("W", min=low, max=4096)}
        images = torch.from_numpy(netspec.random_images(2, 1, 17, 19, seed=low).transpose(0, 3, 1, 2)).float()
        program = torch.export.export(ci, (images,), dynamic_shapes={"images": dims})
        for n, h, w in [(1, low, low), (2, low + 1, low + 2), (1, 23, 30)]:
            images = torch.from_numpy(netspec.random_images(n, 1, h, w, seed=h * w).transpose(0, 3, 1, 2)).float()
            with torch.no_grad():
                got = program.module()(images)
            expected = tb.FDFE.dense_reference(net, images, patch, output_stride=step)
            assert max_rel_error(got, expected) <= TOL["float32"], (low, n, h, w)


def test_torch_exports_of_streams_that_pool_differently(tb, tmp_path):
    """Two streams with other strides merged per pixel (siam2stream-like): torch.export over the whole size range
    and both ONNX exporters are exact at sizes not seen at export (the streams' unwarping was once recorded as
    view copies: the TorchScript-based ONNX export ran and gave wrong values, torch.export failed)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TwoStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2 = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3)
            self.b1, self.b2 = nn.Conv2d(2, 4, 2, stride=2), nn.Conv2d(4, 4, 2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            a = self.a2(F.relu(F.max_pool2d(self.a1(x), 2)))
            b = self.b2(torch.tanh(F.avg_pool2d(self.b1(x), 2)))
            return self.fc(torch.cat([a, b], 1).flatten(1))
    torch.manual_seed(0)
    _check_torch_exports(tb, TwoStreams().eval(), 8, tmp_path, 30)


def _check_torch_exports(tb, net, patch, tmp_path, seed):
    """torch.export over the whole size range and both ONNX exporters (run in onnxruntime) of ``net``'s CI give
    Cp's output on every patch at sizes not seen at export (1x1 included)."""
    import onnxruntime
    import torch
    from torch.export import Dim
    ci = tb.FDFE.convert(net, patch)
    example = (_torch_images(2, 12, 13, 4),)
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=1, max=8192), 3: Dim("W", min=1, max=8192)}
    runs = {"torch.export": torch.export.export(ci, example, dynamic_shapes={"images": dims}).module()}
    for dynamo in (True, False):
        path = str(tmp_path / f"ci_{dynamo}.onnx")
        options = {"dynamic_shapes": {"images": dims}} if dynamo else \
            {"dynamic_axes": {"images": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}}}
        torch.onnx.export(ci, example, path, dynamo=dynamo, input_names=["images"], output_names=["features"],
                          **options)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        runs[f"onnx, dynamo={dynamo}"] = lambda x, session=session: session.run(None, {"images": x.numpy()})[0]
    for i, (n, h, w) in enumerate([(1, 1, 1), (1, 17, 11), (3, 6, 9)]):
        images = _torch_images(n, h, w, seed + i)
        ref = tb.FDFE.dense_reference(net, images, patch)
        for name, run in runs.items():
            with torch.no_grad():
                out = torch.as_tensor(np.asarray(run(images)))
            assert out.shape == ref.shape and max_rel_error(out, ref) <= TOL["float32"], (name, (n, h, w))


def test_torch_exports_of_global_sums_channel_ops_and_running_statistics(tb, tmp_path):
    """Global sum and minimum, channel splits and flips, and instance normalisation with running statistics
    (no affine parameters) after a pooling: torch.export and both ONNX exporters are exact in onnxruntime at sizes
    not seen at export.  The sum was an average pooling with divisor_override=1, which ONNX's AveragePool lacks:
    onnxruntime divided it by the window's area, silently; the TorchScript-based exporter refused a batch
    normalisation without weights ("unknown channel size")."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.pool, self.conv2 = nn.Conv2d(2, 6, 3), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2)
            self.norm = nn.InstanceNorm2d(6, track_running_stats=True)
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            y = self.norm(self.pool(self.conv1(x)))
            y = self.conv2(torch.max(*y.flip(1).chunk(2, 1)))
            return torch.cat([y.sum((2, 3)), torch.amin(y, (2, 3))], 1)
    torch.manual_seed(0)
    _check_torch_exports(tb, Net().eval(), 7, tmp_path, 40)


def test_torch_onnx_exports_run_exactly_in_onnxruntime(tb, tmp_path):
    """torch.onnx.export, both exporters (dynamo=True with Dim ranges; the TorchScript-based one with
    dynamic_axes), run in ONNX Runtime at sizes not seen at export."""
    import onnxruntime
    import torch
    from torch.export import Dim
    net, ci = _torch_ci(tb)
    example = (_torch_images(2, 30, 33, 4),)
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=1, max=8192), 3: Dim("W", min=1, max=8192)}
    axes = {"images": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}}
    for dynamo in (True, False):
        path = str(tmp_path / f"ci_{dynamo}.onnx")
        if dynamo:
            torch.onnx.export(ci, example, path, dynamo=True, input_names=["images"], output_names=["features"],
                              dynamic_shapes={"images": dims})
        else:
            torch.onnx.export(ci, example, path, dynamo=False, input_names=["images"], output_names=["features"],
                              dynamic_axes=axes)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        _check_torch_artifact(tb, net, lambda x: session.run(None, {"images": x.numpy()})[0],
                              f"onnxruntime, dynamo={dynamo}")


def test_torch_jit_trace_and_script_serve_any_image_size(tb, tmp_path):
    """torch.jit.trace(ci, images) records shapes computed from the image's, so the trace is exact at
    other sizes; torch.jit.script(ci) compiles such a trace; both survive torch.jit.save/load."""
    import torch
    net, ci = _torch_ci(tb)
    with torch.no_grad():
        traced = torch.jit.trace(ci, _torch_images(2, 30, 33, 4))
    scripted = torch.jit.script(ci)
    for name, module in [("trace", traced), ("script", scripted)]:
        torch.jit.save(module, str(tmp_path / f"{name}.pt"))
        _check_torch_artifact(tb, net, torch.jit.load(str(tmp_path / f"{name}.pt")), f"torch.jit.{name}")
    # the scripted CI holds its trace as .traced, which takes CI's (and the trace's) state_dict
    assert [f"traced.{k}" for k in ci.state_dict()] == list(scripted.state_dict()) and \
        list(traced.state_dict()) == list(ci.state_dict())
    images = _torch_images(2, 13, 12, 6)
    scaled = {k: v * 1.25 for k, v in ci.state_dict().items()}
    changed = copy.deepcopy(net)
    changed.load_state_dict({k.removeprefix("base_net."): v for k, v in scaled.items()})
    with torch.no_grad():
        before = scripted(images)
        scripted.traced.load_state_dict(scaled)
        assert max_rel_error(before, scripted(images)) > 0.01
        assert max_rel_error(scripted(images), tb.FDFE.dense_reference(changed, images, PATCH)) <= TOL["float32"]
    # a reflected border reaches half a patch: script traces an example at least that large (it failed)
    torch.manual_seed(0)
    strided = torch.nn.Sequential(torch.nn.Conv2d(CHANNELS, 4, 3, stride=2), torch.nn.Conv2d(4, 3, 4)).eval()
    scripted = torch.jit.script(tb.FDFE.convert(strided, 9, border="reflect"))
    images = _torch_images(2, 11, 13, 5)
    with torch.no_grad():
        assert max_rel_error(scripted(images), tb.FDFE.dense_reference(strided, images, 9, border="reflect")) \
            <= TOL["float32"]
    # amax over the patch's positions, traced with gradients on (the default): torch.jit.trace's check of the graph
    # failed ("Graphs differed across invocations") on the split of the gradient among tied maxima
    class Amax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(CHANNELS, 4, 3)

        def forward(self, x):
            return self.conv(x).amax((2, 3))
    pooled = Amax().eval()
    ci = tb.FDFE.convert(pooled, 6)
    traced = torch.jit.trace(ci, _torch_images(2, 9, 8, 3))
    images = _torch_images(2, 13, 12, 8).requires_grad_()
    with torch.no_grad():
        assert max_rel_error(traced(images), tb.FDFE.dense_reference(pooled, images, 6)) <= TOL["float32"]
    grad, = torch.autograd.grad(traced(images).square().sum(), images)
    expected, = torch.autograd.grad(tb.FDFE.dense_reference(pooled, images, 6, differentiable=True).square().sum(),
                                    images)
    assert max_rel_error(grad, expected) <= TOL["float32"]  # (random values: no ties)


def test_torch_output_layout_follows_the_input(tb):
    """A contiguous input gives a contiguous output (out.view(N, K, -1) works, as for Cp), tiled or not
    and whatever layout CI uses inside; a channels-last input gives a channels-last output."""
    import torch
    net, ci = _torch_ci(tb)
    images = _torch_images(2, 29, 26, 7)
    ref = tb.FDFE.dense_reference(net, images, PATCH)
    defaults = {"tile": "auto", "memory_format": torch.channels_last, "naive": False, "output_stride": 1}
    for kwargs in [{}, {"tile": None}, {"tile": (16, 16)}, {"memory_format": torch.contiguous_format},
                   {"naive": True, "tile": (16, 16)}, {"output_stride": 2, "tile": (16, 16)}]:
        for name, value in {**defaults, **kwargs}.items():
            setattr(ci, name, value)
        step = ci.output_stride
        want = ref[:, :, ::step[0], ::step[1]]
        with torch.no_grad():
            out = ci(images)
            out_cl = ci(images.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous() and out.view(2, 3, -1).shape[-1] == want.shape[2] * want.shape[3], kwargs
        assert out_cl.is_contiguous(memory_format=torch.channels_last), kwargs
        assert max_rel_error(out, want) <= TOL["float32"], kwargs
        assert max_rel_error(out_cl, want) <= TOL["float32"], kwargs
    # untiled on a multiple of the stride product: no crop, the channels-last result is transposed whole
    for name, value in defaults.items():
        setattr(ci, name, value)
    ci.tile = None
    images = _torch_images(2, 32, 24, 8)
    with torch.no_grad():
        out = ci(images)
    assert out.is_contiguous() and out.view(2, 3, -1).shape[-1] == 32 * 24
    assert max_rel_error(out, tb.FDFE.dense_reference(net, images, PATCH)) <= TOL["float32"]


def test_torch_layout_copies_in_blocks(tb, monkeypatch):
    """The blocked channels-last -> contiguous copies (whole images, and tiles of a contiguous output)
    equal plain copies when the images span many blocks of sizes that do not divide them."""
    import torch
    monkeypatch.setattr(tb.FDFE, "_TRANSPOSE_BLOCK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 13, 11, generator=gen).contiguous(memory_format=torch.channels_last)
    for src in (x, x[:, :, 1:12, 2:9], x[:, :, ::2, ::3]):  # whole, a crop, a subsampling
        got = tb.FDFE._channels_last_to_contiguous(src)
        assert got.is_contiguous() and torch.equal(got, src)
    dest = torch.zeros(2, 5, 20, 20)
    tb.FDFE._copy_rows_blocked(dest[:, :, 3:16, 4:15], x)
    assert torch.equal(dest[:, :, 3:16, 4:15], x) and dest.sum() == x.sum()
    net, ci = _torch_ci(tb)
    images = _torch_images(2, 32, 24, 9)
    ref = tb.FDFE.dense_reference(net, images, PATCH)
    for tile in (None, (16, 16)):
        ci.tile = tile
        with torch.no_grad():
            out = ci(images)
        assert out.is_contiguous() and max_rel_error(out, ref) <= TOL["float32"], tile


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


def test_keras_saved_model_of_a_cp_whose_call_reads_its_weights(kb, tmp_path):
    """A layer of Cp without a rule of its own that reads its weight in call() (x * exp(self.log_s)) becomes
    ops of CI that read Cp's variable, which CI did not track: tf.saved_model.save(ci) failed ("references an
    'untracked' resource"), ci.fit left the variable alone, get_weights / save_weights missed it, and a .keras
    copy kept its value as a constant (stale after set_weights).  It is a weight of CI, once however many ops
    read it (a copy has one too), and tf.train.Checkpoint saves it: all of these work."""
    import keras
    import tensorflow as tf

    class Scaled(keras.layers.Layer):
        def build(self, shape):
            self.log_s = self.add_weight(shape=(shape[-1],), initializer="random_normal", name="log_s")

        def call(self, x):  # (the weight read by two ops: one variable of CI, and of its copies)
            return x * keras.ops.exp(self.log_s) - 0.1 * self.log_s
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((7, 7, CHANNELS)), keras.layers.Conv2D(4, 3), Scaled(),
                            keras.layers.MaxPooling2D(2), keras.layers.Conv2D(3, 2), keras.layers.Flatten()])
    ci = kb.FDFE.convert(net, 7)
    tf.saved_model.save(ci, str(tmp_path / "saved"))
    served = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    ci.save(str(tmp_path / "ci.keras"))
    loaded = keras.models.load_model(str(tmp_path / "ci.keras"), custom_objects={"Scaled": Scaled})
    images = tf.constant(netspec.random_images(2, CHANNELS, 17, 23, 6), tf.float32)
    ref = kb.FDFE.dense_reference(net, images, 7)
    assert max_rel_error(next(iter(served(images).values())), ref) <= TOL["float32"]
    assert max_rel_error(loaded(images), ref) <= TOL["float32"]

    log_s = net.layers[1].log_s
    assert any(w is log_s for w in ci.trainable_weights) and len(ci.get_weights()) == len(net.weights)
    before = log_s.numpy().copy()
    ci.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ci.fit(images, tf.zeros_like(ref), epochs=1, verbose=0)
    assert not np.array_equal(log_s.numpy(), before), "ci.fit did not train a weight Cp's call() reads"
    loaded.set_weights(ci.get_weights())  # the copy's own variables, set from the trained CI
    assert max_rel_error(loaded(images), kb.FDFE.dense_reference(net, images, 7)) <= TOL["float32"]
    checkpoint = tf.train.Checkpoint(model=ci)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    trained = log_s.numpy().copy()
    log_s.assign(tf.zeros_like(log_s))
    checkpoint.restore(path)
    assert np.array_equal(log_s.numpy(), trained), "tf.train.Checkpoint(ci) did not restore a weight call() reads"


def _keras_images(n, h, w, seed):
    return np.ascontiguousarray(netspec.random_images(n, CHANNELS, h, w, seed), dtype=np.float32)


def _check_keras_artifact(kb, net, run, name, sizes=UNSEEN):
    """``run`` (an exported Keras CI, numpy in and out) gives Cp's output on every patch at ``sizes``."""
    import tensorflow as tf
    for seed, (n, h, w) in enumerate(sizes):
        images = _keras_images(n, h, w, 20 + seed)
        out = np.asarray(run(images))
        assert out.shape == (n, h, w, 3), (name, (n, h, w))
        ref = kb.FDFE.dense_reference(net, tf.constant(images), PATCH)
        assert max_rel_error(out, ref) <= TOL["float32"], (name, (n, h, w))


def test_keras_ci_is_a_model_of_any_image_size(kb):
    """CI's symbolic inputs and outputs take any N, H, W and are one graph, the same tensors at every access, so
    that Keras' idiom keras.Model(ci.inputs, head(ci.outputs[0])) builds a model (it failed with "Graph
    disconnected", and ci.input / ci.output with "never been called"); summary() lists the converted layers."""
    import keras
    net, ci = _keras_ci(kb)
    assert [tuple(t.shape) for t in ci.inputs] == [(None, None, None, CHANNELS)]
    assert [tuple(t.shape) for t in ci.outputs] == [(None, None, None, 3)]
    assert (ci.input_shape, ci.output_shape) == ((None, None, None, CHANNELS), (None, None, None, 3))
    assert ci.outputs[0] is ci.outputs[0] and ci.output is ci.outputs[0] and ci.input is ci.inputs[0]
    head = keras.layers.Dense(2)
    model = keras.Model(ci.input, head(ci.output))
    images = _keras_images(2, 9, 8, 5)
    ref = kb.FDFE.dense_reference(net, images, PATCH)
    assert max_rel_error(model(images), head(ref)) <= TOL["float32"]
    lines = []
    ci.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    text = "\n".join(lines)
    for kind in ["multiConv", "multiMaxPooling", "multiLPPooling", "multiAvgPooling", "DenseAsConv"]:
        assert kind in text, kind


def test_keras_tflite_with_builtin_ops_only(kb, tmp_path):
    """TFLite from the exported SavedModel with built-in ops only (no Select ops), fast and naive
    paths: a fixed image size, and dynamic H, W set with resize_tensor_input, exact at unseen sizes."""
    import tensorflow as tf
    net, ci = _keras_ci(kb)

    def interpreter(shape):
        path = str(tmp_path / f"saved_{len(list(tmp_path.iterdir()))}")
        ci.export(path, input_signature=[tf.TensorSpec(shape, tf.float32)], verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(path)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return tf.lite.Interpreter(model_content=converter.convert())

    def run_with(interp, resize):
        def run(images):
            index = interp.get_input_details()[0]["index"]
            if resize:
                interp.resize_tensor_input(index, list(images.shape))
            interp.allocate_tensors()
            interp.set_tensor(index, images)
            interp.invoke()
            return interp.get_tensor(interp.get_output_details()[0]["index"])
        return run

    for naive in (False, True):
        ci.naive = naive
        _check_keras_artifact(kb, net, run_with(interpreter([None, None, None, CHANNELS]), True),
                              f"TFLite dynamic, naive={naive}", UNSEEN[:3])
    ci.naive = False
    _check_keras_artifact(kb, net, run_with(interpreter([2, 17, 23, CHANNELS]), False), "TFLite fixed",
                          [(2, 17, 23)])


def test_keras_exports_with_a_reflected_border(kb, tmp_path):
    """border='reflect' in exported graphs (SavedModel, TFLite, tf2onnx, XLA), where the image size is known only as
    they run: exact at unseen sizes; an image smaller than the patch reaches is refused by the SavedModel with the
    eager message (it raised a raw MirrorPad error); a TFLite interpreter and XLA, which drop that check, give NaN
    (TFLite read memory outside the image: other values at every run)."""
    import onnxruntime
    import tensorflow as tf
    import tf2onnx
    net, ci = _keras_ci(kb, border="reflect")
    top, bottom, left, right = kb.FDFE.patch_padding(PATCH)
    sizes = [(1, max(top, bottom) + 1, max(left, right) + 1), (2, 17, 23), (1, 29, 26)]

    def check(run, name):
        for seed, (n, h, w) in enumerate(sizes):
            images = _keras_images(n, h, w, 30 + seed)
            ref = kb.FDFE.dense_reference(net, tf.constant(images), PATCH, border="reflect")
            assert max_rel_error(np.asarray(run(images)), ref) <= TOL["float32"], (name, (n, h, w))
    path = str(tmp_path / "saved")
    ci.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # (kept: its functions read its variables)
    served = loaded.serve
    check(lambda images: served(tf.constant(images)), "SavedModel")
    small = _keras_images(1, 3, 2, 7)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"border=reflect mirrors the image at its edge, so "
                       r"it must be larger than the patch reaches beyond it"):
        served(tf.constant(small))
    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())

    def tflite(images):
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, list(images.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    check(tflite, "TFLite")
    assert np.isnan(tflite(small)).all()  # (an interpreter cannot raise: NaN, not numbers)
    xla = tf.function(lambda images: ci(images), input_signature=[tf.TensorSpec([None, None, None, CHANNELS])],
                      jit_compile=True)  # (XLA drops the check too)
    check(xla, "XLA")
    assert np.isnan(xla(small).numpy()).all()
    spec = (tf.TensorSpec([None, None, None, CHANNELS], tf.float32, name="images"),)
    proto, _ = tf2onnx.convert.from_function(tf.function(lambda images: ci(images), input_signature=spec),
                                             input_signature=spec, opset=17)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    check(lambda images: session.run(None, {session.get_inputs()[0].name: images})[0], "ONNX Runtime")


def test_keras_tf2onnx_runs_exactly_in_onnxruntime(kb):
    """tf2onnx of CI's call with (None, None, None, C) images, fast and naive paths, in ONNX Runtime at
    sizes that are not multiples of the stride product."""
    import onnxruntime
    import tensorflow as tf
    import tf2onnx
    net, ci = _keras_ci(kb)
    spec = (tf.TensorSpec([None, None, None, CHANNELS], tf.float32, name="images"),)
    for naive in (False, True):
        ci.naive = naive
        proto, _ = tf2onnx.convert.from_function(tf.function(lambda images: ci(images), input_signature=spec),
                                                 input_signature=spec, opset=17)
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        _check_keras_artifact(kb, net, lambda x: session.run(None, {"images": x})[0], f"tf2onnx, naive={naive}",
                              UNSEEN[:3])
