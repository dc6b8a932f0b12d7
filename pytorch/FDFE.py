"""FDFE: Fast Dense Feature Extraction with CNNs that have pooling or striding layers.

PyTorch backend of the reference implementation of

    C. Bailer, T. Habtegebrial, K. Varanasi, D. Stricker,
    "Fast Dense Feature Extraction with CNNs that have Pooling or Striding Layers",
    BMVC 2017.

A patch network Cp maps one pH x pW patch to a K-vector.  This file builds the
network CI that computes Cp for the patch around *every* pixel of whole images in
one pass: pooling and striding layers become multipooling (all s x s shifted
poolings, stacked into the batch dimension) and the stacked result is unwarped
with reshapes and one transpose.

The file is self-contained (torch, numpy and the standard library; tqdm is used
for progress bars when it is installed), so it can be copied into any project.

Layout: images are (N, C, H, W), CI returns (N, K, H, W).

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
unwarpAll                                               -- the same as nn.Modules
convert, DenseFeatureNet, ConversionError               -- automatic Cp -> CI
"""

import collections
import inspect
import numbers
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
    "unwarp_into",
    "unwarp_layer",
    "multiPoolPrepare",
    "multiMaxPooling",
    "multiAvgPooling",
    "multiLPPooling",
    "multiConv",
    "unwrapPrepare",
    "unwrapPool",
    "unwarpAll",
    "DenseFeatureNet",
    "convert",
]


class ConversionError(ValueError):
    """Raised when a patch network cannot be turned into an exact CI."""


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _pair(value, name: str, minimum: int = 1) -> Tuple[int, int]:
    """Return ``value`` as a pair of ints, checking that both are >= ``minimum``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list, torch.Size)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return pair


def check_images(images, in_channels: Optional[int] = None, name: str = "images") -> None:
    """Check that ``images`` is a non-empty floating (N, C, H, W) tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")
    if min(images.shape) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    if in_channels is not None and images.shape[1] != in_channels:
        raise ValueError(f"{name} has {images.shape[1]} channels but the network expects {in_channels} "
                         f"(layout is (N, C, H, W))")


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


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
        ``padded[..., y:y+pH, x:x+pW]``.
    """
    ph, pw = _pair(patch_size, "patch_size")
    return ph // 2, (ph - 1) // 2, pw // 2, (pw - 1) // 2


def _output_vectors(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Check that Cp returned one vector per patch and return it as (batch, K)."""
    if not isinstance(out, torch.Tensor):
        raise ConversionError(f"Cp must return one tensor, got {type(out).__name__}")
    if out.dim() < 2 or out.shape[0] != batch or any(s != 1 for s in out.shape[2:]):
        raise ConversionError(
            f"Cp's output for one patch is not a single vector: a batch of {batch} patches gave shape "
            f"{tuple(out.shape)}; expected ({batch}, K) or ({batch}, K, 1, 1)")
    return out.reshape(batch, -1)


def _example_kind(base_net: nn.Module):
    """(dtype, device) for example inputs to Cp: those of its first parameter (float32 on the CPU if none)."""
    ref = next(iter(base_net.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return dtype, (ref.device if ref is not None else torch.device("cpu"))


def check_patch_size(base_net: nn.Module, patch_size, in_channels: int) -> int:
    """Run Cp on one random patch and check that it gives one vector; return its length K.

    Raises a ValueError naming the problem when the patch is smaller (or larger) than the net
    needs, i.e. when Cp fails on it or does not reduce it to a single vector.
    """
    ph, pw = _pair(patch_size, "patch_size")
    dtype, device = _example_kind(base_net)
    try:
        with torch.no_grad(), _EvalMode(base_net):
            out = base_net(torch.randn(1, in_channels, ph, pw, dtype=dtype, device=device))
    except RuntimeError as exc:
        raise ValueError(f"patch {ph}x{pw} does not fit the net (smaller than its receptive field needs?): "
                         f"{exc}") from exc
    try:
        return _output_vectors(out, 1).shape[1]
    except ConversionError as exc:
        raise ValueError(f"patch {ph}x{pw} does not fit the net: {exc}") from exc


class _EvalMode:
    """Context manager: put a module in eval mode and restore every training flag after."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A tqdm progress bar where tqdm is installed and enabled, else None."""
    if enabled is False or (enabled is None and total < 50):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


def patch_outputs(base_net: nn.Module, images: torch.Tensor, patch_size, positions,
                  batch_size: int = 256, progress: Optional[bool] = None) -> torch.Tensor:
    """Run Cp on the patches centred at the given pixels.

    Args:
        base_net: the patch network Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
            It runs in inference mode; its training flags are restored afterwards.
        images: (N, C, H, W) floating tensor.
        patch_size: int or (pH, pW).
        positions: (P, 3) integer array or tensor of (n, y, x) triples.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.

    Returns:
        (P, K) tensor: row i is Cp(patch of image n_i centred at (y_i, x_i)).

    Shape:
        images (N, C, H, W), positions (P, 3) -> (P, K).
    """
    check_images(images)
    ph, pw = _pair(patch_size, "patch_size")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pos = torch.as_tensor(np.asarray(positions) if not isinstance(positions, torch.Tensor) else positions)
    if pos.dim() != 2 or pos.shape[1] != 3 or pos.dtype.is_floating_point:
        raise ValueError(f"positions must be a (P, 3) integer array of (n, y, x), got shape {tuple(pos.shape)}")
    if len(pos) == 0:
        raise ValueError("positions is empty")
    pos = pos.to(torch.long)
    upper = torch.tensor([images.shape[0], images.shape[2], images.shape[3]])
    if (pos < 0).any() or (pos >= upper).any():
        raise ValueError("positions must lie inside the images: 0 <= n < N, 0 <= y < H, 0 <= x < W")
    top, bottom, left, right = patch_padding((ph, pw))
    padded = F.pad(images, (left, right, top, bottom))
    rows = torch.arange(ph, device=images.device)
    cols = torch.arange(pw, device=images.device)
    pos = pos.to(images.device)
    outputs = []
    n_batches = (len(pos) + batch_size - 1) // batch_size
    bar = _progress(n_batches, "Cp on patches", progress)
    with torch.no_grad(), _EvalMode(base_net):
        for start in range(0, len(pos), batch_size):
            chunk = pos[start:start + batch_size]
            n = chunk[:, 0, None, None]
            yy = (chunk[:, 1, None] + rows)[:, :, None]
            xx = (chunk[:, 2, None] + cols)[:, None, :]
            patches = padded[n, :, yy, xx].permute(0, 3, 1, 2).contiguous()  # (B, C, pH, pW)
            outputs.append(_output_vectors(base_net(patches), len(chunk)))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return torch.cat(outputs, 0)


def dense_reference(base_net: nn.Module, images: torch.Tensor, patch_size, batch_size: int = 256,
                    progress: Optional[bool] = None) -> torch.Tensor:
    """Cp run on every patch: the ground truth that CI must reproduce.

    Args:
        base_net: the patch network Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
        images: (N, C, H, W) floating tensor.
        patch_size: int or (pH, pW); patches follow the convention in :func:`patch_padding`.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.

    Returns:
        (N, K, H, W) tensor with out[n, :, y, x] = Cp(patch of image n centred at (y, x)).
    """
    check_images(images)
    n_img, _, height, width = images.shape
    grid = torch.stack(torch.meshgrid(torch.arange(n_img), torch.arange(height), torch.arange(width),
                                      indexing="ij"), -1).reshape(-1, 3)
    out = patch_outputs(base_net, images, patch_size, grid, batch_size=batch_size, progress=progress)
    return out.reshape(n_img, height, width, -1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------
# Stateless building blocks: multipooling and unwarping
# ---------------------------------------------------------------------------

def multipool_prepare(images: torch.Tensor, patch_size, stride_product=1) -> torch.Tensor:
    """Zero-pad images so that every pixel has a full patch around it.

    Pads by :func:`patch_padding` and, on the bottom and right, up to the next
    multiple of the stride product so that every multipooling divides evenly.

    Args:
        images: (N, C, H, W).
        patch_size: int or (pH, pW).
        stride_product: int or (SH, SW), the product of all pooling/striding strides.

    Returns:
        (N, C, H' + pH - 1, W' + pW - 1) with H' = ceil(H / SH) * SH, W' likewise.
    """
    check_images(images)
    top, bottom, left, right = patch_padding(patch_size)
    sh, sw = _pair(stride_product, "stride_product")
    height, width = images.shape[-2:]
    return F.pad(images, (left, right + (-width) % sw, top, bottom + (-height) % sh))


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when channels are the innermost axis in memory (also for crops of channels-last tensors)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(3) >= x.shape[1]


def space_to_batch(x: torch.Tensor, stride) -> torch.Tensor:
    """Split a stride-1 result into its s x s shifts and stack them on the batch axis.

    Element (dy, dx, b) of the output batch holds ``x[b, :, dy::sh, dx::sw]``,
    cropped so that all shifts have the same size.  Channels-last inputs stay
    channels-last.

    Args:
        x: (B, C, L_h, L_w).
        stride: int or (sh, sw).

    Returns:
        (sh * sw * B, C, L_h // sh, L_w // sw), shift-major.
    """
    sh, sw = _pair(stride, "stride")
    b, c, lh, lw = x.shape
    hq, wq = lh // sh, lw // sw
    if hq < 1 or wq < 1:
        raise ValueError(f"input {lh}x{lw} is smaller than the stride {sh}x{sw}")
    channels_last = _is_channels_last(x)
    x = x[:, :, :hq * sh, :wq * sw]
    if channels_last:
        y = x.permute(0, 2, 3, 1).reshape(b, hq, sh, wq, sw, c).permute(2, 4, 0, 1, 3, 5)
        return y.reshape(sh * sw * b, hq, wq, c).permute(0, 3, 1, 2)
    y = x.reshape(b, c, hq, sh, wq, sw).permute(3, 5, 0, 1, 2, 4)
    return y.reshape(sh * sw * b, c, hq, wq)


_POOLS = ("max", "avg", "lp")


def _pool(x, kind, kernel, stride, dilation, norm_type, divisor_override):
    if kind == "max":
        return F.max_pool2d(x, kernel, stride, 0, dilation)
    if kind == "avg":
        return F.avg_pool2d(x, kernel, stride, 0, False, True, divisor_override)
    return F.lp_pool2d(x, norm_type, kernel, stride)


def multi_pool(x: torch.Tensor, kind: str, kernel_size, stride=None, dilation=1, naive: bool = False,
               norm_type: float = 2.0, divisor_override: Optional[int] = None) -> torch.Tensor:
    """Multipooling: all sh x sw shifted poolings, stacked shift-major on the batch axis.

    Args:
        x: (B, C, L_h, L_w).
        kind: 'max', 'avg' or 'lp' (power-average, ``norm_type``).
        kernel_size, stride, dilation: as for torch's pooling (stride defaults to the kernel).
        naive: compute the s*s shifted poolings one by one (the paper's formulation);
            otherwise one stride-1 pooling followed by :func:`space_to_batch`.  Same result.

    Returns:
        (sh * sw * B, C, h', w') with h' = (L_h - dh*(kh-1)) // sh (every shift has a
        full-size result), likewise w'.
    """
    if kind not in _POOLS:
        raise ValueError(f"kind must be one of {_POOLS}, got {kind!r}")
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    dil = _pair(dilation, "dilation")
    if kind != "max" and dil != (1, 1):
        raise ValueError(f"{kind} pooling has no dilation")
    return _multi(x, lambda t, s: _pool(t, kind, kernel, s, dil, norm_type, divisor_override),
                  kernel, stride, dil, naive)


def multi_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
               dilation=1, groups: int = 1, naive: bool = False) -> torch.Tensor:
    """A strided convolution made dense: all sh x sw shifts, stacked shift-major on the batch axis.

    Uses the trained weights as they are (no padding).  ``naive`` runs one strided
    convolution per shift (the paper's formulation); otherwise one stride-1
    convolution followed by :func:`space_to_batch`.  Same result.

    Shape:
        x (B, C, L_h, L_w), weight (K, C/groups, kh, kw) -> (sh * sw * B, K, h', w').
    """
    stride = _pair(stride, "stride")
    dil = _pair(dilation, "dilation")
    kernel = tuple(weight.shape[-2:])
    return _multi(x, lambda t, s: F.conv2d(t, weight, bias, s, 0, dil, groups), kernel, stride, dil, naive)


def _multi(x, op, kernel, stride, dil, naive):
    if stride == (1, 1):
        return op(x, 1)
    if not naive:
        return space_to_batch(op(x, 1), stride)
    sh, sw = stride
    hq = (x.shape[-2] - dil[0] * (kernel[0] - 1)) // sh
    wq = (x.shape[-1] - dil[1] * (kernel[1] - 1)) // sw
    if hq < 1 or wq < 1:
        raise ValueError(f"input {tuple(x.shape[-2:])} is too small for kernel {kernel} and stride {stride}")
    shifts = [op(x[:, :, dy:, dx:], stride)[:, :, :hq, :wq] for dy in range(sh) for dx in range(sw)]
    return torch.cat(shifts, 0)


def unwarp_layer(x: torch.Tensor, stride) -> torch.Tensor:
    """Undo one multipooling layer (the outermost one): interleave its shifts into the image.

    Shape:
        (sh * sw * B, K, h, w) -> (B, K, h * sh, w * sw).
    """
    sh, sw = _pair(stride, "stride")
    b, k, h, w = x.shape
    if b % (sh * sw):
        raise ValueError(f"batch {b} is not a multiple of the {sh}x{sw} shifts")
    y = x.reshape(sh, sw, b // (sh * sw), k, h, w).permute(2, 3, 4, 0, 5, 1)
    return y.reshape(b // (sh * sw), k, h * sh, w * sw)


def _unwarp_views(x, strides, dest):
    """(source, destination) views whose element-wise copy is the unwarping (channels innermost
    when ``x`` is channels-last)."""
    n = len(strides)
    sizes = [v for s in reversed(strides) for v in s]
    b, k, h, w = x.shape
    n_img = b // _prod(sizes)
    ydims, xdims = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    ysizes, xsizes = [s[0] for s in reversed(strides)], [s[1] for s in reversed(strides)]
    if _is_channels_last(x):
        src = x.permute(0, 2, 3, 1).reshape(*sizes, n_img, h, w, k)
        src = src.permute([2 * n, 2 * n + 1] + ydims + [2 * n + 2] + xdims + [2 * n + 3])
        dst = dest.permute(0, 2, 3, 1).view(n_img, h, *ysizes, w, *xsizes, k)
    else:
        src = x.reshape(*sizes, n_img, k, h, w)
        src = src.permute([2 * n, 2 * n + 1, 2 * n + 2] + ydims + [2 * n + 3] + xdims)
        dst = dest.view(n_img, k, h, *ysizes, w, *xsizes)
    return src, dst


def unwarp_into(x: torch.Tensor, strides: Sequence, dest: torch.Tensor) -> torch.Tensor:
    """:func:`unwarp` written straight into ``dest`` (N, K, h * SH, w * SW), e.g. a slice of the output.

    ``dest`` must allow the split of its height and width into the stride digits (true for
    slices of a contiguous or channels-last tensor).  Returns ``dest``.
    """
    strides = [_pair(s, "stride") for s in strides]
    if not strides:
        return dest.copy_(x)
    src, dst = _unwarp_views(x, strides, dest)
    dst.copy_(src)
    return dest


def unwarp(x: torch.Tensor, strides: Sequence, naive: bool = False) -> torch.Tensor:
    """Unwarping: turn the shift-stacked output of n multipooling layers into the image grid.

    The batch axis holds (y_n, x_n, ..., y_1, x_1, N) (last layer outermost).  The
    output row of (q, y_n, ..., y_1) is q * SH + ... + s_1 * y_2 + y_1 (paper,
    Section 3.3), likewise for columns.  Done as one reshape, one permute and one
    reshape; ``naive`` instead undoes one layer at a time, innermost last (the
    paper's Torch listing).  Channels-last inputs stay channels-last.

    Args:
        x: (M * N, K, h, w) with M the product of all strides.
        strides: list of (sh, sw) per multipooling layer, in network order.

    Returns:
        (N, K, h * SH, w * SW) with SH, SW the stride products.
    """
    strides = [_pair(s, "stride") for s in strides]
    if naive:
        for s in reversed(strides):
            x = unwarp_layer(x, s)
        return x
    if not strides:
        return x
    b, k, h, w = x.shape
    m = _prod(v for s in strides for v in s)
    if b % m:
        raise ValueError(f"batch {b} is not a multiple of the {m} stacked shifts")
    big_h = _prod(s[0] for s in strides)
    big_w = _prod(s[1] for s in strides)
    dest = torch.empty((b // m, k, h * big_h, w * big_w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)
    return unwarp_into(x, strides, dest)


# ---------------------------------------------------------------------------
# The same building blocks as modules, under the original port's names
# ---------------------------------------------------------------------------

class multiPoolPrepare(nn.Module):
    """Zero padding before CI: a patch around every pixel, size up to the stride product.

    Args:
        patchY, patchX: patch height and width.
        stride_product: int or (SH, SW), product of all strides of the net (default 1).

    Shape:
        (N, C, H, W) -> (N, C, H' + pY - 1, W' + pX - 1), H' = ceil(H / SH) * SH.
    """

    def __init__(self, patchY: int, patchX: int, stride_product=1):
        super().__init__()
        self.patch_size = _pair((patchY, patchX), "patch size")
        self.stride_product = _pair(stride_product, "stride_product")

    def forward(self, images):
        return multipool_prepare(images, self.patch_size, self.stride_product)

    def extra_repr(self):
        return f"patch_size={self.patch_size}, stride_product={self.stride_product}"


class _MultiPoolBase(nn.Module):
    kind = "max"

    def __init__(self, kW, kH, dW=None, dH=None, naive: bool = False):
        super().__init__()
        self.kernel_size = _pair((kH, kW), "kernel size")
        self.stride = self.kernel_size if dW is None and dH is None else _pair((dH, dW), "stride")
        self.naive = naive

    def forward(self, x):
        return multi_pool(x, self.kind, self.kernel_size, self.stride, naive=self.naive, **self._options())

    def _options(self):
        return {}

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, naive={self.naive}"


class multiMaxPooling(_MultiPoolBase):
    """Max pooling made dense (multipooling).  Argument order of the original: (kW, kH, dW, dH).

    Shape:
        (B, C, L_h, L_w) -> (dH * dW * B, C, (L_h - kH + 1) // dH, (L_w - kW + 1) // dW).
    """
    kind = "max"


class multiAvgPooling(_MultiPoolBase):
    """Average pooling made dense (multipooling).  Arguments as :class:`multiMaxPooling`."""
    kind = "avg"


class multiLPPooling(_MultiPoolBase):
    """Power-average (LP) pooling made dense: (sum x^p)^(1/p) over each window."""
    kind = "lp"

    def __init__(self, norm_type: float, kW, kH, dW=None, dH=None, naive: bool = False):
        super().__init__(kW, kH, dW, dH, naive)
        self.norm_type = float(norm_type)

    def _options(self):
        return {"norm_type": self.norm_type}


class multiConv(nn.Module):
    """A trained strided convolution made dense.  Reuses (shares) the conv's weights.

    Args:
        conv: a trained ``nn.Conv2d`` with no padding (any stride, dilation, groups).
        naive: one strided convolution per shift instead of stride 1 + space-to-batch.

    Shape:
        (B, C, L_h, L_w) -> (sh * sw * B, K, h', w').
    """

    def __init__(self, conv: nn.Conv2d, naive: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"multiConv needs a trained nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or any(p != 0 for p in _padding_values(conv.padding)):
            raise ConversionError(f"multiConv: the convolution pads its input (padding={conv.padding}); "
                                  f"{_PADDING_REASON}")
        self.conv = conv
        self.naive = naive

    def forward(self, x):
        c = self.conv
        return multi_conv(x, c.weight, c.bias, c.stride, c.dilation, c.groups, self.naive)


class unwrapPrepare(nn.Module):
    """Crop every stacked shift to the image's grid, ready for :class:`unwrapPool`.

    Args:
        stride_product: int or (SH, SW), product of all strides.

    Call as ``unwrap_prepare(x, image_size)`` with the (H, W) of the input images.

    Shape:
        (M * N, K, h, w) -> (M * N, K, ceil(H / SH), ceil(W / SW)).
    """

    def __init__(self, stride_product=1):
        super().__init__()
        self.stride_product = _pair(stride_product, "stride_product")

    def forward(self, x, image_size):
        h = -(-int(image_size[0]) // self.stride_product[0])
        w = -(-int(image_size[1]) // self.stride_product[1])
        if x.shape[-2] < h or x.shape[-1] < w:
            raise ValueError(f"stacked output {tuple(x.shape[-2:])} is smaller than the grid ({h}, {w})")
        return x[:, :, :h, :w]


class unwrapPool(nn.Module):
    """Undo one multipooling layer; apply once per layer, the last layer's first.

    Shape:
        (dH * dW * B, K, h, w) -> (B, K, h * dH, w * dW).
    """

    def __init__(self, dW: int, dH: Optional[int] = None):
        super().__init__()
        self.stride = _pair((dW if dH is None else dH, dW), "stride")

    def forward(self, x):
        return unwarp_layer(x, self.stride)

    def extra_repr(self):
        return f"stride={self.stride}"


class unwarpAll(nn.Module):
    """Unwarping of all multipooling layers at once, plus the crop to the image size.

    Args:
        strides: list of (sh, sw) per multipooling layer, in network order.
        naive: undo one layer at a time (the paper's listing); same result.

    Call as ``unwarp_all(x, image_size)``.

    Shape:
        (M * N, K, h, w) -> (N, K, H, W).
    """

    def __init__(self, strides: Sequence, naive: bool = False):
        super().__init__()
        self.strides = [_pair(s, "stride") for s in strides]
        self.naive = naive

    def forward(self, x, image_size):
        out = unwarp(x, self.strides, self.naive)
        return out[:, :, :int(image_size[0]), :int(image_size[1])]

    def extra_repr(self):
        return f"strides={self.strides}, naive={self.naive}"


# ---------------------------------------------------------------------------
# Automatic conversion: capture Cp's forward, then apply one rule per op
# ---------------------------------------------------------------------------

_PADDING_REASON = ("inside Cp the padded border depends on where the patch ends, so a pixel near the "
                   "patch border sees zeros in Cp but real neighbours in a whole image; CI cannot be exact. "
                   "Use unpadded convolutions (padding=0), or use dense_reference() for this net")


def _padding_values(padding):
    if isinstance(padding, str):
        return [0] if padding == "valid" else [1]
    return list(padding) if isinstance(padding, (tuple, list)) else [padding]


class _Ref:
    """Placeholder for an activation (a value that depends on the input patch)."""
    __slots__ = ("slot",)

    def __init__(self, slot):
        self.slot = slot


class _Param:
    """Placeholder for a parameter or buffer of Cp, looked up by name at run time."""
    __slots__ = ("name", "shape", "view")

    def __init__(self, name, shape, view=None):
        self.name, self.shape, self.view = name, tuple(shape), view


class _Const:
    """Placeholder for a constant tensor created inside Cp's forward (stored as a buffer of CI)."""
    __slots__ = ("index", "shape", "view")

    def __init__(self, index, shape, view=None):
        self.index, self.shape, self.view = index, tuple(shape), view


def _map_structure(obj, fn):
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return type(obj)(_map_structure(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_structure(v, fn) for k, v in obj.items()}
    return fn(obj)


def _leaves(obj):
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    else:
        yield obj


class _Node:
    """One recorded call of Cp's forward that touched an activation."""

    def __init__(self, func, args, kwargs, in_slots, in_shapes, out_slots, out_shapes, where):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.in_slots, self.in_shapes = in_slots, in_shapes
        self.out_slots, self.out_shapes = out_slots, out_shapes
        self.where = where

    @property
    def name(self):
        return _func_name(self.func)

    def bind(self, names, defaults=None):
        """Map positional and keyword arguments to ``names`` (like inspect's bind)."""
        values = dict(defaults or {})
        for name, value in zip(names, self.args):
            values[name] = value
        if len(self.args) > len(names):
            raise ConversionError(f"{self.where}: unexpected arguments to {self.name}")
        values.update(self.kwargs)
        return values

    def fail(self, reason):
        return ConversionError(f"{self.where}: {self.name} cannot be made dense exactly: {reason}")


def _func_name(func) -> str:
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        return f"Tensor.{getattr(func.__self__, '__name__', '?')}"
    name = getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if "functional" in module or module == "torch._C._nn":
        return f"F.{name}"
    if module.startswith("torch") and isinstance(func, type(torch.relu)):
        return f"torch.{name}"
    qual = getattr(func, "__qualname__", name)
    if "TensorBase" in qual or "Tensor" in qual or type(func).__name__ == "method_descriptor":
        return f"Tensor.{name}"
    return f"torch.{name}"


_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_leaf",
                   "is_sparse", "is_quantized", "is_meta", "is_mps", "is_xpu", "names", "itemsize", "nbytes"}
_METADATA_METHODS = {getattr(torch.Tensor, n) for n in (
    "size", "dim", "ndimension", "numel", "nelement", "is_contiguous", "is_floating_point", "is_complex",
    "element_size", "get_device", "__len__", "stride", "storage_offset", "is_signed") if hasattr(torch.Tensor, n)}


class _Tracer(TorchFunctionMode):
    """Records every call of Cp's forward that touches a value derived from the input."""

    def __init__(self, base_net: nn.Module, example: torch.Tensor):
        super().__init__()
        self.slot_of = {id(example): 0}
        self.alive = [example]                  # keep traced tensors alive so ids stay unique
        self.shapes = {0: tuple(example.shape)}
        self.n_slots = 1
        self.names = {id(t): n for n, t in base_net.named_parameters(remove_duplicate=False)}
        self.names.update({id(t): n for n, t in base_net.named_buffers(remove_duplicate=False)})
        self.constants: List[torch.Tensor] = []
        self.nodes: List[_Node] = []
        self.stack = [type(base_net).__name__ + ".forward"]
        self.hooks = []
        for name, module in base_net.named_modules():
            if name:
                label = f"{name} ({type(module).__name__})"
                self.hooks.append(module.register_forward_pre_hook(self._enter(label)))
                self.hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, label):
        def hook(module, args):
            self.stack.append(label)
        return hook

    def _leave(self, module, args, output):
        self.stack.pop()

    def remove_hooks(self):
        for h in self.hooks:
            h.remove()

    def _template(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in self.slot_of:
            return _Ref(self.slot_of[id(value)])
        if id(value) in self.names:
            return _Param(self.names[id(value)], value.shape)
        self.constants.append(value.detach().clone())
        return _Const(len(self.constants) - 1, value.shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_slots = [self.slot_of[id(t)] for t in _leaves((args, kwargs))
                    if isinstance(t, torch.Tensor) and id(t) in self.slot_of]
        if not in_slots:
            return out
        where = self.stack[-1]
        out_tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
        if not out_tensors:
            is_getter = getattr(func, "__name__", "") == "__get__"
            attr = getattr(getattr(func, "__self__", None), "__name__", None) if is_getter else None
            if func in _METADATA_METHODS or attr in _METADATA_ATTRS:
                return out
            raise ConversionError(
                f"{where}: {_func_name(func)} reads the values of an activation (data-dependent "
                f"control flow or a Python number computed from the patch); CI cannot reproduce that")
        args_t = _map_structure(args, self._template)
        kwargs_t = _map_structure(kwargs, self._template)
        in_shapes = [self.shapes[s] for s in in_slots]
        out_slots = []
        for t in out_tensors:
            self.slot_of[id(t)] = self.n_slots
            self.shapes[self.n_slots] = tuple(t.shape)
            self.alive.append(t)
            out_slots.append(self.n_slots)
            self.n_slots += 1
        self.nodes.append(_Node(func, args_t, kwargs_t, in_slots, in_shapes, out_slots,
                                [tuple(t.shape) for t in out_tensors], where))
        return out


class _Geom:
    """What a dense value holds, in patch terms.

    kind 'map': Cp sees a (channels, h, w) map; the dense tensor is
    (N*M, channels, Hq + h - 1 (or more), Wq + w - 1 (or more)).
    kind 'vector': Cp sees the flattening of a (channels, h, w) map (torch's C, H, W
    order); the dense tensor is that map's.  kind 'view': another reshape of that map,
    for element-wise ops only.  ``stage`` lists the strides so far.
    """
    __slots__ = ("kind", "channels", "size", "stage")

    def __init__(self, kind, channels, size, stage):
        self.kind, self.channels, self.size, self.stage = kind, int(channels), tuple(size), tuple(stage)

    def same_grid(self, other):
        return self.stage == other.stage and self.size == other.size and self.kind == other.kind

    def describe(self):
        c, (h, w) = self.channels, self.size
        return {"map": f"a {c}x{h}x{w} map", "vector": f"a flattened {c}x{h}x{w} map"}.get(
            self.kind, f"a reshaped {c}x{h}x{w} map")


class _Step:
    """One operation of CI: reads dense values from slots and writes dense values."""

    def __init__(self, inputs, outputs, label):
        self.inputs, self.outputs, self.label = list(inputs), list(outputs), label

    def run(self, values, net):  # pragma: no cover - abstract
        raise NotImplementedError


class _CallStep(_Step):
    """Applies the recorded function itself to dense values (ops that act per pixel).

    In-place variants are used only where the input is not needed afterwards (``overwrite``),
    so a user's in-place op never changes the padded image or a value read later.
    """

    def __init__(self, node, func=None, args=None, kwargs=None):
        super().__init__(node.in_slots, node.out_slots, node.name)
        self.func = func or node.func
        self.args = node.args if args is None else args
        self.kwargs = node.kwargs if kwargs is None else kwargs
        self.func_inplace, self.func_copy = _inplace_variants(self.func)
        self.overwrite = False  # set by DenseFeatureNet once it knows which values are read later

    def run(self, values, net):
        env = dict(zip(self.inputs, values))

        def sub(v):
            if isinstance(v, _Ref):
                return env[v.slot]
            if isinstance(v, (_Param, _Const)):
                return net._resolve(v)
            return v
        args, kwargs = _map_structure(self.args, sub), _map_structure(self.kwargs, sub)
        func = self.func_inplace if self.overwrite else self.func_copy
        if func is _WITH_INPLACE_FLAG:
            func, kwargs = self.func, dict(kwargs, inplace=self.overwrite)
        out = func(*args, **kwargs)
        return [t for t in _leaves(out) if isinstance(t, torch.Tensor)]


_WITH_INPLACE_FLAG = object()
_INPLACE_TWINS = {torch.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_, torch.relu: torch.relu_,
                  torch.Tensor.tanh: torch.Tensor.tanh_, torch.Tensor.sigmoid: torch.Tensor.sigmoid_,
                  torch.Tensor.relu: torch.Tensor.relu_}


def _inplace_variants(func):
    """(in-place version, out-of-place version) of an element-wise function."""
    try:
        if "inplace" in inspect.signature(func).parameters:
            return _WITH_INPLACE_FLAG, _WITH_INPLACE_FLAG
    except (TypeError, ValueError):
        pass
    if func in _INPLACE_TWINS:
        return _INPLACE_TWINS[func], func
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]) \
            and getattr(torch.Tensor, name, None) is func:
        return func, getattr(torch.Tensor, name[:-1])
    return func, func


class _PoolStep(_Step):
    def __init__(self, node, kind, kernel, stride, dilation=(1, 1), norm_type=2.0, divisor_override=None):
        super().__init__(node.in_slots[:1], node.out_slots, f"multi_pool({kind}, kernel={kernel}, stride={stride})")
        self.kind, self.kernel, self.stride, self.dilation = kind, kernel, stride, dilation
        self.norm_type, self.divisor_override = norm_type, divisor_override

    def run(self, values, net):
        return [multi_pool(values[0], self.kind, self.kernel, self.stride, self.dilation, net.naive,
                           self.norm_type, self.divisor_override)]


class _ConvStep(_Step):
    def __init__(self, node, weight, bias, stride, dilation, groups, weight_shape=None, label=None):
        kind = "multi_conv" if stride != (1, 1) else "conv2d"
        super().__init__(node.in_slots[:1], node.out_slots,
                         label or f"{kind}(stride={stride}, dilation={dilation}, groups={groups})")
        self.weight, self.bias = weight, bias
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.weight_shape = weight_shape

    def run(self, values, net):
        weight = net._resolve(self.weight)
        if self.weight_shape is not None:
            weight = weight.reshape(self.weight_shape)
        bias = None if self.bias is None else net._resolve(self.bias)
        return [multi_conv(values[0], weight, bias, self.stride, self.dilation, self.groups, net.naive)]


class _UnfoldStep(_Step):
    """Cp returns a flattened (C, h, w) map: gather its h*w shifts into channels (C, h, w order)."""

    def __init__(self, slot, geom):
        super().__init__([slot], [slot], f"flatten_output({geom.channels}x{geom.size[0]}x{geom.size[1]})")
        self.size = geom.size

    def run(self, values, net):
        x = values[0]
        h, w = self.size
        cols = F.unfold(x, self.size)
        return [cols.reshape(x.shape[0], -1, x.shape[2] - h + 1, x.shape[3] - w + 1)]


# --- rule helpers ----------------------------------------------------------

def _channel_dim(geom, dim, node):
    """Dense channel axis for ``dim`` of a patch tensor, or raise if ``dim`` is spatial or the batch."""
    rank = 4 if geom.kind == "map" else 2
    d = dim + rank if dim < 0 else dim
    if d == 1 and (geom.kind == "map" or (geom.kind == "vector" and geom.size == (1, 1))):
        return 1
    raise node.fail(f"it works along dim {dim} of {geom.describe()}, which mixes positions of the patch; "
                    f"only the channel axis (dim 1) can be made dense")


def _constant_for(geom, value, node):
    """Reshape a constant operand so that it broadcasts per pixel on the dense tensor."""
    if not isinstance(value, (torch.Tensor, _Param, _Const)):
        return value
    shape = tuple(value.shape)
    if _prod(shape) == 1 and len(shape) <= (4 if geom.kind == "map" else 2):
        return value
    if geom.kind == "map":
        padded = (1,) * (4 - len(shape)) + shape
        if len(shape) <= 4 and padded[0] == 1 and padded[2] == 1 and padded[3] == 1:
            return value
        raise node.fail(f"a constant of shape {shape} differs across positions of the patch "
                        f"({geom.describe()}), so overlapping patches cannot share work")
    if geom.kind == "vector" and geom.size == (1, 1) and len(shape) <= 2 and (len(shape) < 2 or shape[0] == 1):
        view = (1, shape[-1], 1, 1)
        if isinstance(value, _Const):
            return _Const(value.index, value.shape, view)
        if isinstance(value, _Param):
            return _Param(value.name, value.shape, view)
        return value.reshape(view)
    raise node.fail(f"a constant of shape {shape} differs across the entries of {geom.describe()}")


def _same_grid(node, geoms):
    first = geoms[0]
    for g in geoms[1:]:
        if not first.same_grid(g):
            raise node.fail(
                f"it combines {first.describe()} with {g.describe()} (strides {list(first.stage)} vs "
                f"{list(g.stage)}); values that cover different parts of the patch, such as a statistic "
                f"of the whole patch, differ for every patch and cannot be shared")
    return first


# --- the rules: one small function per kind of op ---------------------------

def _rule_elementwise(node, geoms):
    """Element-wise functions (activations, arithmetic, casts): applied unchanged."""
    geom = _same_grid(node, geoms)
    args = _map_structure(node.args, lambda v: _constant_for(geom, v, node))
    kwargs = _map_structure(node.kwargs, lambda v: _constant_for(geom, v, node))
    _check_same_shape(node)
    return _CallStep(node, args=args, kwargs=kwargs), [geom] * len(node.out_slots)


def _check_same_shape(node):
    for shape in node.out_shapes:
        if shape != node.in_shapes[0]:
            raise node.fail(f"its output {shape} does not have the shape of its input {node.in_shapes[0]} "
                            f"(broadcasting an activation over the patch is not per-pixel)")


def _passthrough(node, geom):
    return _CallStep(node, func=_identity, args=(_Ref(node.in_slots[0]),), kwargs={}), [geom]


def _identity(x):
    return x


def _rule_identity(node, geoms):
    """Dropout (off at inference), contiguous, clone, detach: the value passes through."""
    return _passthrough(node, geoms[0])


def _rule_conv2d(node, geoms):
    p = node.bind(["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    geom = geoms[0]
    if geom.kind != "map":
        raise node.fail(f"its input is {geom.describe()}, not an image-like map")
    if any(v != 0 for v in _padding_values(p["padding"])):
        raise node.fail(f"it pads its input (padding={p['padding']!r}); {_PADDING_REASON}")
    if not isinstance(p["weight"], _Param):
        raise node.fail("its weight is not a parameter of Cp")
    stride, dil = _pair(p["stride"], "stride"), _pair(p["dilation"], "dilation")
    out = node.out_shapes[0]
    stage = geom.stage + ((stride,) if stride != (1, 1) else ())
    return (_ConvStep(node, p["weight"], p["bias"], stride, dil, int(p["groups"])),
            [_Geom("map", out[1], out[2:], stage)])


def _pool_params(node, kind):
    if kind == "max":
        p = node.bind(["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                      {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    elif kind == "avg":
        p = node.bind(["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                       "divisor_override"],
                      {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                       "divisor_override": None})
    else:
        p = node.bind(["input", "norm_type", "kernel_size", "stride", "ceil_mode"],
                      {"stride": None, "ceil_mode": False})
    return p


def _make_pool_rule(kind):
    def rule(node, geoms):
        p = _pool_params(node, kind)
        geom = geoms[0]
        if geom.kind != "map":
            raise node.fail(f"its input is {geom.describe()}, not an image-like map")
        if p.get("return_indices"):
            raise node.fail("it returns pooling indices, which refer to positions inside one patch")
        if any(v != 0 for v in _padding_values(p.get("padding", 0))):
            raise node.fail(f"it pads its input (padding={p['padding']!r}); {_PADDING_REASON}")
        kernel = _pair(p["kernel_size"], "kernel_size")
        stride = kernel if p["stride"] is None or p["stride"] == [] else _pair(p["stride"], "stride")
        dil = _pair(p.get("dilation", 1), "dilation")
        if p.get("ceil_mode"):
            for size, k, s, d in zip(geom.size, kernel, stride, dil):
                if (size - d * (k - 1) - 1) % s:
                    raise node.fail(
                        f"ceil_mode=True makes a last, partial window at the patch border "
                        f"(patch-level size {size}, kernel {k}, stride {s}); in a whole image that "
                        f"window would see real pixels.  Use ceil_mode=False or a patch size that "
                        f"makes the windows fit exactly")
        out = node.out_shapes[0]
        stage = geom.stage + ((stride,) if stride != (1, 1) else ())
        step = _PoolStep(node, kind, kernel, stride, dil, float(p.get("norm_type", 2.0)),
                         p.get("divisor_override"))
        return step, [_Geom("map", out[1], out[2:], stage)]
    rule.__doc__ = f"{kind} pooling: multipooling with the same kernel and stride."
    return rule


def _global_pool_step(node, geom, kind, keep_map):
    """Pooling over the whole patch-level map: a stride-1 pooling with the map's size."""
    h, w = geom.size
    step = _PoolStep(node, kind, (h, w), (1, 1))
    return step, [_Geom("map" if keep_map else "vector", geom.channels, (1, 1), geom.stage)]


def _make_adaptive_rule(kind):
    def rule(node, geoms):
        p = node.bind(["input", "output_size", "return_indices"], {"return_indices": False})
        geom = geoms[0]
        if geom.kind != "map":
            raise node.fail(f"its input is {geom.describe()}")
        if p["return_indices"]:
            raise node.fail("it returns pooling indices")
        out_size = p["output_size"]
        out_size = (out_size, out_size) if not isinstance(out_size, (tuple, list)) else tuple(out_size)
        out_size = tuple(geom.size[i] if o is None else int(o) for i, o in enumerate(out_size))
        if out_size == (1, 1):
            return _global_pool_step(node, geom, kind, keep_map=True)
        if any(s % o for s, o in zip(geom.size, out_size)):
            raise node.fail(f"adaptive pooling from {geom.size} to {out_size} uses windows of varying size")
        kernel = tuple(s // o for s, o in zip(geom.size, out_size))
        stage = geom.stage + ((kernel,) if kernel != (1, 1) else ())
        return _PoolStep(node, kind, kernel, kernel), [_Geom("map", geom.channels, out_size, stage)]
    rule.__doc__ = f"adaptive {kind} pooling: global pooling, or an ordinary one where sizes divide."
    return rule


_REDUCE_SIGNATURES = {"norm": ["input", "p", "dim", "keepdim"], "vector_norm": ["x", "ord", "dim", "keepdim"]}


def _make_reduce_rule(kind):
    """Reductions: over the channel axis they act per pixel; over both spatial axes of a map they
    are a global pooling (mean -> average pooling, amax -> max pooling)."""
    def rule(node, geoms):
        geom = geoms[0]
        names = _REDUCE_SIGNATURES.get(getattr(node.func, "__name__", ""), ["input", "dim", "keepdim"])
        p = node.bind(names, {"dim": None, "keepdim": False})
        dim = p.pop("dim")
        if dim is None:
            raise node.fail("it reduces over the whole tensor, batch included")
        dims = [dim] if isinstance(dim, numbers.Integral) else list(dim)
        keepdim = bool(p.pop("keepdim"))
        if geom.kind == "map" and sorted(d % 4 for d in dims) == [2, 3]:
            if kind is None:
                raise node.fail("only mean and amax over the spatial axes are supported (as global pooling)")
            return _global_pool_step(node, geom, kind, keep_map=keepdim)
        rank = 4 if geom.kind == "map" else len(node.in_shapes[0])
        if any(d % rank == 0 for d in dims):
            raise node.fail("it reduces over the batch of patches")
        per_pixel = dims and all(d % rank == 1 for d in dims) and (
            geom.kind == "map" or (geom.kind == "vector" and geom.size == (1, 1)))
        if not per_pixel:
            raise node.fail(f"it computes a statistic over positions of each patch (dims {dims} of "
                            f"{geom.describe()}), as per-patch normalisation does; {_PER_PATCH_REASON}")
        if not keepdim and geom.kind == "map":
            raise node.fail("a channel reduction without keepdim=True turns the map into (N, h, w)")
        first = p.pop(names[0])
        return _CallStep(node, args=(first,), kwargs=dict(p, dim=1, keepdim=True)), \
            [_Geom(geom.kind, 1, geom.size, geom.stage)]
    return rule


def _make_channel_rule(dim_name, position, default):
    """Ops that work along one axis (softmax, normalize, ...): per pixel when that axis is the channels."""
    def rule(node, geoms):
        geom = geoms[0]
        names = ["input"] + [None] * (position - 1) + [dim_name]
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        dim = values.get(dim_name, default)
        if dim is None:
            raise node.fail("it works along an implicit axis; pass dim=1")
        dense_dim = _channel_dim(geom, int(dim), node)
        args, kwargs = list(node.args), dict(node.kwargs)
        if dim_name in kwargs:
            kwargs[dim_name] = dense_dim
        elif len(args) > position:
            args[position] = dense_dim
        else:
            kwargs[dim_name] = dense_dim
        _check_same_shape(node)
        return _CallStep(node, args=tuple(args), kwargs=kwargs), [geom]
    return rule


def _rule_local_response_norm(node, geoms):
    """Local response normalisation: across channels at each pixel."""
    geom = geoms[0]
    if geom.kind != "map":
        raise node.fail(f"its input is {geom.describe()}")
    return _CallStep(node), [geom]


def _rule_batch_norm(node, geoms):
    """Batch normalisation with running statistics: a per-channel affine map."""
    p = node.bind(["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    geom = geoms[0]
    if p["running_mean"] is None or p["running_var"] is None:
        raise node.fail("it has no running statistics (track_running_stats=False), so it normalises with "
                        "statistics of the batch of patches")
    if geom.kind == "vector" and geom.size != (1, 1):
        raise node.fail(f"it normalises each entry of {geom.describe()} with its own statistics")
    args = (_Ref(node.in_slots[0]), p["running_mean"], p["running_var"], p["weight"], p["bias"], False,
            0.0, p["eps"])
    return _CallStep(node, func=F.batch_norm, args=args, kwargs={}), [geom]


def _rule_prelu(node, geoms):
    """PReLU: one slope per channel (or one for all)."""
    geom = geoms[0]
    if geom.kind == "vector" and geom.size != (1, 1):
        raise node.fail(f"its slopes apply per entry of {geom.describe()}")
    return _CallStep(node), [geom]


def _rule_layer_norm(node, geoms):
    """Layer normalisation: per pixel only when it normalises a vector of channels."""
    p = node.bind(["input", "normalized_shape", "weight", "bias", "eps"],
                  {"weight": None, "bias": None, "eps": 1e-5})
    geom = geoms[0]
    shape = tuple(p["normalized_shape"]) if isinstance(p["normalized_shape"], (list, tuple, torch.Size)) \
        else (int(p["normalized_shape"]),)
    if geom.kind == "vector" and geom.size == (1, 1) and shape == (geom.channels,):
        def layer_norm_channels(x, weight, bias, eps):
            y = F.layer_norm(x.permute(0, 2, 3, 1), shape, weight, bias, eps)
            return y.permute(0, 3, 1, 2)
        args = (_Ref(node.in_slots[0]), p["weight"], p["bias"], p["eps"])
        return _CallStep(node, func=layer_norm_channels, args=args, kwargs={}), [geom]
    raise node.fail(f"it normalises {geom.describe()} over {shape}, with statistics of each patch; "
                    f"{_PER_PATCH_REASON}")


_PER_PATCH_REASON = ("every patch is normalised with its own statistics, so the features of a pixel differ "
                     "for every patch that contains it and no work can be shared between overlapping "
                     "patches: CI cannot be exact (normalise the whole image instead, or use dense_reference)")


def _rule_refuse_per_patch(node, geoms):
    """Instance and group normalisation use statistics of each patch."""
    raise node.fail(f"it normalises with statistics computed over each patch; {_PER_PATCH_REASON}")


def _rule_refuse_padding(node, geoms):
    """Explicit padding inside Cp."""
    raise node.fail(f"it pads an activation inside Cp; {_PADDING_REASON}")


def _rule_refuse_indices(node, geoms):
    """Pooling that returns indices: they refer to positions inside one patch."""
    raise node.fail("it returns pooling indices, which refer to positions inside one patch")


def _rule_reshape(node, geoms):
    """view/reshape/flatten/squeeze/unsqueeze that keep the batch axis: the same values, reinterpreted.

    (N, C, h, w) is a map, (N, C*h*w) a vector (torch's C, H, W order); any other shape is a
    'view' that only element-wise ops and further reshapes may use."""
    geom = geoms[0]
    src, dst = node.in_shapes[0], node.out_shapes[0]
    c, (h, w) = geom.channels, geom.size
    if dst == src:
        return _passthrough(node, geom)
    if len(dst) >= 1 and dst[0] == src[0] and _prod(dst[1:]) == c * h * w:
        kind = "map" if dst[1:] == (c, h, w) else "vector" if dst[1:] == (c * h * w,) else "view"
        return _passthrough(node, _Geom(kind, c, (h, w), geom.stage))
    raise node.fail(f"it reshapes {src} to {dst}, which moves values between patches (the batch axis)")


def _rule_linear(node, geoms):
    """Linear layer on a flattened map: a convolution with the map's size (C, h, w order)."""
    p = node.bind(["input", "weight", "bias"], {"bias": None})
    geom = geoms[0]
    if geom.kind != "vector":
        raise node.fail(f"it is applied to {geom.describe()} and so mixes values along the width axis; "
                        f"flatten the map first")
    if not isinstance(p["weight"], _Param):
        raise node.fail("its weight is not a parameter of Cp")
    c, (h, w) = geom.channels, geom.size
    out = node.out_shapes[0][-1]
    step = _ConvStep(node, p["weight"], p["bias"], (1, 1), (1, 1), 1, weight_shape=(out, c, h, w),
                     label=f"linear_as_conv(kernel={h}x{w}, {c * h * w}->{out})")
    return step, [_Geom("vector", out, (1, 1), geom.stage)]


def _rule_cat(node, geoms):
    """Concatenation along the channel axis of values on the same grid."""
    p = node.bind(["tensors", "dim"], {"dim": 0})
    if any(not isinstance(t, _Ref) for t in p["tensors"]):
        raise node.fail("it concatenates an activation with a constant")
    geom = _same_grid(node, geoms)
    dense_dim = _channel_dim(geom, int(p["dim"]), node)
    out = node.out_shapes[0]
    return _CallStep(node, args=(p["tensors"],), kwargs={"dim": dense_dim}), \
        [_Geom(geom.kind, out[1], geom.size, geom.stage)]


def _build_rules() -> Dict[Callable, Callable]:
    rules: Dict[Callable, Callable] = {}

    def add(names, rule, spaces=(torch, F, torch.Tensor, torch.special)):
        for name in names:
            for space in spaces:
                obj = getattr(space, name, None)
                if obj is not None and callable(obj):
                    rules[obj] = rule

    add(["relu", "relu_", "relu6", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_",
         "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "softplus", "softsign",
         "softshrink", "hardshrink", "tanhshrink", "logsigmoid", "threshold", "threshold_", "rrelu",
         "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "abs_", "exp", "exp_", "log", "log_", "log1p",
         "expm1", "sqrt", "sqrt_", "rsqrt", "square", "neg", "neg_", "sign", "erf", "reciprocal", "clamp",
         "clamp_", "clip", "clamp_min", "clamp_max", "pow", "pow_", "add", "add_", "sub", "sub_", "mul",
         "mul_", "div", "div_", "true_divide", "maximum", "minimum", "where", "float", "double", "half",
         "bfloat16", "to", "type_as", "sin", "cos", "atan", "floor", "ceil", "round", "trunc",
         "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
         "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__pow__", "__rpow__",
         "__neg__", "__abs__", "rsub"], _rule_elementwise)
    add(["contiguous", "clone", "detach"], _rule_identity, (torch, torch.Tensor))
    add(["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
         "feature_dropout"], _rule_identity, (torch, F))
    add(["conv2d"], _rule_conv2d, (torch, F))
    add(["max_pool2d"], _make_pool_rule("max"), (torch, F))
    add(["max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"], _rule_refuse_indices, (torch, F))
    add(["avg_pool2d"], _make_pool_rule("avg"), (torch, F))
    add(["lp_pool2d"], _make_pool_rule("lp"), (F,))
    add(["adaptive_avg_pool2d"], _make_adaptive_rule("avg"), (torch, F))
    add(["adaptive_max_pool2d"], _make_adaptive_rule("max"), (torch, F))
    add(["mean"], _make_reduce_rule("avg"), (torch, torch.Tensor))
    add(["amax"], _make_reduce_rule("max"), (torch, torch.Tensor))
    add(["sum", "amin", "norm", "logsumexp"], _make_reduce_rule(None), (torch, torch.Tensor))
    rules[torch.linalg.vector_norm] = _make_reduce_rule(None)
    rules[F.normalize] = _make_channel_rule("dim", 2, 1)
    add(["softmax", "log_softmax", "softmin"], _make_channel_rule("dim", 1, None), (torch, F, torch.Tensor))
    add(["local_response_norm"], _rule_local_response_norm, (F,))
    add(["batch_norm"], _rule_batch_norm, (torch, F))
    add(["prelu"], _rule_prelu, (torch, F))
    add(["layer_norm"], _rule_layer_norm, (torch, F))
    add(["instance_norm", "group_norm"], _rule_refuse_per_patch, (torch, F))
    add(["pad", "constant_pad_nd"], _rule_refuse_padding, (torch, F))
    add(["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"],
        _rule_reshape, (torch, torch.Tensor))
    add(["linear"], _rule_linear, (torch, F))
    add(["cat", "concat", "concatenate"], _rule_cat, (torch,))
    return rules


_RULES = _build_rules()


def _lookup_rule(func):
    rule = _RULES.get(func)
    if rule is None:
        # Tensor.__rsub__ & co. are wrapped in Python; fall back to the wrapped builtin's name.
        name = getattr(func, "__name__", None)
        rule = next((r for f, r in _RULES.items() if getattr(f, "__name__", None) == name
                     and getattr(f, "__qualname__", "").startswith(("Tensor.", "TensorBase."))
                     and getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase."))), None)
    return rule


# ---------------------------------------------------------------------------
# CI as a module
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


class DenseFeatureNet(nn.Module):
    """CI built by :func:`convert`: Cp's output for the patch around every pixel.

    Holds Cp as the submodule ``base_net`` and uses its parameters directly (no copy), so
    ``.to()``, ``.half()`` and ``load_state_dict`` work as for any module.

    Attributes:
        patch_size: (pH, pW).
        in_channels, out_channels: C and K.
        strides: (sh, sw) of each multipooling/striding layer, in network order.
        stride_product: (SH, SW).
        naive: use the paper-faithful per-shift multipooling and per-layer unwarping.
        tile: "auto" (default: 128x128 output tiles on the CPU for patches up to 32 px, where
            cache-sized tiles run faster; none on GPUs or for larger patches), None (no tiling), or
            (th, tw): process the image in tiles of this output size.  Tiling is exact
            (overlapping inputs) and bounds memory.
        memory_format: torch.channels_last (default) or torch.contiguous_format for the internal tensors.
        max_memory: None, or a budget in bytes: tiles are chosen so that :meth:`estimate_memory`
            stays under it (overrides ``tile``).

    Shape:
        (N, C, H, W) -> (N, K, H, W), any N, H, W >= 1.  The result may have channels-last strides.
    """

    def __init__(self, base_net, patch_size, in_channels, out_channels, steps, output_slot, strides,
                 constants, naive=False, tile="auto", memory_format=torch.channels_last, progress=None,
                 slot_channels=None, max_memory=None):
        super().__init__()
        self.base_net = base_net
        self.patch_size = _pair(patch_size, "patch_size")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.strides = [tuple(s) for s in strides]
        self.stride_product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.steps = steps
        self.output_slot = output_slot
        for i, c in enumerate(constants):
            self.register_buffer(f"constant_{i}", c)
        self.n_constants = len(constants)
        self.naive = naive
        self.tile = tile
        self.memory_format = memory_format
        self.progress = progress
        last_use: Dict[int, int] = {}
        for i, step in enumerate(steps):
            for s in step.inputs:
                last_use[s] = i
        self._free_after = [[s for s in step.inputs if last_use.get(s) == i and s != output_slot]
                            for i, step in enumerate(steps)]
        self.max_memory = max_memory
        channels = dict(slot_channels or {})
        channels.setdefault(0, self.in_channels)
        self._peak_channels = _peak_live_channels([(st.inputs, st.outputs) for st in steps],
                                                  collections.defaultdict(lambda: self.out_channels, channels))
        for step, free in zip(steps, self._free_after):
            if isinstance(step, _CallStep):
                # slot 0 is the padded image (a view of it when tiling): never overwritten
                step.overwrite = len(step.inputs) == 1 and step.inputs[0] in free and step.inputs[0] != 0

    def _resolve(self, ref):
        if isinstance(ref, _Param):
            try:
                t = self.base_net.get_parameter(ref.name)
            except AttributeError:
                t = self.base_net.get_buffer(ref.name)
        else:
            t = getattr(self, f"constant_{ref.index}")
        return t if ref.view is None else t.reshape(ref.view)

    def stacked(self, padded: torch.Tensor) -> torch.Tensor:
        """Run CI's layers on padded images; returns the shift-stacked result before unwarping.

        Shape:
            (N, C, H' + pH - 1, W' + pW - 1) -> (M * N, K, >= H'/SH, >= W'/SW).
        """
        values = {0: padded}
        layout = self.memory_format
        for step, free in zip(self.steps, self._free_after):
            outs = step.run([values[s] for s in step.inputs], self)
            for s, v in zip(step.outputs, outs):
                if layout == torch.channels_last and v.dim() == 4 and not _is_channels_last(v) and v.shape[1] > 1:
                    v = v.contiguous(memory_format=layout)  # a 1-channel input leaves convs in NCHW
                values[s] = v
            for s in free:
                values.pop(s, None)
        return values[self.output_slot]

    def _dense(self, padded, out_h, out_w):
        y = unwarp(self.stacked(padded), self.strides, self.naive)
        return y[:, :, :out_h, :out_w]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.in_channels)
        height, width = images.shape[-2:]
        padded = multipool_prepare(images, self.patch_size, self.stride_product)
        if self.memory_format is not None and self.memory_format != torch.contiguous_format:
            padded = padded.contiguous(memory_format=self.memory_format)
        tile = self._tile_size(images.device, height, width, images.shape[0], images.dtype)
        if tile is None:
            return self._dense(padded, height, width)
        return self._tiled(padded, height, width, tile)

    @property
    def tile(self):
        return self._tile

    @tile.setter
    def tile(self, value):
        self._tile = value if value is None or value == "auto" else _pair(value, "tile")

    def estimate_memory(self, image_size, batch: int = 1, tile=None, dtype=torch.float32) -> int:
        """Estimated peak bytes of CI on images of ``image_size`` (H, W): the padded input, the
        output, and 1.5 times the values alive at once on one tile (``tile`` None: whole image)."""
        return _memory_estimate(image_size, batch, self.in_channels, self.out_channels, self.patch_size,
                                self.stride_product, self._peak_channels, torch.empty((), dtype=dtype).element_size(),
                                None if tile is None else _pair(tile, "tile"))

    def tile_for_memory(self, budget: int, image_size, batch: int = 1, dtype=torch.float32):
        """The largest tile whose :meth:`estimate_memory` fits ``budget`` bytes (None: no tiling needed)."""
        return _tile_for_memory(budget, lambda t: self.estimate_memory(image_size, batch, t, dtype),
                                tuple(image_size), self.stride_product, self.patch_size)

    def _tile_size(self, device, height, width, batch=1, dtype=torch.float32):
        """The tile in use: from max_memory, the one asked for, or for "auto" 128 px tiles on the CPU
        when patches are at most 32 px (larger patches make the overlap cost more than tiles save)."""
        if self.max_memory is not None:
            return self.tile_for_memory(self.max_memory, (height, width), batch, dtype)
        if self._tile != "auto":
            return self._tile
        if device.type != "cpu" or max(self.patch_size) > 32 or (height <= 128 and width <= 128):
            return None
        return (128, 128)

    def _tiled(self, padded, height, width, tile):
        """Exact tiling: each output tile from its own crop of the padded image (overlap pH-1, pW-1),
        unwarped straight into the output."""
        sh, sw = self.stride_product
        th = -(-tile[0] // sh) * sh
        tw = -(-tile[1] // sw) * sw
        ph, pw = self.patch_size
        out = None
        origins = [(y, x) for y in range(0, height, th) for x in range(0, width, tw)]
        automatic = self._tile == "auto" and self.max_memory is None  # quiet: the user asked for nothing
        bar = _progress(len(origins), "CI tiles", self.progress if self.progress is not None else
                        (None if len(origins) >= 50 and not automatic else False))
        for y0, x0 in origins:
            hp, wp = -(-min(th, height - y0) // sh) * sh, -(-min(tw, width - x0) // sw) * sw
            stacked = self.stacked(padded[:, :, y0:y0 + hp + ph - 1, x0:x0 + wp + pw - 1])
            stacked = stacked[:, :, :hp // sh, :wp // sw]
            if out is None:  # the image size rounded up to the stride product; cropped at the end
                out = torch.empty((padded.shape[0], stacked.shape[1], -(-height // sh) * sh, -(-width // sw) * sw),
                                  dtype=stacked.dtype, device=stacked.device, memory_format=torch.channels_last
                                  if _is_channels_last(stacked) else torch.contiguous_format)
            dest = out[:, :, y0:y0 + hp, x0:x0 + wp]
            if self.naive:
                dest.copy_(unwarp(stacked, self.strides, naive=True))
            else:
                unwarp_into(stacked, self.strides, dest)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out[:, :, :height, :width]

    def extra_repr(self):
        lines = [f"patch_size={self.patch_size}, in_channels={self.in_channels}, out_channels="
                 f"{self.out_channels}, strides={self.strides}, naive={self.naive}, tile={self.tile}",
                 "steps:"]
        lines += [f"  {i}: {s.label}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def _infer_in_channels(base_net):
    for m in base_net.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int):
            return c
    return None


def _trace(base_net, patch_size, in_channels):
    """Run Cp once on random patches and record its ops.  Tries a batch of 2, then of 1."""
    ph, pw = patch_size
    dtype, device = _example_kind(base_net)
    last_error = None
    for batch in (2, 1):
        example = torch.randn(batch, in_channels, ph, pw, dtype=dtype, device=device)
        tracer = _Tracer(base_net, example)
        try:
            with torch.no_grad(), _EvalMode(base_net), tracer:
                out = base_net(example)
        except ConversionError:
            raise
        except Exception as exc:  # the net rejected this example; report it below
            last_error = exc
            continue
        finally:
            tracer.remove_hooks()
        return tracer, out, example
    msg = str(last_error)
    hint = ""
    if any(s in msg for s in ("too small", "can't be greater", "larger than", "smaller than", "must be",
                              "shapes cannot be multiplied", "size mismatch")):
        hint = (f" -- the patch {ph}x{pw} may be smaller (or larger) than the net needs; check patch_size "
                f"against the size Cp was trained on")
    raise ConversionError(f"running Cp on a batch of {in_channels}x{ph}x{pw} patches failed: "
                          f"{type(last_error).__name__}: {msg}{hint}") from last_error


def convert(base_net: nn.Module, patch_size, in_channels: Optional[int] = None, *, naive: bool = False,
            tile="auto", max_memory: Optional[int] = None, memory_format=torch.channels_last,
            check: bool = True, progress: Optional[bool] = None) -> DenseFeatureNet:
    """Turn a patch network Cp into CI, which computes Cp for the patch around every pixel.

    Cp's forward is captured on an example batch of patches (so any ``nn.Module`` works:
    functional calls, reused modules, shape checks), in inference mode (dropout off,
    batch-norm running statistics); the training flags of ``base_net`` are restored
    afterwards and its weights are shared, not copied.  Each captured op is made dense
    by one rule (see the README's table); ops that cannot be made exact raise
    :class:`ConversionError` naming the layer and the reason.

    Args:
        base_net: Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
        patch_size: int or (pH, pW).
        in_channels: C; inferred from the first module with ``in_channels`` when omitted.
        naive: paper-faithful per-shift multipooling and per-layer unwarping (slower, same result).
        tile: "auto" (CPU: cache-sized tiles, GPU: none), None, or (th, tw): process images in tiles
            of this output size (exact, bounded memory).
        max_memory: a budget in bytes; tiles are chosen so that CI's estimated peak stays under it.
        memory_format: internal layout; channels_last (default) is fastest on CPU.
        check: compare CI with Cp on a few patches of a small random image before returning.
        progress: progress bar for tiled runs (None: automatic).

    Returns:
        A :class:`DenseFeatureNet` mapping (N, C, H, W) to (N, K, H, W).
    """
    if not isinstance(base_net, nn.Module):
        raise TypeError(f"base_net must be a torch.nn.Module, got {type(base_net).__name__}")
    ph, pw = _pair(patch_size, "patch_size")
    if in_channels is None:
        in_channels = _infer_in_channels(base_net)
        if in_channels is None:
            raise ValueError("in_channels cannot be inferred from base_net (no module has in_channels); "
                             "pass in_channels=")
    elif not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    tracer, out, example = _trace(base_net, (ph, pw), int(in_channels))
    batch = example.shape[0]
    geoms = {0: _Geom("map", in_channels, (ph, pw), ())}
    steps: List[_Step] = []
    for node in tracer.nodes:
        rule = _lookup_rule(node.func)
        if rule is None:
            raise ConversionError(f"{node.where}: {node.name} is not supported by convert() (unknown op); "
                                  f"see the README's table of supported layers")
        step, out_geoms = rule(node, [geoms[s] for s in node.in_slots])
        for slot, geom in zip(node.out_slots, out_geoms):
            geoms[slot] = geom
        steps.append(step)
    _output_vectors(out, batch)
    if id(out) not in tracer.slot_of:
        raise ConversionError("Cp's output does not depend on its input patch")
    out_slot = tracer.slot_of[id(out)]
    geom = geoms[out_slot]
    if geom.size != (1, 1):
        if geom.kind == "map":
            raise ConversionError(
                f"Cp's output for one patch is a {geom.channels}x{geom.size[0]}x{geom.size[1]} map, not a "
                f"single vector; end Cp with layers that reduce it to 1x1 (or flatten it)")
        steps.append(_UnfoldStep(out_slot, geom))
    out_channels = out.reshape(batch, -1).shape[1]
    net = DenseFeatureNet(base_net, (ph, pw), in_channels, out_channels, steps, out_slot,
                          [s for s in geom.stage], tracer.constants, naive=naive, tile=tile,
                          memory_format=memory_format, progress=progress, max_memory=max_memory,
                          slot_channels={slot: g.channels for slot, g in geoms.items()})
    if check:
        _self_check(net, base_net)
    return net


def _self_check(net: DenseFeatureNet, base_net: nn.Module) -> None:
    """Compare CI with Cp on a few patches of a small random image (catches unsupported semantics)."""
    sh, sw = net.stride_product
    dtype, device = _example_kind(base_net)
    gen = torch.Generator().manual_seed(0)
    h, w = sh + 3, sw + 2
    images = torch.randn(1, net.in_channels, h, w, generator=gen).to(device=device, dtype=dtype)
    positions = torch.tensor([[0, 0, 0], [0, h - 1, w - 1], [0, h // 2, w // 3], [0, 1, w - 1]])
    with torch.no_grad(), _EvalMode(net):
        tile = net.tile
        net.tile = None
        try:
            dense = net(images)
        finally:
            net.tile = tile
        expected = patch_outputs(base_net, images, net.patch_size, positions)
    got = dense[positions[:, 0], :, positions[:, 1], positions[:, 2]]
    scale = max(float(expected.abs().max()), 1e-6)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                              or torch.backends.cuda.matmul.allow_tf32):
        tol = 1e-2  # TF32 tensor cores round operands to 10-bit mantissas
    err = float((got - expected).abs().max())
    if not err <= tol * scale:
        raise ConversionError(f"internal check failed: CI differs from Cp by {err:.3g} (scale {scale:.3g}) on "
                              f"a test image; this net uses an op whose dense form is not exact here. "
                              f"Please report it with the net's definition")
