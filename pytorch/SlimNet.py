"""SlimNet: CI for BaseNet, wired by hand from FDFE's building blocks (PyTorch).

This file is a template (the original port's; StridedNet.py is a second one, for a net with a
strided convolution, batch normalisation, a flatten + Linear head and an L2 normalisation).  To
make CI for your own patch network by hand:

  1. Copy it next to your BaseNet.
  2. List every stride of your Cp in ``self.strides``, in network order: each pooling layer's and
     each strided convolution's (their product pads the images and all of them are unwarped).
  3. In __init__, go through your Cp layer by layer:
       - a layer without pooling or striding (conv with stride 1, activation, ...) is reused
         unchanged: ``self.x = base_net.x``;
       - a pooling layer becomes multipooling with the same kernel and stride
         (FDFE.multiMaxPooling / multiAvgPooling / multiLPPooling);
       - a strided convolution becomes ``FDFE.multiConv(base_net.conv)``;
       - batch norm, flatten + Linear, normalisation: see StridedNet.py.
  4. Mirror your Cp's forward in ``forward``, ending with ``self.unwarp(x, images)``.
  5. Keep ``check=True``: FDFE.check_ci compares the result with Cp on a few pixels.

No padding may happen inside Cp (see the README's limits).  FDFE.convert(base_net,
patch_size) does all of this automatically; this file shows what it builds.
"""

import FDFE
import torch
import torch.nn as nn


def _check_stride(pool: nn.MaxPool2d, stride: int, name: str) -> None:
    """The strides given to SlimNet must be the ones the trained net pools with."""
    actual = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    if stride != actual:
        raise ValueError(f"{name}={stride} does not fit the net: its pooling layer pools with stride {actual}")


class SlimNet(nn.Module):
    """CI for BaseNet: (N, 1, H, W) -> (N, 113, H, W), Cp's output for the patch around every pixel.

    Args:
        base_net: the trained BaseNet (its layers and weights are shared, not copied).
        pH, pW: patch size Cp was trained on (BaseNet: 14 to 17 with strides 2, 2).
        sL1, sL2: strides of BaseNet's two pooling layers.
        naive: paper-faithful multipooling (s*s shifted poolings) and per-layer unwarping;
            the default is one stride-1 pooling + space-to-batch and a single unwarping.
        check: compare CI with Cp on a few pixels of random test images (FDFE.check_ci) before
            returning.

    The image size is taken from the input at call time: any N, H, W >= 1.  Floating images of another
    precision are cast to the net's; integer images are refused (convert them, e.g. ``.float() / 255``).

    Shape:
        (N, 1, H, W) -> (N, 113, H, W).
    """

    def __init__(self, base_net, pH: int, pW: int, sL1: int = 2, sL2: int = 2, naive: bool = False,
                 check: bool = True):
        super().__init__()
        _check_stride(base_net.pool1, sL1, "sL1")
        _check_stride(base_net.pool2, sL2, "sL2")
        self.out_channels = FDFE.check_patch_size(base_net, (pH, pW), in_channels=1)
        self.in_channels = 1
        self.strides = [(sL1, sL1), (sL2, sL2)]

        # Zero padding: a patch around every pixel, and the image size up to a multiple of sL1*sL2.
        self.prepare = FDFE.multiPoolPrepare(pH, pW, stride_product=sL1 * sL2)

        # Layers without pooling or striding: used unchanged (same modules, same weights).
        self.conv1, self.relu1 = base_net.conv1, base_net.relu1
        self.conv2, self.relu2 = base_net.conv2, base_net.relu2
        self.conv3, self.relu3 = base_net.conv3, base_net.relu3
        self.conv4 = base_net.conv4

        # Pooling layers -> multipooling with the same kernel and stride (kW, kH, dW, dH).
        k1, k2 = base_net.pool1.kernel_size, base_net.pool2.kernel_size
        self.pool1 = FDFE.multiMaxPooling(k1, k1, sL1, sL1, naive=naive)
        self.pool2 = FDFE.multiMaxPooling(k2, k2, sL2, sL2, naive=naive)

        # Unwarping: undo the stacking of shifts (all layers, innermost last) and crop to the image.
        self.unwarp = FDFE.unwarpAll(self.strides, naive=naive)

        # Check the wiring against Cp (cheap: a few pixels of two small random images).
        if check:
            FDFE.check_ci(self, base_net, (pH, pW))

    def forward(self, images):
        images = FDFE.check_images(images, self.in_channels, dtype=self.conv1.weight.dtype)
        x = self.prepare(images)
        x = self.relu1(self.conv1(x))
        x = x.contiguous(memory_format=torch.channels_last)  # channels innermost: much faster on CPUs
        x = self.pool1(x)
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = self.conv4(x)
        return self.unwarp(x, images)
