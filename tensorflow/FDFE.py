"""FDFE: Fast Dense Feature Extraction with CNNs that have pooling or striding layers.

TensorFlow / Keras 3 backend of the reference implementation of

    C. Bailer, T. Habtegebrial, K. Varanasi, D. Stricker,
    "Fast Dense Feature Extraction with CNNs that have Pooling or Striding Layers",
    BMVC 2017.

A patch network Cp maps one pH x pW patch to a K-vector.  This file builds the
network CI that computes Cp for the patch around *every* pixel of whole images in
one pass: pooling and striding layers become multipooling (all s x s shifted
poolings, stacked into the batch dimension) and the stacked result is unwarped
with reshapes and one transpose.

The file is self-contained (TensorFlow with its Keras 3, numpy and the standard
library; tqdm is used for progress bars when it is installed), so it can be copied
into any project.  It mirrors the PyTorch backend: same names, same semantics.

Layout: images are (N, H, W, C), CI returns (N, H, W, K).

Patch convention (the paper's): the patch of output pixel (y, x) covers rows
y - ceil((pH-1)/2) ... y + floor((pH-1)/2) and the same for columns, with zeros
outside the image.

Public API
----------
patch_padding, dense_reference, patch_outputs          -- the ground truth (Cp on patches)
multipool_prepare, space_to_batch, multi_pool,
multi_conv, unwarp, unwarp_layer                        -- stateless building blocks
multiPoolPrepare, multiMaxPooling, multiAvgPooling,
multiLPPooling, multiConv, unwrapPrepare, unwrapPool,
unwarpAll                                               -- the same as Keras layers
LPPooling2D, LocalResponseNormalization                 -- Cp layers Keras lacks (PyTorch semantics)
convert, DenseFeatureModel, ConversionError             -- automatic Cp -> CI
"""

import collections
import numbers
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"FDFE's TensorFlow backend needs Keras with the TensorFlow backend, "
                      f"got KERAS_BACKEND={keras.backend.backend()!r}")

__all__ = [
    "ConversionError",
    "check_images",
    "check_patch_size",
    "patch_padding",
    "patch_outputs",
    "dense_reference",
    "multipool_prepare",
    "space_to_batch",
    "multi_pool",
    "multi_conv",
    "unwarp",
    "unwarp_layer",
    "multiPoolPrepare",
    "multiMaxPooling",
    "multiAvgPooling",
    "multiLPPooling",
    "multiConv",
    "unwrapPrepare",
    "unwrapPool",
    "unwarpAll",
    "LPPooling2D",
    "LocalResponseNormalization",
    "DenseFeatureModel",
    "convert",
]

_register = keras.saving.register_keras_serializable(package="FDFE")


class _Layer(keras.layers.Layer):
    """Base of FDFE's layers: pure rearrangements and shared-weight ops that keep their input's
    dtype (no autocast to the default float32 policy)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)


class ConversionError(ValueError):
    """Raised when a patch network cannot be turned into an exact CI."""


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _pair(value, name: str, minimum: int = 1) -> Tuple[int, int]:
    """Return ``value`` as a pair of ints, checking that both are >= ``minimum``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return pair


def check_images(images, in_channels: Optional[int] = None, name: str = "images") -> None:
    """Check that ``images`` is a floating (N, H, W, C) tensor (static parts of the shape only)."""
    if not (tf.is_tensor(images) or isinstance(images, (np.ndarray, keras.KerasTensor))):
        raise TypeError(f"{name} must be a tensor of shape (N, H, W, C), got {type(images).__name__}")
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4 (N, H, W, C), got shape {shape}")
    dtype = tf.as_dtype(images.dtype)
    if not dtype.is_floating:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {dtype.name}")
    if any(s is not None and s < 1 for s in shape):
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    if in_channels is not None and shape[3] is not None and shape[3] != in_channels:
        raise ValueError(f"{name} has {shape[3]} channels but the network expects {in_channels} "
                         f"(layout is (N, H, W, C))")


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _static_or_dynamic(x):
    """Shape of x as a list with Python ints where known and scalar tensors elsewhere."""
    dynamic = tf.shape(x)
    return [s if s is not None else dynamic[i] for i, s in enumerate(x.shape)]


# ---------------------------------------------------------------------------
# Patch convention and the ground truth: Cp run on patches
# ---------------------------------------------------------------------------

def patch_padding(patch_size) -> Tuple[int, int, int, int]:
    """Zero padding that puts a patch around every pixel.

    Args:
        patch_size: int or (pH, pW).

    Returns:
        (top, bottom, left, right) = (ceil((pH-1)/2), floor((pH-1)/2),
        ceil((pW-1)/2), floor((pW-1)/2)).  The patch of pixel (y, x) is then
        ``padded[:, y:y+pH, x:x+pW, :]``.
    """
    ph, pw = _pair(patch_size, "patch_size")
    return ph // 2, (ph - 1) // 2, pw // 2, (pw - 1) // 2


def _output_vectors(out, batch: int):
    """Check that Cp returned one vector per patch and return it as (batch, K)."""
    if not tf.is_tensor(out):
        raise ConversionError(f"Cp must return one tensor, got {type(out).__name__}")
    shape = tuple(out.shape)
    if len(shape) < 2 or shape[0] != batch or any(s != 1 for s in shape[1:-1]):
        raise ConversionError(
            f"Cp's output for one patch is not a single vector: a batch of {batch} patches gave shape "
            f"{shape}; expected ({batch}, K) or ({batch}, 1, 1, K)")
    return tf.reshape(out, [batch, -1])


def check_patch_size(base_net, patch_size, in_channels: int) -> int:
    """Run Cp on one random patch and check that it gives one vector; return its length K.

    Raises a ValueError naming the problem when the patch is smaller (or larger) than the net
    needs, i.e. when Cp fails on it or does not reduce it to a single vector.
    """
    ph, pw = _pair(patch_size, "patch_size")
    try:
        out = base_net(tf.random.normal([1, ph, pw, in_channels], dtype=_compute_dtype(base_net)),
                       training=False)
    except (ValueError, tf.errors.InvalidArgumentError) as exc:
        raise ValueError(f"patch {ph}x{pw} does not fit the net (smaller than its receptive field needs?): "
                         f"{exc}") from exc
    try:
        return int(_output_vectors(out, 1).shape[1])
    except ConversionError as exc:
        raise ValueError(f"patch {ph}x{pw} does not fit the net: {exc}") from exc


def _compute_dtype(model):
    """The dtype Cp computes in: that of its first weight, else its dtype policy's."""
    for weight in getattr(model, "weights", []):
        dtype = tf.as_dtype(weight.dtype)
        if dtype.is_floating:
            return dtype
    return tf.as_dtype(getattr(model, "compute_dtype", None) or "float32")


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A tqdm progress bar where tqdm is installed and enabled, else None."""
    if enabled is False or (enabled is None and total < 50):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


def patch_outputs(base_net, images, patch_size, positions, batch_size: int = 256,
                  progress: Optional[bool] = None):
    """Run Cp on the patches centred at the given pixels.

    Args:
        base_net: the patch network Cp (a Keras model), mapping (B, pH, pW, C) to (B, K) or
            (B, 1, 1, K); called with training=False.
        images: (N, H, W, C) floating tensor or array.
        patch_size: int or (pH, pW).
        positions: (P, 3) integer array of (n, y, x) triples.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.

    Returns:
        (P, K) tensor: row i is Cp(patch of image n_i centred at (y_i, x_i)).

    Shape:
        images (N, H, W, C), positions (P, 3) -> (P, K).
    """
    check_images(images)
    ph, pw = _pair(patch_size, "patch_size")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be a (P, 3) integer array of (n, y, x), got shape {pos.shape}")
    if len(pos) == 0:
        raise ValueError("positions is empty")
    images = tf.convert_to_tensor(images)
    upper = np.array([images.shape[0], images.shape[1], images.shape[2]])
    if (pos < 0).any() or (pos >= upper).any():
        raise ValueError("positions must lie inside the images: 0 <= n < N, 0 <= y < H, 0 <= x < W")
    top, bottom, left, right = patch_padding((ph, pw))
    padded = tf.pad(images, [[0, 0], [top, bottom], [left, right], [0, 0]])
    rows, cols = np.arange(ph), np.arange(pw)
    outputs = []
    n_batches = (len(pos) + batch_size - 1) // batch_size
    bar = _progress(n_batches, "Cp on patches", progress)
    for start in range(0, len(pos), batch_size):
        chunk = pos[start:start + batch_size].astype(np.int64)
        b = len(chunk)
        index = np.empty((b, ph, pw, 3), np.int64)
        index[..., 0] = chunk[:, 0, None, None]
        index[..., 1] = chunk[:, 1, None, None] + rows[None, :, None]
        index[..., 2] = chunk[:, 2, None, None] + cols[None, None, :]
        patches = tf.gather_nd(padded, index)  # (B, pH, pW, C)
        outputs.append(_output_vectors(base_net(patches, training=False), b))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return tf.concat(outputs, 0)


def dense_reference(base_net, images, patch_size, batch_size: int = 256, progress: Optional[bool] = None):
    """Cp run on every patch: the ground truth that CI must reproduce.

    Args:
        base_net: the patch network Cp (Keras), mapping (B, pH, pW, C) to (B, K) or (B, 1, 1, K).
        images: (N, H, W, C) floating tensor or array.
        patch_size: int or (pH, pW); patches follow the convention in :func:`patch_padding`.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.

    Returns:
        (N, H, W, K) tensor with out[n, y, x] = Cp(patch of image n centred at (y, x)).
    """
    check_images(images)
    n_img, height, width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    grid = np.stack(np.meshgrid(np.arange(n_img), np.arange(height), np.arange(width), indexing="ij"),
                    -1).reshape(-1, 3)
    out = patch_outputs(base_net, images, patch_size, grid, batch_size=batch_size, progress=progress)
    return tf.reshape(out, [n_img, height, width, -1])


# ---------------------------------------------------------------------------
# Stateless building blocks: multipooling and unwarping
# ---------------------------------------------------------------------------

def multipool_prepare(images, patch_size, stride_product=1):
    """Zero-pad images so that every pixel has a full patch around it.

    Pads by :func:`patch_padding` and, on the bottom and right, up to the next
    multiple of the stride product so that every multipooling divides evenly.

    Shape:
        (N, H, W, C) -> (N, H' + pH - 1, W' + pW - 1, C), H' = ceil(H / SH) * SH, W' likewise.
    """
    top, bottom, left, right = patch_padding(patch_size)
    sh, sw = _pair(stride_product, "stride_product")
    shape = _static_or_dynamic(images)
    extra_h, extra_w = (-shape[1]) % sh, (-shape[2]) % sw
    return tf.pad(images, [[0, 0], [top, bottom + extra_h], [left, right + extra_w], [0, 0]])


def space_to_batch(x, stride):
    """Split a stride-1 result into its s x s shifts and stack them on the batch axis.

    Element (dy, dx, b) of the output batch holds ``x[b, dy::sh, dx::sw, :]``, cropped so
    that all shifts have the same size.

    Shape:
        (B, L_h, L_w, C) -> (sh * sw * B, L_h // sh, L_w // sw, C), shift-major.
    """
    sh, sw = _pair(stride, "stride")
    b, lh, lw, c = _static_or_dynamic(x)
    hq, wq = lh // sh, lw // sw
    if isinstance(hq, int) and isinstance(wq, int) and (hq < 1 or wq < 1):
        raise ValueError(f"input {lh}x{lw} is smaller than the stride {sh}x{sw}")
    x = x[:, :hq * sh, :wq * sw, :]
    y = tf.transpose(tf.reshape(x, [b, hq, sh, wq, sw, c]), [2, 4, 0, 1, 3, 5])
    return tf.reshape(y, [sh * sw * b, hq, wq, c])


_POOLS = ("max", "avg", "lp")


def _pool(x, kind, kernel, stride, norm_type):
    if kind == "max":
        return tf.nn.max_pool2d(x, kernel, stride, "VALID")
    if kind == "avg":
        return tf.nn.avg_pool2d(x, kernel, stride, "VALID")
    # power-average pooling as in PyTorch: (sum of x^p over the window)^(1/p)
    total = tf.nn.avg_pool2d(tf.pow(x, norm_type), kernel, stride, "VALID") * float(kernel[0] * kernel[1])
    return tf.pow(total, 1.0 / norm_type)


def multi_pool(x, kind: str, kernel_size, stride=None, naive: bool = False, norm_type: float = 2.0):
    """Multipooling: all sh x sw shifted poolings, stacked shift-major on the batch axis.

    Args:
        x: (B, L_h, L_w, C).
        kind: 'max', 'avg' or 'lp' (power-average, ``norm_type``).
        kernel_size, stride: as for Keras pooling (stride defaults to the kernel).
        naive: compute the s*s shifted poolings one by one (the paper's formulation);
            otherwise one stride-1 pooling followed by :func:`space_to_batch`.  Same result.

    Returns:
        (sh * sw * B, h', w', C) with h' = (L_h - kh + 1) // sh, likewise w'.
    """
    if kind not in _POOLS:
        raise ValueError(f"kind must be one of {_POOLS}, got {kind!r}")
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    return _multi(x, lambda t, s: _pool(t, kind, kernel, s, float(norm_type)), kernel, stride, (1, 1), naive)


def multi_conv(x, kernel, bias=None, stride=1, dilation=1, naive: bool = False):
    """A strided convolution made dense: all sh x sw shifts, stacked shift-major on the batch axis.

    Uses the trained kernel as it is (HWIO, no padding; grouped when the input has a multiple of
    the kernel's input channels).  ``naive`` runs one strided convolution per shift (the paper's
    formulation); otherwise one stride-1 convolution followed by :func:`space_to_batch`.

    Shape:
        x (B, L_h, L_w, C), kernel (kh, kw, C/groups, K) -> (sh * sw * B, h', w', K).
    """
    stride = _pair(stride, "stride")
    dil = _pair(dilation, "dilation")
    kshape = tuple(kernel.shape[:2])

    def conv(t, s):
        if dil != (1, 1) and s != (1, 1):  # TensorFlow has no strided dilated convolution
            y = tf.nn.conv2d(t, kernel, 1, "VALID", dilations=dil)[:, ::s[0], ::s[1], :]
        else:
            y = tf.nn.conv2d(t, kernel, s, "VALID", dilations=dil)
        return y if bias is None else tf.nn.bias_add(y, bias)
    return _multi(x, conv, kshape, stride, dil, naive)


def _multi(x, op, kernel, stride, dil, naive):
    if stride == (1, 1):
        return op(x, (1, 1))
    if not naive:
        return space_to_batch(op(x, (1, 1)), stride)
    sh, sw = stride
    _, lh, lw, _ = _static_or_dynamic(x)
    hq = (lh - dil[0] * (kernel[0] - 1)) // sh
    wq = (lw - dil[1] * (kernel[1] - 1)) // sw
    shifts = [op(x[:, dy:, dx:, :], stride)[:, :hq, :wq, :] for dy in range(sh) for dx in range(sw)]
    return tf.concat(shifts, 0)


def unwarp_layer(x, stride):
    """Undo one multipooling layer (the outermost one): interleave its shifts into the image.

    Shape:
        (sh * sw * B, h, w, K) -> (B, h * sh, w * sw, K).
    """
    sh, sw = _pair(stride, "stride")
    b, h, w, k = _static_or_dynamic(x)
    y = tf.transpose(tf.reshape(x, [sh, sw, b // (sh * sw), h, w, k]), [2, 3, 0, 4, 1, 5])
    return tf.reshape(y, [b // (sh * sw), h * sh, w * sw, k])


def unwarp(x, strides: Sequence, naive: bool = False):
    """Unwarping: turn the shift-stacked output of n multipooling layers into the image grid.

    The batch axis holds (y_n, x_n, ..., y_1, x_1, N) (last layer outermost).  The output row
    of (q, y_n, ..., y_1) is q * SH + ... + s_1 * y_2 + y_1 (paper, Section 3.3), likewise for
    columns.  Done as one reshape, one transpose and one reshape; ``naive`` instead undoes one
    layer at a time, innermost last (the paper's Torch listing).

    Shape:
        (M * N, h, w, K) -> (N, h * SH, w * SW, K), M and SH, SW the products of the strides.
    """
    strides = [_pair(s, "stride") for s in strides]
    if naive:
        for s in reversed(strides):
            x = unwarp_layer(x, s)
        return x
    if not strides:
        return x
    n = len(strides)
    sizes = [v for s in reversed(strides) for v in s]
    b, h, w, k = _static_or_dynamic(x)
    n_img = b // _prod(sizes)
    big_h = _prod(s[0] for s in strides)
    big_w = _prod(s[1] for s in strides)
    perm = [2 * n, 2 * n + 1] + list(range(0, 2 * n, 2)) + [2 * n + 2] + list(range(1, 2 * n, 2)) + [2 * n + 3]
    v = tf.transpose(tf.reshape(x, sizes + [n_img, h, w, k]), perm)
    return tf.reshape(v, [n_img, h * big_h, w * big_w, k])


# ---------------------------------------------------------------------------
# The same building blocks as Keras layers, under the original port's names
# ---------------------------------------------------------------------------

@_register
class multiPoolPrepare(_Layer):
    """Zero padding before CI: a patch around every pixel, size up to the stride product.

    Args:
        patchY, patchX: patch height and width.
        stride_product: int or (SH, SW), product of all strides of the net (default 1).

    Shape:
        (N, H, W, C) -> (N, H' + pY - 1, W' + pX - 1, C), H' = ceil(H / SH) * SH.
    """

    def __init__(self, patchY: int, patchX: int, stride_product=1, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = _pair((patchY, patchX), "patch size")
        self.stride_product = _pair(stride_product, "stride_product")

    def call(self, images):
        return multipool_prepare(images, self.patch_size, self.stride_product)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "patchY": self.patch_size[0], "patchX": self.patch_size[1],
                "stride_product": list(self.stride_product)}


class _MultiPoolBase(_Layer):
    kind = "max"

    def __init__(self, kW, kH, dW=None, dH=None, naive: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = _pair((kH, kW), "kernel size")
        self.stride = self.kernel_size if dW is None and dH is None else _pair((dH, dW), "stride")
        self.naive = bool(naive)

    def call(self, x):
        return multi_pool(x, self.kind, self.kernel_size, self.stride, self.naive, **self._options())

    def _options(self):
        return {}

    def compute_output_shape(self, input_shape):
        return (None, None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "kW": self.kernel_size[1], "kH": self.kernel_size[0],
                "dW": self.stride[1], "dH": self.stride[0], "naive": self.naive}


@_register
class multiMaxPooling(_MultiPoolBase):
    """Max pooling made dense (multipooling).  Argument order of the original: (kW, kH, dW, dH).

    Shape:
        (B, L_h, L_w, C) -> (dH * dW * B, (L_h - kH + 1) // dH, (L_w - kW + 1) // dW, C).
    """
    kind = "max"


@_register
class multiAvgPooling(_MultiPoolBase):
    """Average pooling made dense (multipooling).  Arguments as :class:`multiMaxPooling`."""
    kind = "avg"


@_register
class multiLPPooling(_MultiPoolBase):
    """Power-average (LP) pooling made dense: (sum x^p)^(1/p) over each window."""
    kind = "lp"

    def __init__(self, norm_type: float, kW, kH, dW=None, dH=None, naive: bool = False, **kwargs):
        super().__init__(kW, kH, dW, dH, naive, **kwargs)
        self.norm_type = float(norm_type)

    def _options(self):
        return {"norm_type": self.norm_type}

    def get_config(self):
        return {**super().get_config(), "norm_type": self.norm_type}


def _activation_of(layer):
    act = getattr(layer, "activation", None)
    return None if act is None or act is keras.activations.linear else act


@_register
class multiConv(_Layer):
    """A trained strided Conv2D made dense.  Reuses (shares) the layer's weights and activation.

    Args:
        conv: a trained ``keras.layers.Conv2D`` with padding='valid' (any strides, dilation, groups).
        naive: one strided convolution per shift instead of stride 1 + space-to-batch.

    Shape:
        (B, L_h, L_w, C) -> (sh * sw * B, h', w', K).
    """

    def __init__(self, conv, naive: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(conv, keras.layers.Conv2D):
            raise TypeError(f"multiConv needs a trained keras.layers.Conv2D, got {type(conv).__name__}")
        if conv.padding != "valid":
            raise ConversionError(f"multiConv: the convolution pads its input (padding={conv.padding!r}); "
                                  f"{_PADDING_REASON}")
        self.conv = conv
        self.naive = bool(naive)

    def build(self, input_shape):
        if not self.conv.built:
            self.conv.build(input_shape)

    def call(self, x):
        c = self.conv
        y = multi_conv(x, c.kernel, c.bias if c.use_bias else None, c.strides, c.dilation_rate, self.naive)
        act = _activation_of(c)
        return y if act is None else act(y)

    def compute_output_shape(self, input_shape):
        return (None, None, None, self.conv.filters)

    def get_config(self):
        return {**super().get_config(), "conv": keras.saving.serialize_keras_object(self.conv),
                "naive": self.naive}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        conv = keras.saving.deserialize_keras_object(config.pop("conv"))
        return cls(conv, **config)


@_register
class unwrapPrepare(_Layer):
    """Crop every stacked shift to the image's grid, ready for :class:`unwrapPool`.

    Call as ``unwrapPrepare(stride_product)([stacked, images])``.

    Shape:
        (M * N, h, w, K), (N, H, W, C) -> (M * N, ceil(H / SH), ceil(W / SW), K).
    """

    def __init__(self, stride_product=1, **kwargs):
        super().__init__(**kwargs)
        self.stride_product = _pair(stride_product, "stride_product")

    def call(self, inputs):
        x, images = inputs
        shape = _static_or_dynamic(images)
        h = -(-shape[1] // self.stride_product[0])
        w = -(-shape[2] // self.stride_product[1])
        return x[:, :h, :w, :]

    def get_config(self):
        return {**super().get_config(), "stride_product": list(self.stride_product)}


@_register
class unwrapPool(_Layer):
    """Undo one multipooling layer; apply once per layer, the last layer's first.

    Shape:
        (dH * dW * B, h, w, K) -> (B, h * dH, w * dW, K).
    """

    def __init__(self, dW: int, dH: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.stride = _pair((dW if dH is None else dH, dW), "stride")

    def call(self, x):
        return unwarp_layer(x, self.stride)

    def get_config(self):
        return {**super().get_config(), "dW": self.stride[1], "dH": self.stride[0]}


@_register
class unwarpAll(_Layer):
    """Unwarping of all multipooling layers at once, plus the crop to the image size.

    Args:
        strides: list of (sh, sw) per multipooling layer, in network order.
        naive: undo one layer at a time (the paper's listing); same result.

    Call as ``unwarpAll(strides)([stacked, images])``.

    Shape:
        (M * N, h, w, K), (N, H, W, C) -> (N, H, W, K).
    """

    def __init__(self, strides: Sequence, naive: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.strides = [_pair(s, "stride") for s in strides]
        self.naive = bool(naive)

    def call(self, inputs):
        x, images = inputs
        shape = _static_or_dynamic(images)
        return unwarp(x, self.strides, self.naive)[:, :shape[1], :shape[2], :]

    def compute_output_shape(self, input_shapes):
        x_shape, image_shape = input_shapes
        return (image_shape[0], image_shape[1], image_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "strides": [list(s) for s in self.strides], "naive": self.naive}


# ---------------------------------------------------------------------------
# Cp layers that Keras lacks (same semantics as their PyTorch counterparts)
# ---------------------------------------------------------------------------

@_register
class LPPooling2D(_Layer):
    """Power-average pooling, (sum of x^p over each window)^(1/p), like torch.nn.LPPool2d.

    Args:
        norm_type: p.
        pool_size: int or pair.
        strides: int or pair (default: pool_size).  No padding.
    """

    def __init__(self, norm_type: float, pool_size, strides=None, **kwargs):
        super().__init__(**kwargs)
        self.norm_type = float(norm_type)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else _pair(strides, "strides")

    def call(self, x):
        return _pool(x, "lp", self.pool_size, self.strides, self.norm_type)

    def compute_output_shape(self, s):
        size = [None if n is None else (n - k) // st + 1 for n, k, st in zip(s[1:3], self.pool_size, self.strides)]
        return (s[0], size[0], size[1], s[3])

    def get_config(self):
        return {**super().get_config(), "norm_type": self.norm_type, "pool_size": list(self.pool_size),
                "strides": list(self.strides)}


@_register
class LocalResponseNormalization(_Layer):
    """Local response normalisation across channels, like torch.nn.LocalResponseNorm.

    b_c = a_c / (k + alpha / n * sum of a_c'^2 over the n channels around c)^beta, with the
    window zero-padded at the first and last channels.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def call(self, x):
        squares = tf.square(x)
        channels = tf.shape(x)[-1]
        pad_front, pad_back = self.size // 2, (self.size - 1) // 2
        padded = tf.pad(squares, [[0, 0], [0, 0], [0, 0], [pad_front, pad_back]])
        total = tf.add_n([padded[..., i:i + channels] for i in range(self.size)])
        return x / tf.pow(self.k + self.alpha / self.size * total, self.beta)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta,
                "k": self.k}


# ---------------------------------------------------------------------------
# Automatic conversion: capture the chain of Keras layers, then one rule per layer kind
# ---------------------------------------------------------------------------

_PADDING_REASON = ("inside Cp the padded border depends on where the patch ends, so a pixel near the "
                   "patch border sees zeros in Cp but real neighbours in a whole image; CI cannot be exact. "
                   "Use padding='valid', or use dense_reference() for this net")
_PER_PATCH_REASON = ("every patch is normalised with its own statistics, so the features of a pixel differ "
                     "for every patch that contains it and no work can be shared between overlapping "
                     "patches: CI cannot be exact (normalise the whole image instead, or use dense_reference)")


class _Call:
    """One recorded call of a leaf Keras layer inside Cp."""

    def __init__(self, layer, in_slots, in_shapes, out_slot, out_shape):
        self.layer = layer
        self.in_slots, self.in_shapes = in_slots, in_shapes
        self.out_slot, self.out_shape = out_slot, out_shape

    @property
    def where(self):
        return f"layer '{self.layer.name}' ({type(self.layer).__name__})"

    def fail(self, reason):
        return ConversionError(f"{self.where} cannot be made dense exactly: {reason}")


def _is_leaf(layer) -> bool:
    return not isinstance(layer, keras.Model) and not list(layer._flatten_layers(include_self=False,
                                                                                   recursive=False))


class _Tracer:
    """Records the leaf layers Cp calls, linking them through tensor identity (eager mode)."""

    def __init__(self, example):
        self.slot_of = {id(example): 0}
        self.shapes = {0: tuple(example.shape)}
        self.alive = [example]
        self.calls: List[_Call] = []
        self.error = None

    def __enter__(self):
        self.original = keras.Layer.__call__
        tracer = self

        def recording_call(layer, *args, **kwargs):
            out = tracer.original(layer, *args, **kwargs)
            if _is_leaf(layer) and not isinstance(layer, keras.layers.InputLayer):
                tracer.record(layer, args, out)
            return out
        keras.Layer.__call__ = recording_call
        return self

    def __exit__(self, *exc):
        keras.Layer.__call__ = self.original
        return False

    def record(self, layer, args, out):
        inputs = [t for t in tf.nest.flatten(args[:1]) if tf.is_tensor(t)]
        if not inputs or not all(hasattr(t, "numpy") for t in inputs):
            return  # a symbolic call made while Keras builds a layer
        if self.error is not None:
            return
        unknown = [t for t in inputs if id(t) not in self.slot_of]
        if unknown:
            self.error = ConversionError(
                f"layer '{layer.name}' ({type(layer).__name__}) receives a tensor that no Keras layer of Cp "
                f"produced (a TensorFlow op between layers in call(), or a constant); only chains and graphs "
                f"of Keras layers can be converted")
            return
        outs = tf.nest.flatten(out)
        if len(outs) != 1 or not tf.is_tensor(outs[0]):
            self.error = ConversionError(f"layer '{layer.name}' ({type(layer).__name__}) returns "
                                         f"{len(outs)} values; only layers with one output are supported")
            return
        in_slots = [self.slot_of[id(t)] for t in inputs]  # before the output (maybe the same tensor) is added
        slot = len(self.shapes)
        self.slot_of[id(outs[0])] = slot
        self.shapes[slot] = tuple(outs[0].shape)
        self.alive.append(outs[0])
        self.calls.append(_Call(layer, in_slots, [self.shapes[s] for s in in_slots], slot, tuple(outs[0].shape)))


class _Geom:
    """What a dense value holds, in patch terms.

    kind 'map': Cp sees an (h, w, channels) map; the dense tensor is
    (N*M, Hq + h - 1 (or more), Wq + w - 1 (or more), channels).
    kind 'vector': Cp sees the flattening of an (h, w, channels) map (Keras' H, W, C order);
    the dense tensor is that map's.  kind 'view': another reshape of that map, for element-wise
    layers only.  ``stage`` lists the strides so far.
    """
    __slots__ = ("kind", "channels", "size", "stage")

    def __init__(self, kind, channels, size, stage):
        self.kind, self.channels, self.size, self.stage = kind, int(channels), tuple(size), tuple(stage)

    def same_grid(self, other):
        return self.stage == other.stage and self.size == other.size and self.kind == other.kind

    def describe(self):
        (h, w), c = self.size, self.channels
        return {"map": f"a {h}x{w}x{c} map", "vector": f"a flattened {h}x{w}x{c} map"}.get(
            self.kind, f"a reshaped {h}x{w}x{c} map")


def _map_geom(call, geom, stride=(1, 1)):
    out = call.out_shape
    stage = geom.stage + ((stride,) if stride != (1, 1) else ())
    return _Geom("map", out[3], out[1:3], stage)


def _require_map(call, geom):
    if geom.kind != "map":
        raise call.fail(f"its input is {geom.describe()}, not an image-like map")


def _per_pixel_ok(call, geom, what="it"):
    """Layers acting on the last axis: fine on maps and on vectors of one position."""
    if geom.kind == "view" or (geom.kind == "vector" and geom.size != (1, 1)):
        raise call.fail(f"{what} acts on each entry of {geom.describe()} differently or together, "
                        f"which mixes positions of the patch")


def _check_channel_axis(call, axis, rank=4):
    axes = [axis] if isinstance(axis, numbers.Integral) else list(axis)
    if [a % rank for a in axes] != [rank - 1]:
        raise call.fail(f"it works along axis {axis}; only the channel axis (-1) can be made dense")


def _activation_ok(call, geom, layer):
    act = _activation_of(layer)
    if act is not None and getattr(act, "__name__", "") in ("softmax", "log_softmax"):
        _per_pixel_ok(call, geom, "its softmax")


# --- the rules: one small function per layer kind ---------------------------
# Each returns (function mapping dense KerasTensors to one dense KerasTensor, output geometry).

def _rule_reuse(call, geoms):
    """Layers that act per pixel (activations, dropout at inference, ...): reused unchanged."""
    geom = geoms[0]
    layer = call.layer
    if call.out_shape != call.in_shapes[0]:
        raise call.fail(f"its output {call.out_shape} does not have the shape of its input {call.in_shapes[0]}")
    return (lambda xs: layer(xs[0], training=False)), geom


def _rule_identity(call, geoms):
    """Dropout, noise and regularisation layers: identity at inference."""
    return (lambda xs: xs[0]), geoms[0]


def _rule_channelwise(call, geoms):
    """Layers with per-channel parameters acting on the last axis (BatchNormalization, LayerNormalization
    over channels, UnitNormalization, Normalization, Rescaling, Softmax, PReLU with shared spatial
    axes, LocalResponseNormalization): reused unchanged."""
    geom = geoms[0]
    layer = call.layer
    if isinstance(layer, keras.layers.PReLU):
        shared = sorted(layer.shared_axes or [])
        if geom.kind == "map" and shared != [1, 2]:
            raise call.fail("its slopes differ per position (use shared_axes=[1, 2])")
    for name in ("axis",):
        if hasattr(layer, name):
            _check_channel_axis(call, getattr(layer, name), len(call.in_shapes[0]))
    _per_pixel_ok(call, geom)
    if isinstance(layer, keras.layers.BatchNormalization):
        return (lambda xs: layer(xs[0], training=False)), geom
    return _rule_reuse(call, geoms)


def _rule_conv2d(call, geoms):
    """Conv2D without padding: reused when stride 1, made dense (multiConv) when strided."""
    geom = geoms[0]
    layer = call.layer
    _require_map(call, geom)
    if layer.padding != "valid":
        raise call.fail(f"it pads its input (padding={layer.padding!r}); {_PADDING_REASON}")
    if layer.data_format != "channels_last":
        raise call.fail("only data_format='channels_last' is supported")
    stride = tuple(layer.strides)
    if stride == (1, 1):
        return (lambda xs: layer(xs[0], training=False)), _map_geom(call, geom)
    return (lambda xs: multiConv(layer, naive=call.naive)(xs[0])), _map_geom(call, geom, stride)


def _make_pool_rule(kind):
    def rule(call, geoms):
        geom = geoms[0]
        layer = call.layer
        _require_map(call, geom)
        if getattr(layer, "padding", "valid") != "valid":
            raise call.fail(f"it pads its input (padding={layer.padding!r}); {_PADDING_REASON}")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise call.fail("only data_format='channels_last' is supported")
        kernel = tuple(layer.pool_size)
        stride = tuple(layer.strides) if layer.strides is not None else kernel
        options = {"norm_type": layer.norm_type} if kind == "lp" else {}
        cls = {"max": multiMaxPooling, "avg": multiAvgPooling, "lp": multiLPPooling}[kind]
        args = ((options["norm_type"],) if kind == "lp" else ()) + (kernel[1], kernel[0], stride[1], stride[0])
        return (lambda xs: cls(*args, naive=call.naive)(xs[0])), _map_geom(call, geom, stride)
    rule.__doc__ = f"{kind} pooling: multipooling with the same kernel and stride."
    return rule


def _make_global_pool_rule(kind):
    def rule(call, geoms):
        """Global pooling over the patch-level map: a stride-1 pooling with the map's size."""
        geom = geoms[0]
        _require_map(call, geom)
        if getattr(call.layer, "data_format", "channels_last") != "channels_last":
            raise call.fail("only data_format='channels_last' is supported")
        h, w = geom.size
        cls = multiMaxPooling if kind == "max" else multiAvgPooling
        keep = len(call.out_shape) == 4
        return (lambda xs: cls(w, h, 1, 1)(xs[0])), _Geom("map" if keep else "vector", geom.channels, (1, 1),
                                                          geom.stage)
    return rule


def _rule_flatten(call, geoms):
    """Flatten / Reshape that keep the batch axis: the same values, reinterpreted.

    (N, h, w, C) is a map, (N, h*w*C) a vector (Keras' H, W, C order); any other shape is a
    'view' that only element-wise layers and further reshapes may use."""
    geom = geoms[0]
    src, dst = call.in_shapes[0], call.out_shape
    (h, w), c = geom.size, geom.channels
    if dst == src:
        return (lambda xs: xs[0]), geom
    if dst[0] == src[0] and _prod(dst[1:]) == h * w * c:
        kind = "map" if dst[1:] == (h, w, c) else "vector" if dst[1:] == (h * w * c,) else "view"
        return (lambda xs: xs[0]), _Geom(kind, c, (h, w), geom.stage)
    raise call.fail(f"it reshapes {src} to {dst}, which moves values between patches (the batch axis)")


@_register
class DenseAsConv(_Layer):
    """A trained Dense layer applied to a flattened (h, w, C) map, as an h x w convolution.

    Shares the Dense layer's weights: its kernel (h*w*C, K) is read as (h, w, C, K).
    """

    def __init__(self, dense, size, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense
        self.size = _pair(size, "size")

    def build(self, input_shape):
        if not self.dense.built:
            self.dense.build((None, self.size[0] * self.size[1] * input_shape[-1]))

    def call(self, x):
        d = self.dense
        kernel = tf.reshape(d.kernel, [self.size[0], self.size[1], -1, d.units])
        y = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), 1, "VALID")
        if d.use_bias:
            y = tf.nn.bias_add(y, tf.cast(d.bias, x.dtype))
        act = _activation_of(d)
        return y if act is None else act(y)

    def compute_output_shape(self, input_shape):
        return (None, None, None, self.dense.units)

    def get_config(self):
        return {**super().get_config(), "dense": keras.saving.serialize_keras_object(self.dense),
                "size": list(self.size)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        dense = keras.saving.deserialize_keras_object(config.pop("dense"))
        return cls(dense, **config)


def _rule_dense(call, geoms):
    """Dense on a flattened map: an h x w convolution (H, W, C order); on channels: reused."""
    geom = geoms[0]
    layer = call.layer
    units = call.out_shape[-1]
    if geom.kind == "view":
        raise call.fail(f"it is applied to {geom.describe()}; flatten the map first")
    if geom.kind == "map" or geom.size == (1, 1):
        _activation_ok(call, geom, layer)
        return (lambda xs: layer(xs[0], training=False)), _Geom(geom.kind, units, geom.size, geom.stage)
    return (lambda xs: DenseAsConv(layer, geom.size)(xs[0])), _Geom("vector", units, (1, 1), geom.stage)


def _rule_activation(call, geoms):
    """Element-wise activations (and softmax over channels): reused unchanged."""
    _activation_ok(call, geoms[0], call.layer)
    if isinstance(call.layer, keras.layers.Softmax):
        return _rule_channelwise(call, geoms)
    return _rule_reuse(call, geoms)


def _rule_merge(call, geoms):
    """Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate(axis=-1) of values on one grid."""
    first = geoms[0]
    for g in geoms[1:]:
        if not first.same_grid(g):
            raise call.fail(f"it combines {first.describe()} with {g.describe()} (strides {list(first.stage)} "
                            f"vs {list(g.stage)}); values that cover different parts of the patch differ for "
                            f"every patch and cannot be shared")
    layer = call.layer
    channels = first.channels
    if isinstance(layer, keras.layers.Concatenate):
        _check_channel_axis(call, layer.axis, len(call.in_shapes[0]))
        _per_pixel_ok(call, first)
        channels = call.out_shape[-1]
    return (lambda xs: layer(list(xs))), _Geom(first.kind, channels, first.size, first.stage)


def _rule_refuse_padding(call, geoms):
    """Explicit padding or cropping inside Cp."""
    raise call.fail(f"it pads or crops an activation inside Cp; {_PADDING_REASON}")


def _rule_refuse_per_patch(call, geoms):
    """Normalisation with statistics of each patch."""
    raise call.fail(f"it normalises with statistics computed over each patch; {_PER_PATCH_REASON}")


def _rule_layer_norm(call, geoms):
    """LayerNormalization: per pixel when it normalises over the channel axis only."""
    axis = call.layer.axis
    axes = [axis] if isinstance(axis, numbers.Integral) else list(axis)
    rank = len(call.in_shapes[0])
    if [a % rank for a in axes] != [rank - 1] or (geoms[0].kind == "vector" and geoms[0].size != (1, 1)):
        raise call.fail(f"it normalises {geoms[0].describe()} over axes {axis}, with statistics of each patch; "
                        f"{_PER_PATCH_REASON}")
    return _rule_channelwise(call, geoms)


def _refuse_lambda(call, geoms):
    """Lambda layers are opaque."""
    raise call.fail("a Lambda layer is opaque to convert(); write it as a Keras layer of the supported kinds")


_L = keras.layers
_RULES = [
    (_L.Conv2D, _rule_conv2d),
    (_L.MaxPooling2D, _make_pool_rule("max")),
    (_L.AveragePooling2D, _make_pool_rule("avg")),
    (LPPooling2D, _make_pool_rule("lp")),
    (_L.GlobalMaxPooling2D, _make_global_pool_rule("max")),
    (_L.GlobalAveragePooling2D, _make_global_pool_rule("avg")),
    (_L.BatchNormalization, _rule_channelwise),
    (_L.LayerNormalization, _rule_layer_norm),
    (_L.UnitNormalization, _rule_channelwise),
    (_L.Normalization, _rule_channelwise),
    (_L.Rescaling, _rule_reuse),
    (LocalResponseNormalization, _rule_channelwise),
    (_L.Softmax, _rule_activation),
    (_L.PReLU, _rule_channelwise),
    (_L.Activation, _rule_activation),
    (_L.ReLU, _rule_reuse),
    (_L.LeakyReLU, _rule_reuse),
    (_L.ELU, _rule_reuse),
    (_L.Dropout, _rule_identity),
    (_L.SpatialDropout2D, _rule_identity),
    (_L.GaussianNoise, _rule_identity),
    (_L.GaussianDropout, _rule_identity),
    (_L.AlphaDropout, _rule_identity),
    (_L.ActivityRegularization, _rule_identity),
    (_L.Identity, _rule_identity),
    (_L.Flatten, _rule_flatten),
    (_L.Reshape, _rule_flatten),
    (_L.Dense, _rule_dense),
    (_L.Add, _rule_merge),
    (_L.Subtract, _rule_merge),
    (_L.Multiply, _rule_merge),
    (_L.Average, _rule_merge),
    (_L.Maximum, _rule_merge),
    (_L.Minimum, _rule_merge),
    (_L.Concatenate, _rule_merge),
    (_L.ZeroPadding2D, _rule_refuse_padding),
    (_L.Cropping2D, _rule_refuse_padding),
    (_L.GroupNormalization, _rule_refuse_per_patch),
    (_L.Lambda, _refuse_lambda),
]


def _lookup_rule(layer):
    """The rule of the layer's class, or of a base class whose call() it does not override."""
    for cls, rule in _RULES:
        if type(layer) is cls:
            return rule
    for cls, rule in _RULES:
        if isinstance(layer, cls) and type(layer).call is cls.call:
            return rule
    return None


# ---------------------------------------------------------------------------
# CI as a Keras model
# ---------------------------------------------------------------------------

def _peak_live_channels(steps_io, channels):
    """Largest total channel count of the dense values alive at once while CI's steps run.

    ``steps_io`` lists (input slots, output slots) per step; slot 0 is the padded image."""
    last_use = {}
    for i, (ins, _) in enumerate(steps_io):
        for s in ins:
            last_use[s] = i
    alive, peak = {0}, channels[0]
    for i, (ins, outs) in enumerate(steps_io):
        alive |= set(outs)
        peak = max(peak, sum(channels[s] for s in alive))
        alive -= {s for s in ins if last_use.get(s) == i and s not in outs}
    return peak


def _memory_estimate(image_size, batch, in_channels, out_channels, patch, stride_product, peak_channels,
                     itemsize, tile=None):
    """Bytes CI needs: the padded input and the output, plus the values alive at once on one tile
    (1.5 times, for convolution workspaces and layout copies).  An upper bound in practice."""
    (height, width), (ph, pw), (sh, sw) = image_size, patch, stride_product
    full_h, full_w = -(-height // sh) * sh, -(-width // sw) * sw
    fixed = batch * (in_channels * (full_h + ph - 1) * (full_w + pw - 1) + out_channels * full_h * full_w)
    th, tw = (full_h, full_w) if tile is None else (min(-(-tile[0] // sh) * sh, full_h),
                                                  min(-(-tile[1] // sw) * sw, full_w))
    work = 1.5 * batch * peak_channels * (th + ph - 1 + sh) * (tw + pw - 1 + sw)
    return int((fixed + work) * itemsize)


def _tile_for_memory(budget, estimate, image_size, stride_product, patch):
    """The largest square-ish tile (multiple of the stride product) whose estimate fits the budget."""
    (height, width), (sh, sw) = image_size, stride_product
    if estimate(None) <= budget:
        return None
    edge = max(height, width)
    smallest = max(sh, sw, 8)
    while edge > smallest:
        edge = max(smallest, edge * 3 // 4)
        tile = (-(-min(edge, height) // sh) * sh, -(-min(edge, width) // sw) * sw)
        if estimate(tile) <= budget:
            return tile
    raise MemoryError(f"CI needs about {estimate((smallest, smallest)) / 2**20:.0f} MiB even with "
                      f"{smallest}x{smallest} tiles (the padded image and the output alone take "
                      f"{estimate((1, 1)) / 2**20:.0f} MiB); the budget is {budget / 2**20:.0f} MiB")


@_register
class DenseFeatureModel(keras.Model):
    """CI built by :func:`convert`: Cp's output for the patch around every pixel.

    Holds ``core``, a functional model from padded images to the shift-stacked result, built
    from Cp's own layers (shared weights) and FDFE's layers.  Always runs in inference mode.

    Attributes:
        patch_size: (pH, pW).
        in_channels, out_channels: C and K.
        strides: (sh, sw) of each multipooling/striding layer, in network order.
        stride_product: (SH, SW).
        naive: paper-faithful per-shift multipooling and per-layer unwarping.
        tile: None, or (th, tw): process the image in tiles of this output size (exact; bounded
            memory; needs the image size to be known, e.g. eager calls).
        max_memory: None, or a budget in bytes: tiles are chosen so that :meth:`estimate_memory`
            stays under it (overrides ``tile``).

    Shape:
        (N, H, W, C) -> (N, H, W, K), any N, H, W >= 1.
    """

    def __init__(self, core, patch_size, strides, in_channels, out_channels, naive=False, tile=None,
                 progress=None, peak_channels=None, max_memory=None, **kwargs):
        kwargs.setdefault("autocast", False)  # images are cast to the core's dtype in call()
        super().__init__(**kwargs)
        self.core = core
        self.patch_size = _pair(patch_size, "patch_size")
        self.strides = [_pair(s, "stride") for s in strides]
        self.stride_product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.naive = bool(naive)
        self.tile = None if tile is None else _pair(tile, "tile")
        self.progress = progress
        self.peak_channels = int(peak_channels or in_channels + out_channels)
        self.max_memory = max_memory

    def estimate_memory(self, image_size, batch: int = 1, tile=None, dtype=None) -> int:
        """Estimated peak bytes of CI on images of ``image_size`` (H, W): the padded input, the
        output, and 1.5 times the values alive at once on one tile (``tile`` None: whole image)."""
        itemsize = tf.as_dtype(dtype or self.core.inputs[0].dtype).size
        return _memory_estimate(image_size, batch, self.in_channels, self.out_channels, self.patch_size,
                                self.stride_product, self.peak_channels, itemsize,
                                None if tile is None else _pair(tile, "tile"))

    def tile_for_memory(self, budget: int, image_size, batch: int = 1, dtype=None):
        """The largest tile whose :meth:`estimate_memory` fits ``budget`` bytes (None: no tiling needed)."""
        return _tile_for_memory(budget, lambda t: self.estimate_memory(image_size, batch, t, dtype),
                                tuple(image_size), self.stride_product, self.patch_size)

    def stacked(self, padded):
        """Run CI's layers on padded images; the shift-stacked result before unwarping.

        Shape:
            (N, H' + pH - 1, W' + pW - 1, C) -> (M * N, >= H'/SH, >= W'/SW, K).
        """
        return self.core(padded, training=False)

    def _unwarped_crop(self, padded, out_h, out_w):
        return unwarp(self.stacked(padded), self.strides, self.naive)[:, :out_h, :out_w, :]

    def _dense(self, padded, out_h, out_w):
        """Stacked layers + unwarping + crop; called eagerly, it runs as one graph (traced once for
        every image size), which is markedly faster than layer-by-layer eager execution."""
        if not tf.executing_eagerly():
            return self._unwarped_crop(padded, out_h, out_w)
        if getattr(self, "_graph_fn", None) is None:
            spec = tf.TensorSpec([None, None, None, self.in_channels], self.core.inputs[0].dtype)
            scalar = tf.TensorSpec([], tf.int32)
            object.__setattr__(self, "_graph_fn", tf.function(self._unwarped_crop,
                                                              input_signature=[spec, scalar, scalar]))
        return self._graph_fn(padded, tf.constant(out_h, tf.int32), tf.constant(out_w, tf.int32))

    def call(self, images, training=None):
        check_images(images, self.in_channels)
        images = tf.cast(images, self.core.inputs[0].dtype)
        shape = _static_or_dynamic(images)
        padded = multipool_prepare(images, self.patch_size, self.stride_product)
        tile = self.tile
        if self.max_memory is not None and all(isinstance(s, int) for s in shape[:3]):
            tile = self.tile_for_memory(self.max_memory, (shape[1], shape[2]), shape[0])
        if tile is None:
            return self._dense(padded, shape[1], shape[2])
        if not all(isinstance(s, int) for s in shape[1:3]):
            raise ValueError("tiling needs the image size to be known (call the model eagerly)")
        return self._tiled(padded, shape[1], shape[2], tile)

    def _tiled(self, padded, height, width, tile):
        """Exact tiling: each output tile from its own crop of the padded image (overlap pH-1, pW-1),
        written into one preallocated output buffer."""
        sh, sw = self.stride_product
        th = -(-tile[0] // sh) * sh
        tw = -(-tile[1] // sw) * sw
        ph, pw = self.patch_size
        origins = [(y, x) for y in range(0, height, th) for x in range(0, width, tw)]
        bar = _progress(len(origins), "CI tiles", self.progress if self.progress is not None else
                        (None if len(origins) >= 50 else False))
        out = None
        for y0, x0 in origins:
            h, w = min(th, height - y0), min(tw, width - x0)
            hp, wp = -(-h // sh) * sh, -(-w // sw) * sw
            part = self._dense(padded[:, y0:y0 + hp + ph - 1, x0:x0 + wp + pw - 1, :], h, w)
            if out is None:
                out = tf.Variable(tf.zeros([padded.shape[0], height, width, part.shape[-1]], part.dtype),
                                  trainable=False)
            out[:, y0:y0 + h, x0:x0 + w, :].assign(part)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out.read_value()

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[2], self.out_channels)

    def get_config(self):
        return {"core": keras.saving.serialize_keras_object(self.core), "patch_size": list(self.patch_size),
                "strides": [list(s) for s in self.strides], "in_channels": self.in_channels,
                "out_channels": self.out_channels, "naive": self.naive,
                "tile": None if self.tile is None else list(self.tile), "peak_channels": self.peak_channels,
                "max_memory": self.max_memory, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        core = keras.saving.deserialize_keras_object(config.pop("core"))
        return cls(core, **config)


def _infer_in_channels(base_net):
    try:
        shape = base_net.inputs[0].shape
        if shape[-1] is not None:
            return int(shape[-1])
    except (AttributeError, IndexError, ValueError):
        pass
    for layer in base_net._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D) and layer.built:
            return int(layer.kernel.shape[2]) * int(layer.groups)
    return None


def _trace(base_net, patch_size, in_channels):
    """Run Cp eagerly on random patches and record its leaf layers.  Tries a batch of 2, then of 1."""
    ph, pw = patch_size
    last_error = None
    for batch in (2, 1):
        example = tf.random.normal([batch, ph, pw, in_channels], dtype=_compute_dtype(base_net))
        try:
            base_net(example, training=False)  # builds the layers outside the recording
            with _Tracer(example) as tracer:
                out = base_net(example, training=False)
        except ConversionError:
            raise
        except Exception as exc:  # the net rejected this example; report it below
            last_error = exc
            continue
        if tracer.error is not None:
            raise tracer.error
        return tracer, out, example
    raise ConversionError(f"running Cp on a batch of {ph}x{pw}x{in_channels} patches failed: "
                          f"{type(last_error).__name__}: {last_error} -- the patch {ph}x{pw} may be smaller "
                          f"(or larger) than the net needs; check patch_size against the size Cp was trained "
                          f"on") from last_error


def convert(base_net, patch_size, in_channels: Optional[int] = None, *, naive: bool = False, tile=None,
            max_memory: Optional[int] = None, check: bool = True,
            progress: Optional[bool] = None) -> DenseFeatureModel:
    """Turn a patch network Cp (Keras) into CI, which computes Cp for the patch around every pixel.

    Cp is run once eagerly on an example batch of patches and the Keras layers it calls are
    recorded (Sequential, functional, and subclassed models whose call() chains layers).  Each
    layer is made dense by one rule (see the README's table), in inference mode (dropout off,
    batch-norm moving statistics); the layers and their weights are shared with Cp, not copied.
    Layers that cannot be made exact raise :class:`ConversionError` naming the layer and why.

    Args:
        base_net: Cp, a keras.Model mapping (B, pH, pW, C) to (B, K) or (B, 1, 1, K).
        patch_size: int or (pH, pW).
        in_channels: C; inferred from the model's input or first Conv2D when omitted.
        naive: paper-faithful per-shift multipooling and per-layer unwarping (slower, same result).
        tile: None or (th, tw): process images in tiles of this output size (exact, bounded memory).
        max_memory: a budget in bytes; tiles are chosen so that CI's estimated peak stays under it.
        check: compare CI with Cp on a few patches of a small random image before returning.
        progress: progress bar for tiled runs (None: automatic).

    Returns:
        A :class:`DenseFeatureModel` mapping (N, H, W, C) to (N, H, W, K).
    """
    if not isinstance(base_net, keras.layers.Layer):
        raise TypeError(f"base_net must be a Keras model or layer, got {type(base_net).__name__}")
    ph, pw = _pair(patch_size, "patch_size")
    if in_channels is None:
        in_channels = _infer_in_channels(base_net)
        if in_channels is None:
            raise ValueError("in_channels cannot be inferred from base_net (not built, no Conv2D); "
                             "pass in_channels=")
    elif not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    tracer, out, example = _trace(base_net, (ph, pw), int(in_channels))
    batch = int(example.shape[0])
    dtype = _compute_dtype(base_net)
    images = keras.Input((None, None, in_channels), dtype=dtype.name, name="padded_images")
    values = {0: images}
    geoms = {0: _Geom("map", in_channels, (ph, pw), ())}
    for call in tracer.calls:
        rule = _lookup_rule(call.layer)
        if rule is None:
            raise ConversionError(f"{call.where} is not supported by convert() (unknown layer kind); see the "
                                  f"README's table of supported layers")
        call.naive = naive
        build, geom = rule(call, [geoms[s] for s in call.in_slots])
        values[call.out_slot] = build([values[s] for s in call.in_slots])
        geoms[call.out_slot] = geom
    _output_vectors(out, batch)
    if id(out) not in tracer.slot_of:
        raise ConversionError("Cp's output is not the output of one of its Keras layers (a TensorFlow op "
                              "after the last layer?); only chains and graphs of Keras layers can be converted")
    out_slot = tracer.slot_of[id(out)]
    geom = geoms[out_slot]
    stacked = values[out_slot]
    if geom.size != (1, 1):
        if geom.kind == "map":
            raise ConversionError(
                f"Cp's output for one patch is a {geom.size[0]}x{geom.size[1]}x{geom.channels} map, not a "
                f"single vector; end Cp with layers that reduce it to 1x1 (or flatten it)")
        stacked = _FlattenOutput(geom.size)(stacked)
    out_channels = int(_output_vectors(out, batch).shape[1])
    core = keras.Model(images, stacked, name=f"{base_net.name}_dense_core")
    channels = collections.defaultdict(lambda: out_channels, {slot: g.channels for slot, g in geoms.items()})
    peak = _peak_live_channels([(c.in_slots, [c.out_slot]) for c in tracer.calls], channels)
    net = DenseFeatureModel(core, (ph, pw), list(geom.stage), in_channels, out_channels, naive=naive,
                            tile=tile, progress=progress, peak_channels=peak, max_memory=max_memory,
                            name=f"{base_net.name}_dense")
    if check:
        _self_check(net, base_net, dtype)
    return net


@_register
class _FlattenOutput(_Layer):
    """Cp returns a flattened (h, w, C) map: gather its h*w shifts into channels (H, W, C order)."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = _pair(size, "size")

    def call(self, x):
        h, w = self.size
        _, lh, lw, _ = _static_or_dynamic(x)
        parts = [x[:, i:lh - h + 1 + i, j:lw - w + 1 + j, :] for i in range(h) for j in range(w)]
        return tf.concat(parts, -1)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size)}


def _self_check(net, base_net, dtype):
    """Compare CI with Cp on a few patches of a small random image (catches unsupported semantics)."""
    sh, sw = net.stride_product
    h, w = sh + 3, sw + 2
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((1, h, w, net.in_channels)), dtype=dtype)
    positions = np.array([[0, 0, 0], [0, h - 1, w - 1], [0, h // 2, w // 3], [0, 1, w - 1]])
    tile = net.tile
    net.tile = None
    try:
        dense = net(images)
    finally:
        net.tile = tile
    expected = patch_outputs(base_net, images, net.patch_size, positions).numpy().astype(np.float64)
    got = tf.gather_nd(dense, positions).numpy().astype(np.float64)
    scale = max(float(np.abs(expected).max()), 1e-6)
    tol = {tf.float64: 1e-9, tf.float32: 1e-4}.get(dtype, 3e-2)
    err = float(np.abs(got - expected).max())
    if not err <= tol * scale:
        raise ConversionError(f"internal check failed: CI differs from Cp by {err:.3g} (scale {scale:.3g}) on a "
                              f"test image; this net uses a layer whose dense form is not exact here. Please "
                              f"report it with the net's definition")
