"""Published patch architectures, in PyTorch and in Keras (random weights), for tests and benchmarks.

Each entry: its patch size (PATCH; one input channel) and builders.  The Keras builder returns a model that
computes the same function as the PyTorch one, with its weights copied (see ``build_keras``).

- simo_serra: the paper's Torch example (after Simo-Serra et al., ICCV 2015), 64x64 patches,
  conv 7x7 ->32, max-pool 2, tanh, conv 6x6 ->64, max-pool 3, tanh, conv 5x5 ->128, max-pool 4, tanh.
- zagoruyko_siam_l2: one branch of Zagoruyko & Komodakis' siamese descriptor (CVPR 2015), 64x64,
  conv 7x7 stride 3 ->96, ReLU, max-pool 2, conv 5x5 ->192, ReLU, max-pool 2, conv 3x3 ->256, ReLU,
  normalised to unit length ("siam-l2").
- bailer_fast: Bailer et al.'s patch network for optical flow (arXiv 1607.08064), 56x56.  Reconstructed
  from memory of that paper's architecture table, which could not be consulted here: conv 7x7 ->64,
  max-pool 2, conv 5x5 ->80, conv 5x5 ->160, max-pool 2, conv 5x5 ->256, conv 4x4 ->512, conv 1x1 ->64,
  tanh after every convolution.  Treat its layer sizes as approximate.
- tfeat: TFeat (Balntas et al., BMVC 2016) without its input normalisation, 32x32, conv 7x7 ->32, tanh,
  max-pool 2, conv 6x6 ->64, tanh, flatten, linear ->128, tanh.
- mccnn_fast: MC-CNN-fast-style stereo features (Zbontar & LeCun), 9x9, four 3x3 convolutions with 64
  maps, ReLU between them, normalised to unit length.  No pooling.
- strided_only: a net with strided convolutions and no pooling, 29x29.
- siam2stream: Zagoruyko & Komodakis' two-stream descriptor (CVPR 2015), 64x64: a central stream on the
  32x32 centre crop and a surround stream on the whole patch average-pooled 2x2 to 32x32, each
  conv 5x5 ->95, ReLU, max-pool 2, conv 3x3 ->96, ReLU, max-pool 2, conv 3x3 ->192, ReLU, conv 3x3 ->192,
  ReLU, then (our addition, so that each stream ends in one vector per patch) max-pool 2;
  concatenated (384) and normalised to unit length (their L2 variant).  The streams pool differently
  (strides 2, 2, 2 after the crop; 2, 2, 2, 2 with the downsampling).
- original_basenet: the original port's BaseNet, 15x15 (weights from weights/basenet.npz).
"""

import numpy as np

from backends import load_backend


def _torch_modules(name):
    import torch.nn as nn
    import torch.nn.functional as F

    class L2Norm(nn.Module):
        def forward(self, x):
            return F.normalize(x, dim=1)

    if name == "simo_serra":
        return [nn.Conv2d(1, 32, 7), nn.MaxPool2d(2, 2), nn.Tanh(), nn.Conv2d(32, 64, 6), nn.MaxPool2d(3, 3),
                nn.Tanh(), nn.Conv2d(64, 128, 5), nn.MaxPool2d(4, 4), nn.Tanh()]
    if name == "zagoruyko_siam_l2":
        return [nn.Conv2d(1, 96, 7, stride=3), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(96, 192, 5), nn.ReLU(),
                nn.MaxPool2d(2, 2), nn.Conv2d(192, 256, 3), nn.ReLU(), L2Norm()]
    if name == "bailer_fast":
        return [nn.Conv2d(1, 64, 7), nn.Tanh(), nn.MaxPool2d(2, 2), nn.Conv2d(64, 80, 5), nn.Tanh(),
                nn.Conv2d(80, 160, 5), nn.Tanh(), nn.MaxPool2d(2, 2), nn.Conv2d(160, 256, 5), nn.Tanh(),
                nn.Conv2d(256, 512, 4), nn.Tanh(), nn.Conv2d(512, 64, 1), nn.Tanh()]
    if name == "tfeat":
        return [nn.Conv2d(1, 32, 7), nn.Tanh(), nn.MaxPool2d(2, 2), nn.Conv2d(32, 64, 6), nn.Tanh(), nn.Flatten(),
                nn.Linear(64 * 8 * 8, 128), nn.Tanh()]
    if name == "mccnn_fast":
        return [nn.Conv2d(1, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                nn.Conv2d(64, 64, 3), L2Norm()]
    if name == "strided_only":
        return [nn.Conv2d(1, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(), nn.Conv2d(64, 128, 2)]
    raise KeyError(name)


PATCH = {"simo_serra": 64, "zagoruyko_siam_l2": 64, "bailer_fast": 56, "tfeat": 32, "mccnn_fast": 9,
         "strided_only": 29, "original_basenet": 15, "siam2stream": 64}


def _siam2stream_torch():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def stream():
        return nn.Sequential(nn.Conv2d(1, 95, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(95, 96, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(96, 192, 3), nn.ReLU(), nn.Conv2d(192, 192, 3), nn.ReLU(),
                             nn.MaxPool2d(2))

    class Siam2Stream(nn.Module):
        def __init__(self):
            super().__init__()
            self.central, self.surround = stream(), stream()

        def forward(self, x):
            central = self.central(x[:, :, 16:48, 16:48])
            surround = self.surround(F.avg_pool2d(x, 2))
            return F.normalize(torch.cat([central, surround], 1).flatten(1), dim=1)
    return Siam2Stream()


def _siam2stream_keras(torch_net, dtype):
    import keras
    L = keras.layers

    def stream(x, torch_stream):
        for m in torch_stream:
            kind = type(m).__name__
            if kind == "Conv2d":
                layer = L.Conv2D(m.out_channels, m.kernel_size, dtype=dtype)
                x = layer(x)
                layer.set_weights([m.weight.detach().numpy().transpose(2, 3, 1, 0).astype(dtype),
                                   m.bias.detach().numpy().astype(dtype)])
            elif kind == "ReLU":
                x = L.ReLU(dtype=dtype)(x)
            else:
                x = L.MaxPooling2D(m.kernel_size, dtype=dtype)(x)
        return x
    x = keras.Input((64, 64, 1), dtype=dtype)
    central = stream(L.Cropping2D(16, dtype=dtype)(x), torch_net.central)
    surround = stream(L.AveragePooling2D(2, dtype=dtype)(x), torch_net.surround)
    merged = L.Concatenate(dtype=dtype)([central, surround])
    out = L.UnitNormalization(axis=-1, dtype=dtype)(L.Flatten(dtype=dtype)(merged))
    return keras.Model(x, out, name="siam2stream")


def build_torch(name, seed=0):
    """The PyTorch Cp with random weights (seeded), in eval mode."""
    import torch
    import torch.nn as nn
    torch.manual_seed(seed)
    if name == "original_basenet":
        return load_backend("pytorch", "torch").BaseNet.BaseNet().eval()
    if name == "siam2stream":
        return _siam2stream_torch().eval()
    return nn.Sequential(*_torch_modules(name)).eval()


def build_keras(name, torch_net, fdfe, dtype="float32"):
    """The Keras Cp computing the same function as ``torch_net`` (same weights)."""
    import keras
    L = keras.layers
    if name == "original_basenet":
        return load_backend("tensorflow", "tf").BaseNet.BaseNet(dtype=dtype)
    if name == "siam2stream":
        return _siam2stream_keras(torch_net, dtype)
    layers, assign = [], []
    flat_shape = None
    size = PATCH[name]
    channels = 1
    for m in torch_net:
        kind = type(m).__name__
        if kind == "Conv2d":
            layer = L.Conv2D(m.out_channels, m.kernel_size, m.stride, "valid", dtype=dtype)
            assign.append((layer, [m.weight.detach().numpy().transpose(2, 3, 1, 0), m.bias.detach().numpy()]))
            size = (size - m.kernel_size[0]) // m.stride[0] + 1
            channels = m.out_channels
        elif kind == "MaxPool2d":
            layer = L.MaxPooling2D(m.kernel_size, m.stride, dtype=dtype)
            size = (size - m.kernel_size) // m.stride + 1
        elif kind in ("Tanh", "ReLU"):
            layer = L.Activation(kind.lower(), dtype=dtype)
        elif kind == "L2Norm":
            layer = L.UnitNormalization(axis=-1, dtype=dtype)
        elif kind == "Flatten":
            layer = L.Flatten(dtype=dtype)
            flat_shape = (channels, size, size)
        elif kind == "Linear":
            layer = L.Dense(m.out_features, dtype=dtype)
            w = m.weight.detach().numpy()
            c, h, w_ = flat_shape
            w = w.reshape(-1, c, h, w_).transpose(2, 3, 1, 0).reshape(h * w_ * c, -1)
            assign.append((layer, [w, m.bias.detach().numpy()]))
        else:
            raise KeyError(kind)
        layers.append(layer)
    net = keras.Sequential([keras.Input((PATCH[name], PATCH[name], 1), dtype=dtype)] + layers)
    for layer, values in assign:
        layer.set_weights([np.asarray(v, dtype=dtype) for v in values])
    return net


def macs_per_patch(torch_net, patch):
    """Multiply-adds of Cp on one patch (convolutions and linear layers)."""
    import torch
    total = []

    def hook(m, inputs, out):
        if isinstance(m, torch.nn.Conv2d):
            total.append(out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, torch.nn.Linear):
            total.append(m.in_features * m.out_features)
    handles = [m.register_forward_hook(hook) for m in torch_net.modules()]
    with torch.no_grad():
        torch_net(torch.zeros(1, 1, patch, patch))
    for h in handles:
        h.remove()
    return sum(total)


def macs_per_pixel(torch_net):
    """Multiply-adds CI spends per output pixel: every layer runs at every pixel (the dense count)."""
    import torch
    total = 0
    for m in torch_net.modules():
        if isinstance(m, torch.nn.Conv2d):
            total += m.in_channels // m.groups * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
    return total
