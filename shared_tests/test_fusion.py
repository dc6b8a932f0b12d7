"""PyTorch's CI computes a tanh that follows a stride-1 convolution (directly, or after a max pooling, with which
tanh commutes) inside that convolution's oneDNN call, at inference on CPUs in float32.  Which layers fuse; that
the result still equals Cp on every patch (float32 tolerance) and differs from the unfused run by rounding only;
that the fused op really runs; and that nothing fuses where another layer reads the values in between."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TOL, max_rel_error


class _TanhResidual(nn.Module):
    """conv -> tanh, but the convolution's output is read again: no fusion."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.out(torch.tanh(y) + 0.5 * y)


class _FunctionalTanh(nn.Module):
    """conv -> F.max_pool2d -> F.tanh (functional forms), then a conv -> torch.tanh."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 2, dilation=2)

    def forward(self, x):
        x = F.tanh(F.max_pool2d(self.a(x), 2))
        return torch.tanh(self.b(x))


def _cases():
    torch.manual_seed(0)
    return [
        # (Cp, patch, expected {conv step: tanh step})
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3), nn.Tanh()), 5, {0: 1, 2: 3}),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.Tanh(), nn.Conv2d(4, 3, 2), nn.MaxPool2d(3),
                       nn.Tanh()), 12, {0: 2, 3: 5}),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.AvgPool2d(2), nn.Tanh(), nn.Conv2d(4, 3, 2)), 6, {}),  # avg: no
        (nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.Tanh(), nn.Conv2d(4, 3, 2)), 5, {}),  # strided: no
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 2), nn.Sigmoid()), 4, {}),  # not tanh
        (_TanhResidual(), 5, {}),
        (_FunctionalTanh(), 8, {0: 2, 3: 4}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_torch_tanh_fused_into_convolutions_is_exact(tb, case):
    net, patch, expected = _cases()[case]
    net = net.eval()
    torch.manual_seed(1)
    images = 2 * torch.randn(2, 2, 17, 22)  # values well into tanh's curved range
    ci = tb.FDFE.convert(net, patch)
    assert ci._tanh_fusions() == expected
    ref = tb.FDFE.dense_reference(net, images, patch)
    with torch.inference_mode():
        fused = ci(images)
        ci.fuse_tanh = False
        plain = ci(images)
    assert max_rel_error(fused, ref) <= TOL["float32"]
    assert max_rel_error(plain, ref) <= TOL["float32"]
    assert float((fused - plain).abs().max()) <= 1e-6
    ci.fuse_tanh = True
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ci(images)
    ran = any(e.key == "mkldnn::_convolution_pointwise" for e in prof.key_averages())
    assert ran == (bool(expected) and tb.FDFE._conv_tanh_available())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # autograd: never
        ci(images.requires_grad_())
    assert not any(e.key == "mkldnn::_convolution_pointwise" for e in prof.key_averages())


def test_torch_tanh_fusion_is_available_on_this_cpu_build(tb):
    """The CPU wheels the project pins have oneDNN; without it the fusion would silently never run."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    assert tb.FDFE._conv_tanh_available()


def test_torch_no_tanh_fusion_under_autocast(tb):
    """torch.autocast("cpu", bfloat16) runs Cp's convolutions in bfloat16; the fused oneDNN op would compute in
    float32 and return float32, so under autocast CI runs Cp's own ops (bit for bit those of Cp)."""
    torch.manual_seed(0)
    cp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 5, 3), nn.Tanh()).eval()
    images = torch.randn(2, 3, 19, 23)
    ci = tb.FDFE.convert(cp, 5)
    assert ci._tanh_fusions() == {0: 1, 2: 3}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref, out = tb.FDFE.dense_reference(cp, images, 5), ci(images)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert max_rel_error(out.float(), ref.float()) == 0.0
