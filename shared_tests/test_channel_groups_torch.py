"""PyTorch: maps with their channels split into group axes, (N, g1, ..., gk, h, w): maxout over a reshape of the
channels, channel shuffle, softmax or sums within groups, stacks of maps along a new axis (selective-kernel
attention).  They act per pixel; CI gives Cp's output (and gradients) on every patch.  Float32 to 1e-5 of the
largest output (TOL), float64 to 1e-10."""

import copy
import pickle

import numpy as np
import pytest

from conftest import TOL, max_rel_error

torch = pytest.importorskip("torch")


def _maxout(x):
    n, c, h, w = x.shape
    return x.view(n, c // 2, 2, h, w).amax(2)


def _maxout_values(x):  # torch.max over a group axis: values and indices
    return x.unflatten(1, (2, x.shape[1] // 2)).max(1)[0]


def _shuffle(x):  # ShuffleNet's channel shuffle
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _shuffle_flat(x):
    return x.unflatten(1, (4, 2)).permute(0, 2, 1, 3, 4).flatten(1, 2)


def _grouped_softmax(x):
    return x.unflatten(1, (4, 2)).softmax(2).flatten(1, 2) * x


def _group_share(x):  # each channel's share of its group (a sum with keepdim, broadcast back)
    g = x.unflatten(1, (2, 4)).abs() + 0.5
    return (g / g.sum(1, keepdim=True)).reshape(x.shape) * x


def _group_std(x):  # a statistic within each group, then the groups as channels
    return x.unflatten(1, (4, 2)).std(2) + x.unflatten(1, (4, 2)).mean(2)


def _every_group_axis(x):  # a reduction over every group axis, (N, h, w): a one-channel map
    return x * x.unflatten(1, (2, 4)).amax((1, 2)).unsqueeze(1)


def _stack_attention(x, conv):  # two branches weighted per pixel by a softmax over a new stack axis
    branches = torch.stack([x, conv(x)], 1)
    weights = (branches * 0.7).tanh().softmax(1)
    return (branches * weights).sum(1)


def _selective_kernel(x, conv):  # SKNet's weights, from a global pooling of the branches: a gate of the patch
    branches = torch.stack([x, conv(x)], 1)
    weights = branches.mean((3, 4), keepdim=True).softmax(1)
    return (branches * weights).sum(1)


def _stack_pair(x, conv):  # a stack after the channels, an index along it and a product of its members
    pair = torch.stack([x, conv(x)], 2) * 0.5
    return pair[:, :, 0] * pair[:, :, 1] + pair.amax(2)


def _stack_max(x, conv):
    return torch.stack([x, -conv(x)], 1).amax(1)


GROUP_OPS = {"maxout": _maxout, "maxout_values": _maxout_values, "shuffle": _shuffle, "shuffle_flat": _shuffle_flat,
             "grouped_softmax": _grouped_softmax, "group_share": _group_share, "group_std": _group_std,
             "every_group_axis": _every_group_axis, "stack_pair": _stack_pair, "stack_max": _stack_max,
             "stack_attention": _stack_attention}


class GroupsCp(torch.nn.Module):
    """conv -> max pool 2 -> the op of GROUP_OPS on an 8-channel map -> conv -> Linear: a patch net of ``patch``
    (at module level, so that CI pickles)."""

    def __init__(self, op_name, patch, channels=3):
        super().__init__()
        nn = torch.nn
        self.op_name = op_name
        self.conv1, self.pool = nn.Conv2d(channels, 8, 3), nn.MaxPool2d(2)
        self.branch = nn.Conv2d(8, 8, 1) if op_name.startswith("stack") else None
        size = (patch - 2) // 2 - 1
        halved = op_name in ("maxout", "maxout_values", "group_std")
        self.conv2, self.fc = nn.Conv2d(4 if halved else 8, 6, 2), nn.Linear(6 * size * size, 5)

    def forward(self, x):
        y = self.pool(torch.tanh(self.conv1(x)))
        op = GROUP_OPS[self.op_name]
        y = op(y, self.branch) if self.branch is not None else op(y)
        return self.fc(torch.tanh(self.conv2(y)).flatten(1))


def _cp(op_name, patch):
    torch.manual_seed(0)
    return GroupsCp(op_name, patch).eval()


def _images(n, c, h, w, seed, dtype="float32"):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype))


@pytest.mark.parametrize("op_name", sorted(GROUP_OPS))
@pytest.mark.parametrize("patch", [10, 11])
def test_channel_groups_equal_cp_on_every_patch(tb, op_name, patch):
    """Odd and even patches, sizes that are not multiples of the stride product, a batch of 2, untiled and tiled."""
    cp = _cp(op_name, patch)
    ci = tb.FDFE.convert(cp, patch)
    images = _images(2, 3, 13, 10, seed=1)
    ref = tb.FDFE.dense_reference(cp, images, patch)
    assert max_rel_error(ci(images).detach(), ref) <= TOL["float32"]
    ci.tile = (5, 4)
    assert max_rel_error(ci(images).detach(), ref) <= TOL["float32"]


@pytest.mark.parametrize("op_name", ["shuffle", "stack_pair", "stack_attention"])
def test_channel_groups_in_float64_at_a_step_and_naive(tb, op_name):
    cp = _cp(op_name, 11).double()
    images = _images(1, 3, 12, 9, seed=2, dtype="float64")
    ci = tb.FDFE.convert(cp, 11)
    assert max_rel_error(ci(images).detach(), tb.FDFE.dense_reference(cp, images, 11)) <= TOL["float64"]
    ci = tb.FDFE.convert(cp, 11, output_stride=(2, 3))
    assert max_rel_error(ci(images).detach(), tb.FDFE.dense_reference(cp, images, 11, output_stride=(2, 3))) \
        <= TOL["float64"]
    ci = tb.FDFE.convert(cp, 11, naive=True)
    assert max_rel_error(ci(images).detach(), tb.FDFE.dense_reference(cp, images, 11)) <= TOL["float64"]


def test_maxout_gradients_at_ties_and_shuffle_gradients_equal_cp(tb):
    """Gradients with respect to the image and to every parameter equal Cp's on every patch (float64), also where
    the members of a maxout group tie (conv1 gives each channel twice): the op runs on the dense values as Cp runs
    it, so torch.amax shares the gradient among tied members in both."""
    from test_training import _compare, torch_gradients
    for op_name in ("maxout", "maxout_values", "shuffle", "stack_max"):
        cp = _cp(op_name, 10).double()
        if op_name.startswith("maxout"):
            with torch.no_grad():
                half = cp.conv1.weight[:4].clone(), cp.conv1.bias[:4].clone()
                cp.conv1.weight[4:], cp.conv1.bias[4:] = half  # (maxout_values pairs channel c with c + 4)
                if op_name == "maxout":  # (it pairs channel 2k with 2k + 1)
                    cp.conv1.weight.copy_(half[0].repeat_interleave(2, 0))
                    cp.conv1.bias.copy_(half[1].repeat_interleave(2, 0))
        ci = tb.FDFE.convert(cp, 10)
        images = _images(2, 3, 11, 9, seed=3, dtype="float64")
        weights = _images(2, 5, 11, 9, seed=4, dtype="float64")
        _compare(torch_gradients(tb, cp, images, 10, weights, ci=ci), torch_gradients(tb, cp, images, 10, weights),
                 op_name)


def test_channel_groups_copy_pickle_and_export(tb, tmp_path):
    """Copies (deepcopy, pickle) and exports (torch.export, ONNX through onnxruntime) at sizes not seen at export."""
    import onnxruntime
    from torch.export import Dim
    cp = _cp("shuffle", 10)
    ci = tb.FDFE.convert(cp, 10)
    unseen = [(1, 7, 12), (3, 15, 9)]
    for copied in (copy.deepcopy(ci), pickle.loads(pickle.dumps(ci))):
        images = _images(2, 3, 9, 14, seed=5)
        assert max_rel_error(copied(images).detach(), tb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=2, max=4096), 3: Dim("W", min=2, max=4096)}
    example = (_images(2, 3, 11, 13, seed=6),)
    program = torch.export.export(ci, example, dynamic_shapes={"images": dims})
    path = str(tmp_path / "groups.onnx")
    torch.onnx.export(ci, example, path, dynamo=True, input_names=["images"], dynamic_shapes={"images": dims})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    legacy = str(tmp_path / "groups_legacy.onnx")  # (TorchScript's exporter froze every shape of the graph: 1.04
    # off at 13x12, a Reshape error at most sizes)
    torch.onnx.export(ci, example, legacy, dynamo=False, input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}, "features": {0: "N", 2: "H", 3: "W"}})
    traced = onnxruntime.InferenceSession(legacy, providers=["CPUExecutionProvider"])
    for seed, (n, h, w) in enumerate(unseen + [(2, 13, 11)]):
        images = _images(n, 3, h, w, seed=10 + seed)
        ref = tb.FDFE.dense_reference(cp, images, 10)
        with torch.no_grad():
            assert max_rel_error(program.module()(images), ref) <= TOL["float32"], (n, h, w)
        assert max_rel_error(session.run(None, {"images": images.numpy()})[0], ref.numpy()) <= TOL["float32"]
        assert max_rel_error(traced.run(None, {"images": images.numpy()})[0], ref.numpy()) <= TOL["float32"]


@pytest.mark.parametrize("forward, says", [
    (lambda s, y: y.view(y.shape[0], 2, 4, *y.shape[2:]).repeat(1, 1, 2, 1, 1),
     ["split into groups (6x6 positions, 2x4 channels)", "reshape it back"]),
    (lambda s, y: y.view(y.shape[0], 2, 4, *y.shape[2:]).amax(3), ["position axis", "dims 1 to 2"]),
    (lambda s, y: y.view(y.shape[0], 2, 4, *y.shape[2:]).transpose(2, 3), ["transposes", "position axis"]),
    (lambda s, y: y.view(y.shape[0], 2, 4, *y.shape[2:])[:, :, :, 1:], ["indexes dim 3", "position axis"]),
    (lambda s, y: y.view(y.shape[0], 2, 4, *y.shape[2:]) * y[:, :4], ["combines a map with its channels split",
                                                                "unsqueeze"]),
    (lambda s, y: y.unflatten(1, (2, 4)).softmax(-1), ["position axis"]),
    (lambda s, y: torch.stack([y, y], 0).amax(0), ["new dim 0", "dim 1 or 2"]),
    (lambda s, y: _selective_kernel(y, lambda t: t * 2), ["Tensor.mean", "a position axis of the patch",
                                                         "for a global pooling, reshape it back to the map"]),
])
def test_what_cannot_be_made_dense_is_refused_by_name(tb, forward, says):
    class Cp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return forward(self, self.conv1(x)).mean((-2, -1)).flatten(1)

    with pytest.raises(tb.FDFE.ConversionError) as info:
        tb.FDFE.convert(Cp().eval(), 8)
    for text in says:
        assert text in str(info.value), str(info.value)


def test_reductions_with_positional_arguments_and_empty_values(tb):
    """torch.linalg.vector_norm(x, ord, dim) with ord positional (its dim was read from ord: the norm of the whole
    patch for a plain map, silently 0.6 off where convert's check was off), torch.max(x, dim, keepdim) and
    x.max(dim, keepdim) with keepdim positional (refused as 'unexpected arguments' on group axes) equal Cp on every
    patch; an empty part of a map split into groups is refused by name (it crashed)."""
    norm = torch.linalg.vector_norm

    def groups(y):
        return y.unflatten(1, (2, 4))

    class Cp(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.conv, self.f = torch.nn.Conv2d(2, 8, 3), f

        def forward(self, x):
            return self.f(torch.tanh(self.conv(x))).mean((2, 3))

    images = _images(2, 2, 9, 8, seed=7, dtype="float64")
    for f in (lambda y: y * norm(y, 1, 1).unsqueeze(1), lambda y: y * norm(groups(y), 2, (1, 2)).unsqueeze(1),
              lambda y: norm(groups(y), float("inf"), 1), lambda y: norm(groups(y), 3, 2, True).flatten(1, 2),
              lambda y: groups(y).max(2, True)[0].flatten(1, 2), lambda y: torch.min(groups(y), 1, True).values[:, 0]):
        cp = Cp(f).double().eval()
        ci = tb.FDFE.convert(cp, 7, check=False)
        with torch.no_grad():
            assert max_rel_error(ci(images), tb.FDFE.dense_reference(cp, images, 7)) <= TOL["float64"]
    cp = Cp(lambda y: (y[:, None].tensor_split(2, 1)[1] + 1).flatten(1, 2)).double().eval()
    with pytest.raises(tb.FDFE.ConversionError, match=r"tensor_split cannot be made dense exactly: it gives an empty "
                       r"value \(shape \(2, 0, 8, 5, 5\)\) of a map with its channels split into groups"):
        tb.FDFE.convert(cp, 7)


def test_global_reductions_of_grouped_maps(tb):
    """A reduction over every dim of a map split into groups (x.view(N, G, C // G, h, w).amax((1, 2, 3, 4)), sum,
    mean, flatten(1).amin(1)) is the map's global one, as for the reshapes of a map before groups were held
    (converted then, refused as over a position axis with the groups, found by a fuzzer); std over every dim is
    refused as a statistic of the patch, as before."""
    class Cp(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.conv, self.fc, self.f = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(1, 5), f

        def forward(self, x):
            y = torch.nn.functional.max_pool2d(torch.tanh(self.conv(x)), 2)
            return self.fc(self.f(y.view(y.shape[0], 4, 2, *y.shape[2:])).reshape(-1, 1))

    images = _images(2, 3, 13, 11, seed=8, dtype="float64")
    for f in (lambda g: g.amax((1, 2, 3, 4)), lambda g: g.sum((-1, -2, -3, -4)), lambda g: g.mean((1, 2, 3, 4)),
              lambda g: g.flatten(1).amin(1)):
        cp = Cp(f).double().eval()
        with torch.no_grad():
            assert max_rel_error(tb.FDFE.convert(cp, 10)(images), tb.FDFE.dense_reference(cp, images, 10)) \
                <= TOL["float64"]
    with pytest.raises(tb.FDFE.ConversionError, match=r"Tensor\.std cannot be made dense exactly: it computes a "
                                                      r"statistic over positions of each patch"):
        tb.FDFE.convert(Cp(lambda g: g.std((1, 2, 3, 4))).eval(), 10)
