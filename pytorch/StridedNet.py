"""StridedNet: CI wired by hand for a descriptor net with a strided convolution, batch
normalisation, a flatten + Linear head and an L2 normalisation (PyTorch).

The second template next to SlimNet (whose BaseNet has only pooling and convolutions).  The
example Cp, StridedPatchNet, maps a 21x21 grey patch to a 32-vector of unit length:

    conv 5x5 1->16, ReLU, max-pool 2,
    conv 3x3 16->32, batch norm, ReLU,
    conv 2x2 32->32 stride 2, ReLU,          <- a strided convolution: it counts like a pooling layer
    conv 2x2 32->64, flatten (64x2x2),
    Linear 256->32, L2 normalisation

Each layer kind's hand-wired form (README, "Wiring CI by hand"):

    stride-1 conv, activation       reused unchanged (same module, same weights)
    pooling                         FDFE.multiMaxPooling / multiAvgPooling / multiLPPooling
    strided convolution             FDFE.multiConv(conv)
    batch normalisation             its running statistics, per pixel (F.batch_norm(..., training=False))
    flatten                         left out
    Linear after the flatten        FDFE.linearAsConv(fc, in_shape=(C, h, w) of the flattened map)
    Linear after a Linear           FDFE.linearAsConv(fc)  (a 1x1 convolution)
    L2 normalisation over channels  unchanged: F.normalize(x, dim=1) normalises every pixel's vector
    dropout                         left out (identity at inference)

and the strides: every pooling layer's and every strided convolution's, in network order, in
FDFE.multiPoolPrepare's stride product and in FDFE.unwarpAll's list.  FDFE.check_ci compares the
result with Cp on a few pixels (the constructor does it); FDFE.dense_reference runs Cp on every patch.

No padding may happen inside Cp (see the README's refusals).  FDFE.convert(base_net, 21) builds the
same CI automatically.
"""

import math

import FDFE
import torch
import torch.nn as nn
import torch.nn.functional as F


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class StridedPatchNet(nn.Module):
    """The example Cp: a 21x21 grey patch -> a 32-vector of unit length (a descriptor).

    Args:
        seed: seed of the random weights (PyTorch's default initialisation; the batch norm gets random
            running statistics, scale and shift, as after training).

    Shape:
        (B, 1, 21, 21) -> (B, 32).  Patches of 20 to 23 pixels a side also give one vector.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(1, 16, 5)
            self.relu1 = nn.ReLU()
            self.pool1 = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(16, 32, 3)
            self.bn2 = nn.BatchNorm2d(32)
            self.relu2 = nn.ReLU()
            self.conv3 = nn.Conv2d(32, 32, 2, stride=2)
            self.relu3 = nn.ReLU()
            self.conv4 = nn.Conv2d(32, 64, 2)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(64 * 2 * 2, 32)
            with torch.no_grad():
                self.bn2.running_mean.uniform_(-0.5, 0.5)
                self.bn2.running_var.uniform_(0.5, 2.0)
                self.bn2.weight.uniform_(0.5, 1.5)
                self.bn2.bias.uniform_(-0.5, 0.5)

    def features(self, x):
        """The layers before the flatten: (B, 1, pH, pW) -> (B, 64, h, w), h = w = 2 for 21x21 patches."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)

    def forward(self, x):
        return F.normalize(self.fc(self.flatten(self.features(x))), dim=1)


class StridedNet(nn.Module):
    """CI for StridedPatchNet: (N, 1, H, W) -> (N, 32, H, W), Cp's descriptor for the patch around every pixel.

    Args:
        base_net: the trained StridedPatchNet (its layers and weights are shared, not copied).
        pH, pW: patch size Cp was trained on (21 x 21).
        naive: paper-faithful multipooling (s*s shifted poolings and convolutions) and per-layer
            unwarping; the default is one stride-1 layer + space-to-batch and a single unwarping.
        check: compare CI with Cp on a few pixels of random test images (FDFE.check_ci) before
            returning; catches wiring mistakes when you adapt this file.

    The image size is taken from the input at call time: any N, H, W >= 1.  Floating images of another
    precision are cast to the net's; integer images are refused (convert them, e.g. ``.float() / 255``).

    Shape:
        (N, 1, H, W) -> (N, 32, H, W).
    """

    def __init__(self, base_net: StridedPatchNet, pH: int = 21, pW: int = 21, naive: bool = False,
                 check: bool = True):
        super().__init__()
        self.in_channels = 1
        self.patch_size = (pH, pW)

        # The map Cp flattens before its Linear, (C, h, w), at this patch size: read at the flatten while
        # FDFE.check_patch_size runs Cp on one patch (in eval mode, so no batch-norm statistics change).
        seen = {}

        def record(module, args):
            seen["shape"] = tuple(args[0].shape[1:])
        hook = base_net.flatten.register_forward_pre_hook(record)
        try:
            self.out_channels = FDFE.check_patch_size(base_net, (pH, pW), self.in_channels)
        finally:
            hook.remove()
        flattened = seen["shape"]

        # 1. Every stride of Cp in network order, the strided convolution's included: (sh, sw) each.
        self.strides = [_pair(base_net.pool1.stride), _pair(base_net.conv3.stride)]
        self.stride_product = (math.prod(s[0] for s in self.strides), math.prod(s[1] for s in self.strides))

        # 2. Zero padding: a patch around every pixel, and the image size up to a multiple of the stride product.
        self.prepare = FDFE.multiPoolPrepare(pH, pW, stride_product=self.stride_product)

        # 3. Cp layer by layer.
        self.conv1, self.relu1 = base_net.conv1, base_net.relu1           # stride 1: unchanged
        (kh, kw), (sh, sw) = _pair(base_net.pool1.kernel_size), self.strides[0]
        self.pool1 = FDFE.multiMaxPooling(kw, kh, sw, sh, naive=naive)    # pooling -> multipooling
        self.conv2, self.relu2 = base_net.conv2, base_net.relu2
        self.bn2 = base_net.bn2                                           # its running statistics (forward)
        self.conv3 = FDFE.multiConv(base_net.conv3, naive=naive)          # strided conv -> multiConv
        self.relu3 = base_net.relu3
        self.conv4 = base_net.conv4
        # flatten: left out.  The Linear after it: an h x w convolution on the (C, h, w) map Cp flattens.
        self.fc = FDFE.linearAsConv(base_net.fc, in_shape=flattened)
        # L2 normalisation over channels: per pixel, the same call as in Cp (forward).

        # 4. Unwarping: undo the stacking of shifts (every stride listed above) and crop to the image.
        self.unwarp = FDFE.unwarpAll(self.strides, naive=naive)

        # 5. Check the wiring against Cp (cheap: a few pixels of two small random images).
        if check:
            FDFE.check_ci(self, base_net, (pH, pW))

    def forward(self, images):
        images = FDFE.check_images(images, self.in_channels, dtype=self.conv1.weight.dtype)
        x = self.prepare(images)
        x = self.relu1(self.conv1(x))
        x = x.contiguous(memory_format=torch.channels_last)  # channels innermost: much faster on CPUs
        x = self.pool1(x)
        bn = self.bn2  # batch norm with its running statistics, whatever the mode (Cp at inference)
        x = self.relu2(F.batch_norm(self.conv2(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                    training=False, eps=bn.eps))
        x = self.relu3(self.conv3(x))
        x = self.fc(self.conv4(x))
        x = F.normalize(x, dim=1)
        return self.unwarp(x, images)
