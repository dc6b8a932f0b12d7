"""Published patch architectures convert exactly in both backends; padded and per-patch-normalised
nets (HardNet, TFeat with its input normalisation) are refused with the reason."""

import numpy as np
import pytest

import architectures
from conftest import TOL, max_rel_error

NAMES = ["simo_serra", "zagoruyko_siam_l2", "bailer_fast", "tfeat", "mccnn_fast", "strided_only", "siam2stream"]


def _sample(rng, n, h, w, count):
    flat = rng.choice(n * h * w, size=min(count, n * h * w), replace=False)
    return np.stack([flat // (h * w), flat // w % h, flat % w], 1)


@pytest.mark.parametrize("name", NAMES)
def test_published_architecture_converts_exactly(tb, kb, name):
    """CI equals Cp on a random sample of 60 patches (float32), and PyTorch equals Keras on every pixel."""
    import tensorflow as tf
    import torch
    patch = architectures.PATCH[name]
    t_net = architectures.build_torch(name)
    k_net = architectures.build_keras(name, t_net, kb.FDFE)
    rng = np.random.default_rng(len(name))
    image = rng.standard_normal((2, 13, 10, 1)).astype(np.float32)
    positions = _sample(rng, 2, 13, 10, 60)
    t_img = torch.from_numpy(image.transpose(0, 3, 1, 2))
    with torch.no_grad():
        t_out = tb.FDFE.convert(t_net, patch)(t_img)
    t_ref = tb.FDFE.patch_outputs(t_net, t_img, patch, positions)
    pos = torch.from_numpy(positions)
    assert max_rel_error(t_out[pos[:, 0], :, pos[:, 1], pos[:, 2]], t_ref) <= TOL["float32"]
    k_out = kb.FDFE.convert(k_net, patch)(tf.constant(image))
    k_ref = kb.FDFE.patch_outputs(k_net, tf.constant(image), patch, positions)
    assert max_rel_error(tf.gather_nd(k_out, positions), k_ref) <= TOL["float32"]
    assert max_rel_error(t_out.numpy().transpose(0, 2, 3, 1), k_out) <= 10 * TOL["float32"]


def _hardnet(input_norm):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class HardNet(nn.Module):
        """HardNet (Mishchuk et al., 2017): padded 3x3 convolutions, batch norm without affine."""

        def __init__(self):
            super().__init__()
            spec = [(1, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
            layers = []
            for cin, cout, stride in spec:
                layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(cout, affine=False), nn.ReLU()]
            layers += [nn.Dropout(0.3), nn.Conv2d(128, 128, 8, bias=False), nn.BatchNorm2d(128, affine=False)]
            self.features = nn.Sequential(*layers)

        def forward(self, x):
            if input_norm:  # each patch to zero mean, unit standard deviation
                flat = x.view(x.size(0), -1)
                mean, std = flat.mean(dim=1), flat.std(dim=1) + 1e-7
                x = (x - mean[:, None, None, None]) / std[:, None, None, None]
            return F.normalize(self.features(x).view(x.size(0), -1), dim=1)
    torch.manual_seed(0)
    return HardNet().eval()


def test_hardnet_is_refused_for_its_padding(tb):
    with pytest.raises(tb.FDFE.ConversionError, match=r"features\.0 \(Conv2d\).*pads its input.*patch border"):
        tb.FDFE.convert(_hardnet(input_norm=False), 32)


def test_hardnet_with_input_normalisation_is_refused_for_it(tb):
    """Every problem at once: the per-patch statistics (mean and std), each reported once, and the padded
    convolutions."""
    with pytest.raises(tb.FDFE.ConversionError, match=r"HardNet\.forward: .*computes a statistic over "
                       r"positions of each patch.*as per-patch normalisation does") as info:
        tb.FDFE.convert(_hardnet(input_norm=True), 32)
    message = str(info.value)
    assert message.startswith("Cp cannot be made dense exactly; 3 problems:")
    assert "Tensor.std cannot be made dense exactly: it computes a statistic over positions" in message
    assert "features.0 (Conv2d): torch.conv2d, features.3 (Conv2d): torch.conv2d" in message
    assert "features.15 (Conv2d): torch.conv2d cannot be made dense exactly: it pads its input" in message
    # the mean of every entry (flat.mean(1), a value of the whole patch that converts) is reported where it meets the
    # map; the std where it is computed, and not again where it is used
    assert "Tensor.sub cannot be made dense exactly: it combines a 1x32x32 map with a 1x1x1 map" in message
    assert "div" not in message


def test_tfeat_with_instance_norm_is_refused(tb):
    import torch.nn as nn
    net = nn.Sequential(nn.InstanceNorm2d(1, affine=False), *architectures.build_torch("tfeat"))
    with pytest.raises(tb.FDFE.ConversionError, match=r"0 \(InstanceNorm2d\).*statistics computed over each patch"):
        tb.FDFE.convert(net, 32)


def test_flop_counts(tb):
    """The FLOP ratios the benchmark reports: Simo-Serra 51.0 M multiply-adds per patch, 280 k per pixel."""
    net = architectures.build_torch("simo_serra")
    assert round(architectures.macs_per_patch(net, 64) / 1e6, 1) == 51.0
    assert round(architectures.macs_per_pixel(net) / 1e3) == 280
    siam = architectures.build_torch("zagoruyko_siam_l2")
    assert round(architectures.macs_per_patch(siam, 64) / 1e6, 1) == 18.9
    assert round(architectures.macs_per_pixel(siam) / 1e3) == 908
