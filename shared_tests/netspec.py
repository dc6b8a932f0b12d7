"""Framework-neutral patch networks for the tests: one description, identical weights in both backends.

A spec is a list of layer dicts:

    {"type": "conv", "out": 8, "k": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 1}
    {"type": "pool", "kind": "max" | "avg" | "lp", "k": [2, 2], "stride": [2, 2], "p": 2.0}
    {"type": "act", "fn": "relu" | "tanh" | "sigmoid" | "elu" | "leaky_relu" | "gelu" | "silu" | "softplus"}
    {"type": "bn"}            batch normalisation with random statistics (inference)
    {"type": "lrn", "size": 3}
    {"type": "l2norm"}        unit length over channels
    {"type": "channel_ln"}    layer normalisation over the channels of every position, written with transposes
                              (PyTorch: permute to (N, h, w, C), LayerNorm, permute back; Keras: transpose to
                              (N, C, h, w), LayerNormalization(axis=1), transpose back)
    {"type": "dropout"}
    {"type": "crop", "crop": [top, bottom, left, right]}   a constant crop of the map
    {"type": "flatten"}       then "linear" layers
    {"type": "linear", "out": 5}

Weights are numpy arrays in PyTorch's layout (OIHW kernels, (out, in) linear weights in
C, H, W flattening order); the Keras builder converts them (HWIO kernels, (in, out) dense
kernels in H, W, C order).
"""

import math

import numpy as np


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def shapes(spec, in_channels, patch):
    """Patch-level (C, h, w) before every layer and at the end; raises ValueError if the patch is too small."""
    c, (h, w) = in_channels, _pair(patch)
    out = []
    for layer in spec:
        out.append((c, h, w))
        t = layer["type"]
        if t == "conv":
            (kh, kw), (dh, dw), (sh, sw) = _pair(layer["k"]), _pair(layer.get("dilation", 1)), _pair(layer.get("stride", 1))
            h, w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
            c = layer["out"]
        elif t == "pool":
            (kh, kw), (sh, sw) = _pair(layer["k"]), _pair(layer.get("stride", layer["k"]))
            h, w = (h - kh) // sh + 1, (w - kw) // sw + 1
        elif t == "crop":
            top, bottom, left, right = layer["crop"]
            h, w = h - top - bottom, w - left - right
        elif t == "flatten":
            c, h, w = c * h * w, 1, 1
        elif t == "linear":
            c = layer["out"]
        if h < 1 or w < 1:
            raise ValueError(f"patch {patch} is too small for {spec}")
    out.append((c, h, w))
    return out


def make_weights(spec, in_channels, patch, seed=0):
    """Random weights for a spec, in PyTorch's layout, as float64 numpy arrays keyed by layer index."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (layer, (c, h, w)) in enumerate(zip(spec, shapes(spec, in_channels, patch))):
        t = layer["type"]
        if t == "conv":
            kh, kw = _pair(layer["k"])
            groups = layer.get("groups", 1)
            fan_in = c // groups * kh * kw
            weights[f"{i}.weight"] = rng.uniform(-1, 1, (layer["out"], c // groups, kh, kw)) * math.sqrt(3 / fan_in)
            weights[f"{i}.bias"] = rng.uniform(-0.5, 0.5, layer["out"])
        elif t == "linear":
            weights[f"{i}.weight"] = rng.uniform(-1, 1, (layer["out"], c)) * math.sqrt(3 / c)
            weights[f"{i}.bias"] = rng.uniform(-0.5, 0.5, layer["out"])
        elif t == "channel_ln":
            weights[f"{i}.weight"] = rng.uniform(0.5, 1.5, c)
            weights[f"{i}.bias"] = rng.uniform(-0.5, 0.5, c)
        elif t == "bn":
            weights[f"{i}.weight"] = rng.uniform(0.5, 1.5, c)
            weights[f"{i}.bias"] = rng.uniform(-0.5, 0.5, c)
            weights[f"{i}.running_mean"] = rng.uniform(-0.5, 0.5, c)
            weights[f"{i}.running_var"] = rng.uniform(0.5, 2.0, c)
    return weights


def random_images(n, c, h, w, seed=0):
    """Random non-zero images, (N, H, W, C) float64 (transpose to (N, C, H, W) for PyTorch)."""
    return np.random.default_rng(seed + 1000).standard_normal((n, h, w, c))


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

def build_torch(spec, in_channels, patch, weights, dtype="float64"):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class L2Norm(nn.Module):
        def forward(self, x):
            return F.normalize(x, dim=1)

    class LayerNorm2d(nn.LayerNorm):  # over the channels of every position, as timm's
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Crop(nn.Module):
        def __init__(self, top, bottom, left, right):
            super().__init__()
            self.bounds = (top, bottom, left, right)

        def forward(self, x):
            top, bottom, left, right = self.bounds
            return x[:, :, top:x.shape[2] - bottom, left:x.shape[3] - right]

    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
            "leaky_relu": lambda: nn.LeakyReLU(0.125), "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus}
    modules = []
    for i, (layer, (c, h, w)) in enumerate(zip(spec, shapes(spec, in_channels, patch))):
        t = layer["type"]
        if t == "conv":
            m = nn.Conv2d(c, layer["out"], _pair(layer["k"]), _pair(layer.get("stride", 1)), 0,
                          _pair(layer.get("dilation", 1)), layer.get("groups", 1))
        elif t == "pool":
            k, s = _pair(layer["k"]), _pair(layer.get("stride", layer["k"]))
            m = {"max": lambda: nn.MaxPool2d(k, s), "avg": lambda: nn.AvgPool2d(k, s),
                 "lp": lambda: nn.LPPool2d(layer.get("p", 2.0), k, s)}[layer["kind"]]()
        elif t == "act":
            m = acts[layer["fn"]]()
        elif t == "bn":
            after_head = any(prev["type"] == "flatten" for prev in spec[:i])
            m = nn.BatchNorm1d(c) if after_head else nn.BatchNorm2d(c)
        elif t == "lrn":
            m = nn.LocalResponseNorm(layer["size"])
        elif t == "l2norm":
            m = L2Norm()
        elif t == "channel_ln":
            m = LayerNorm2d(c)
        elif t == "dropout":
            m = nn.Dropout(0.3)
        elif t == "crop":
            m = Crop(*layer["crop"])
        elif t == "flatten":
            m = nn.Flatten()
        elif t == "linear":
            m = nn.Linear(c, layer["out"])
        else:
            raise ValueError(t)
        modules.append(m)
    net = nn.Sequential(*modules).to(getattr(torch, dtype))
    state = {k: torch.from_numpy(np.asarray(v)).to(getattr(torch, dtype)) for k, v in weights.items()}
    for name, buf in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = buf
    net.load_state_dict(state)
    return net.eval()


# ---------------------------------------------------------------------------
# Keras
# ---------------------------------------------------------------------------

def build_keras(spec, in_channels, patch, weights, fdfe, dtype="float64"):
    import keras
    L = keras.layers
    acts = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "elu": "elu", "gelu": "gelu", "silu": "silu",
            "softplus": "softplus"}
    class ChannelLayerNorm(keras.layers.Layer):  # over the channels of every position, through (N, C, h, w)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = L.LayerNormalization(axis=1, epsilon=1e-5, dtype=kwargs.get("dtype"))

        def call(self, x):
            return keras.ops.transpose(self.norm(keras.ops.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))
    layers, assign = [], []
    ph, pw = _pair(patch)
    for i, (layer, (c, h, w)) in enumerate(zip(spec, shapes(spec, in_channels, patch))):
        t = layer["type"]
        if t == "conv":
            m = L.Conv2D(layer["out"], _pair(layer["k"]), _pair(layer.get("stride", 1)), "valid",
                         dilation_rate=_pair(layer.get("dilation", 1)), groups=layer.get("groups", 1), dtype=dtype)
            assign.append((m, [weights[f"{i}.weight"].transpose(2, 3, 1, 0), weights[f"{i}.bias"]]))
        elif t == "pool":
            k, s = _pair(layer["k"]), _pair(layer.get("stride", layer["k"]))
            m = {"max": lambda: L.MaxPooling2D(k, s, dtype=dtype), "avg": lambda: L.AveragePooling2D(k, s, dtype=dtype),
                 "lp": lambda: fdfe.LPPooling2D(layer.get("p", 2.0), k, s, dtype=dtype)}[layer["kind"]]()
        elif t == "act":
            m = L.LeakyReLU(0.125, dtype=dtype) if layer["fn"] == "leaky_relu" else L.Activation(acts[layer["fn"]], dtype=dtype)
        elif t == "bn":
            m = L.BatchNormalization(epsilon=1e-5, dtype=dtype)
            assign.append((m, [weights[f"{i}.weight"], weights[f"{i}.bias"], weights[f"{i}.running_mean"],
                               weights[f"{i}.running_var"]]))
        elif t == "lrn":
            m = fdfe.LocalResponseNormalization(layer["size"], dtype=dtype)
        elif t == "l2norm":
            m = L.UnitNormalization(axis=-1, dtype=dtype)
        elif t == "channel_ln":
            m = ChannelLayerNorm(dtype=dtype)
            assign.append((m, [weights[f"{i}.weight"], weights[f"{i}.bias"]]))
        elif t == "dropout":
            m = L.Dropout(0.3, dtype=dtype)
        elif t == "crop":
            top, bottom, left, right = layer["crop"]
            m = L.Cropping2D(((top, bottom), (left, right)), dtype=dtype)
        elif t == "flatten":
            m = L.Flatten(dtype=dtype)
        elif t == "linear":
            m = L.Dense(layer["out"], dtype=dtype)
            wt = weights[f"{i}.weight"]
            prev = [j for j in range(i) if spec[j]["type"] == "flatten"]
            if prev and spec[i - 1]["type"] == "flatten":
                fc, fh, fw = shapes(spec, in_channels, patch)[prev[-1]]
                wt = wt.reshape(-1, fc, fh, fw).transpose(2, 3, 1, 0).reshape(fh * fw * fc, -1)
            else:
                wt = wt.T
            assign.append((m, [wt, weights[f"{i}.bias"]]))
        else:
            raise ValueError(t)
        layers.append(m)
    net = keras.Sequential([keras.Input((ph, pw, in_channels), dtype=dtype)] + layers)
    for m, values in assign:
        m.set_weights([np.asarray(v, dtype=dtype) for v in values])
    return net


# ---------------------------------------------------------------------------
# Hand-wired CI from FDFE's public blocks (what SlimNet and StridedNet do, for any spec)
# ---------------------------------------------------------------------------

def _hand_wired_blocks(layer_objects, spec, fdfe, naive, layer_shapes, channels_last, batch_norm=None):
    """Cp's layers with pools made multipooling, strided convolutions multiConv, the flatten left out and
    fully connected layers linearAsConv (the first after the flatten an h x w convolution); batch norms
    through ``batch_norm`` where given; and the strides."""
    blocks, stride_list = [], []
    for i, (layer_obj, layer) in enumerate(zip(layer_objects, spec)):
        t = layer["type"]
        if t == "pool":
            k, s = _pair(layer["k"]), _pair(layer.get("stride", layer["k"]))
            cls = {"max": fdfe.multiMaxPooling, "avg": fdfe.multiAvgPooling}.get(layer["kind"])
            blocks.append(cls(k[1], k[0], s[1], s[0], naive=naive) if cls else
                          fdfe.multiLPPooling(layer.get("p", 2.0), k[1], k[0], s[1], s[0], naive=naive))
            stride_list.append(s)
        elif t == "conv" and _pair(layer.get("stride", 1)) != (1, 1):
            blocks.append(fdfe.multiConv(layer_obj, naive=naive))
            stride_list.append(_pair(layer["stride"]))
        elif t == "flatten":
            continue
        elif t == "linear":
            if i and spec[i - 1]["type"] == "flatten":
                c, h, w = layer_shapes[i - 1]
                blocks.append(fdfe.linearAsConv(layer_obj, (h, w, c) if channels_last else (c, h, w)))
            else:
                blocks.append(fdfe.linearAsConv(layer_obj))
        elif t == "bn" and batch_norm is not None:
            blocks.append(batch_norm(layer_obj))
        else:
            blocks.append(layer_obj)
    product = (int(np.prod([s[0] for s in stride_list])), int(np.prod([s[1] for s in stride_list])))
    return blocks, stride_list, product


def hand_wired_torch(net, spec, patch, fdfe, naive=False):
    """CI built by hand from multiPoolPrepare / multi*Pooling / multiConv / linearAsConv / unwarpAll."""
    import torch.nn as nn
    import torch.nn.functional as F

    class BatchNormInference(nn.Module):  # running statistics, per pixel, for BatchNorm1d and 2d alike
        def __init__(self, bn):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            bn = self.bn
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    in_channels = next(m for m in net if isinstance(m, nn.Conv2d)).in_channels
    blocks, stride_list, product = _hand_wired_blocks(net, spec, fdfe, naive, shapes(spec, in_channels, patch),
                                                      False, BatchNormInference)

    class HandWired(nn.Module):
        def __init__(self):
            super().__init__()
            self.prepare = fdfe.multiPoolPrepare(*_pair(patch), stride_product=product)
            self.body = nn.Sequential(*blocks)
            self.unwarp = fdfe.unwarpAll(stride_list, naive=naive)

        def forward(self, images):
            return self.unwarp(self.body(self.prepare(images)), images)
    return HandWired()


def hand_wired_keras(net, spec, patch, fdfe, naive=False):
    in_channels = int(net.inputs[0].shape[-1])
    blocks, stride_list, product = _hand_wired_blocks(net.layers, spec, fdfe, naive,
                                                      shapes(spec, in_channels, patch), True)
    prepare = fdfe.multiPoolPrepare(*_pair(patch), stride_product=product)
    unwarp = fdfe.unwarpAll(stride_list, naive=naive)

    def run(images, training=False):
        x = prepare(images)
        for b in blocks:
            x = b(x)
        return unwarp([x, images])
    return run
