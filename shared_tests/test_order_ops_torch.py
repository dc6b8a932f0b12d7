"""PyTorch: ops that order or accumulate the channels of each pixel (cumsum, cumprod, logcumsumexp, cummax, cummin,
sort, argsort, topk) and reductions over them (prod, nansum, nanmean, any, all, aminmax, median, nanmedian, mode,
kthvalue, quantile, nanquantile), and the channels one by one (r, g, b = x.unbind(1)).  Along the channel axis they
act per pixel (of a map, a vector of one position, a
transposed map, or a group axis of a map split into groups); convert() refused them as unknown ops.  CI equals Cp on
every patch: float64 within TOL["float64"] = 1e-10 of the largest |Cp|, float32 within 1e-5; gradients too.  Along
a position axis, over the whole tensor, or several quantiles at once: refused, naming why."""

import copy
import pickle

import numpy as np
import pytest

from conftest import TOL, max_rel_error

torch = pytest.importorskip("torch")


def _f(y, like):
    return y.to(like.dtype)


ORDER_OPS = {  # an 8-channel map (N, 8, h, w) -> a map of the same size
    "cumsum": lambda y: y.cumsum(1) * 0.3,
    "cumprod": lambda y: torch.cumprod(y, dim=1),
    "logcumsumexp": lambda y: y.logcumsumexp(1),
    "cummax": lambda y: y.cummax(1).values + _f(y.cummax(1)[1], y) * 0.1,
    "cummin": lambda y: torch.cummin(y, dim=1)[0],
    "sort": lambda y: torch.sort(y, 1, descending=True)[0],
    "sort_indices": lambda y: y + _f(y.sort(dim=1).indices, y) * 0.1,
    "argsort": lambda y: _f(torch.argsort(y, 1), y) * 0.1 - y,
    "topk": lambda y: torch.cat([y.topk(3, 1)[0], torch.topk(y, k=5, dim=1, largest=False).values], 1),
    "prod": lambda y: y * y.prod(1, keepdim=True),
    "nansum": lambda y: y + torch.nansum(y, 1, keepdim=True),
    "nanmean": lambda y: y - y.nanmean(1, True),
    "any_all": lambda y: y * (y > 0.1).any(1, keepdim=True) + y * torch.all(y > -0.5, dim=1, keepdim=True),
    "aminmax": lambda y: torch.cat(torch.aminmax(y, dim=1, keepdim=True) + (y[:, 2:],), 1),
    "median": lambda y: y - y.median(1, keepdim=True)[0] + y.median(1).values[:, None],
    "nanmedian": lambda y: y - torch.nanmedian(y, 1, True).values,
    "mode": lambda y: torch.cat([y[:, 1:], torch.mode((y * 2).round(), 1, True)[0]], 1),
    "kthvalue": lambda y: y - y.kthvalue(3, 1, True).values,
    "quantile": lambda y: y - torch.quantile(y, 0.3, dim=1, keepdim=True),
    "nanquantile": lambda y: y - y.nanquantile(0.7, 1, True, interpolation="nearest"),
}

ELSEWHERE = {  # the same kinds of op on other values whose channels they order
    "vector_sort": ("vector", lambda v: v.sort()[0]),  # (dim -1 of (N, K): its channels)
    "vector_topk": ("vector", lambda v: torch.cat([v.topk(2)[0], v], 1)),
    "vector_cumsum_median": ("vector", lambda v: v.cumsum(-1) - v.median(-1, keepdim=True)[0]),
    "vector_kthvalue_prod": ("vector", lambda v: v.kthvalue(2)[0][:, None] + v.prod(1)[:, None] * v),
    "transposed_sort": ("map", lambda y: y.permute(0, 2, 3, 1).sort(-1)[0].permute(0, 3, 1, 2)),
    "transposed_topk_cumsum": ("map", lambda y: y.permute(0, 2, 3, 1).topk(8, -1)[0].cumsum(3).permute(0, 3, 1, 2)),
    "transposed_median": ("map", lambda y: y - y.permute(0, 2, 3, 1).median(-1, keepdim=True)[0].permute(0, 3, 1, 2)),
    "groups_cumsum": ("map", lambda y: y.unflatten(1, (2, 4)).cumsum(2).flatten(1, 2)),
    "groups_topk": ("map", lambda y: y.unflatten(1, (2, 4)).topk(4, dim=2)[0].flatten(1, 2)),
    "groups_sort": ("map", lambda y: torch.sort(y.unflatten(1, (2, 4)), dim=1)[0].flatten(1, 2)),
    "sort_topk_cumsum": ("map", lambda y: torch.cat([y.sort(1)[0][:, :3], y.topk(3, 1)[0], y.cumsum(1)[:, :2]], 1)),
    "unbind": ("map", lambda y: torch.stack(y.unbind(1)[::-1], 1) * sum(torch.unbind(y, dim=-3))[:, None]),
    "vector_unbind": ("vector", lambda v: torch.stack([a * b for a, b in zip(v.unbind(1), v.unbind(-1)[1:])], 1)),
    "transposed_unbind": ("map", lambda y: torch.stack(y.permute(0, 2, 3, 1).unbind(-1)[1:] + (y[:, 0],), 1)),
    "groups_unbind": ("map", lambda y: torch.cat(y.unflatten(1, (2, 4)).unbind(1), 1)),
    "groups_median_quantile": ("map", lambda y: torch.cat([y.unflatten(1, (4, 2)).median(1).values,
                                                           y.unflatten(1, (2, 4)).quantile(0.25, 2),
                                                           y[:, :4]], 1)),
}


class OrderCp(torch.nn.Module):
    """conv -> max pool 2 -> conv to an 8-channel map -> the op (ORDER_OPS, or ELSEWHERE on the map or on a vector
    after a Linear) -> a head to 5 channels (at module level, so that CI pickles)."""

    def __init__(self, op_name, patch):
        super().__init__()
        nn = torch.nn
        self.op_name = op_name
        self.where = ELSEWHERE.get(op_name, ("map",))[0]
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 3), nn.MaxPool2d(2), nn.Conv2d(6, 8, 2)
        size = (patch[0] - 2) // 2 - 1, (patch[1] - 2) // 2 - 1
        self.fc = nn.Linear(8 * size[0] * size[1], 6 if self.where == "vector" else 5)
        self.head = nn.Linear({"vector_topk": 8, "vector_unbind": 5}.get(op_name, 6), 5) if self.where == "vector" \
            else None

    def forward(self, x):
        op = ELSEWHERE[self.op_name][1] if self.op_name in ELSEWHERE else ORDER_OPS[self.op_name]
        y = self.conv2(self.pool(torch.tanh(self.conv1(x))))
        if self.where == "vector":
            return self.head(op(self.fc(y.flatten(1))))
        return self.fc(torch.tanh(op(y)).flatten(1))


def _cp(op_name, patch, dtype=torch.float64):
    torch.manual_seed(0)
    return OrderCp(op_name, patch).to(dtype).eval()


def _images(n, h, w, seed, dtype="float64"):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(dtype))


@pytest.mark.parametrize("op_name", sorted(ORDER_OPS) + sorted(ELSEWHERE))
def test_order_ops_equal_cp_on_every_patch(tb, op_name):
    """Float64, an odd-by-even patch, a size that is no multiple of the stride product, a batch of 2; tiled too."""
    patch = (11, 12)
    cp = _cp(op_name, patch)
    ci = tb.FDFE.convert(cp, patch)
    images = _images(2, 13, 10, seed=1)
    ref = tb.FDFE.dense_reference(cp, images, patch)
    assert max_rel_error(ci(images).detach(), ref) <= TOL["float64"]
    ci.tile = (5, 6)
    assert max_rel_error(ci(images).detach(), ref) <= TOL["float64"]


@pytest.mark.parametrize("op_name", ["sort", "topk", "median", "groups_topk", "vector_cumsum_median"])
def test_order_ops_in_float32_and_at_a_step(tb, op_name):
    cp = _cp(op_name, (10, 10), torch.float32)
    images = _images(2, 11, 14, seed=2, dtype="float32")
    ci = tb.FDFE.convert(cp, 10)
    assert max_rel_error(ci(images).detach(), tb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]
    ci = tb.FDFE.convert(cp, 10, output_stride=(3, 2))
    assert max_rel_error(ci(images).detach(), tb.FDFE.dense_reference(cp, images, 10, output_stride=(3, 2))) \
        <= TOL["float32"]


def test_order_ops_gradients_equal_cp(tb):
    """Gradients with respect to the image and every parameter equal Cp's on every patch (float64)."""
    from test_training import _compare, torch_gradients
    for op_name in ("sort", "topk", "cumprod", "median", "quantile", "groups_sort", "transposed_topk_cumsum"):
        cp = _cp(op_name, (10, 10))
        ci = tb.FDFE.convert(cp, 10)
        images = _images(2, 11, 9, seed=3)
        weights = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 5, 11, 9)))
        _compare(torch_gradients(tb, cp, images, 10, weights, ci=ci), torch_gradients(tb, cp, images, 10, weights),
                 op_name)


def test_order_ops_copy_pickle_and_export(tb, tmp_path):
    """Copies (deepcopy, pickle) and exports (torch.export; ONNX through onnxruntime) of a CI that sorts, takes the
    top k and accumulates the channels, at sizes not seen at export."""
    import onnxruntime
    from torch.export import Dim

    cp = _cp("sort_topk_cumsum", (10, 10), torch.float32)
    ci = tb.FDFE.convert(cp, 10)
    for copied in (copy.deepcopy(ci), pickle.loads(pickle.dumps(ci))):
        images = _images(2, 9, 14, seed=5, dtype="float32")
        assert max_rel_error(copied(images).detach(), tb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=2, max=4096), 3: Dim("W", min=2, max=4096)}
    example = (_images(2, 11, 13, seed=6, dtype="float32"),)
    program = torch.export.export(ci, example, dynamic_shapes={"images": dims})
    path = str(tmp_path / "order.onnx")
    torch.onnx.export(ci, example, path, dynamo=True, input_names=["images"], dynamic_shapes={"images": dims})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, (n, h, w) in enumerate([(1, 7, 12), (3, 15, 9)]):
        images = _images(n, h, w, seed=10 + seed, dtype="float32")
        ref = tb.FDFE.dense_reference(cp, images, 10)
        with torch.no_grad():
            assert max_rel_error(program.module()(images), ref) <= TOL["float32"], (n, h, w)
        assert max_rel_error(session.run(None, {"images": images.numpy()})[0], ref.numpy()) <= TOL["float32"]


@pytest.mark.parametrize("op, says", [
    (lambda y: y.sort()[0], ["Tensor.sort", "dim -1", "mixes positions", "channel axis (dim 1)"]),
    (lambda y: y.topk(2, 2)[0], ["Tensor.topk", "dim 2", "mixes positions"]),
    (lambda y: y.cumsum(3), ["Tensor.cumsum", "dim 3", "mixes positions"]),
    (lambda y: y.cumsum(0), ["dim 0, the batch of patches"]),
    (lambda y: y - y.median(), ["Tensor.median", "whole tensor, batch included"]),
    (lambda y: y * y.prod(), ["Tensor.prod", "whole tensor"]),
    (lambda y: y - y.mode(keepdim=True)[0], ["Tensor.mode", "over one spatial axis only mean, sum, amax and amin"]),
    (lambda y: y - torch.quantile(y, torch.tensor([0.2, 0.5], dtype=y.dtype), dim=1, keepdim=True)[0],
     ["torch.quantile", "several quantiles at once", "one quantile per call"]),
    (lambda y: y - y.median(2, keepdim=True)[0].median(3, keepdim=True)[0], ["Tensor.median", "over one spatial "
                                                                             "axis"]),
    (lambda y: y.unflatten(1, (2, 4)).sort(-1)[0].flatten(1, 2), ["Tensor.sort", "position axis"]),
    (lambda y: torch.stack(y.unbind(2), 2), ["Tensor.unbind", "dim 2", "mixes positions"]),
    (lambda y: torch.stack(y.unbind(), 0), ["Tensor.unbind", "dim 0, the batch of patches"]),
])
def test_order_ops_along_positions_are_refused_by_name(tb, op, says):
    class Cp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return op(self.conv1(x)).mean((-2, -1))

    with pytest.raises(tb.FDFE.ConversionError) as info:
        tb.FDFE.convert(Cp().double().eval(), 8)
    message = str(info.value)
    assert all(part in message for part in says), message


def test_order_ops_are_listed(tb):
    listed = {name for names in tb.FDFE.supported_layers().values() for name in names}
    assert {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "argsort", "topk", "prod", "nansum",
            "nanmean", "any", "all", "aminmax", "median", "nanmedian", "mode", "kthvalue", "quantile",
            "nanquantile", "unbind"} <= listed
