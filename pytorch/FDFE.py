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

Usage
-----
Convert a patch network (here 8x8 patches -> 8-vectors) and compare with Cp run on every patch:

>>> import torch
>>> from torch import nn
>>> cp = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3))
>>> ci = FDFE.convert(cp, patch_size=8)
>>> images = torch.randn(2, 1, 20, 30)
>>> with torch.no_grad():
...     dense = ci(images)
>>> dense.shape
torch.Size([2, 8, 20, 30])
>>> reference = FDFE.dense_reference(cp, images, patch_size=8)   # Cp on all 1200 patches
>>> bool(torch.allclose(dense, reference, atol=1e-5))
True

The same CI wired by hand from the blocks (the SlimNet and StridedNet templates): pad, reuse the
layers without strides, replace the pooling by multipooling, unwarp with the list of strides (the
blocks check the wiring; check_ci compares the result with Cp on a few pixels):

>>> x = FDFE.multiPoolPrepare(8, 8, stride_product=2)(images)
>>> x = FDFE.multiMaxPooling(2, 2, 2, 2)(cp[1](cp[0](x)))
>>> x = cp[3](x)
>>> hand = FDFE.unwarpAll([(2, 2)])(x, images)
>>> bool(torch.allclose(hand, reference, atol=1e-5))
True

How this file is built
----------------------
convert():  capture (_Tracer records Cp's ops on example patches)
         -> rules (one function per op kind, registered with @_rule_for; each turns a recorded
            op into a _Step and says what the result holds: a _Geom)
         -> plan (plan_steps: liveness, in-place permissions, peak memory)
         -> DenseFeatureNet runs the steps on the padded image (whole, or tile by tile:
            tile_grid) and unwarps the shift-stacked result into (N, K, H, W).
The framework-neutral parts (pairs, patch padding, geometry, the rule contract, planning, memory
estimate, tiles, the self-check's comparison) sit in one block that is identical in the
TensorFlow backend.  supported_layers() lists what convert() accepts.

Public API
----------
patch_padding, dense_reference, patch_outputs          -- the ground truth (Cp on patches)
multipool_prepare, space_to_batch, multi_pool,
multi_conv, unwarp, unwarp_into, unwarp_layer           -- stateless building blocks
multiPoolPrepare, multiMaxPooling, multiAvgPooling,
multiLPPooling, multiConv, unwrapPrepare, unwrapPool,
unwarpAll, linearAsConv                                 -- the same as nn.Modules (they check the wiring)
check_images, check_patch_size, check_ci               -- checks of images, patch size, a CI against Cp
convert, DenseFeatureNet, ConversionError,
supported_layers, plan_steps, tile_grid                 -- automatic Cp -> CI
"""

import abc
import argparse
import contextlib
import dataclasses
import enum
import inspect
import numbers
import sys
import threading
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
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
    "linearAsConv",
    "check_ci",
    "DenseFeatureNet",
    "convert",
    "supported_layers",
    "plan_steps",
    "tile_grid",
    "keep_freed_memory",
]

#: order of a map's sizes in messages (the framework's layout)
_MAP_LAYOUT = "CHW"


# ============================================================================================
# BEGIN FRAMEWORK-NEUTRAL BLOCK
# Everything up to "END FRAMEWORK-NEUTRAL BLOCK" uses no framework (numbers, tuples, numpy, the
# standard library) and is kept textually identical in pytorch/FDFE.py and tensorflow/FDFE.py;
# shared_tests/test_structure.py checks that.  Change it in one file, copy it to the other.
# ============================================================================================

class ConversionError(ValueError):
    """Raised when a patch network cannot be turned into an exact CI."""


def _own_dict(value):
    """``value.__dict__`` (None for a class with slots), read past any ``__getattribute__`` of its class (not
    recorded as a read, see :class:`_ConfigReads`)."""
    try:
        return object.__getattribute__(value, "__dict__")
    except AttributeError:
        return None


def _is_config(value) -> bool:
    """Whether ``value`` is a configuration object (see :func:`_config_fields`)."""
    return isinstance(value, (argparse.Namespace, types.SimpleNamespace)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type))


def _config_fields(value):
    """The fields of a configuration object (an argparse.Namespace, a types.SimpleNamespace, a dataclass instance) as
    (name, value) pairs, leaving out names with a leading underscore; None for any other value.  The settings such
    an object holds for a module or layer (``self.cfg.temperature``) are compared like its own attributes, those
    that Cp's forward reads (see :class:`_ConfigReads`)."""
    if _is_config(value):
        fields = _own_dict(value)
        if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
            return [(k, v) for k, v in fields.items() if not k.startswith("_")]
        names = [f.name for f in dataclasses.fields(value) if not f.name.startswith("_")]
        if fields is None:  # (slots)
            return [(k, getattr(value, k)) for k in names if hasattr(value, k)]
        return [(k, fields[k]) for k in names if k in fields]
    return None


def _setting_paths(name, value, read=None):
    """The names under which an attribute ``name`` holding ``value`` is compared as a setting, with their values:
    ``name``, or, for a configuration object (:func:`_config_fields`), ``name.field`` for each of its fields (those
    in ``read`` where it is a set: the fields forward read), so that a field that forward changes as it runs (a
    counter: state) or never reads (an epoch a training loop stores) leaves the others compared."""
    fields = _config_fields(value)
    if fields is None:
        return [(name, value)]
    paths = [(f"{name}.{k}", v) for k, v in fields if read is None or k in read or "__dict__" in read]
    present = {k for k, _ in fields}  # (a field read but absent, getattr(cfg, "beta", 1.0): compared as absent)
    return paths + [(f"{name}.{k}", None) for k in sorted(read or ()) if k not in present and k[:1] != "_"
                    and not hasattr(type(value), k)]


def _read_setting(attributes, path, missing):
    """The value of a setting named as by :func:`_setting_paths` in ``attributes`` (an object's ``vars()``), or
    ``missing``."""
    name, _, field = path.partition(".")
    value = attributes.get(name, missing)
    if not field or value is missing:
        return value
    if not _is_config(value):
        return missing
    fields = _own_dict(value)
    return getattr(value, field, missing) if fields is None else fields.get(field, missing)


class _ConfigReads:
    """Which fields of the configuration objects (:func:`_config_fields`) that Cp's modules or layers hold its
    forward reads: :meth:`record` runs Cp once with each such object's class swapped for a subclass that records
    the names read, then once as it is (convert traces and checks Cp with the classes as they are).  An object whose
    class cannot be swapped (a dataclass with slots, a SimpleNamespace) or should not be (a class with its own
    metaclass or ``__init_subclass__``, whose hooks a subclass would run) has all its fields compared, and so has
    every object where the recording run fails or gives other values than Cp (a forward that checks the class).
    ``read(value)``: the set of field names read, or None (all)."""

    _lock = threading.Lock()  # (one recording run at a time: swaps of a configuration object shared by two Cps)

    def __init__(self, holders):
        self._reads, self._holders = {}, list(holders)

    def record(self, run, same):
        """Run ``run()`` (Cp on some patches) recording reads, then again as it is; ``same(a, b)`` compares the two
        results."""
        swapped, reads = [], {}
        with self._lock:
            try:
                for holder in self._holders:
                    for value in list(vars(holder).values()):
                        if _config_fields(value) is None or id(value) in reads:
                            continue
                        kind = type(value)
                        if type(kind) not in (type, abc.ABCMeta) or any(
                                "__init_subclass__" in vars(c) for c in kind.__mro__[:-1]):
                            continue

                        def getattribute(obj, name, kind=kind):
                            if name[:2] != "__" or name == "__dict__":  # (vars(cfg): all its fields)
                                reads.get(id(obj), set()).add(name)
                            return kind.__getattribute__(obj, name)
                        recording = type(kind.__name__, (kind,), {"__getattribute__": getattribute,
                                                                  "__module__": kind.__module__,
                                                                  "__qualname__": kind.__qualname__})
                        try:  # (past a frozen dataclass' __setattr__)
                            object.__setattr__(value, "__class__", recording)
                        except (TypeError, AttributeError):  # (slots, SimpleNamespace): all its fields compared
                            continue
                        reads[id(value)] = set()
                        swapped.append((value, kind))
                recorded = run() if swapped else None
            except Exception:  # (Cp fails with the classes swapped: all fields compared)
                return
            finally:
                for value, kind in swapped:
                    object.__setattr__(value, "__class__", kind)
        if swapped:
            try:
                if not same(recorded, run()):
                    return
            except Exception:
                return
            self._reads = reads

    def read(self, value):
        return self._reads.get(id(value))


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


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _ceil_div(value, divisor):
    """``value / divisor`` rounded up, for positive ``divisor`` (ints, or symbolic or scalar tensors for value).
    Written without negative operands: exporters (ONNX) may turn ``//`` into a division that rounds toward
    zero, which on ``-(-value // divisor)`` would round down."""
    return (value + divisor - 1) // divisor


def _ceil_to(value, multiple):
    """``value`` rounded up to a multiple of ``multiple`` (ints, or scalar tensors for value)."""
    return _ceil_div(value, multiple) * multiple


def patch_padding(patch_size) -> Tuple[int, int, int, int]:
    """Zero padding that puts a patch around every pixel.

    Args:
        patch_size: int or (pH, pW).

    Returns:
        (top, bottom, left, right) = (ceil((pH-1)/2), floor((pH-1)/2),
        ceil((pW-1)/2), floor((pW-1)/2)).  The patch of pixel (y, x) then covers rows
        y .. y + pH - 1 and columns x .. x + pW - 1 of the padded image.

    Example:
        >>> patch_padding(15)
        (7, 7, 7, 7)
        >>> patch_padding((16, 5))
        (8, 7, 2, 2)
    """
    ph, pw = _pair(patch_size, "patch_size")
    return ph // 2, (ph - 1) // 2, pw // 2, (pw - 1) // 2


#: how the image is extended beyond its border for the patches of pixels near it: "zeros" (the
#: paper's convention), "reflect" (mirrored without repeating the edge pixel: ... 2 1 | 0 1 2 ...) or
#: "replicate" (the edge pixel repeated: ... 0 0 | 0 1 2 ...)
BORDERS = ("zeros", "reflect", "replicate")


def _check_border(border, image_size, patch_size):
    """Check ``border``; for "reflect", the image must be larger than the patch's reach beyond it."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    top, bottom, left, right = patch_padding(patch_size)
    height, width = image_size
    if border == "reflect" and all(isinstance(v, int) for v in (height, width)) and (
            max(top, bottom) >= height or max(left, right) >= width):
        raise ValueError(f"border='reflect' mirrors the image at its edge, so it must be larger than the patch "
                         f"reaches beyond it: a {patch_size[0]}x{patch_size[1]} patch needs images of at least "
                         f"{max(top, bottom) + 1}x{max(left, right) + 1}, got {height}x{width} (use "
                         f"border='replicate' or 'zeros' for smaller images)")


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A tqdm progress bar where tqdm is installed and enabled, else None."""
    if enabled is False or (enabled is None and total < 50):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


# --- why a layer cannot be made dense exactly (used by the rules and the hand-wired blocks) ----

_PADDING_REASON = ("inside Cp the padded border depends on where the patch ends, so a window near the "
                   "patch border reads padding in Cp (zeros, or values mirrored or repeated from the patch; a "
                   "padded pooling skips those cells and pools fewer pixels) but real neighbours in a whole image; "
                   "CI cannot be exact. "
                   "Use unpadded layers (padding=0 in PyTorch, padding='valid' in Keras), or use "
                   "dense_reference() for this net")
_PER_PATCH_REASON = ("every patch is normalised with its own statistics, so the features of a pixel differ "
                     "for every patch that contains it and no work can be shared between overlapping "
                     "patches: CI cannot be exact (normalise the whole image instead, or use dense_reference)")
_INDICES_REASON = "it returns pooling indices, which refer to positions inside one patch"
_RESIZE_REASON = ("the resized maps of neighbouring patches are not shifted copies of one another (one pixel further "
                  "in the image is one position further in the input map, but s positions, or a fraction of one, in "
                  "the resized map), so no dense map holds them; FDFE makes dense the layers that keep or reduce the "
                  "resolution (convolutions, pooling, striding)")


def _transposed_conv_reason(stride, kernel):
    """Why a transposed convolution of ``stride`` and ``kernel`` ((sh, sw), (kh, kw)) cannot be made dense."""
    if tuple(stride) != (1, 1):
        return f"it resizes a map; {_RESIZE_REASON}"
    if tuple(kernel) == (1, 1):
        return ("a 1x1 transposed convolution at stride 1 is a 1x1 convolution, which convert does not read it as: "
                "write it as one (its kernel's two channel axes swapped)")
    return f"a transposed convolution at stride 1 pads its input by the kernel size - 1 on every side; " \
        f"{_PADDING_REASON}"
_MIXED_GRID_REASON = ("values that cover different parts of the patch, such as a statistic of the whole "
                      "patch, differ for every patch and cannot be shared (a squeeze-and-excitation gate is one; where "
                      "the gated map is pooled over the patch next, pool first: the gate times the map's mean is the "
                      "mean of the gated map)")
_MIXED_STRIDES_REASON = ("maps that went through different strides (even where their positions coincide, such as "
                         "two strides of 2 and one of 4) hold their positions in different orders in CI, which stacks "
                         "each stride's shifts on its own; streams that pool or stride differently merge exactly only "
                         "as one vector per position each (1x1 maps: pool, crop or flatten each stream to one position "
                         "first), or give the streams the same strides")
_MIXED_LAYOUT_REASON = ("one holds the channels of every position where a transpose moved them and the other does "
                        "not; transpose one of them first, so that both hold them on the same axis")
_MIXED_GROUPS_REASON = ("one holds the channels of every position split into groups (on axes of their own) and the "
                        "other does not; reshape one of them first, so that both hold their channels alike")


# --- geometry: what a dense value holds, in patch terms ---------------------------------------

#: Geometry kinds.  MAP: Cp sees a (channels, h, w) map (Keras: (h, w, channels)); the dense
#: tensor holds it for every pixel, shift-stacked on the batch axis.  VECTOR: Cp sees the
#: flattening of such a map (torch's C, H, W order; Keras' H, W, C order); the dense tensor is
#: still the map's.  VIEW: any other reshape of that map, usable by element-wise ops only.  TRANSPOSED:
#: the map with its channels moved to the other end (torch: (h, w, channels), Keras: (channels, h, w)); the
#: dense tensor is transposed the same way, and only ops per position along the channel axis and the
#: transpose back may use it.  SWAPPED: the map as (w, h, channels), its channels last and its positions
#: transposed (PyTorch: ``x.transpose(1, 3)`` of a map; Keras: what a softmax along axis 1 makes of a transposed
#: map inside); the dense tensor is transposed the same way, and only ops per position along the channels and the
#: transposes back may use it.  ROWS: the map as one row of channels per position, (N, h*w, channels) (PyTorch:
#: ``x.flatten(2).transpose(1, 2)`` of a map, tokens; Keras holds such rows as a VIEW, its maps having their
#: channels last); the dense tensor is the transposed map's, and only ops per position along the channels, pooling
#: over the rows and the transposes back may use it.  GROUPS: the map with its channels split into groups, on axes of
#: their own beside the positions (PyTorch: (N, g1, ..., gk, h, w); Keras: (N, h, w, g1, ..., gk), k >= 2; a reshape of
#: the channels, ``x.view(N, G, C // G, h, w)``, or a stack of maps along a new axis); the dense tensor holds the same
#: axes with CI's batch and spatial sizes, so that ops along the group axes alone (element-wise ops, reductions,
#: softmax, transposes of the groups, reshapes back) are exact on it; ``groups`` holds (g1, ..., gk).
MAP, VECTOR, VIEW, TRANSPOSED, SWAPPED, ROWS = "map", "vector", "view", "transposed", "swapped", "rows"
GROUPS = "groups"


class _Geom:
    """Geometry of one dense value: its kind, the channels and (h, w) size Cp sees, and the
    strides of the multipooling/striding layers it went through (network order); of a map with its channels split
    into groups (GROUPS), the group sizes (g1, ..., gk), whose product is the channels (empty for other kinds)."""
    __slots__ = ("kind", "channels", "size", "strides", "guessed", "groups")

    def __init__(self, kind, channels, size, strides=(), guessed=False, groups=()):
        if kind not in (MAP, VECTOR, VIEW, TRANSPOSED, SWAPPED, ROWS, GROUPS):
            raise ValueError(f"unknown geometry kind {kind!r}")
        self.kind, self.channels, self.size = kind, int(channels), (int(size[0]), int(size[1]))
        self.strides = tuple((int(s[0]), int(s[1])) for s in strides)
        self.guessed = guessed  # a stand-in after a refused op (see _guessed_geom), or derived from one
        self.groups = tuple(int(g) for g in groups) if kind == GROUPS else ()
        if kind == GROUPS and (len(self.groups) < 2 or _prod(self.groups) != self.channels):
            raise ValueError(f"groups {self.groups} of {self.channels} channels: at least two axes, whose product "
                             f"is the channels")

    def with_(self, kind=None, channels=None, size=None, stride=(1, 1), groups=None):
        """A copy with some fields replaced; ``stride`` other than (1, 1) is appended to the strides.  A GROUPS copy
        keeps the groups unless ``groups`` is given, and its channels are their product."""
        strides = self.strides + ((tuple(stride),) if tuple(stride) != (1, 1) else ())
        kind = self.kind if kind is None else kind
        groups = self.groups if groups is None else tuple(groups)
        if kind == GROUPS:
            channels = _prod(groups)
        return _Geom(kind, self.channels if channels is None else channels,
                     self.size if size is None else size, strides, self.guessed, groups)

    @property
    def is_pixel_vector(self):
        """True for a vector of channels at one position (a 1x1 map, flattened or not)."""
        return self.size == (1, 1) and self.kind in (MAP, VECTOR)

    def same_grid(self, other):
        return self.strides == other.strides and self.size == other.size and self.kind == other.kind

    def with_positions_transposed(self, kind):
        """A copy of ``kind`` with (h, w) and every stride transposed: a SWAPPED map seen as a map of size (w, h)
        whose channels are last (see _on_swapped), and back."""
        return _Geom(kind, self.channels, self.size[::-1], [s[::-1] for s in self.strides], self.guessed)

    def describe(self):
        """E.g. "a 16x5x5 map" (sizes in the backend's layout, _MAP_LAYOUT)."""
        (h, w), c = self.size, self.channels
        what = f"{c}x{h}x{w} map" if _MAP_LAYOUT == "CHW" else f"{h}x{w}x{c} map"
        if self.kind == TRANSPOSED:
            return f"a transposed map ({h}x{w}x{c})" if _MAP_LAYOUT == "CHW" else f"a transposed map ({c}x{h}x{w})"
        if self.kind == SWAPPED:
            return f"a map with its positions transposed ({w}x{h}x{c})"
        if self.kind == ROWS:
            return f"the rows of a {h}x{w} map ({h * w}x{c}, one per position)"
        if self.kind == GROUPS:
            return (f"a map with its channels split into groups ({h}x{w} positions, "
                    f"{'x'.join(str(g) for g in self.groups)} channels)")
        return {MAP: f"a {what}", VECTOR: f"a flattened {what}"}.get(self.kind, f"a reshaped {what}")

    def __repr__(self):
        groups = f", groups={self.groups}" if self.kind == GROUPS else ""
        return f"_Geom({self.kind!r}, {self.channels}, {self.size}, {self.strides}{groups})"


def _same_grid(op, geoms):
    """The common geometry of values combined by one op, or the op's ConversionError."""
    first = geoms[0]
    for g in geoms[1:]:
        if not first.same_grid(g):
            reason = _MIXED_GRID_REASON
            if first.strides != g.strides and not (first.is_pixel_vector or g.is_pixel_vector):
                reason = _MIXED_STRIDES_REASON
            elif GROUPS in (first.kind, g.kind) and first.kind != g.kind:
                reason = _MIXED_GROUPS_REASON
            elif {first.kind, g.kind} & {TRANSPOSED, SWAPPED, ROWS} and first.kind != g.kind:
                reason = _MIXED_LAYOUT_REASON
            strides = f" (strides {list(first.strides)} vs {list(g.strides)})" if first.strides != g.strides else ""
            raise op.fail(f"it combines {first.describe()} with {g.describe()}{strides}; {reason}")
    return first


def _numbers_as_vectors(geoms, shapes):
    """``geoms`` (of values of traced ``shapes``) with each value of one number per patch, (N,) or any reshape of a
    1x1 map's channels, taken as the vector of one position it holds (the dense values are the 1x1 map's either
    way), so that such values of streams that pool differently merge as vectors do (_merge_grids)."""
    return [g.with_(kind=VECTOR) if g.kind == VIEW and g.size == (1, 1) and _prod(s[1:]) == g.channels else g
            for g, s in zip(geoms, shapes)]


def _grid_multiple(geoms):
    """(SH, SW) the image is padded and tiled to: the least common multiple of the stride products of
    every value (for a chain of layers, the product of its strides; branches that pool differently
    each need their own product to divide it)."""
    sh = sw = 1
    for g in geoms:
        sh = sh * _prod(s[0] for s in g.strides) // _gcd(sh, _prod(s[0] for s in g.strides))
        sw = sw * _prod(s[1] for s in g.strides) // _gcd(sw, _prod(s[1] for s in g.strides))
    return sh, sw


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _output_grid(strides, output_stride):
    """How CI computes features every (sy, sx) pixels (output_stride): the number k of leading strided
    layers that run without their shifts (the shifts no output pixel uses), the step (gy, gx) those
    layers leave (the product of their strides, which divides the output stride), and the factor
    (ry, rx) = output stride / step by which the result is subsampled.  k is the largest number of
    leading strides whose product divides the output stride on both axes."""
    sy, sx = output_stride
    k, gy, gx = 0, 1, 1
    for s in strides:
        if sy % (gy * s[0]) or sx % (gx * s[1]):
            break
        k, gy, gx = k + 1, gy * s[0], gx * s[1]
    return k, (gy, gx), (sy // gy, sx // gx)


def _lcm_pair(a, b):
    return a[0] * b[0] // _gcd(a[0], b[0]), a[1] * b[1] // _gcd(a[1], b[1])

def _einsum_over_channels(equation, activation, channel_axis):
    """Why an einsum of two operands, ``activation`` (0 or 1) the index of a map (rank 4, its channels on
    ``channel_axis``) and the other a matrix, is not a product over the channels of every position that keeps
    the other axes in their order ("nchw,kc->nkhw"), or None where it is."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return "its equation has no explicit output"
    inputs, out = eq.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return f"it has {len(operands)} operands"
    if "." in eq:  # an ellipsis: the axes it stands for, named (right-aligned, as they broadcast)
        spare = [chr(c) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in eq]
        ranks = [4, 2] if activation == 0 else [2, 4]
        covered = [rank - len(term.replace("...", "")) for term, rank in zip(operands, ranks)]
        if any(term.count("...") != 1 and "." in term or term.count(".") not in (0, 3) for term in operands + [out]) \
                or min(covered) < 0 or max(covered) > len(spare):
            return "its ellipsis does not fit its operands"
        names = spare[:max(covered)]
        operands = [term.replace("...", "".join(names[len(names) - n:])) for term, n in zip(operands, covered)]
        out = out.replace("...", "".join(names))
    act, weight = operands[activation], operands[1 - activation]
    if len(act) != 4 or len(set(act)) != 4 or len(weight) != 2 or len(set(weight)) != 2:
        return "its operands are not a map and a matrix"
    channel, others = act[channel_axis], [a for a in weight if a != act[channel_axis]]
    if channel not in weight or len(others) != 1 or others[0] in act:
        return "it does not contract the channels of the map with one axis of the matrix"
    if out != act[:channel_axis] + others[0] + act[channel_axis + 1:]:
        return "it moves or contracts other axes of the map"
    return None


def _merge_grids(op, geoms):
    """Values combined by one op (addition, concatenation, ...): their common geometry, and for each
    input the strides to unwarp first (empty where none).  Values on the same grid merge as they are.
    Per-position vectors (1x1) that went through different strides (two streams that pool
    differently) are first unwarped to the image grid, where they align pixel by pixel; anything else
    is refused."""
    first = geoms[0]
    if all(first.same_grid(g) for g in geoms[1:]):
        return first, [()] * len(geoms)
    if all(g.is_pixel_vector and g.kind == first.kind for g in geoms):
        return _Geom(first.kind, first.channels, (1, 1), ()), [g.strides for g in geoms]
    return _same_grid(op, geoms), None  # raises with the reason


# --- the rule contract ------------------------------------------------------------------------
#
# convert() runs Cp once on example patches and records every op (PyTorch: every function call
# that touches a value derived from the input; Keras: every call of a leaf layer).  Each recorded
# op ``op`` has ``op.in_slots`` / ``op.out_slots`` (numbers naming values; slot 0 is the input),
# ``op.in_shapes`` / ``op.out_shapes`` (the shapes Cp saw for one batch of patches), ``op.where``
# (the layer's name, for messages) and ``op.fail(reason)`` (a ConversionError naming the layer).
#
# A rule is a function ``rule(op, geoms) -> (run, out_geoms)``:
#   * it receives the recorded op and one _Geom per input (``geoms[i]`` for ``op.in_slots[i]``);
#   * it returns what CI runs -- PyTorch: a _Step, run on dense tensors at every call; Keras: a
#     function from the list of dense input tensors to the list of dense output tensors, called
#     once on symbolic tensors to build CI's graph -- and a list with one _Geom per output;
#   * it refuses with ``raise op.fail(reason)``, the reason saying why the op cannot be exact;
#   * it does not read ``naive``: CI reads it at run time (``ci.naive = True`` after conversion
#     switches to the paper-faithful per-shift path in both backends).
#
# A rule is registered next to its definition with ``@_rule_for(...)`` (keys: the torch functions
# of the op's names; Keras: layer classes).  Adding a layer kind = one rule, one registration, one
# exactness or refusal test (shared_tests/test_convert.py), and the kind added to the random-net
# generator (shared_tests/netspec.py).

_RULES = {}           # key (a function or a layer class) -> rule
_SUPPORTED = {}       # label -> names of the supported ops or layers of that label


def _register_rule(rule, keys, names, label):
    """Register ``rule`` for every key; list ``names`` under ``label`` in supported_layers()."""
    for key in keys:
        _RULES[key] = rule
    _SUPPORTED.setdefault(label, set()).update(names)
    return rule


def supported_layers() -> Dict[str, List[str]]:
    """The op or layer kinds convert() makes dense (or refuses with a reason), by rule.

    Returns:
        dict: label of a rule (what the kind becomes in CI, or "refused: ...") -> sorted names.
    """
    return {label: sorted(names) for label, names in sorted(_SUPPORTED.items())}


def _unsupported_message(subject, what):
    """``subject`` (the op or layer, with where it is) is not supported: say so, and where the supported ones are
    listed (the list itself, thousands of characters, made every such error unreadable)."""
    return (f"{subject} is not supported by convert() (unknown {what}): no rule makes it dense. "
            f"FDFE.supported_layers() lists the supported ones by kind, as the README's Supported layers does")


def _all_problems(problems):
    """One ConversionError for every op of Cp that cannot be made dense (a single one as it is); ops
    refused for the same reason are listed together."""
    separator = " cannot be made dense exactly: "
    by_reason = {}
    for message in dict.fromkeys(problems):
        subject, _, reason = message.partition(separator)
        by_reason.setdefault(reason if reason else message, []).append(subject if reason else "")
    if len(problems) == 1 or len(by_reason) == 1 and len(next(iter(by_reason.values()))) == 1:
        return ConversionError(problems[0])
    lines = [f"  {i}. {', '.join(s for s in subjects if s)}{separator if subjects[0] else ''}{reason}"
             for i, (reason, subjects) in enumerate(by_reason.items(), 1)]
    return ConversionError(f"Cp cannot be made dense exactly; {len(lines)} problem{'s' if len(lines) > 1 else ''}:\n"
                           + "\n".join(lines))


def _guessed_geom(shape, geoms, layout):
    """A stand-in geometry after a refused op (from its traced output shape), so that the rules of the
    ops after it can still report their own problems (a reshape of a stand-in to 4 dims guesses a map
    again, rather than reporting a reshaped vector as a second problem)."""
    strides = geoms[0].strides if geoms else ()
    if len(shape) >= 5 and any(g.kind == GROUPS for g in geoms):  # (still a map split into groups)
        groups, size = (shape[3:], shape[1:3]) if layout == "HWC" else (shape[1:-2], shape[-2:])
        return _Geom(GROUPS, _prod(groups), size, strides, guessed=True, groups=groups)
    if len(shape) == 4 and any(g.kind == TRANSPOSED for g in geoms):  # (still a transposed map: its transpose back
        channels, size = (shape[3], shape[1:3]) if layout == "CHW" else (shape[1], shape[2:])  # is no problem)
        return _Geom(TRANSPOSED, channels, size, strides, guessed=True)
    if len(shape) == 4 and any(g.kind == SWAPPED for g in geoms):  # (N, w, h, C) in both layouts
        return _Geom(SWAPPED, shape[3], (shape[2], shape[1]), strides, guessed=True)
    if len(shape) == 4:
        channels, size = (shape[1], shape[2:]) if layout == "CHW" else (shape[3], shape[1:3])
        return _Geom(MAP, channels, size, strides, guessed=True)
    rows = next((g for g in geoms if g.kind == ROWS), None)
    if len(shape) == 3 and rows is not None:  # (still rows of positions, (N, h*w, C): their transpose back is no
        size = rows.size if rows.size[0] * rows.size[1] == shape[1] else (shape[1], 1)  # problem)
        return _Geom(ROWS, shape[2], size, strides, guessed=True)
    if len(shape) == 3:  # rows of positions: (N, C, h*w), Keras (N, h*w, C)
        channels, positions = (shape[1], shape[2]) if layout == "CHW" else (shape[2], shape[1])
        return _Geom(VIEW, channels, (positions, 1), strides, guessed=True)
    return _Geom(VECTOR, _prod(shape[1:]) if len(shape) > 1 else 1, (1, 1), strides, guessed=True)


# --- planning: which values are alive, which step may overwrite its input ----------------------

class _Plan:
    """How CI runs its steps.

    Attributes:
        free_after: per step, the slots no later step reads (dropped after the step).
        overwrite: per step, True where the step may write its result into its input's memory
            (its only input, and no other value sharing that memory, is read later).
        peak_channels: the largest total channel count of the values alive at once.
    """

    def __init__(self, free_after, overwrite, peak_channels):
        self.free_after, self.overwrite, self.peak_channels = free_after, overwrite, peak_channels


def plan_steps(steps_io, channels, output_slot, protected=(0,)) -> _Plan:
    """Plan a list of steps: liveness, in-place permissions and peak memory in channels.

    Args:
        steps_io: per step, (input slots, output slots, aliases) where ``aliases`` is True when
            the outputs share memory with the first input (identity ops, views, reshapes).
        channels: mapping slot -> channels of that value.
        output_slot: the slot CI returns (never freed, never overwritten).
        protected: slots whose memory must never be overwritten (slot 0, the padded image or
            a view of it shared by tiles).

    Returns:
        A :class:`_Plan`.
    """
    last_use, root = {}, {}
    for i, (ins, outs, aliases) in enumerate(steps_io):
        for s in ins:
            last_use[s] = i
        for s in outs:
            root[s] = root.get(ins[0], ins[0]) if aliases and ins else s
    last_use[output_slot] = len(steps_io)
    # the last step that reads any value of each memory (a value and everything aliasing it)
    root_last_use = {}
    for s, i in last_use.items():
        r = root.get(s, s)
        root_last_use[r] = max(root_last_use.get(r, -1), i)
    protected_roots = {root.get(s, s) for s in protected} | {root.get(output_slot, output_slot)}
    free_after, overwrite, alive, peak = [], [], {0}, channels[0]
    for i, (ins, outs, aliases) in enumerate(steps_io):
        free = [s for s in ins if last_use.get(s) == i]
        free_after.append(free)
        r = root.get(ins[0], ins[0]) if ins else None
        overwrite.append(len(ins) == 1 and not aliases and r not in protected_roots
                         and root_last_use.get(r) == i)
        alive |= set(outs)
        peak = max(peak, sum(channels[s] for s in alive))  # aliases counted too: an upper bound
        alive -= {s for s in free if s not in outs}
    return _Plan(free_after, overwrite, peak)


# --- memory estimate and tiles ------------------------------------------------------------------

#: what a measured peak may exceed a budget (max_memory) by: the frameworks' own allocations during a
#: call (oneDNN's primitive cache and scratchpads, the allocator's arenas and rounding, thread stacks),
#: which CI does not control.  The peak is the resident-set increase over the call (bench/memory_budget.py).
MEMORY_SLACK = 64 * 2**20


def _memory_estimate(image_size, batch, in_channels, out_channels, patch, stride_product, peak_channels,
                     itemsize, tile=None, work_factor=2.0):
    """Bytes CI needs: the padded input and the output, plus ``work_factor`` times the values alive
    at once on one tile (the plan's peak channels, on the tile's padded area): the layers' transients
    (a multipooling's stride-1 result and its shift-stacked copy, layout copies, convolution
    workspaces) on top of what the plan counts.  Each backend passes the factor its measurements
    bound (bench/memory_budget.py)."""
    (height, width), (ph, pw), (sh, sw) = _pair(image_size, "image_size"), patch, stride_product
    full_h, full_w = _ceil_to(height, sh), _ceil_to(width, sw)
    fixed = batch * (in_channels * (full_h + ph - 1) * (full_w + pw - 1) + out_channels * full_h * full_w)
    th, tw = (full_h, full_w) if tile is None else (min(_ceil_to(tile[0], sh), full_h),
                                                  min(_ceil_to(tile[1], sw), full_w))
    work = work_factor * batch * peak_channels * (th + ph - 1 + sh) * (tw + pw - 1 + sw)
    return int((fixed + work) * itemsize)


def _is_positive(value, kind=numbers.Real) -> bool:
    """True for a number of ``kind`` (not a bool) above 0: the check of budgets, powers and channel counts."""
    return isinstance(value, kind) and not isinstance(value, bool) and value > 0


def _check_budget(max_memory):
    """``max_memory`` as given (None, or a positive number of bytes), or a clear error."""
    if max_memory is None:
        return None
    if not _is_positive(max_memory):
        raise ValueError(f"max_memory must be None or a positive number of bytes, got {max_memory!r}")
    return max_memory


def _size_text(n_bytes) -> str:
    """A byte count for messages, in three significant digits (KiB under 1 MiB), so that a need and a
    budget that differ never print alike: 56956 -> '55.6 KiB', 2.3e9 -> '2193 MiB'."""
    value, unit = (n_bytes / 2**20, "MiB") if n_bytes >= 2**20 else (n_bytes / 2**10, "KiB")
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"


def _tile_for_memory(budget, estimate, image_size, stride_product, patch=(1, 1)):
    """The tile (multiple of the stride product) whose tiling fits the budget with the least work.

    The image is cut into ny x nx tiles of one size (the last row and column may be smaller); for
    each ny, the fewest columns whose tile's estimate fits; of those tilings, the one that computes
    the least area, each tile's overlap of ``patch`` - 1 included (ties: fewer tiles).  None where
    the whole image fits."""
    (height, width), (sh, sw), (ph, pw) = image_size, stride_product, patch
    if estimate(None) <= budget:
        return None
    full_h, full_w = _ceil_to(height, sh), _ceil_to(width, sw)
    least_h, least_w = min(full_h, _ceil_to(8, sh)), min(full_w, _ceil_to(8, sw))

    def columns(nx):
        return _ceil_to(_ceil_div(width, nx), sw)

    most_x = _ceil_div(width, least_w)
    heights = list(dict.fromkeys(th for th in (_ceil_to(_ceil_div(height, ny), sh)
                                               for ny in range(1, _ceil_div(height, least_h) + 1)) if th >= least_h))
    best = None
    for th in heights + ([least_h] if least_h not in heights else []):  # (the least tile, which errors name, too)
        if estimate((th, columns(most_x))) > budget:
            continue
        lo, hi = 1, most_x  # the fewest columns that fit (the estimate grows with the tile's width)
        while lo < hi:
            mid = (lo + hi) // 2
            if estimate((th, columns(mid))) <= budget:
                hi = mid
            else:
                lo = mid + 1
        tw = columns(lo)
        rows, cols = _ceil_div(height, th), _ceil_div(width, tw)
        key = ((full_h + rows * (ph - 1)) * (full_w + cols * (pw - 1)), rows * cols)
        if best is None or key < best[0]:
            best = (key, (th, tw))
    if best is None:
        raise MemoryError(f"CI needs about {_size_text(estimate((least_h, least_w)))} even with "
                          f"{least_h}x{least_w} tiles (the padded image and the output alone take "
                          f"{_size_text(estimate((1, 1)))}); the budget is {_size_text(budget)}")
    return best[1]


def _changed_between(snapshots) -> set:
    """The keys whose values differ between consecutive snapshots (dicts; a key missing from one counts as a
    change): the state a network changed as it ran, as opposed to its settings."""
    return {key for a, b in zip(snapshots, snapshots[1:]) for key in set(a) | set(b) if a.get(key) != b.get(key)}


def _adaptive_windows(size: int, out: int):
    """(kernel, stride) of the ordinary pooling that adaptive pooling from ``size`` to ``out`` entries of an
    axis is (window i covers floor(i size / out) to ceil((i + 1) size / out)), where its windows have one size
    and one spacing (5 -> 2: windows 0:3 and 2:5, kernel 3, stride 2); else None."""
    starts = [i * size // out for i in range(out)]
    ends = [_ceil_div((i + 1) * size, out) for i in range(out)]
    kernel, stride = ends[0] - starts[0], (starts[1] - starts[0] if out > 1 else 1)
    if any(e - b != kernel for b, e in zip(starts, ends)) or any(b != i * stride for i, b in enumerate(starts)) \
            or (out > 1 and stride < 1):  # (more entries than the axis has: windows that repeat)
        return None
    return kernel, stride


def tile_grid(height, width, tile, stride_product):
    """The output tiles of an exact tiling, row by row.

    Tile sizes are rounded up to multiples of the stride product, so every tile starts on the
    stacked grid.  Each tile reads rows y0 .. y0 + hp + pH - 2 of the padded image (overlap pH - 1).

    Args:
        height, width: the image size.
        tile: (th, tw), the requested output tile size.
        stride_product: (SH, SW).

    Returns:
        list of (y0, x0, h, w, hp, wp): the tile's origin, its size inside the image, and that
        size rounded up to the stride product (what CI computes for it).

    Example:
        >>> tile_grid(5, 7, (4, 4), (2, 2))
        [(0, 0, 4, 4, 4, 4), (0, 4, 4, 3, 4, 4), (4, 0, 1, 4, 2, 4), (4, 4, 1, 3, 2, 4)]
    """
    (sh, sw) = stride_product
    tile = _pair(tile, "tile")
    th, tw = _ceil_to(tile[0], sh), _ceil_to(tile[1], sw)
    grid = []
    for y0 in range(0, height, th):
        for x0 in range(0, width, tw):
            h, w = min(th, height - y0), min(tw, width - x0)
            grid.append((y0, x0, h, w, _ceil_to(h, sh), _ceil_to(w, sw)))
    return grid


# --- the memory guard: never more than the process may still allocate ----------------------------

#: share of the memory the process may still allocate that CI plans to fill (the rest is left for
#: the framework's caches, fragmentation and the estimate's error)
MEMORY_GUARD_FRACTION = 0.6


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text in ("", "max") else int(text)
    except (OSError, ValueError):
        return None


def _host_memory_available():
    """Bytes this process may still allocate on the host: the least of the system's available memory
    (/proc/meminfo MemAvailable), the cgroup's limit minus its usage, and the address-space limit
    (RLIMIT_AS) minus the address space in use.  None where none of them can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2 ** 60:
            limits.append(max(0, limit - usage))
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            limits.append(max(0, soft - vm))
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    return min(limits) if limits else None


#: glibc's mallopt parameters and the values :func:`keep_freed_memory` sets: blocks up to 1 GiB come from
#: the heap, and up to 2 GiB of free memory at its top is kept (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_TRIM_THRESHOLD, _KEEP_MMAP_THRESHOLD = 2 ** 31 - 1, 1 << 30


def keep_freed_memory() -> bool:
    """Make this process keep the memory it frees for its next allocations (glibc only; process-wide).

    CI allocates and frees maps of hundreds of MB on every call.  glibc hands blocks over 32 MB back to the
    system when they are freed, so each call pays for fresh pages again (page faults and zeroing: on
    2 cores, 0.4 s of system time per call of PyTorch's CI on the Simo-Serra net at 720x480).  After this
    call, blocks up to 1 GiB allocated by the main thread come from glibc's heap and stay with the process
    when freed (up to 2 GiB at the heap's top), much as the environment variables
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1099511627776`` do at start-up (other
    threads' arenas still return blocks over 64 MB).  TensorFlow's own CPU pool, where it uses one, is not
    affected.  The price: the process's memory stays at its peak between calls (and the memory guard,
    which reads the system's available memory, sees less).  Nothing in FDFE calls this for you.

    Returns:
        True where glibc accepted both settings; False elsewhere (another C library, another system), where
        nothing changes.
    """
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differ or do nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                    _KEEP_TRIM_THRESHOLD))


def _choose_tile(requested, estimate, image_size, stride_product, max_memory, available, what, patch=(1, 1)):
    """The tile CI runs with (None: untiled).

    Args:
        requested: the tile asked for (None or (th, tw)).
        estimate: tile -> estimated peak bytes.
        max_memory: the user's budget in bytes, or None.
        available: bytes the process may still allocate (the memory guard), or None (guard off).
        what: the work, for messages (e.g. "CI on 2 images of 3000x4000").
        patch: (pH, pW), the overlap of tiles (for :func:`_tile_for_memory`).

    With a budget, the largest tile that fits it.  Otherwise the requested tile, made smaller where
    MEMORY_GUARD_FRACTION of the available memory demands it; MemoryError where nothing fits.
    """
    if max_memory is not None:
        return _tile_for_memory(max_memory, estimate, image_size, stride_product, patch)
    if available is None:
        return requested
    guard = int(available * MEMORY_GUARD_FRACTION)
    if estimate(requested) <= guard:
        return requested
    try:
        return _tile_for_memory(guard, estimate, image_size, stride_product, patch)
    except MemoryError as exc:
        raise MemoryError(f"{what} would need about {_size_text(estimate(requested))}, but this process may "
                          f"allocate only about {_size_text(available)} more (the memory guard uses "
                          f"{MEMORY_GUARD_FRACTION:.0%} of it), and tiles do not help: {exc}. Use smaller images "
                          f"or batches; or set max_memory= to a budget you know is free, or memory_guard=False "
                          f"to allocate anyway") from None


# --- the self-check: CI against Cp on a few patches before convert() returns --------------------

def _self_check_image_size(stride_product, patch_size=(1, 1), border="zeros"):
    """A small image that is not a multiple of the stride product (large enough to reflect a patch)."""
    height, width = stride_product[0] + 3, stride_product[1] + 2
    if border == "reflect":
        top, bottom, left, right = patch_padding(patch_size)
        height, width = max(height, max(top, bottom) + 2), max(width, max(left, right) + 3)
    return height, width


def _self_check_positions(height, width):
    """(n, y, x) of the patches compared: corners, the middle, an edge, of both test images (normal values, and
    uniform in [0, 1), where a Cp that takes roots or logarithms of pixels gives finite values to compare)."""
    return [[n, y, x] for n in (0, 1) for y, x in [(0, 0), (height - 1, width - 1), (height // 2, width // 3),
                                                   (1, width - 1)]]


#: relative tolerance of the self-check per compute dtype (others: 3e-2)
_SELF_CHECK_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


def _self_check_compare(got, expected, dtype_name, tolerance=None):
    """Raise ConversionError("internal check failed ...") unless max|got - expected| is within the
    tolerance of ``dtype_name`` relative to the largest finite |expected|.  Where Cp gives NaN or an infinity
    (0 / 0 of a patch in the zero border), CI must give the same.  ``got``/``expected``: lists of floats."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    if not finite.any():
        raise ConversionError("convert's self-check compared nothing: Cp gave NaN or infinite values for every patch "
                              "it checked, on normal and on uniform [0, 1) test images; pass check=False and compare "
                              "CI with dense_reference on your own images")
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-6)
    tol = tolerance if tolerance is not None else _SELF_CHECK_TOLERANCE.get(dtype_name, 3e-2)
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))  # (NaN, or the same infinity, in both)
    with np.errstate(invalid="ignore"):
        err = float(np.where(same, 0.0, np.abs(got - expected)).max(initial=0.0))
    err = err if err == err else float("inf")  # (NaN in one of them only)
    if not err <= tol * scale:
        raise ConversionError(f"internal check failed: CI differs from Cp by {err:.3g} (scale {scale:.3g}) on a "
                              f"test image; this net uses an op or layer whose dense form is not exact here. "
                              f"First check that Cp gives each patch the same output whatever else is in its batch "
                              f"(a forward that computes with the batch size, x.shape[0] or len(x), or with other "
                              f"patches does not; CI computes them in one pass over whole images); else please report "
                              f"it with the net's definition")


# --- checks of hand-wired CIs (the blocks' wiring checks and check_ci) ------------------------------

_NOT_REPLACED = ("a pooling layer or strided convolution of Cp was not replaced (by multiMaxPooling, "
                 "multiAvgPooling, multiLPPooling or multiConv), so it still strides inside CI")


_SIZES_SWAPPED = ("a multipooling layer got its sizes height first (multiMaxPooling, multiAvgPooling and "
                  "multiLPPooling take kW, kH, dW, dH: width first, as in the original port)")

_STRIDE_MISSING = ("a stride is missing from the list (list the stride of every pooling layer and of every "
                   "strided convolution, multiConv included, in network order)")


def _stacked_problem(who, batch, map_size, products, listed, image_size, n_images=None):
    """Why a shift-stacked result cannot be unwarped into images of ``image_size``; None where it can.

    A correct wiring stacks exactly SH * SW shifts per image, (SH, SW) = ``products``, and its maps are
    at least ceil(H / SH) x ceil(W / SW) (larger ones are legitimate and cropped).  ``listed`` says how
    the strides were given, ``n_images`` is N where known.  Plain ints in, a message or None out."""
    (sh, sw), (h, w), (height, width) = products, map_size, image_size
    m = sh * sw
    if n_images is not None and batch != n_images * m:
        want = n_images * m
        if batch > want and batch % want == 0:
            cause = f"{_STRIDE_MISSING}: there are {batch // want} times more shifts than listed"
        else:
            cause = f"{_NOT_REPLACED}; or the list holds a stride that Cp does not have; or {_SIZES_SWAPPED}"
        return (f"{who}: the stacked result holds {batch} maps, but {n_images} image(s) with {listed} "
                f"({m} shifts per image) make {want}; likely cause: {cause}")
    if batch % m:
        return (f"{who}: the stacked result holds {batch} maps, not a multiple of the {m} shifts per image of "
                f"{listed}; likely cause: {_NOT_REPLACED}; or the list holds a stride that Cp does not have; "
                f"or {_SIZES_SWAPPED}")
    if h * sh < height or w * sw < width:
        return (f"{who}: the stacked maps are {h}x{w} and unwarp to {h * sh}x{w * sw}, smaller than the images "
                f"({height}x{width}); likely cause: {_NOT_REPLACED} (and its stride is not listed); or "
                f"{_STRIDE_MISSING}; or multiPoolPrepare got a smaller stride product or patch than Cp has; or "
                f"{_SIZES_SWAPPED}")
    return None


def _in_shape_dims(in_shape, layout):
    """``in_shape`` of linearAsConv as a tuple of 2 or 3 positive ints (ValueError otherwise)."""
    if (not isinstance(in_shape, (tuple, list)) and type(in_shape).__name__ not in ("Size", "TensorShape")) \
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in in_shape) \
            or len(in_shape) not in (2, 3) or min(in_shape) < 1:
        names = "(C, h, w)" if layout == "CHW" else "(h, w, C)"
        raise ValueError(f"linearAsConv: in_shape must be the map Cp flattens before this layer, {names} or "
                         f"(h, w), with positive sizes; got {in_shape!r}")
    return tuple(int(v) for v in in_shape)


def _linear_in_shape(in_features, in_shape, layout):
    """The map a fully connected layer with ``in_features`` inputs sees flattened, in ``layout`` ("CHW" or
    "HWC") order: from ``in_shape`` (that map's shape, or its (h, w)), or 1 x 1 where it is None."""
    names = "(C, h, w)" if layout == "CHW" else "(h, w, C)"
    if in_shape is None:
        c, h, w = in_features, 1, 1
    else:
        dims = _in_shape_dims(in_shape, layout)
        if len(dims) == 2:
            (h, w), c = dims, in_features // (dims[0] * dims[1])
        else:
            c, h, w = dims if layout == "CHW" else (dims[2], dims[0], dims[1])
        if c * h * w != in_features:
            raise ValueError(f"linearAsConv: the layer has {in_features} inputs, but in_shape {in_shape!r} "
                             f"{'does not divide them' if len(dims) == 2 else f'flattens to {c * h * w}'}; "
                             f"in_shape must be the map Cp flattens before this layer, {names}, at the patch "
                             f"size CI is built for")
    return (c, h, w) if layout == "CHW" else (h, w, c)


_WIRING_HINTS = ("common wiring mistakes: a Linear (Keras: Dense) after a flatten reused as it is, where it "
                 "must become FDFE.linearAsConv(layer, in_shape); a pooling layer or strided convolution not "
                 "replaced (multi*Pooling, multiConv); a stride missing from unwarpAll's list, or the list not "
                 "in network order; multiPoolPrepare given another patch size or stride product than Cp's; a "
                 "layer of Cp left out, repeated or moved; batch normalisation with batch statistics")


def _check_positions(batch, height, width):
    """(n, y, x) compared by check_ci: every image's corners and middle, and random pixels."""
    rng = np.random.default_rng(0)
    pos = []
    for n in range(batch):
        pos += [[n, 0, 0], [n, height - 1, width - 1], [n, 0, width - 1], [n, height - 1, 0],
                [n, height // 2, width // 2]]
        pos += [[n, int(rng.integers(height)), int(rng.integers(width))] for _ in range(3)]
    return np.array(pos)


def _check_ci_compare(got, expected, positions, dtype_name, tolerance=None):
    """max |got - expected| / max |expected| (numpy (P, K) arrays); ValueError where above the tolerance."""
    scale = float(np.abs(expected).max()) or 1.0
    diff = np.abs(got - expected).max(axis=1)
    diff[~np.isfinite(diff)] = np.inf
    worst = int(np.argmax(diff))
    tol = tolerance if tolerance is not None else _SELF_CHECK_TOLERANCE.get(dtype_name, 3e-2)
    if not diff[worst] <= tol * scale:
        n, y, x = (int(v) for v in positions[worst])
        raise ValueError(f"check_ci: CI differs from Cp by {diff[worst]:.3g} (largest |Cp| {scale:.3g}) at image {n}, "
                         f"pixel ({y}, {x}): the wiring does not compute Cp; {_WIRING_HINTS}")
    return float(diff[worst] / scale)

# ============================================================================================
# END FRAMEWORK-NEUTRAL BLOCK
# ============================================================================================


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def check_images(images, in_channels: Optional[int] = None, name: str = "images",
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Check that ``images`` is a non-empty floating (N, C, H, W) tensor; return it, cast to ``dtype``.

    Floating images of another precision are cast to the network's (as Keras' autocast does, and as
    every CI of this file does through this function); integer images are refused, with how to
    convert them, since their scale (0..255 or 0..1) is the caller's choice.

    Args:
        images: the images.
        in_channels: C the network expects (None: not checked).
        name: the argument's name in messages.
        dtype: the network's floating dtype (None: keep the images' dtype).

    Returns:
        ``images``, or ``images.to(dtype)`` where the dtypes differ.

    Shape:
        (N, C, H, W) -> (N, C, H, W).

    Example:
        >>> FDFE.check_images(torch.zeros(1, 1, 4, 4, dtype=torch.float64), 1, dtype=torch.float32).dtype
        torch.float32
        >>> FDFE.check_images(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
        Traceback (most recent call last):
        ...
        TypeError: images must be a floating-point tensor, got dtype torch.uint8; convert it first, ...
    """
    if in_channels is not None and not _is_positive(in_channels, numbers.Integral):
        raise ValueError(f"in_channels must be None or a positive int, got {in_channels!r}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {images.dtype}; convert it first, "
                        f"e.g. {name}.float() / 255 for 8-bit images (scaled to 0..1, if Cp was trained so) "
                        f"or {name}.float() to keep the values")
    if torch.jit.is_tracing():  # sizes are traced values here; comparing them would freeze them
        pass
    elif min(images.shape) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    elif in_channels is not None and images.shape[1] != in_channels:
        raise ValueError(f"{name} has {images.shape[1]} channels but the network expects {in_channels} "
                         f"(layout is (N, C, H, W))")
    if dtype is not None and images.dtype != dtype:
        images = images.to(dtype)
    return images


def _first_floating(module: nn.Module) -> Optional[torch.Tensor]:
    """The network's first floating parameter, else its first floating buffer (None where it has none)."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t
    return None


def _compute_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype a network computes in: that of its first floating parameter or buffer (None
    where it has none: such a net computes in its input's dtype)."""
    t = _first_floating(module)
    return None if t is None else t.dtype


#: settings of PyTorch's own layers that do not change what CI computes (it runs Cp in inference mode)
_TORCH_SETTINGS_CI_IGNORES = frozenset({"momentum", "inplace"})
_SETTING_TYPES = (bool, int, float, str, type(None), np.generic, enum.Enum)  # (an Enum's members: by identity)


def _setting(value, depth=0):
    """A module attribute as :func:`_module_structure` compares it, or ``_NOT_A_SETTING``: numbers, strings and
    None by value (NaN equal to NaN), tuples, lists and dicts of them by a copy of their values, functions and
    other callables (not modules) by identity; nothing nested deeper than 8 levels.  (The fields of configuration
    objects are settings of their own: :func:`_setting_paths`.)"""
    if isinstance(value, _SETTING_TYPES):
        return "NaN" if isinstance(value, (float, np.floating)) and value != value else value
    if depth >= 8:
        return _NOT_A_SETTING
    if isinstance(value, (tuple, list)):
        items = tuple(_setting(v, depth + 1) for v in value)
        return _NOT_A_SETTING if any(v is _NOT_A_SETTING for v in items) else items
    if isinstance(value, dict):
        items = tuple((k, _setting(v, depth + 1)) for k, v in value.items())
        return _NOT_A_SETTING if any(v is _NOT_A_SETTING for _, v in items) else dict(items)
    if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
        return value
    return _NOT_A_SETTING


_NOT_A_SETTING = object()


def _shown_setting(value):
    """:func:`_setting`, or for other objects their kind (an object that replaced a setting is a change)."""
    setting = _setting(value)
    return f"a {type(value).__name__}" if setting is _NOT_A_SETTING else setting


class _TensorAttribute:
    """A tensor attribute of one of Cp's modules (neither parameter nor buffer) whose values CI captured at
    convert: equal to another while both are the same tensor, unchanged in place since (as far as its version
    counter tells: writes through ``.data`` or numpy, and inference tensors, which have none, are not seen)."""
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, _version(tensor) if isinstance(tensor, torch.Tensor) else None

    def __eq__(self, other):
        return isinstance(other, _TensorAttribute) and other.tensor is self.tensor and other.version == self.version

    def __reduce__(self):  # copies (deepcopy, pickle) compare with their own copy of the tensor, as it is then
        return _TensorAttribute, (self.tensor,)

    def __repr__(self):
        if not isinstance(self.tensor, torch.Tensor):
            return repr(self.tensor)
        return f"a tensor of shape {tuple(self.tensor.shape)} (version {self.version})"


def _attribute_values(base_net: nn.Module) -> Dict[Tuple[str, str], object]:
    """(module name, attribute) -> value as compared (:func:`_shown_setting`; tensors by identity and version) of
    every public attribute of Cp's modules: snapshots taken around the runs of Cp that convert makes, to tell
    state (what forward changes as it runs: a counter, a cached shape) from settings."""
    values = {}
    for name, module in base_net.named_modules():
        for k, v in vars(module).items():
            for path, value in _setting_paths(k, v) if k[0] != "_" else ():
                values[(name, path)] = (id(value), _version(value)) if isinstance(value, torch.Tensor) \
                    else _shown_setting(value)
    return values


def _compared_settings(base_net: nn.Module, snapshots, reads=None) -> Dict[str, Tuple[str, ...]]:
    """module name -> the attributes CI compares at every call (:func:`_module_structure`): the public ones with a
    setting's value (:func:`_setting`), and ``forward`` (replaced on an instance, it is a change); leaving out
    state, which changed between the ``snapshots`` (:func:`_attribute_values`, taken around convert's runs of
    Cp), ``training``, PyTorch's layers' momentum and inplace (also in subclasses), and PyTorch's dropout
    layers."""
    state = _changed_between(snapshots)
    names = {}
    for name, module in base_net.named_modules():
        kind = nn.utils.parametrize.type_before_parametrizations(module)
        if kind.__module__.startswith("torch.nn.") and isinstance(module, nn.modules.dropout._DropoutNd):
            continue
        torch_layer = any(c.__module__.startswith("torch.nn.") for c in kind.__mro__[:-2])
        names[name] = tuple(sorted({"forward"} | {
            path for k, v in vars(module).items() if k[0] != "_" and k != "training"
            and not (torch_layer and k in _TORCH_SETTINGS_CI_IGNORES)
            for path, value in _setting_paths(k, v, None if reads is None else reads.read(v))
            if (name, path) not in state and _setting(value) is not _NOT_A_SETTING}))
    return names


#: containers whose forward runs every child: a module added to one changes Cp's ops
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _module_structure(base_net: nn.Module, captured=(), settings=None, read=None) -> Dict:
    """What the ops that :func:`convert` traced depend on, module by module (name -> entry): its class, the
    settings (``settings``: module name -> attribute names, :func:`_compared_settings`: a layer's stride, a
    temperature, a flag that picks a branch, an activation function; not the state forward changes as it runs),
    the names of its parameters and buffers (with the shapes of those CI reads, ``read``: their full names; and
    the parameters that are None, such as a bias left out), and its hooks; the names of tensors that are one
    (tied weights); and the tensor attributes whose values CI captured (``captured``: (module name, attribute)
    pairs, :func:`_captured_attributes`).

    CI reads Cp's parameters and buffers by name at every call, so their new values are followed (training,
    ``load_state_dict``, ``torch.func.functional_call``, a module replaced by one of the same class and settings,
    a parametrization such as ``weight_norm``).  :func:`_structure_change` tells the changes that change, or may
    change, the ops Cp runs, which CI would not follow (a module replaced by another kind, added to a container
    or removed, a setting changed, a parameter gone (pruning, fusing), hooks added or removed):
    :meth:`DenseFeatureNet.forward` refuses them.  (Called at every call of CI: kept to plain loops.)"""
    settings = settings or {}
    entries, owners = {}, {}  # owners: id of a tensor -> the names it has
    for name, module in base_net.named_modules():
        if "parametrizations" in name and "parametrizations" in name.split("."):
            continue  # a parametrization's own modules: CI reads the tensor they compute
        parametrized = module._modules.get("parametrizations")
        if parametrized is not None and not nn.utils.parametrize.is_parametrized(module):
            parametrized = None
        kind = nn.utils.parametrize.type_before_parametrizations(module) if parametrized else type(module)
        attributes = module.__dict__
        values = {k: (_shown_setting(attributes[k]) if k in attributes else "unset") if "." not in k else
                  "unset" if (v := _read_setting(attributes, k, _NOT_A_SETTING)) is _NOT_A_SETTING
                  else _shown_setting(v) for k in settings.get(name, ())}  # (k: an attribute, or "cfg.field")
        tensors = {}  # name -> the shape of a tensor CI reads, "held" for the others, "unset" for a parameter that
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):  # is None (bias=False)
            full = f"{name}.{key}" if name else key
            if t is None:
                if key in module._parameters:
                    tensors[key] = "unset"
                continue
            tensors[key] = tuple(t.shape) if read is None or full in read else "held"
            owners.setdefault(id(t), []).append(full)
        tensors.update((key, "parametrized") for key in (parametrized.keys() if parametrized else ()))
        hooks = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks), tuple(module._backward_hooks),
                 tuple(getattr(module, "_backward_pre_hooks", ())))
        entries[name] = (kind, values, tensors, hooks)
    for name, key in captured:
        try:
            value = getattr(base_net.get_submodule(name) if name else base_net, key)
        except AttributeError:
            value = None
        entries[f"{name}:{key}"] = (_TensorAttribute, {"value": _TensorAttribute(value)}, {}, ())
    tied = frozenset(frozenset(names) for names in owners.values() if len(names) > 1)
    entries[_TIED] = (_TiedTensors, {"groups": tied}, {}, ())
    entries[_GLOBAL_HOOKS] = (_GlobalHooks, {}, {}, _global_module_hooks())
    return entries


def _global_module_hooks(kinds=("_global_forward_pre_hooks", "_global_forward_hooks")) -> Tuple:
    """The keys of the global module forward hooks and pre-hooks (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``; or of the other ``kinds``, such as the backward hooks), which run on Cp's
    modules like their own hooks; those of PyTorch's own tools (FlopCounterMode's module tracker), which only
    observe, are left out."""
    from torch.nn.modules import module as modules
    keys = []
    for kind in kinds:
        for key, hook in getattr(modules, kind, {}).items():
            owner = getattr(getattr(hook, "__func__", hook), "__module__", None) or ""
            if not owner.startswith("torch."):
                keys.append((kind, key))
    return tuple(keys)


class _TiedTensors:
    """Marks the entry of :func:`_module_structure` that holds the groups of names of Cp's parameters and buffers
    that are one tensor (tied weights): CI reads one of the names for all their uses."""


_TIED = "\0tied"  # (no module has this name)


class _GlobalHooks:
    """Marks the entry of :func:`_module_structure` that holds the global module forward hooks
    (:func:`_global_module_hooks`)."""


_GLOBAL_HOOKS = "\0global hooks"


def _captured_attributes(base_net: nn.Module, tracer, snapshots=()) -> List[Tuple[str, str]]:
    """(module name, attribute) of the tensor attributes of Cp's modules, neither parameters nor buffers, whose
    values the trace captured as constants, directly or through a view (``self.scale = torch.tensor(2.0)``,
    ``self.mean.view(1, 3, 1, 1)``): CI keeps those values, so :func:`_module_structure` compares them to see them
    replaced or changed in place.  Attributes that forward itself changes as it runs (between the ``snapshots``,
    :func:`_attribute_values`) are its state, not compared."""
    written = _changed_between(snapshots)
    return [(name, key) for name, module in base_net.named_modules() for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and id(value) in tracer.constant_sources and (name, key) not in written]


def _structure_change(before: Dict, now: Dict) -> Optional[str]:
    """The first difference between two :func:`_module_structure` results that changes, or may change, the ops
    Cp runs, in words (None: none)."""
    if before == now:
        return None

    def label(name, kind):
        return f"module '{name}' ({kind.__name__})" if name else f"Cp ({kind.__name__})"
    for name, (kind, settings, tensors, hooks) in before.items():
        if kind is _TiedTensors:
            together = now.get(name, (kind, {"groups": frozenset()}, {}, ()))[1]["groups"]
            untied = [sorted(group) for group in settings["groups"] if not any(group <= g for g in together)]
            if untied:
                return (f"the parameters or buffers {', '.join(repr(n) for n in untied[0])} were one tensor at convert "
                        f"(tied) and no longer are (CI reads one of them for all their uses)")
            continue
        if kind is _GlobalHooks:
            if now.get(name, (kind, {}, {}, ()))[3] != hooks:
                return ("global module forward hooks (register_module_forward_hook, register_module_forward_pre_hook) "
                        "were added or removed (CI does not call Cp's modules: the hooks present at convert were "
                        "traced into its ops and still act, later ones would not run)")
            continue
        if kind is _TensorAttribute and now.get(name) != (kind, settings, tensors, hooks):
            module, _, key = name.partition(":")
            return (f"the tensor {key!r} of {f'module {module!r}' if module else 'Cp'}, whose values CI captured at "
                    f"convert, was replaced or changed in place (register it as a buffer to have CI follow it)")
        if name not in now:
            return f"{label(name, kind)} was removed"
        kind2, settings2, tensors2, hooks2 = now[name]
        if kind2 is not kind:
            if kind2.__name__ == kind.__name__:
                return (f"module '{name}' ({kind.__module__}.{kind.__qualname__}) was replaced by "
                        f"{kind2.__module__}.{kind2.__qualname__}")
            return f"{label(name, kind)} was replaced by {kind2.__name__}"
        gone = sorted(k for k, v in tensors.items() if v != "unset" and tensors2.get(k, "unset") == "unset")
        if gone:  # (tensors added, a buffer registered later, are not read by the traced ops)
            return f"{label(name, kind)} no longer holds the tensors {', '.join(gone)} (pruned, fused, or deleted?)"
        filled = sorted(k for k, v in tensors.items() if v == "unset" and tensors2.get(k, "unset") != "unset")
        if filled:  # a slot that held None (bias=False) now holds a tensor, which its forward reads
            return (f"{label(name, kind)} holds a tensor {filled[0]!r} that was None at convert (a bias added?), "
                    f"which its forward reads and the traced ops do not")
        reshaped = sorted(k for k, v in tensors.items() if isinstance(v, tuple) and isinstance(tensors2.get(k), tuple)
                          and tensors2[k] != v)
        if reshaped:
            return (f"{label(name, kind)} changed the shape of its tensor {reshaped[0]!r} from {tensors[reshaped[0]]} "
                    f"to {tensors2[reshaped[0]]} (another kernel size or channel count changes the ops)")
        if settings2 != settings:
            unset = "unset"
            key = sorted(k for k in set(settings) | set(settings2)
                         if (k in settings, settings.get(k)) != (k in settings2, settings2.get(k)))[0]
            return (f"{label(name, kind)} changed its {key} from {settings.get(key, unset)!r} to "
                    f"{settings2.get(key, unset)!r}")
        if hooks2 != hooks:
            return (f"{label(name, kind)} had hooks added or removed (CI does not call Cp's modules: the hooks "
                    f"present at convert were traced into its ops, later ones would not run)")
    for name in now:  # a module added to a container (Sequential, ModuleList, ModuleDict) runs in forward
        if name not in before and name.rpartition(".")[0] in before:
            parent = name.rpartition(".")[0]
            if issubclass(before[parent][0], _CONTAINERS):
                return f"{label(name, now[name][0])} was added to {label(parent, before[parent][0])}"
    return None  # modules added elsewhere (an auxiliary head) are not run by the traced forward


# ---------------------------------------------------------------------------
# Patch convention and the ground truth: Cp run on patches
# ---------------------------------------------------------------------------


def _output_vectors(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Check that Cp returned one vector per patch and return it as (batch, K): (batch, K), (batch, K, 1, 1), or
    one number per patch, (batch,) (K = 1; a matching cost squeezed, also () for one patch)."""
    if not isinstance(out, torch.Tensor):
        raise ConversionError(f"Cp must return one tensor, got {type(out).__name__}")
    if out.dim() == 1 and out.shape[0] == batch or out.dim() == 0 and batch == 1:
        return out.reshape(batch, 1)
    if out.dim() < 2 or out.shape[0] != batch or any(s != 1 for s in out.shape[2:]):
        raise ConversionError(
            f"Cp's output for one patch is not a single vector: a batch of {batch} patches gave shape "
            f"{tuple(out.shape)}; expected ({batch}, K), ({batch}, K, 1, 1) or ({batch},)")
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


def patch_outputs(base_net: nn.Module, images: torch.Tensor, patch_size, positions,
                  batch_size: int = 256, progress: Optional[bool] = None,
                  differentiable: bool = False, border: str = "zeros") -> torch.Tensor:
    """Run Cp on the patches centred at the given pixels.

    Args:
        base_net: the patch network Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
            It runs in inference mode; its training flags are restored afterwards.
        images: (N, C, H, W) floating tensor (cast to Cp's dtype, see :func:`check_images`).
        patch_size: int or (pH, pW).
        positions: (P, 3) integer array or tensor of (n, y, x) triples.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.
        differentiable: record the computation for autograd (where grad mode is on), e.g. to
            compare CI's gradients with Cp's; by default Cp runs under no_grad.
        border: how the image is extended for patches near its edge: "zeros" (the paper's
            convention), "reflect" or "replicate" (see BORDERS).

    Returns:
        (P, K) tensor: row i is Cp(patch of image n_i centred at (y_i, x_i)).

    Shape:
        images (N, C, H, W), positions (P, 3) -> (P, K).
    """
    images = check_images(images, dtype=_compute_dtype(base_net))
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
    padded = _pad_border(images, (ph, pw), border)
    rows = torch.arange(ph, device=images.device)
    cols = torch.arange(pw, device=images.device)
    pos = pos.to(images.device)
    outputs = []
    n_batches = (len(pos) + batch_size - 1) // batch_size
    bar = _progress(n_batches, "Cp on patches", progress)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), _EvalMode(base_net):
        for start in range(0, len(pos), batch_size):
            chunk = pos[start:start + batch_size]
            n = chunk[:, 0, None, None]
            yy = (chunk[:, 1, None] + rows)[:, :, None]
            xx = (chunk[:, 2, None] + cols)[:, None, :]
            # (B, C, pH, pW) in contiguous memory, also for C = 1 (where .contiguous() would keep the gather's
            # strides, and Cp's x.view(B, -1) after a convolution would fail)
            patches = padded[n, :, yy, xx].permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
            outputs.append(_output_vectors(base_net(patches), len(chunk)))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return torch.cat(outputs, 0)


def dense_reference(base_net: nn.Module, images: torch.Tensor, patch_size, batch_size: int = 256,
                    progress: Optional[bool] = None, differentiable: bool = False,
                    border: str = "zeros", output_stride=1) -> torch.Tensor:
    """Cp run on every patch: the ground truth that CI must reproduce.

    Args:
        base_net: the patch network Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
        images: (N, C, H, W) floating tensor.
        patch_size: int or (pH, pW); patches follow the convention in :func:`patch_padding`.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.
        differentiable: record for autograd (see :func:`patch_outputs`): the loss of Cp trained on
            every patch, to compare with training through CI.
        border: "zeros" (default), "reflect" or "replicate": how the image is extended (see BORDERS).
        output_stride: int or (sy, sx): only the pixels (sy * i, sx * j).

    Returns:
        (N, K, H, W) tensor with out[n, :, y, x] = Cp(patch of image n centred at (y, x));
        with output_stride, (N, K, ceil(H / sy), ceil(W / sx)) with out[n, :, i, j] at (sy * i, sx * j).
    """
    check_images(images)
    sy, sx = _pair(output_stride, "output_stride")
    n_img, _, height, width = images.shape
    rows, cols = torch.arange(0, height, sy), torch.arange(0, width, sx)
    grid = torch.stack(torch.meshgrid(torch.arange(n_img), rows, cols, indexing="ij"), -1).reshape(-1, 3)
    out = patch_outputs(base_net, images, patch_size, grid, batch_size=batch_size, progress=progress,
                        differentiable=differentiable, border=border)
    return out.reshape(n_img, len(rows), len(cols), -1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------
# Wiring checks: what a hand-wired block can tell about the blocks before it
# ---------------------------------------------------------------------------


def _unwarp_target(image_size, batch, who):
    """(N or None, H, W) from what unwarpAll / unwrapPrepare are called with: the images (N, C, H, W), their
    shape, or their (H, W) (then N comes from ``batch``, if given)."""
    if isinstance(image_size, torch.Tensor) and image_size.dim() == 4:
        size = tuple(image_size.shape)
    else:
        try:
            size = tuple(int(v) for v in image_size)
        except (TypeError, ValueError):
            size = ()
    if len(size) == 4:
        n, height, width = size[0], size[2], size[3]
    elif len(size) == 2:
        n, (height, width) = None, size
    else:
        raise ValueError(f"{who}: call it with the images (N, C, H, W), their shape, or their (H, W); "
                         f"got {image_size!r}")
    if batch is not None:
        if n is not None and int(batch) != n:
            raise ValueError(f"{who}: batch={batch} but the images are {n}")
        n = int(batch)
    return n, height, width


# ---------------------------------------------------------------------------
# Stateless building blocks: multipooling and unwarping
# ---------------------------------------------------------------------------

def _pad_border(images: torch.Tensor, patch_size, border: str = "zeros") -> torch.Tensor:
    """The images extended by :func:`patch_padding` in the way ``border`` says (see BORDERS)."""
    ph, pw = _pair(patch_size, "patch_size")
    _check_border(border, tuple(images.shape[-2:]), (ph, pw))
    top, bottom, left, right = patch_padding((ph, pw))
    if border == "zeros":
        return F.pad(images, (left, right, top, bottom))
    return F.pad(images, (left, right, top, bottom), mode=border)


def multipool_prepare(images: torch.Tensor, patch_size, stride_product=1, border: str = "zeros") -> torch.Tensor:
    """Pad images so that every pixel has a full patch around it.

    Pads by :func:`patch_padding` (zeros, or the image reflected or replicated: ``border``) and, on the
    bottom and right, with zeros up to the next multiple of the stride product so that every
    multipooling divides evenly (those rows only feed outputs beyond the image, which are cropped).

    Args:
        images: (N, C, H, W).
        patch_size: int or (pH, pW).
        stride_product: int or (SH, SW), the product of all pooling/striding strides.
        border: "zeros" (default, the paper's convention), "reflect" or "replicate".

    Returns:
        (N, C, H' + pH - 1, W' + pW - 1) with H' = ceil(H / SH) * SH, W' likewise.
    """
    check_images(images)
    top, bottom, left, right = patch_padding(patch_size)
    sh, sw = _pair(stride_product, "stride_product")
    height, width = images.shape[-2:]
    # the extra rows as "ceil(H / SH) * SH - H" (not "(-H) % SH"): for symbolic sizes (torch.export) the
    # padded size is then a multiple of SH plus a constant, which the shape solver simplifies
    extra_h = (height + sh - 1) // sh * sh - height
    extra_w = (width + sw - 1) // sw * sw - width
    if border == "zeros":
        return F.pad(images, (left, right + extra_w, top, bottom + extra_h))
    return F.pad(_pad_border(images, patch_size, border), (0, extra_w, 0, extra_h))


def _memory_available(device: torch.device) -> Optional[int]:
    """Bytes CI may still allocate on ``device``: free CUDA memory (plus what PyTorch's allocator holds
    unused), the host's (:func:`_host_memory_available`) on the CPU; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _host_memory_available()
    return None


def _recording_graph() -> bool:
    """True while torch.export, torch.compile or torch.jit.trace records CI."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _vmapped() -> bool:
    """True while ``torch.func.vmap`` runs CI (possibly under other transforms): its batched tensors answer no
    questions about their layout in memory."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def _exporting() -> bool:
    """True while a graph of CI is recorded (:func:`_recording_graph`) or ``torch.func.vmap`` runs it: CI then
    runs one untiled graph of plain ops whose shapes are all computed from the image size, so that the recorded
    graph serves every image size (see DenseFeatureNet.forward) and no step asks for a layout."""
    return _recording_graph() or _vmapped()


def _forward_ad_active() -> bool:
    """Whether forward-mode AD may watch CI's values: a level of ``torch.autograd.forward_ad`` is open, or a
    ``torch.func`` transform (jvp, jacfwd, grad, ...) runs.  CI's fast passes (out= and in-place ops, oneDNN's
    fused convolution and tanh) carry no tangents, so they stand aside then."""
    return (getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
            or torch._C._functorch.maybe_current_level() is not None)


def _autodiff_watches(x: torch.Tensor) -> bool:
    """Whether autograd records through ``x`` or forward-mode AD may watch it (:func:`_forward_ad_active`).
    CI then runs plain differentiable ops: no out= or in-place passes, and no copies into slices of one buffer,
    each of whose backward nodes would pass on the whole output's gradient (training time grew with the square
    of the image size)."""
    return (torch.is_grad_enabled() and x.requires_grad) or _forward_ad_active()


def _channels_last_to_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()`` for a channels-last ``x``, about 2.5 times as fast on CPUs (K = 113): each image, a
    (H*W, K) matrix in memory, is transposed in column blocks of about 64K elements, whose source
    stays in the cache while its channels are written and whose copy is large enough for PyTorch
    to share among its threads (one (K, H*W) transpose per image is single-threaded, and
    ``.contiguous()`` reads each channel across the whole image).  A crop of a channels-last
    tensor is copied in blocks of rows (:func:`_copy_rows_blocked`).

    Shape:
        (N, K, H, W) channels-last -> (N, K, H, W) contiguous.
    """
    n, k, h, w = x.shape
    out = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device)
    if x.device.type != "cpu":
        return out.copy_(x)
    if not x.is_contiguous(memory_format=torch.channels_last):  # a crop: its pixels are no (H*W, K) matrix
        return _copy_rows_blocked(out, x)
    block = max(256, _TRANSPOSE_BLOCK_ELEMENTS // max(k, 1))
    for i in range(n):
        src, dst = x[i].permute(1, 2, 0).reshape(h * w, k), out[i].view(k, h * w)
        for start in range(0, h * w, block):
            dst[:, start:start + block].copy_(src[start:start + block].t())
    return out


def _copy_rows_blocked(dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dest.copy_(src)`` for a channels-last ``src`` and a ``dest`` that is not (e.g. a tile of a
    contiguous output), in blocks of rows of about :data:`_TRANSPOSE_BLOCK_ELEMENTS` per image, for
    the reasons of :func:`_channels_last_to_contiguous`.

    Shape:
        dest, src: (N, K, h, w).
    """
    if src.device.type != "cpu" or not _is_channels_last(src) or _is_channels_last(dest):
        return dest.copy_(src)
    n, k, h, w = src.shape
    rows = max(1, _TRANSPOSE_BLOCK_ELEMENTS // max(k * w, 1))
    for i in range(n):
        for start in range(0, h, rows):
            dest[i, :, start:start + rows].copy_(src[i, :, start:start + rows])
    return dest


def _unwarp_across_layouts(stacked: torch.Tensor, strides, dest: torch.Tensor) -> torch.Tensor:
    """:func:`unwarp` of the channels-last ``stacked`` maps, cropped to ``dest``'s size and written into
    ``dest`` of another layout (the contiguous output, or a tile of it), band by band on CPUs.

    Each band of about :data:`_UNWARP_BAND_ELEMENTS` values (a few stacked rows of one image) is unwarped
    into one small channels-last buffer and copied from there into ``dest`` (:func:`_copy_rows_blocked`).
    The whole unwarped map in the stacked layout, as large as the output, is never allocated: on
    2 CPU threads CI on the Simo-Serra net took 10% less time at 720x480 and 1080x720 this way.

    Shape:
        stacked: (M * N, K, h, w) channels-last, M the product of ``strides``; dest: (N, K, hd, wd)
        with hd <= h * SH and wd <= w * SW.
    """
    strides = [_pair(s, "stride") for s in strides]
    sh, sw = _prod(s[0] for s in strides), _prod(s[1] for s in strides)
    n, (k, h, w), (hd, wd) = dest.shape[0], stacked.shape[1:], dest.shape[-2:]
    band = max(1, _UNWARP_BAND_ELEMENTS // (sh * w * sw * k))  # stacked rows per band
    buffer = stacked.new_empty((1, k, min(band, h) * sh, w * sw)).contiguous(memory_format=torch.channels_last)
    for i in range(n):
        for q0 in range(0, _ceil_div(hd, sh), band):
            q1 = min(h, q0 + band)
            rows = min(hd, q1 * sh) - q0 * sh
            unwarped = unwarp_into(stacked[i::n, :, q0:q1], strides, buffer[:, :, :(q1 - q0) * sh])
            _copy_rows_blocked(dest[i:i + 1, :, q0 * sh:q0 * sh + rows], unwarped[:, :, :rows, :wd])
    return dest


#: elements per band of :func:`_unwarp_across_layouts` (8 MB in float32); bands of 1, 2, 4 and 8 stacked rows
#: of the Simo-Serra net at 720x480 (0.55M elements each) took 85, 78, 76 and 76 ms
_UNWARP_BAND_ELEMENTS = 1 << 21


#: elements per block of :func:`_channels_last_to_contiguous`, chosen among 32K to 256K on 2 threads:
#: the fastest for K = 113 and 256, 13-30% behind the fastest for K = 32 and 8, and 1.3 to 1.55 times
#: as fast as one transpose per image for every K measured (8, 32, 113, 256)
_TRANSPOSE_BLOCK_ELEMENTS = 65536


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when channels are the innermost axis in memory (also for crops of channels-last tensors).

    Always False while CI is exported (:func:`_exporting`: strides of symbolic sizes would add
    guards on the image size; every path is exact in either layout)."""
    if _exporting():
        return False
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(3) >= x.shape[1]


def _one_channel_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A contiguous one-channel batch with channels-last strides (N, 1, H, W) -> strides (H*W, 1, W, 1): the
    same memory, but convolutions on it give channels-last outputs, where the ordinary strides leave them
    in NCHW (CI then converted the first convolution's output: 2x its time plus a copy, on grey images).
    Used on CPUs (oneDNN); GPU paths keep the ordinary strides, whose speed there was measured."""
    if x.device.type != "cpu" or x.shape[1] != 1 or not x.is_contiguous():
        return x
    return x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), 1))


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
    if x.dim() != 4:
        raise ValueError(f"space_to_batch: x must be a (B, C, H, W) map, got shape {tuple(x.shape)}")
    b, c, lh, lw = x.shape
    hq, wq = lh // sh, lw // sw
    if not torch.jit.is_tracing() and (hq < 1 or wq < 1):
        raise ValueError(f"input {lh}x{lw} is smaller than the stride {sh}x{sw}")
    if torch.compiler.is_exporting():
        # torch.export: unfold (a view (b, c, hq, wq, sh, sw)) rather than a reshape of the cropped size,
        # which would leave the shape solver a divisibility it cannot prove
        y = x.unfold(2, sh, sh).unfold(3, sw, sw)
        return y.permute(4, 5, 0, 1, 2, 3).reshape(sh * sw * b, c, hq, wq)
    if torch.compiler.is_compiling():
        # torch.compile: the shifts as strided slices (no divisibility either); inductor's backward of the
        # unfold form gave wrong gradients (PyTorch 2.13), and the reshape form fails with dynamic sizes
        return torch.cat([x[:, :, dy::sh, dx::sw][:, :, :hq, :wq] for dy in range(sh) for dx in range(sw)], 0)
    channels_last = _is_channels_last(x)
    x = x[:, :, :hq * sh, :wq * sw]
    if channels_last:
        y = x.permute(0, 2, 3, 1).reshape(b, hq, sh, wq, sw, c).permute(2, 4, 0, 1, 3, 5)
        return y.reshape(sh * sw * b, hq, wq, c).permute(0, 3, 1, 2)
    y = x.reshape(b, c, hq, sh, wq, sw).permute(3, 5, 0, 1, 2, 4)
    return y.reshape(sh * sw * b, c, hq, wq)


_POOLS = ("max", "avg", "lp")


def _pool(x, kind, kernel, stride, dilation, norm_type, divisor_override, reuse_input=False):
    """One pooling; ``reuse_input``: the separable max pooling may write into ``x`` (nothing reads it after).
    ``kind`` "min" and "sum" (global pooling only): the max pooling of -x, negated; an average pooling times
    the window's area."""
    if kind == "min":
        if x.dtype == torch.bool:
            return ~_pool(~x, "max", kernel, stride, dilation, norm_type, divisor_override, True)
        return -_pool(-x, "max", kernel, stride, dilation, norm_type, divisor_override, True)
    if kind == "sum":  # (not divisor_override=1: ONNX's AveragePool has none, and its exports would divide)
        kernel = _pair(kernel, "kernel")
        if not x.is_floating_point():  # integers and booleans: torch's sum gives int64, exactly
            total = F.avg_pool2d(x.double(), kernel, stride, 0, False, True) * (kernel[0] * kernel[1])
            return total.round().to(torch.int64)
        return F.avg_pool2d(x, kernel, stride, 0, False, True) * (kernel[0] * kernel[1])
    if kind == "max":
        if _separable_max_applies(x, kernel, stride, dilation):
            return _separable_max_pool(x, kernel, reuse_input)
        return F.max_pool2d(x, kernel, stride, 0, dilation)
    if kind == "avg":
        return F.avg_pool2d(x, kernel, stride, 0, False, True, divisor_override)
    return F.lp_pool2d(x, norm_type, kernel, stride)


def _pool_split_ties(x, kind, kernel, over_channels=False):
    """Stride-1 max (``kind`` "min": min) pooling whose gradient, like that of ``torch.amax`` over the window, is
    shared equally among the window's tied extrema (``F.max_pool2d`` gives it to one of them): the pooled values
    plus a term that is zero but carries that gradient.  The term is the mean of each window's tied entries, taken
    in two stages: the mean of the tied entries of each row's kw entries, then those means of the rows that tie the
    window's extremum, weighted by their counts (kh + kw passes, not kh * kw; used only where autograd or
    forward-mode AD watches).  ``over_channels``: the window spans the channels too (``x.amax((1, 2, 3))``): a
    first stage takes each pixel's extremum over its channels, the mean of its tied channels and their count, and
    the result has one channel."""
    (kh, kw), values = _pair(kernel, "kernel"), x.detach()
    if over_channels:  # each pixel's tied channels: their count and mean, weights of the stages below
        values = (torch.amax if kind == "max" else torch.amin)(values, 1, keepdim=True)
        tied = x.detach() == values
        weight = tied.sum(1, keepdim=True).to(x.dtype)
        x = torch.where(tied, x, torch.zeros_like(x)).sum(1, keepdim=True) / weight
    rows = _pool(values, kind, (1, kw), (1, 1), (1, 1), 2.0, None)  # (N, C, H, W - kw + 1)
    pooled = _pool(rows, kind, (kh, 1), (1, 1), (1, 1), 2.0, None)
    (h, _), w = pooled.shape[-2:], rows.shape[-1]
    tied = [values[..., dx:dx + w] == rows for dx in range(kw)]
    if over_channels:  # ties in each row's kw entries, weighted by their tied channels
        tied = [torch.where(t, weight[..., dx:dx + w], torch.zeros_like(rows)) for dx, t in enumerate(tied)]
        count = sum(tied)
        row_mean = sum(t * x[..., dx:dx + w] for dx, t in enumerate(tied)) / count
    else:
        count = sum(t.to(x.dtype) for t in tied)  # ties in each row's kw entries
        row_mean = sum(torch.where(t, x[..., dx:dx + w], torch.zeros_like(rows)) for dx, t in enumerate(tied)) / count
    tied = [rows[..., dy:dy + h, :] == pooled for dy in range(kh)]
    weights = [torch.where(t, count[..., dy:dy + h, :], torch.zeros_like(pooled)) for dy, t in enumerate(tied)]
    mean = sum(wt * row_mean[..., dy:dy + h, :] for dy, wt in enumerate(weights)) / sum(weights)
    return pooled + (mean - mean.detach()).nan_to_num(0.0)  # (0, and NaN where the extremum is infinite or NaN)


def _separable_max_applies(x, kernel, stride, dilation) -> bool:
    """Whether :func:`_separable_max_pool` replaces ``F.max_pool2d``: stride-1, undilated max pooling
    on the CPU, with autograd not recording through ``x`` (its backward would split the gradient
    between tied maxima, where Cp's max pooling gives it to one; forward-mode AD cannot pass its out= ops) and not
    while CI is exported."""
    kernel, stride, dilation = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(dilation, "dilation")
    return (stride == (1, 1) and dilation == (1, 1) and kernel != (1, 1) and x.dim() == 4 and x.device.type == "cpu"
            and not _exporting() and not _autodiff_watches(x))


def _window_steps(size: int):
    """The offsets of the passes that build a window of ``size`` from two of half its size (1 -> 2 -> 4 ...,
    the last covering the rest): 4 -> [1, 2], 3 -> [1, 1], 5 -> [1, 2, 1]."""
    steps, span = [], 1
    while span < size:
        steps.append(min(span, size - span))
        span += steps[-1]
    return steps


#: elements per band of :func:`_separable_max_pool` (2 MB in float32), chosen among 64K to 2M on 2 threads:
#: 512K and 1M were the fastest for 128, 64 and 32 channels; 64K took 2.7 times as long, 2M 1.5 times
_POOL_BAND_ELEMENTS = 1 << 19


def _separable_max_pool(x: torch.Tensor, kernel, reuse_input: bool = False) -> torch.Tensor:
    """Stride-1 max pooling as element-wise maxima of shifted views, along the width and then the height,
    each window built from two of half its size (:func:`_window_steps`), band by band.

    The same values as ``F.max_pool2d(x, kernel, 1)`` (a maximum is exact, NaN propagates alike), and
    faster on CPUs: PyTorch's CPU max pooling also computes the indices of the maxima, which the
    forward pass does not need.  The rows of all images, one after another (channels-last or
    contiguous memory), are taken in bands of about :data:`_POOL_BAND_ELEMENTS` values whose passes
    run in two small buffers that stay in the cache; each band's result goes to the output once.
    A band's rows are written after the band has read them, and no later band reads them, so with
    ``reuse_input`` (``x`` is not read afterwards) the output is ``x`` itself: no allocation of the
    map at all.  (Rows at the junction of two images mix them; they lie outside the result.)  Other
    layouts (crops) and maps of fewer than four bands take the passes whole, in two buffers of ``x``'s
    size.

    Shape:
        (B, C, H, W) -> (B, C, H - kh + 1, W - kw + 1), a view into a buffer of (B, C, H, W).
    """
    kh, kw = _pair(kernel, "kernel")
    b, c, h, w = x.shape
    if x.numel() < 4 * _POOL_BAND_ELEMENTS:  # small maps: fewer ops (72x48 Simo-Serra: 3% faster)
        return _separable_max_pool_whole(x, kernel, reuse_input)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = x if reuse_input else torch.empty_like(x, memory_format=torch.channels_last)
        rows, out_rows = x.permute(0, 2, 3, 1).reshape(b * h, w, c), out.permute(0, 2, 3, 1).view(b * h, w, c)
    elif x.is_contiguous():
        out = x if reuse_input else torch.empty_like(x, memory_format=torch.contiguous_format)
        rows, out_rows = x.view(b * c * h, w, 1), out.view(b * c * h, w, 1)
    else:
        return _separable_max_pool_whole(x, kernel, reuse_input)
    passes = [(1, step) for step in _window_steps(kw)] + [(0, step) for step in _window_steps(kh)]
    if not passes:  # a 1x1 window
        return x if reuse_input else out.copy_(x)
    band = max(1, _POOL_BAND_ELEMENTS // (w * rows.shape[2]))  # output rows per band
    buffer_shape = (min(band, rows.shape[0]) + kh - 1, w, rows.shape[2])
    buffers = [rows.new_empty(buffer_shape), rows.new_empty(buffer_shape)]  # small: kept in the cache
    for start in range(0, rows.shape[0] - kh + 1, band):
        count = min(band, rows.shape[0] - kh + 1 - start)
        current, height, width = rows[start:start + count + kh - 1], count + kh - 1, w
        for i, (dim, step) in enumerate(passes):
            height, width = (height - step, width) if dim == 0 else (height, width - step)
            last = i == len(passes) - 1
            direct = last and not (i == 0 and reuse_input)  # one pass in place: through a buffer
            dest = out_rows[start:start + count, :width] if direct else buffers[i % 2][:height, :width]
            torch.maximum(current[:height, :width], current.narrow(dim, step, (height, width)[dim])[:height, :width],
                          out=dest)
            current = dest
        if not direct:
            out_rows[start:start + count, :width].copy_(current)
    return out[:, :, :h - kh + 1, :w - kw + 1]


def _separable_max_pool_whole(x: torch.Tensor, kernel, reuse_input: bool = False) -> torch.Tensor:
    """:func:`_separable_max_pool`'s passes on the whole of ``x`` (any layout): two buffers of ``x``'s size
    take them in turn; with ``reuse_input``, ``x`` itself is the second one."""
    kh, kw = _pair(kernel, "kernel")
    buffers = [torch.empty_like(x), x if reuse_input else torch.empty_like(x)]
    current, which = x, 0
    for dim, size in ((3, kw), (2, kh)):
        for step in _window_steps(size):
            length = current.shape[dim] - step
            dest = buffers[which][:, :, :current.shape[2], :current.shape[3]].narrow(dim, 0, length)
            torch.maximum(current.narrow(dim, 0, length), current.narrow(dim, step, length), out=dest)
            current, which = dest, 1 - which
    return current


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
    _check_window(f"multipooling ({kind}, kernel {kernel[0]}x{kernel[1]}, stride {stride[0]}x{stride[1]})", x,
                  kernel, stride, dil)
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
    if not torch.jit.is_tracing():  # a traced weight's sizes are traced values: no formatting or checks
        _check_window(f"multi_conv (kernel {kernel[0]}x{kernel[1]}, stride {stride[0]}x{stride[1]})", x, kernel,
                      stride, dil)
    return _multi(x, lambda t, s: F.conv2d(t, weight, bias, s, 0, dil, groups), kernel, stride, dil, naive)


def _check_window(what, x, kernel, stride, dil):
    """A multipooling or strided layer needs a 4-D input of at least its window plus the shifts of its stride
    (always true in a correct wiring: the padded image holds every shift of every later layer)."""
    if x.dim() != 4:
        raise ValueError(f"{what}: its input must be a (B, C, H, W) map, got shape {tuple(x.shape)}")
    size = tuple(x.shape[-2:])
    need = [d * (k - 1) + s for k, s, d in zip(kernel, stride, dil)]
    if not torch.jit.is_tracing() and (size[0] < need[0] or size[1] < need[1]):
        raise ValueError(f"{what}: its input is {size[0]}x{size[1]}, smaller than the {need[0]}x{need[1]} that its "
                         f"window and all its shifts need; likely cause: the images were not padded by "
                         f"multiPoolPrepare first, multiPoolPrepare got a smaller patch than Cp's, or a layer "
                         f"before this one shrinks the map more than in Cp")


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
        raise ValueError(f"batch {b} is not a multiple of the {sh}x{sw} shifts: undo the layers last layer first, "
                         f"one per multipooling layer or multiConv; {_NOT_REPLACED}, or this stride is not Cp's")
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


def unwarp_gather(x: torch.Tensor, strides: Sequence, height, width) -> torch.Tensor:
    """:func:`unwarp` and the crop to ``height`` x ``width`` as one gather, for graph export.

    The row r of the result comes from the stacked row r // SH of the shift whose digits are those
    of r % SH (y_1 = r % s_1, y_2 = (r // s_1) % s_2, ...), likewise for columns.  Unlike the
    reshapes of :func:`unwarp`, nothing splits or merges an axis whose size depends on the image,
    so torch.export's shape solver has no divisibility to prove and ``height``, ``width`` may be
    symbolic.

    Shape:
        (M * N, K, h, w) -> (N, K, height, width), with height <= h * SH and width <= w * SW.
    """
    strides = [_pair(s, "stride") for s in strides]
    b, k, h, w = x.shape
    sizes = [v for s in reversed(strides) for v in s]  # the batch axis: (y_n, x_n, ..., y_1, x_1, N)
    m = _prod(sizes)
    weights = [_prod(sizes[i + 1:]) for i in range(len(sizes))]  # of each digit in the flat shift index
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)

    def shift_part(pos, axis):
        """The part of the flat shift index given by the row (axis 0) or column (axis 1) digits."""
        part, rest = torch.zeros_like(pos), pos
        for i, s in enumerate(strides):  # innermost layer first: its digit is the lowest
            digit_weight = weights[2 * (len(strides) - 1 - i) + axis]
            part = part + (rest % s[axis]) * digit_weight
            rest = rest // s[axis]
        return part, rest  # rest: the position on the stacked grid

    shift_y, qy = shift_part(rows, 0)
    shift_x, qx = shift_part(cols, 1)
    stacked = x.reshape(m, b // m, k, h, w)
    out = stacked[shift_y[:, None] + shift_x[None, :], :, :, qy[:, None], qx[None, :]]  # (height, width, N, K)
    return out.permute(2, 3, 0, 1)


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
        raise ValueError(f"batch {b} is not a multiple of the {m} stacked shifts of the strides {strides}: "
                         f"{_NOT_REPLACED}, or the list holds a stride that Cp does not have")
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
        patchY, patchX: patch height and width (those Cp was trained on).
        stride_product: int or (SH, SW), product of all strides of the net, of its pooling layers and of
            its strided convolutions (default 1).

    Checks the images (rank, floating dtype, non-empty): see :func:`check_images`.

    Shape:
        (N, C, H, W) -> (N, C, H' + pY - 1, W' + pX - 1), H' = ceil(H / SH) * SH.
    """

    def __init__(self, patchY: int, patchX: int, stride_product=1):
        super().__init__()
        self.patch_size = _pair((patchY, patchX), "patch size")
        self.stride_product = _pair(stride_product, "stride_product")

    def forward(self, images):
        padded = multipool_prepare(images, self.patch_size, self.stride_product)
        if not _exporting():  # grey images: the next convolution writes channels-last
            padded = _one_channel_channels_last(padded)
        return padded

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

    Raises a ValueError where its input is smaller than its window and shifts need (the images were
    not padded by :class:`multiPoolPrepare`, or with a smaller patch than Cp's).

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
        if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or not norm_type == norm_type \
                or norm_type == 0:  # (any other power, also negative or infinite: LPPool2d's)
            raise ValueError(f"multiLPPooling: norm_type (the power p) must be a nonzero number, got {norm_type!r}")
        self.norm_type = float(norm_type)

    def _options(self):
        return {"norm_type": self.norm_type}


class multiConv(nn.Module):
    """A trained strided convolution made dense.  Reuses (shares) the conv's weights.

    Its stride counts like a pooling layer's: list it for :class:`unwarpAll` and in the stride product
    of :class:`multiPoolPrepare`.

    Args:
        conv: a trained ``nn.Conv2d`` with no padding (any stride, dilation, groups).
        naive: one strided convolution per shift instead of stride 1 + space-to-batch.

    Raises a ValueError where the input has other channels than the convolution takes, or is smaller
    than its window and shifts need.

    Shape:
        (B, C, L_h, L_w) -> (sh * sw * B, K, h', w').
    """

    def __init__(self, conv: nn.Conv2d, naive: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"multiConv needs a trained nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or _padding_of(conv.padding, conv.kernel_size):
            raise ConversionError(f"multiConv: the convolution pads its input (padding={conv.padding}); "
                                  f"{_PADDING_REASON}")
        self.conv = conv
        self.naive = naive

    def forward(self, x):
        c = self.conv
        if x.dim() == 4 and x.shape[1] != c.in_channels:
            raise ValueError(f"multiConv: its input has {x.shape[1]} channels but the convolution takes "
                             f"{c.in_channels} (layout (B, C, H, W)); likely cause: a layer before it is "
                             f"missing, or in another order than in Cp")
        return multi_conv(x, c.weight, c.bias, c.stride, c.dilation, c.groups, self.naive)


class unwrapPrepare(nn.Module):
    """Crop every stacked shift to the image's grid, ready for :class:`unwrapPool`.

    Args:
        stride_product: int or (SH, SW), product of all strides.

    Call as ``unwrap_prepare(x, images)`` (or with ``images.shape``, or with the (H, W) of the images
    and optionally ``batch=N``).  Checks the wiring like :class:`unwarpAll`: the number of stacked maps
    against N x SH x SW (a multiple of SH x SW where N is not known) and that the maps cover the grid.

    Shape:
        (M * N, K, h, w) -> (M * N, K, ceil(H / SH), ceil(W / SW)).
    """

    def __init__(self, stride_product=1):
        super().__init__()
        self.stride_product = _pair(stride_product, "stride_product")

    def forward(self, x, image_size, batch: Optional[int] = None):
        n, height, width = _unwarp_target(image_size, batch, "unwrapPrepare")
        if x.dim() != 4:
            raise ValueError(f"unwrapPrepare: the stacked result must be (M * N, K, h, w), got shape {tuple(x.shape)}")
        sh, sw = self.stride_product
        problem = _stacked_problem("unwrapPrepare", x.shape[0], tuple(x.shape[-2:]), (sh, sw),
                                   f"the stride product {sh}x{sw}", (height, width), n)
        if problem:
            raise ValueError(problem)
        grid_h, grid_w = _ceil_div(height, sh), _ceil_div(width, sw)  # ceil(H / SH), ceil(W / SW)
        return x[:, :, :grid_h, :grid_w]


class unwrapPool(nn.Module):
    """Undo one multipooling layer; apply once per layer (multiConv included), the last layer's first.

    Raises a ValueError where the batch is not a multiple of its shifts.

    Shape:
        (dH * dW * B, K, h, w) -> (B, K, h * dH, w * dW).
    """

    def __init__(self, dW: int, dH: Optional[int] = None):
        super().__init__()
        self.stride = _pair((dW if dH is None else dH, dW), "stride")

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"unwrapPool: the stacked result must be (M * N, K, h, w), got shape {tuple(x.shape)}")
        return unwarp_layer(x, self.stride)

    def extra_repr(self):
        return f"stride={self.stride}"


class unwarpAll(nn.Module):
    """Unwarping of all multipooling layers at once, plus the crop to the image size.

    Checks the wiring before unwarping: the stacked result must hold N x M maps (M = the product of all
    strides listed) and maps that unwarp to at least the image size.  A stride left out of the list, a
    pooling layer or strided convolution not replaced, or a smaller stride product or patch given to
    :class:`multiPoolPrepare` raise a ValueError that names these causes; a correct wiring always passes
    (its maps may be larger than needed: they are cropped).

    Args:
        strides: list of (sh, sw) per multipooling layer and per multiConv, in network order.
        naive: undo one layer at a time (the paper's listing); same result.

    Call as ``unwarp_all(x, images)``.  The images' (H, W), or ``images.shape[-2:]``, also work: then
    the number of images N is not known, and a stride left out is caught only where the map comes out
    smaller than the images (pass ``batch=N`` to check it exactly).

    Shape:
        (M * N, K, h, w), images (N, C, H, W) -> (N, K, H, W).

    Example:
        >>> x = torch.zeros(2 * 16, 5, 3, 4)                       # 2 images, strides (2, 2) and (2, 2)
        >>> FDFE.unwarpAll([(2, 2), (2, 2)])(x, torch.zeros(2, 1, 10, 13)).shape
        torch.Size([2, 5, 10, 13])
        >>> FDFE.unwarpAll([(2, 2)])(x, torch.zeros(2, 1, 10, 13))
        Traceback (most recent call last):
        ...
        ValueError: unwarpAll: the stacked result holds 32 maps, ... make 8; likely cause: a stride is missing ...
    """

    def __init__(self, strides: Sequence, naive: bool = False):
        super().__init__()
        self.strides = [_pair(s, "stride") for s in strides]
        self.stride_product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.naive = naive

    def forward(self, x, image_size, batch: Optional[int] = None):
        n, height, width = _unwarp_target(image_size, batch, "unwarpAll")
        if x.dim() != 4:
            raise ValueError(f"unwarpAll: the stacked result must be (M * N, K, h, w), got shape {tuple(x.shape)}")
        problem = _stacked_problem("unwarpAll", x.shape[0], tuple(x.shape[-2:]), self.stride_product,
                                   f"the strides {self.strides}", (height, width), n)
        if problem:
            raise ValueError(problem)
        out = unwarp(x, self.strides, self.naive)
        return out[:, :, :height, :width]

    def extra_repr(self):
        return f"strides={self.strides}, naive={self.naive}"


# ---------------------------------------------------------------------------
# Fully connected layers made dense, and the check of a CI against Cp
# ---------------------------------------------------------------------------


class linearAsConv(nn.Module):
    """A trained fully connected layer made dense: an ``nn.Linear`` as a convolution (shared weights).

    In Cp, a Linear after a flatten sees the (C, h, w) map flattened in C, H, W order: that is an
    h x w convolution of the map with the Linear's weight viewed as (K, C, h, w), which CI applies at
    every position of the dense map (leave the flatten out).  A Linear after another Linear (or on a
    1 x 1 map) is a 1 x 1 convolution.  convert() builds the same for flatten + Linear heads.

    Args:
        linear: the trained ``nn.Linear`` (weight and bias shared, not copied).
        in_shape: the map Cp flattens before this layer, (C, h, w), at the patch size CI is built for
            (Cp's layers up to the flatten, run on one patch, give it), or its (h, w); None (default)
            for a Linear that follows another Linear (a 1 x 1 convolution).

    Raises a ValueError where ``in_shape`` does not flatten to the Linear's inputs, or where the input
    has other channels than ``in_shape`` says (e.g. a flattened map, or in_shape left out for the first
    Linear after a flatten).

    Shape:
        (B, C, L_h, L_w) -> (B, K, L_h - h + 1, L_w - w + 1).

    Example:
        >>> fc = torch.nn.Linear(4 * 3 * 2, 5)
        >>> maps = torch.randn(2, 4, 3, 2)                          # Cp's map before its flatten
        >>> dense = FDFE.linearAsConv(fc, (4, 3, 2))(maps)          # one position: the whole 3x2 map
        >>> dense.shape
        torch.Size([2, 5, 1, 1])
        >>> bool(torch.allclose(dense.flatten(1), fc(maps.flatten(1)), atol=1e-6))
        True
    """

    def __init__(self, linear: nn.Linear, in_shape=None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linearAsConv needs a trained nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.in_shape = _linear_in_shape(linear.in_features, in_shape, "CHW")

    def forward(self, x):
        c, h, w = self.in_shape
        if x.dim() != 4:
            raise ValueError(f"linearAsConv: its input must be a (B, C, H, W) map, got shape {tuple(x.shape)}; "
                             f"in CI the flatten before the Linear is left out")
        if x.shape[1] != c:
            raise ValueError(f"linearAsConv: its input has {x.shape[1]} channels, but in_shape {self.in_shape} "
                             f"says the map Cp flattens has {c}; likely cause: in_shape left out or wrong for "
                             f"the first Linear after a flatten, or a layer before it is missing")
        _check_window("linearAsConv", x, (h, w), (1, 1), (1, 1))
        return F.conv2d(x, self.linear.weight.reshape(self.linear.out_features, c, h, w), self.linear.bias)

    def extra_repr(self):
        return f"in_shape={self.in_shape}, out_features={self.linear.out_features}"


#: the wiring mistakes check_ci names where CI and Cp differ


def check_ci(ci, base_net: nn.Module, patch_size, in_channels: Optional[int] = None, image_size=(25, 37),
             batch: int = 2) -> float:
    """Check a CI (wired by hand, or from :func:`convert`) against Cp on random test images.

    Runs ``ci`` on ``batch`` random images of ``image_size`` and Cp on the patches around some of their
    pixels (every image's corners and middle, and random ones), in inference mode (training flags
    restored) and without gradients, and compares: the output's shape must be (N, K, H, W) and its
    values Cp's, within the tolerance of the dtype (relative to max |Cp|: float64 1e-9, float32 1e-4,
    1e-2 on GPUs with TF32, others 3e-2).  Cheap enough to run in a CI's constructor (the templates
    do).  For an exactness test use :func:`dense_reference` (Cp on every patch).

    Args:
        ci: the dense network (a module or any callable), (N, C, H, W) -> (N, K, H, W).
        base_net: Cp.
        patch_size: int or (pH, pW).
        in_channels: C (default: ``ci.in_channels``, else the first module of Cp with ``in_channels``).
        image_size: (H, W) of the test images; by default 1 more than a multiple of the usual stride
            products (2, 3, 4, 6, 12), so that a smaller product given to multiPoolPrepare shows.
        batch: N of the test images.

    Returns:
        float: max |CI - Cp| / max |Cp| over the compared pixels.

    Raises:
        ValueError naming the difference (CI fails on the images, gives another shape, or other values;
        with the pixel) and the common wiring mistakes.

    Example:
        >>> cp = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 4, 2))
        >>> class CI(torch.nn.Module):                                # wired by hand for 6x6 patches
        ...     def forward(self, images):
        ...         x = FDFE.multiPoolPrepare(6, 6, stride_product=2)(images)
        ...         x = cp[2](FDFE.multiMaxPooling(2, 2)(cp[0](x)))
        ...         return FDFE.unwarpAll([(2, 2)])(x, images)
        >>> FDFE.check_ci(CI(), cp, 6) < 1e-5
        True
    """
    ph, pw = _pair(patch_size, "patch_size")
    height, width = _pair(image_size, "image_size")
    if not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if in_channels is None:
        in_channels = getattr(ci, "in_channels", None)
        if not isinstance(in_channels, numbers.Integral):
            in_channels = next((m.in_channels for m in base_net.modules()
                                if isinstance(getattr(m, "in_channels", None), int)), None)
        if in_channels is None:
            raise ValueError("check_ci: in_channels cannot be inferred (neither ci nor Cp has in_channels); "
                             "pass in_channels=")
    out_channels = check_patch_size(base_net, (ph, pw), int(in_channels))
    dtype, device = _example_kind(base_net)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, int(in_channels), height, width, generator=gen).to(device=device, dtype=dtype)
    expected_shape = (batch, out_channels, height, width)
    try:
        with torch.no_grad(), (_EvalMode(ci) if isinstance(ci, nn.Module) else contextlib.nullcontext()):
            out = ci(images)
    except Exception as exc:
        raise ValueError(f"check_ci: running CI on {batch} random {in_channels}x{height}x{width} images failed "
                         f"({type(exc).__name__}: {exc}); {_WIRING_HINTS}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected_shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"check_ci: CI gives {got} for {batch} images of {height}x{width}, but Cp on every patch "
                         f"gives {expected_shape} (N, K, H, W); {_WIRING_HINTS}")
    positions = _check_positions(batch, height, width)
    expected = patch_outputs(base_net, images, (ph, pw), positions)
    p = torch.as_tensor(positions, device=out.device)
    got = out[p[:, 0], :, p[:, 1], p[:, 2]]
    tolerance = None
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                              or torch.backends.cuda.matmul.allow_tf32):
        tolerance = 1e-2  # TF32 tensor cores round operands to 10-bit mantissas
    return _check_ci_compare(got.double().cpu().numpy(), expected.double().cpu().numpy(), positions,
                             str(dtype).replace("torch.", ""), tolerance)


# ---------------------------------------------------------------------------
# Automatic conversion, 1: capture Cp's forward (the recorded ops the rules receive)
# ---------------------------------------------------------------------------


def _padding_values(padding):
    if isinstance(padding, str):
        return [0] if padding == "valid" else [1]
    return list(padding) if isinstance(padding, (tuple, list)) else [padding]


class _Ref:
    """Placeholder for an activation (a value that depends on the input patch)."""
    __slots__ = ("slot",)

    def __init__(self, slot):
        self.slot = slot

    def __repr__(self):  # as messages show an op's arguments
        return "<an activation>"


class _Param:
    """Placeholder for a parameter or buffer of Cp, looked up by name at run time."""
    __slots__ = ("name", "shape", "view")

    def __repr__(self):  # as messages show an op's arguments
        return f"<Cp's tensor {self.name!r}>"

    def __init__(self, name, shape, view=None):
        self.name, self.shape, self.view = name, tuple(shape), view

    def with_view(self, view):
        return _Param(self.name, self.shape, view)


class _Const:
    """Placeholder for a constant tensor created inside Cp's forward (stored as a buffer of CI)."""
    __slots__ = ("index", "shape", "view")

    def __init__(self, index, shape, view=None):
        self.index, self.shape, self.view = index, tuple(shape), view

    def __repr__(self):  # as messages show an op's arguments
        return f"<a constant tensor of shape {self.shape}>"

    def with_view(self, view):
        return _Const(self.index, self.shape, view)


class _Derived:
    """Placeholder for a tensor that Cp's forward computes from its parameters or buffers alone (``self.g.exp()``,
    ``self.gamma.view(1, -1, 1, 1)``, a parametrized weight): the ``leaf``-th tensor of expression ``index``,
    computed again from the current parameters at run time (so training and ``load_state_dict`` reach it)."""
    __slots__ = ("index", "leaf", "shape", "view")

    def __repr__(self):  # as messages show an op's arguments
        return f"<a tensor of shape {self.shape} computed from Cp's parameters>"

    def __init__(self, index, leaf, shape, view=None):
        self.index, self.leaf, self.shape, self.view = index, leaf, tuple(shape), view

    def with_view(self, view):
        return _Derived(self.index, self.leaf, self.shape, view)


#: the placeholders of tensors that are not activations, resolved by ``DenseFeatureNet._resolve``
_OPERANDS = (_Param, _Const, _Derived)


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
    straight_through = False  # an in-place op with gradients off on an activation that keeps its gradient path

    def __init__(self, func, args, kwargs, in_slots, in_shapes, out_slots, out_shapes, where, constants=None,
                 no_grad=False):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.in_slots, self.in_shapes = in_slots, in_shapes
        self.out_slots, self.out_shapes = out_slots, out_shapes
        self.where = where
        self.constants = [] if constants is None else constants  # the tracer's: what _Const placeholders index
        self.no_grad = no_grad  # Cp ran it with gradients off (torch.no_grad() in its forward)

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


_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "grad_fn", "layout", "is_leaf",
                   "is_sparse", "is_quantized", "is_meta", "is_mps", "is_xpu", "names", "itemsize", "nbytes",
                   "is_nested"}
_METADATA_METHODS = {getattr(torch.Tensor, n) for n in (
    "size", "dim", "ndimension", "numel", "nelement", "is_contiguous", "is_floating_point", "is_complex",
    "element_size", "get_device", "__len__", "stride", "storage_offset", "is_signed") if hasattr(torch.Tensor, n)}


#: the augmented assignments (w += ...), which change their left operand in place
_IN_PLACE_OPERATORS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                               "and", "or", "xor", "lshift", "rshift")}

#: Tensor methods whose result depends on the tensor's dtype and device, not on its values: called on an
#: activation (``x.new_zeros(x.shape)``) they make a constant of Cp's forward, as ``torch.zeros`` does
_NEW_TENSOR_METHODS = {getattr(torch.Tensor, n) for n in ("new_zeros", "new_ones", "new_full", "new_tensor")
                       if hasattr(torch.Tensor, n)}

#: functions and Tensor methods that draw random numbers (refused in Cp's forward: see _Tracer.__torch_function__)
_RANDOM_FUNCTIONS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
                     "bernoulli", "multinomial", "poisson", "uniform_", "normal_", "bernoulli_", "random_",
                     "exponential_", "geometric_", "log_normal_", "cauchy_", "binomial"}

#: Tensor methods that turn values into Python numbers (on Cp's parameters: refused, see _Tracer._record_derived)
_VALUE_READS = {"item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__complex__"}


def _in_place(func) -> bool:
    """Whether ``func`` changes its first argument in place (``x.add_``, ``x += y``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS


def _version(t: torch.Tensor):
    """The version counter of ``t``'s memory (shared by its views; in-place ops advance it); None for inference
    tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage have elements in common (their shapes, strides and offsets; where their
    element sizes differ, assumed)."""
    if a.element_size() != b.element_size():
        return True
    size = a.untyped_storage().nbytes() // a.element_size()
    offsets = torch.arange(size, device="cpu")
    touched = torch.zeros(size, dtype=torch.bool)
    touched[offsets.as_strided(a.shape, a.stride(), a.storage_offset()).reshape(-1)] = True
    return bool(touched[offsets.as_strided(b.shape, b.stride(), b.storage_offset()).reshape(-1)].any())


def _memory_of(t: torch.Tensor):
    """A key of the memory ``t`` views (its storage's address), the same for every view of it."""
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


_FUNCTION_APPLY = torch.autograd.function.Function.apply.__func__.__code__
#: autograd Functions whose forward CI may compute from the ops inside it: torch.utils.checkpoint's reentrant one,
#: whose backward differentiates those ops, and the one that module backward hooks wrap values in (the hooks
#: themselves are noted as such: _backward_hooks_of)
_GRADIENT_TRANSPARENT_FUNCTIONS = tuple(f for f in (getattr(sys.modules.get(module), name, None) for module, name in (
    ("torch.utils.checkpoint", "CheckpointFunction"), ("torch.nn.modules._functions", "BackwardHookFunction")))
    if f is not None)


def _called_by_torch_hooks() -> bool:
    """Whether the op being traced is called from torch.utils.hooks (module backward hooks wrap values there)."""
    frame = sys._getframe(2)
    return frame is not None and frame.f_code.co_filename.replace("\\", "/").endswith("torch/utils/hooks.py")


def _running_function():
    """The outermost custom ``torch.autograd.Function`` whose forward is running (its class), or None."""
    found, frame = None, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_APPLY:
            found = frame.f_locals.get("cls", found)
        frame = frame.f_back
    return found


class _Tracer(TorchFunctionMode):
    """Records every call of Cp's forward that touches a value derived from the input."""

    def __init__(self, base_net: nn.Module, example: torch.Tensor):
        super().__init__()
        self.snapshots = [_attribute_values(base_net)]  # the modules' attributes before and after the trace
        self.slot_of = {id(example): 0}
        self.alive = [example]                  # keep traced tensors alive so ids stay unique
        self.shapes = {0: tuple(example.shape)}
        self.n_slots = 1
        named = list(base_net.named_parameters(remove_duplicate=False)) + \
            list(base_net.named_buffers(remove_duplicate=False))
        self.names = {id(t): n for n, t in named}
        self.alive += [t for _, t in named]  # (a buffer forward replaces is freed: its id must not name a new tensor)
        self.constants: List[torch.Tensor] = []
        self.constant_sources = set()           # ids of the tensors the constants copy (module attributes among them)
        self.derived = {}                       # id of a tensor computed from parameters alone -> _Derived
        self.expressions = []                   # (func, args, kwargs, in place) of each such computation
        self.stale = {}                         # id of a view whose memory an in-place op changed -> why refused
        self.version_of = {id(example): _version(example)}  # activation -> its memory's version, to see writes
        self.sharing = {_memory_of(example): [example]}  # memory -> the activations that view it
        self.changed = {}                       # id of an activation an in-place op changed through another -> why
        self.nodes: List[_Node] = []
        self.expression_no_grad = []            # per expression: Cp computed it with gradients off
        self.hazards, self.hazard_keys = [], set()  # what changes Cp's gradients that CI cannot follow (note_hazard)
        self.watches_gradients = False          # gradients on, the example requiring them (_trace_once)
        self.input_leaf = None                  # the leaf tensor the example is a copy of (_from_input)
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
        if id(value) in self.stale:
            raise ConversionError(self.stale[id(value)])
        if id(value) in self.derived:
            return self.derived[id(value)]
        if value.grad_fn is not None and self.input_leaf is not None and self._from_input(value):
            raise ConversionError(f"{self.stack[-1]}: a value computed from the input reaches an op by a way convert "
                                  f"does not see (its grad_fn is {type(value.grad_fn).__name__}); CI cannot "
                                  f"compute it")
        self.constants.append(value.detach().clone())
        self.constant_sources.update((id(value), id(value._base)))  # (a view's source: the attribute it views)
        return _Const(len(self.constants) - 1, value.shape)

    def _tracked(self, t):
        return isinstance(t, torch.Tensor) and (id(t) in self.names or id(t) in self.derived)

    def _before_in_place(self, func, args, kwargs):
        """For an in-place op (``w.add_(...)``, ``w[0] = ...``) that involves Cp's parameters or values computed
        from them and no activation: the templates of its arguments taken before it runs (a constant it
        changes is kept as it was), after refusing what CI could not repeat.  None for other ops."""
        if not (_in_place(func) or func is torch.Tensor.__setitem__):
            return None
        tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors or not any(self._tracked(t) for t in tensors):
            return None
        target, where = tensors[0], f"{self.stack[-1]}: {_func_name(func)}"
        if id(target) in self.names or target._base is not None and id(target._base) in self.names:
            raise ConversionError(f"{where} changes the parameter or buffer "
                                  f"{self.names.get(id(target), self.names.get(id(target._base)))!r} of Cp in place "
                                  f"during its forward; CI cannot repeat that")
        templates = (_map_structure(args, self._template), _map_structure(kwargs, self._template))
        # tensors that share the changed memory keep their old expression: reading them later is refused
        base = target if target._base is None else target._base
        shared = [t for t in self.alive + [base]
                  if t is not target and (t is base or getattr(t, "_base", None) is base)]
        for t in shared:
            self.stale[id(t)] = (f"{where} changed a value computed from Cp's parameters in place, and this one shares "
                                 f"its memory (a view); CI cannot follow changes through views: compute it out of "
                                 f"place (torch.where, torch.cat, or clone() before changing it)")
        return templates

    def _record_derived(self, func, args, kwargs, out, in_place=None):
        """Record a computation from Cp's parameters or buffers alone (no activation) as an expression that CI
        evaluates again at run time, rather than a constant that would keep the values of conversion time.
        ``in_place``: the templates of :meth:`_before_in_place`; the changed tensor's expression is replaced."""
        if in_place is not None:
            target = next(t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            self.expressions.append((func, *in_place, True))
            self.expression_no_grad.append(self._gradients_off(self.stack[-1]))
            self.derived[id(target)] = _Derived(len(self.expressions) - 1, 0, target.shape)
            self.alive.append(target)
            return
        inputs = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(self._tracked(t) for t in inputs):
            return
        outputs = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        if not outputs:  # metadata (.shape, .size()), or a value read as a Python number: frozen into CI
            if name in _VALUE_READS:
                self._refuse_value_read(func, inputs)
            return
        if all(self._tracked(t) for t in outputs):
            return  # it returned its input (.to() of the same dtype and device, .contiguous(), ...): nothing new
        self.expressions.append((func, _map_structure(args, self._template), _map_structure(kwargs, self._template),
                                 False))
        self.expression_no_grad.append(self._gradients_off(self.stack[-1]))
        for leaf, t in enumerate(outputs):
            self.derived[id(t)] = _Derived(len(self.expressions) - 1, leaf, t.shape)
            self.alive.append(t)

    def _refuse_value_read(self, func, inputs):
        """Refuse a read of Cp's parameters, or of a value computed from them, as a Python value (among ``inputs``;
        nothing for others)."""
        source = next((t for t in inputs if self._tracked(t)), None)
        if source is None:
            return
        what = f"the parameter or buffer {self.names[id(source)]!r}" if id(source) in self.names \
            else "a value computed from Cp's parameters"
        raise ConversionError(
            f"{self.stack[-1]}: {_func_name(func)} reads {what} as a Python value; CI would keep its "
            f"value of conversion time through training and load_state_dict (keep it a tensor: "
            f"x * self.scale, not x * self.scale.item())")

    def _note_writes(self, func, kwargs, activations, out_tensors, where):
        """After an op that changed activations in place (their memory's version moved): every other activation
        that views memory it wrote (elements in common, not just the same storage: the two halves of
        x.chunk(2, 1) do not) keeps its recorded expression, which no longer gives its values; reading it later
        is refused (``self.changed``)."""
        moved = [t for t in activations if _version(t) != self.version_of.get(id(t))]
        if not moved:
            return
        inputs = {id(t) for t in activations}
        written = [t for t in out_tensors if id(t) in inputs]  # in-place ops return the tensor they change
        written += [t for t in _leaves(kwargs.get("out")) if isinstance(t, torch.Tensor)]
        outputs = {id(t) for t in out_tensors}
        for target in written or moved:
            memory = _memory_of(target)
            if memory is None:  # (a tensor without storage: its views cannot be told apart from others')
                continue
            for other in self.sharing.get(memory, ()):
                if id(other) not in outputs and other is not target and _overlap(other, target):
                    self.changed[id(other)] = f"{_func_name(func)} (in {where})"
        for t in moved:
            for other in self.sharing.get(_memory_of(t), ()):
                self.version_of[id(other)] = _version(other)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        activations = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) in self.slot_of]
        in_slots = [self.slot_of[id(t)] for t in activations]
        # an activation whose memory an in-place op changed after it was recorded (through a view of it, the
        # tensor it views, or another view of that memory): its recorded expression no longer gives its values
        stale = [t for t in activations if id(t) in self.changed]
        in_place = None if in_slots else self._before_in_place(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if in_slots and name in ("register_hook", "register_post_accumulate_grad_hook"):
            self.note_hazard("tensor hook", f"a hook on the gradient of an activation (Tensor.{name}, in "
                                            f"{self.stack[-1]})")
            return func(*args, **kwargs)
        if name in _RANDOM_FUNCTIONS and getattr(func, "__module__", "") != "torch.nn.functional" and \
                kwargs.get("generator") is None:  # (one of Cp's own, seeded at every call, draws alike; the
            # self-check sees the others)
            raise ConversionError(
                f"{self.stack[-1]}: {_func_name(func)} draws random numbers as Cp runs, so Cp's output changes from "
                f"call to call (also in eval mode), which CI, one pass over whole images, cannot reproduce; draw "
                f"them once outside forward (a buffer), or drop them at inference")
        if name in _VALUE_READS:  # (before it runs: numpy() refuses values that require grad)
            if in_slots:
                raise ConversionError(
                    f"{self.stack[-1]}: {_func_name(func)} reads the values of an activation (data-dependent "
                    f"control flow or a Python number computed from the patch); CI cannot reproduce that")
            self._refuse_value_read(func, [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)])
        if in_slots and name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "grad_fn" \
                and not _called_by_torch_hooks():  # (module backward hooks read it: noted as such)
            self.note_hazard("grad_fn", f"an activation's autograd node (Tensor.grad_fn, in {self.stack[-1]}; hooks "
                                        f"registered on it)")
        with torch.no_grad() if in_slots and kwargs.get("out") is not None else contextlib.nullcontext():
            out = func(*args, **kwargs)  # (out= refuses values that require grad)
        if not in_slots:
            self._record_derived(func, args, kwargs, out, in_place)
            return out
        if func in _NEW_TENSOR_METHODS:
            return out  # a constant, captured where an op reads it
        where = self.stack[-1]
        out_tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
        if not out_tensors:
            is_getter = getattr(func, "__name__", "") == "__get__"
            attr = getattr(getattr(func, "__self__", None), "__name__", None) if is_getter else None
            if func in _METADATA_METHODS or attr in _METADATA_ATTRS:
                return out
            if func is torch.Tensor.__setitem__:
                raise ConversionError(
                    f"{where}: Tensor.__setitem__ writes into an activation in place (x[...] = value), which CI "
                    f"cannot follow; compute it out of place (torch.where with a mask, torch.cat of the parts, or "
                    f"a multiplication by a mask)")
            raise ConversionError(
                f"{where}: {_func_name(func)} reads the values of an activation (data-dependent "
                f"control flow or a Python number computed from the patch); CI cannot reproduce that")
        if stale:
            raise ConversionError(
                f"{where}: {_func_name(func)} reads an activation whose memory {self.changed[id(stale[0])]} changed "
                f"in place through another tensor that shares it (a view such as y[:, :2] or y.view(...), or the "
                f"tensor a view was taken of), after the activation was computed; CI cannot follow changes through "
                f"views: compute it out of place (torch.cat of the parts, torch.where with a mask, or clone() "
                f"before changing it)")
        self._note_writes(func, kwargs, activations, out_tensors, where)
        args_t = _map_structure(args, self._template)
        kwargs_t = _map_structure(kwargs, self._template)
        in_shapes = [self.shapes[s] for s in in_slots]
        out_slots = []
        for t in out_tensors:
            self.version_of[id(t)] = _version(t)
            self.changed.pop(id(t), None)
            group = self.sharing.setdefault(_memory_of(t), [])
            if not any(u is t for u in group):
                group.append(t)
            self.slot_of[id(t)] = self.n_slots
            self.shapes[self.n_slots] = tuple(t.shape)
            self.alive.append(t)
            out_slots.append(self.n_slots)
            self.n_slots += 1
        node = _Node(func, args_t, kwargs_t, in_slots, in_shapes, out_slots, [tuple(t.shape) for t in out_tensors],
                     where, self.constants, no_grad=self._gradients_off(where))
        # an in-place op with gradients off changes the values of an activation that keeps its gradient path (a
        # straight-through clamp: with torch.no_grad(): y.clamp_(...)): CI's value passes gradients on unchanged
        node.straight_through = node.no_grad and _in_place(func) and activations[0].requires_grad and \
            any(t is activations[0] for t in out_tensors)
        self.nodes.append(node)
        return out

    def _gradients_off(self, where):
        """Whether Cp computes the op being recorded with gradients off (torch.no_grad() in its forward: CI does too).
        Inside the forward of a custom autograd.Function gradients are off too; where that Function's backward is
        in the graph of Cp's output, :meth:`finish` notes it as a gradient CI cannot give (a frozen part, under
        torch.no_grad(), is not); torch.utils.checkpoint's reentrant Function, whose backward differentiates the
        same ops, is transparent: CI computes them with gradients on."""
        if not self.watches_gradients:
            return False
        hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)(False)
        if hooks and getattr(hooks[0], "__module__", "") not in ("torch.utils.checkpoint", "torch.autograd.graph"):
            self.note_hazard("saved_tensors_hooks", f"hooks on the tensors autograd saves "
                                                    f"(torch.autograd.graph.saved_tensors_hooks, in {where})")
        return not torch.is_grad_enabled() and _running_function() not in _GRADIENT_TRANSPARENT_FUNCTIONS

    def note_hazard(self, key, what):
        """Record something of Cp's that changes its gradients in a way CI cannot follow (see DenseFeatureNet), once
        per ``key``."""
        if key not in self.hazard_keys:
            self.hazard_keys.add(key)
            self.hazards.append(what)

    def finish(self, out):
        """After the trace: the custom autograd.Functions whose backward the gradient of Cp's output passes through
        (its autograd graph), which CI cannot call, noted as gradients CI cannot give."""
        for node in _autograd_nodes(getattr(out, "grad_fn", None)):
            function = getattr(node, "_forward_cls", None)
            if function is not None and function not in _GRADIENT_TRANSPARENT_FUNCTIONS:
                self.note_hazard(function, f"the custom autograd.Function {function.__name__} (CI computes its "
                                           f"forward from the ops inside it, and cannot call its backward)")

    def _from_input(self, value):
        """Whether ``value`` (a tensor the trace has not recorded) is computed from the example (its autograd graph
        reaches the example's)."""
        return any(getattr(node, "variable", None) is self.input_leaf for node in _autograd_nodes(value.grad_fn))


def _autograd_nodes(grad_fn):
    """The nodes of the autograd graph that ends in ``grad_fn`` (None: none), each once."""
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))


# ---------------------------------------------------------------------------
# Automatic conversion, 2: the steps CI runs (what the rules return)
# ---------------------------------------------------------------------------

class _Step:
    """One operation of CI: reads the dense values of ``inputs`` (slots), returns those of ``outputs``.

    ``aliases`` is True when the outputs share memory with the first input (identity ops and
    reshapes); the plan uses it so that no in-place op changes a value that is still read.
    ``per_pixel`` is True when the step reads each position of its inputs alone (no neighbours), so
    that it gives the same values whether the shifts of a stride are stacked on the batch axis or
    left in place (see :func:`_dense_tail`).
    """
    aliases = False
    per_pixel = False
    no_grad = False  # Cp computed it with gradients off (torch.no_grad() in its forward): CI does too
    straight_through = False  # ... in place, on a value whose gradient path it kept: CI's passes gradients on

    def __init__(self, inputs, outputs, label):
        self.inputs, self.outputs, self.label = list(inputs), list(outputs), label

    def run(self, values, net, overwrite=False):  # pragma: no cover - abstract
        """Return the list of output tensors.  ``overwrite``: the step may reuse its input's memory."""
        raise NotImplementedError


class _AliasStep(_Step):
    """The value passes through unchanged (dropout at inference, clone, views and reshapes)."""
    aliases = True
    per_pixel = True

    def __init__(self, node, label=None):
        super().__init__(node.in_slots[:1], node.out_slots, label or f"{node.name} (identity)")

    def run(self, values, net, overwrite=False):
        return [values[0]]


class _CallStep(_Step):
    """Applies the recorded function itself to dense values (ops that act per pixel).

    The in-place variant is used only where the plan allows it (the input, and every value sharing
    its memory, is not read afterwards) and autograd is not recording, so a user's in-place op
    never changes the padded image, a value read later, or a value saved for backward.
    """
    per_pixel = True

    def __init__(self, node, func=None, args=None, kwargs=None):
        super().__init__(node.in_slots, node.out_slots, node.name)
        self.func = func or node.func
        self.args = node.args if args is None else args
        self.kwargs = node.kwargs if kwargs is None else kwargs
        self.variants = _inplace_variants(self.func)

    def run(self, values, net, overwrite=False):
        env = dict(zip(self.inputs, values))

        def sub(v):
            if isinstance(v, _Ref):
                return env[v.slot]
            if isinstance(v, _OPERANDS):
                return net._resolve(v)
            return v
        args, kwargs = _map_structure(self.args, sub), _map_structure(self.kwargs, sub)
        in_place, out_of_place, flag = self.variants
        if flag:
            out = self.func(*args, **dict(kwargs, inplace=overwrite))
        else:
            out = (in_place if overwrite else out_of_place)(*args, **kwargs)
        return [t for t in _leaves(out) if isinstance(t, torch.Tensor)]

_INPLACE_TWINS = {torch.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_, torch.relu: torch.relu_,
                  torch.Tensor.tanh: torch.Tensor.tanh_, torch.Tensor.sigmoid: torch.Tensor.sigmoid_,
                  torch.Tensor.relu: torch.Tensor.relu_}


def _inplace_variants(func):
    """(in-place version, out-of-place version, takes an ``inplace`` flag) of an element-wise function."""
    try:
        if "inplace" in inspect.signature(func).parameters:
            return func, func, True
    except (TypeError, ValueError):
        pass
    if func in _INPLACE_TWINS:
        return _INPLACE_TWINS[func], func, False
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):  # an in-place function (x.relu_(), torch.relu_, F.elu_)
        for space in (torch.Tensor, torch, F):
            if getattr(space, name, None) is func and callable(getattr(space, name[:-1], None)):
                return func, getattr(space, name[:-1]), False
        return func, _OnACopy(func), False  # (no out-of-place twin: on a copy, never on a value still read)
    return func, func, False


class _OnACopy:
    """The out-of-place form of an in-place function without a twin: the function applied to a copy of its first
    argument (picklable, unlike a closure)."""

    def __init__(self, func):
        self.func = func

    def __call__(self, x, *args, **kwargs):
        return self.func(x.clone(), *args, **kwargs)


class _PoolStep(_Step):
    """Multipooling (stride 1 when the pooling is global over the patch-level map)."""
    split_ties = False  # amax / amin over positions: the gradient is shared among tied extrema (max_pool2d's is not)

    def __init__(self, node, kind, kernel, stride, dilation=(1, 1), norm_type=2.0, divisor_override=None):
        super().__init__(node.in_slots[:1], node.out_slots, f"multi_pool({kind}, kernel={kernel}, stride={stride})")
        self.kind, self.kernel, self.stride, self.dilation = kind, kernel, stride, dilation
        self.norm_type, self.divisor_override = norm_type, divisor_override

    @property
    def per_pixel(self):
        return self.kernel == (1, 1) and self.stride == (1, 1)

    def run(self, values, net, overwrite=False):
        if self.split_ties and _autodiff_watches(values[0]) and not torch.jit.is_tracing():  # (stride 1: a pooling
            # over positions of the patch; torch.jit.trace's check of its graph fails on the split, so a traced CI
            # gives the gradient at exact ties to one tied pixel, as max pooling does)
            return [_pool_split_ties(values[0], self.kind, self.kernel)]
        # no shifts to compute: none that an output uses (output_stride), or stride 1 in naive mode (the global
        # kinds "sum" and "min" among them, which multi_pool does not take)
        if net._without_shifts(self) or (net.naive and self.stride == (1, 1)):
            pooled = _pool(values[0], self.kind, self.kernel, self.stride, self.dilation, self.norm_type,
                           self.divisor_override)
            return [_first_shift(pooled, values[0], self.kernel, self.dilation, self.stride)]
        if not net.naive:  # one stride-1 pooling as in multi_pool, in the input's memory where the plan allows it
            pooled = _pool(values[0], self.kind, self.kernel, (1, 1), self.dilation, self.norm_type,
                           self.divisor_override, overwrite)
            if self.stride == (1, 1) or net._shifts_in_place(self):  # no shifts to stack, or they stay in place
                return [pooled]
            return [space_to_batch(pooled, self.stride)]
        return [multi_pool(values[0], self.kind, self.kernel, self.stride, self.dilation, net.naive,
                           self.norm_type, self.divisor_override)]


def _first_shift(y, x, kernel, dilation, stride):
    """``y``, a strided layer's output on ``x`` run without its shifts (output_stride), as multipooling's first
    shift holds it: L // s positions per axis, L the size of its stride-1 output.  A plain strided layer gives
    ceil(L / s), one more where s does not divide L, which streams cropped differently before the layer would
    then not share (x[:, :, 1:, 1:] into a shortcut): their sizes would differ."""
    rows = (x.shape[2] - dilation[0] * (kernel[0] - 1)) // stride[0]
    cols = (x.shape[3] - dilation[1] * (kernel[1] - 1)) // stride[1]
    return y[:, :, :rows, :cols]


class _ConvStep(_Step):
    """A convolution of Cp (multi_conv when strided); also a Linear read as a convolution."""

    def __init__(self, node, weight, bias, stride, dilation, groups, weight_shape=None, label=None):
        kind = "multi_conv" if stride != (1, 1) else "conv2d"
        super().__init__(node.in_slots[:1], node.out_slots,
                         label or f"{kind}(stride={stride}, dilation={dilation}, groups={groups})")
        self.weight, self.bias = weight, bias
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.weight_shape = weight_shape

    @property
    def per_pixel(self):
        shape = self.weight_shape or self.weight.view or self.weight.shape
        return tuple(shape[-2:]) == (1, 1) and self.stride == (1, 1)

    def weights(self, net):
        """(weight, bias) as the convolution uses them, from Cp's current parameters."""
        weight = net._resolve(self.weight)
        if self.weight_shape is not None:
            weight = weight.reshape(self.weight_shape)
        return weight, None if self.bias is None else net._resolve(self.bias)

    def run(self, values, net, overwrite=False):
        weight, bias = self.weights(net)
        if net._without_shifts(self):
            return [_first_shift(F.conv2d(values[0], weight, bias, self.stride, 0, self.dilation, self.groups),
                                 values[0], weight.shape[2:], self.dilation, self.stride)]
        if net._shifts_in_place(self):  # only per-pixel steps follow: all shifts at once, left in place
            return [F.conv2d(values[0], weight, bias, 1, 0, self.dilation, self.groups)]
        return [multi_conv(values[0], weight, bias, self.stride, self.dilation, self.groups, net.naive)]


class _UnfoldStep(_Step):
    """Cp returns a flattened (C, h, w) map: gather its h*w shifts into channels (C, h, w order)."""

    def __init__(self, slot, geom):
        super().__init__([slot], [slot], f"flatten_output({geom.channels}x{geom.size[0]}x{geom.size[1]})")
        self.size = geom.size

    def run(self, values, net, overwrite=False):
        x = values[0]
        h, w = self.size
        cols = F.unfold(x, self.size)
        return [cols.reshape(x.shape[0], -1, x.shape[2] - h + 1, x.shape[3] - w + 1)]


# ---------------------------------------------------------------------------
# Automatic conversion, 3: the rules, one small function per kind of op (contract: see
# "the rule contract" in the framework-neutral block)
# ---------------------------------------------------------------------------

_ALL_SPACES = (torch, F, torch.Tensor, torch.special)


def _rule_for(names, label, spaces=_ALL_SPACES):
    """Decorator: register a rule for the functions called ``names`` in ``spaces`` (torch, F, Tensor)."""
    keys = [getattr(space, n) for n in names for space in spaces if callable(getattr(space, n, None))]

    def register(rule):
        return _register_rule(rule, keys, names, label)
    return register


_TRANSPOSED_RULES = set()  # the rules that handle transposed maps (TRANSPOSED); the others never see one


def _takes_transposed(rule):
    """Mark ``rule`` as one that handles transposed maps (ops per position along their channels, dim -1)."""
    _TRANSPOSED_RULES.add(rule)
    return rule


def _on_swapped(node, rule, geoms):
    """An op of maps with their positions transposed, (N, w, h, C) (``x.transpose(1, 3)`` of a map): a rule of
    transposed maps (_TRANSPOSED_RULES) sees them as transposed maps of size (w, h) and must give such a map on the
    same grid (the op ran per position: Linear, LayerNorm, softmax, element-wise ops); anything else is refused
    (transpose back first)."""
    view = [g.with_positions_transposed(TRANSPOSED) if g.kind == SWAPPED else g for g in geoms]
    out_geoms, reason = None, ""
    if rule in _TRANSPOSED_RULES and all(g.kind == SWAPPED for g in geoms):
        try:
            step, out_geoms = rule(node, view)
        except ConversionError as exc:  # (its reason, told of the map seen as (N, h, w, C))
            reason = f" (as a map of (N, h, w, C): {str(exc).split('cannot be made dense exactly: ', 1)[-1]})"
        if out_geoms is not None and all(g.kind == TRANSPOSED and g.size == view[0].size and
                                         g.strides == view[0].strides for g in out_geoms):
            return step, [g.with_positions_transposed(SWAPPED) for g in out_geoms]
    geom = next(g for g in geoms if g.kind == SWAPPED)
    error = node.fail(f"it is applied to {geom.describe()}, a map transposed to (N, w, h, C) (x.transpose(1, 3)); "
                      f"only ops per position along its channels (element-wise ops, Linear, LayerNorm, softmax, "
                      f"reductions over dim -1) of such maps alone can follow one: transpose it back first "
                      f"(x.transpose(1, 3)){reason}")
    error.taints_outputs = True  # (what follows is not judged again: its geometry would be a guess)
    raise error


def _on_rows(node, rule, geoms):
    """An op of the rows of a map, (N, h*w, C) (``x.flatten(2).transpose(1, 2)`` of a map: tokens), whose dense
    values are the transposed map's: a rule of transposed maps (_TRANSPOSED_RULES) sees them as the transposed map
    (N, h, w, C), their traced shapes left as they are (its channel axis, dim -1 or 2, is the map's dim -1, see
    _channel_dim), and must give such a map on the same grid with the channels of the traced rows; a mean, sum,
    amax or amin over the rows (dim 1) is the map's global pooling (_pool_rows).  Anything else is refused
    (transpose them back first)."""
    rows = next(g for g in geoms if g.kind == ROWS)
    reason = ""
    if all(g.kind == ROWS for g in geoms):
        if getattr(rule, "pool_kind", False) is not False:
            pooled = _pool_rows(node, rule.pool_kind, rows)
            if pooled is not None:
                return pooled
        if rule in _TRANSPOSED_RULES:
            try:
                step, out_geoms = rule(node, [g.with_(kind=TRANSPOSED) for g in geoms])
            except ConversionError as exc:  # (its reason, told of the rows seen as a map (N, h, w, C))
                reason = f" (as a map of (N, h, w, C): {str(exc).split('cannot be made dense exactly: ', 1)[-1]})"
                dim = node.bind(["input", "dim", "keepdim"], {"dim": None}).get("dim") \
                    if node.name.split(".")[-1] in ("max", "min") else None
                if isinstance(dim, numbers.Integral) and dim % 3 == 1:  # (rows.max(1): values and indices)
                    reason = (f"; torch.max / min over the rows also give indices, positions inside one patch: use "
                              f"{node.name.split('.')[-1].replace('m', 'am', 1)}(1)")
            else:
                positions = rows.size[0] * rows.size[1]
                if all(g.kind == TRANSPOSED and g.size == rows.size and g.strides == rows.strides and
                       tuple(shape[1:]) == (positions, g.channels) for g, shape in zip(out_geoms, node.out_shapes)):
                    return step, [g.with_(kind=ROWS) for g in out_geoms]
    error = node.fail(f"it is applied to {rows.describe()}, a map's positions as rows (x.flatten(2).transpose(1, "
                      f"2)); only ops per position along their channels (element-wise ops, Linear, LayerNorm, "
                      f"softmax, slices and reductions over dim -1) of such rows alone, and a mean, sum, amax or "
                      f"amin over the rows (dim 1), can follow them: transpose them back first (x.transpose(1, "
                      f"2)){reason}")
    error.taints_outputs = True  # (what follows is not judged again: its geometry would be a guess)
    raise error


_GROUPS_OPS = ("element-wise ops, reductions (sum, mean, amax, amin, max, min, std, var, norm, logsumexp, median, "
               "...), softmax, normalize, cumulative ops, sorts and topk along the group axes, transposes among them, "
               "concatenations, splits, stacks, "
               "slices and indices along them, and reshapes back to a map (N, C, h, w)")


class _RegroupStep(_Step):
    """A reshape that keeps the positions: the dense map's channels (all its axes but the batch and the last two)
    regrouped as ``groups`` (a map's channels split: x.view(N, G, C // G, h, w)), or flattened back to one channel
    axis where ``groups`` is None.  Views where the memory allows, as Cp's reshape."""
    aliases = True
    per_pixel = True

    def __init__(self, node, groups):
        super().__init__(node.in_slots[:1], node.out_slots[:1], f"regroup_channels({groups})")
        self.groups = None if groups is None else tuple(int(g) for g in groups)

    def run(self, values, net, overwrite=False):
        v = values[0]
        if v.dim() > 4:
            v = v.flatten(1, v.dim() - 3)
        if self.groups is None:
            return [v]
        # (sizes read from the value, not unflatten's: TorchScript's ONNX exporter froze the whole graph's shapes)
        return [v.reshape(v.shape[0], *self.groups, v.shape[-2], v.shape[-1])]


class _OnMapStep(_Step):
    """Runs ``inner``, a step of maps, on values with group axes flattened back to the map (N, C, H, W)."""

    def __init__(self, inner):
        super().__init__(inner.inputs, inner.outputs, f"{inner.label} of the map")
        self.inner, self.per_pixel = inner, inner.per_pixel

    def run(self, values, net, overwrite=False):
        return self.inner.run([v.flatten(1, v.dim() - 3) if v.dim() > 4 else v for v in values], net, False)


class _GroupsCallStep(_CallStep):
    """:class:`_CallStep` of an op along the group axes whose outputs lose them all, (N, h, w): each output kept as
    the one-channel map (N, 1, H, W) that the dense values of such a value are (the op runs with keepdim=True)."""

    def run(self, values, net, overwrite=False):
        return [t.flatten(1, t.dim() - 3) if t.dim() > 4 else t for t in super().run(values, net, overwrite)]


def _geom_of_groups(geom, shape):
    """The geometry of a value of traced ``shape`` made from values of ``geom``'s grid by an op along group axes:
    (N, g1, ..., gk, h, w) with k >= 2 GROUPS, (N, C, h, w) a MAP, (N, h, w) the view of a one-channel map."""
    shape = tuple(shape)
    if len(shape) >= 5:
        return geom.with_(kind=GROUPS, groups=shape[1:-2])
    if len(shape) == 4:
        return geom.with_(kind=MAP, channels=shape[1])
    return geom.with_(kind=MAP, channels=1).with_(kind=VIEW)


def _groups_dims(node, dims, rank, what):
    """``dims`` (ints, any sign) of a value of ``rank`` made non-negative, or the op's ConversionError where one
    is the batch or a position axis (the last two)."""
    out = []
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool):
            raise node.fail(f"it {what} along {d!r}, which convert cannot read as an axis")
        d = int(d) % rank
        if d == 0:
            raise node.fail(f"it {what} along the batch of patches (dim 0)")
        if d >= rank - 2:
            pooling = " (for a global pooling, reshape it back to the map (N, C, h, w) first)" \
                if what == "reduces" else ""
            raise node.fail(f"it {what} along dim {d}, a position axis of the patch (the last two of a map with its "
                            f"channels split into groups), which mixes positions of the patch; only the group axes "
                            f"(dims 1 to {rank - 3}) can be made dense{pooling}")
        out.append(d)
    return out


def _groups_constant(node, value, rank):
    """A constant operand of an element-wise op of values with group axes: as it is where it is the same for every
    patch and every position (its batch and last two axes of size 1 once broadcast to ``rank``)."""
    if not isinstance(value, (torch.Tensor,) + _OPERANDS):
        return value
    shape = tuple(value.shape)
    padded = (1,) * (rank - len(shape)) + shape
    if _prod(shape) == 1 or (len(shape) <= rank and padded[0] == 1 and padded[-2:] == (1, 1)):
        return value
    raise node.fail(f"a constant of shape {shape} differs across positions of the patch or across patches, so "
                    f"overlapping patches cannot share work")


def _on_groups(node, rule, geoms):
    """An op of a map with its channels split into group axes (GROUPS, (N, g1, ..., gk, h, w)), whose dense values
    have the same axes (CI's batch and positions): an op along group axes only runs on them as it is (_CallStep), a
    reshape that keeps the positions regroups them (_RegroupStep).  Anything else is refused (reshape back to the
    map (N, C, h, w) first)."""
    groups = next(g for g in geoms if g.kind == GROUPS)
    shape, name = tuple(node.in_shapes[0]), node.name.split(".")[-1]
    rank = len(shape)
    if rule is _rule_reshape or rule is _rule_crop and None in _index_of(node) and all(
            i is None or i is Ellipsis or i == slice(None) for i in _index_of(node)):  # (x[:, None])
        return _reshape_groups(node, groups)
    if rule in (_rule_identity, _rule_dropout):
        return rule(node, geoms)
    if any(g.kind != GROUPS for g in geoms):
        other = next(g for g in geoms if g.kind != GROUPS)
        raise node.fail(f"it combines {groups.describe()} with {other.describe()}; give both the same axes first "
                        f"(x.unsqueeze(1) of a map is (N, 1, C, h, w))")
    _same_grid(node, geoms)
    empty = next((tuple(out) for out in node.out_shapes if 0 in tuple(out)), None)
    if empty is not None:
        raise node.fail(f"it gives an empty value (shape {empty}) of {groups.describe()}")
    bound = node.bind(["input", "dim", "keepdim"], {"dim": None}) if rule is _rule_max_min else {}
    elementwise = rule in (_rule_elementwise, _rule_rrelu) or rule is _rule_max_min and isinstance(
        bound.get("other", bound.get("dim")), (torch.Tensor, _Ref) + _OPERANDS)  # (torch.max(x, y))
    if elementwise:
        if rule is _rule_rrelu and node.bind(["input", "lower", "upper", "training"], {"training": False})["training"]:
            return rule(node, geoms)  # (its refusal)
        for in_shape in node.in_shapes:
            for out in node.out_shapes:
                if len(in_shape) != len(out) or in_shape[0] != out[0] or tuple(in_shape[-2:]) != tuple(out[-2:]):
                    raise node.fail(f"its output {tuple(out)} does not have the batch and positions of its input "
                                    f"{tuple(in_shape)} (broadcasting an activation over the patch is not per-pixel)")
        args = _map_structure(node.args, lambda v: _groups_constant(node, v, rank))
        kwargs = _map_structure(node.kwargs, lambda v: _groups_constant(node, v, rank))
        return _CallStep(node, args=args, kwargs=kwargs), [_geom_of_groups(groups, s) for s in node.out_shapes]
    reduction = getattr(rule, "pool_kind", False) is not False or rule in (_rule_max_min, _rule_statistic)
    dim_of = {"softmax": ("dim", 1), "log_softmax": ("dim", 1), "softmin": ("dim", 1), "normalize": ("dim", 2),
              "topk": ("dim", 2), "glu": ("dim", 1), "cat": ("dim", 1), "concat": ("dim", 1), "concatenate": ("dim", 1),
              "split": ("dim", 2), "chunk": ("dim", 2), "tensor_split": ("dim", 2), "flip": ("dims", 1)}
    step = None
    if reduction:
        names = _reduce_signature(node)
        if rule is _rule_statistic:
            names = ["input", "dim", "unbiased", "keepdim"]
        p = node.bind(names, {"dim": None, "keepdim": False}) if rule is _rule_statistic else _bind_reduction(node)
        if p["dim"] is None:
            raise node.fail("it reduces over the whole tensor, batch included")
        dims = [p["dim"]] if isinstance(p["dim"], numbers.Integral) else list(p["dim"])
        if sorted({int(d) % rank for d in dims}) == list(range(1, rank)):
            # every entry (a global reduction of the patch): the map's, on the map that holds the same values
            step, out_geoms = rule(node, [groups.with_(kind=VIEW)])
            return _OnMapStep(step), out_geoms
        _groups_dims(node, dims, rank, "reduces")
        if any(len(out) < 4 for out in node.out_shapes):  # every group axis reduced away: kept, as a map of one
            step = _GroupsCallStep(node, kwargs=dict(node.kwargs, keepdim=True),  # channel, (N, 1, H, W)
                                   args=tuple(node.args[:names.index("keepdim")]))
    elif getattr(rule, "along_channels", False) or rule in (_rule_glu, _rule_cat, _rule_split, _rule_channel_order):
        key, position = dim_of.get(name, ("dim", 1))  # (index_select(input, dim, index) too)
        values = dict(zip(["input"] + [None] * (position - 1) + [key], node.args))
        values.update(node.kwargs)
        dim = values.get(key, 0 if rule in (_rule_cat, _rule_split) else None)
        if dim is None:
            raise node.fail("it works along an implicit axis; pass dim=")
        if rule is _rule_cat and not all(isinstance(t, _Ref) for t in node.bind(["tensors", "dim"])["tensors"]):
            raise node.fail("it concatenates an activation with a constant")
        _groups_dims(node, list(dim) if isinstance(dim, (tuple, list)) else [dim], rank, "works")
    elif rule is _rule_transpose:
        index = torch.arange(_prod(shape)).reshape(shape)
        moved = node.func(index, *node.args[1:], **node.kwargs)
        kept = [0, rank - 2, rank - 1]
        if moved.dim() != rank or [moved.shape[d] for d in kept] != [shape[d] for d in kept] \
                or not _permutes_group_axes(index, moved, rank):
            raise node.fail(f"it transposes {groups.describe()} so that a position axis or the batch moves; only "
                            f"the group axes (dims 1 to {rank - 3}) can be reordered")
    elif rule is _rule_stack:
        p = node.bind(["tensors", "dim"], {"dim": 0})
        if not all(isinstance(t, _Ref) for t in p["tensors"]):
            raise node.fail("it stacks an activation with a constant")
        _groups_dims(node, [p["dim"]], rank + 1, "stacks")
    elif rule is _rule_crop:
        _groups_index(node, rank)
    else:
        raise node.fail(f"it is applied to {groups.describe()}; only {_GROUPS_OPS} can follow one: reshape it back to "
                        f"the map (N, C, h, w) first")
    step = step or _CallStep(node)
    step.aliases = rule in (_rule_transpose, _rule_split, _rule_crop, _rule_unbind)  # (views of the input)
    return step, [_geom_of_groups(groups, s) for s in node.out_shapes]


_SUPPORTED.setdefault(f"maps with their channels split into group axes, (N, g1, ..., gk, h, w): by a reshape "
                      f"(x.view(N, G, C // G, h, w): maxout, channel shuffle) or a stack of maps along dim 1 or 2; "
                      f"then {_GROUPS_OPS}", set()).update(["view", "reshape", "unflatten", "stack"])


def _permutes_group_axes(index, moved, rank):
    """Whether ``moved`` (an op applied to ``index``, the arange of a traced shape) only reorders the group axes:
    every entry keeps its batch and position indices."""
    shape = tuple(index.shape)
    coords = torch.stack(torch.unravel_index(moved.flatten(), shape))  # (rank, entries): where each came from
    mine = torch.stack(torch.unravel_index(torch.arange(moved.numel()), tuple(moved.shape)))
    return all(torch.equal(coords[d], mine[d]) for d in (0, rank - 2, rank - 1))


def _index_of(node):
    """The index of a recorded ``x[index]`` as a tuple."""
    index = node.args[1] if len(node.args) > 1 else None
    return index if isinstance(index, tuple) else (index,)


def _constant_index(node, rank, reason):
    """The index of a recorded ``x[index]`` of a value of ``rank`` dims, one entry per dim (the Ellipsis expanded,
    the dims after it filled with full slices), or the op's ConversionError (``reason``) where it holds anything but
    ints, slices and one Ellipsis."""
    index = _index_of(node)
    if sum(i is Ellipsis for i in index) > 1 or not all(
            i is Ellipsis or isinstance(i, slice) or isinstance(i, numbers.Integral) and not isinstance(i, bool)
            for i in index):
        raise node.fail(f"it indexes with {index!r}; {reason}")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    return index + (slice(None),) * (rank - len(index))


def _groups_index(node, rank):
    """Check ``x[index]`` of a value with group axes: constant ints and slices of the group axes only."""
    if node.name.endswith("narrow"):
        p = node.bind(["input", "dim", "start", "length"])
        _groups_dims(node, [p["dim"]], rank, "narrows")
        return
    index = _constant_index(node, rank, "only constant slices and indices of the group axes can be made dense")
    for d, i in enumerate(index):
        if (d == 0 or d >= rank - 2) and i != slice(None):
            raise node.fail(f"it indexes dim {d} ({i!r}), {'the batch' if d == 0 else 'a position axis'} of a map "
                            f"with its channels split into groups; only the group axes (dims 1 to {rank - 3}) can be "
                            f"sliced or indexed")
        if isinstance(i, slice) and not all(v is None or isinstance(v, numbers.Integral)
                                            for v in (i.start, i.stop, i.step)):
            raise node.fail("it slices by amounts computed from the data")


def _reshape_groups(node, geom):
    """A reshape of a map with its channels split into groups: to (N, g'..., h, w) its channels regrouped, to
    (N, C, h, w) the map; to anything else (flatten(1), (N, C, h*w)) the map's reshape (its values in Cp's
    (C, h, w) order either way)."""
    src, dst = tuple(node.in_shapes[0]), tuple(node.out_shapes[0])
    (h, w), c = geom.size, geom.channels
    if len(dst) < 1 or dst[0] != src[0] or _prod(dst[1:]) != c * h * w:
        raise node.fail(f"it reshapes {src} to {dst}, which moves values between patches (the batch axis)")
    if len(dst) >= 5 and dst[-2:] == (h, w):
        return _RegroupStep(node, dst[1:-2]), [geom.with_(kind=GROUPS, groups=dst[1:-2])]
    return _RegroupStep(node, None), [_geom_of_shape(geom.with_(kind=MAP), dst)]


def _lookup_rule(func):
    """The rule registered for ``func`` (Tensor's Python-level wrappers found by their name)."""
    rule = _RULES.get(func)
    if rule is None:
        # Tensor.__rsub__ & co. are wrapped in Python; fall back to the wrapped builtin's name.
        name = getattr(func, "__name__", None)
        rule = next((r for f, r in _RULES.items() if getattr(f, "__name__", None) == name
                     and getattr(f, "__qualname__", "").startswith(("Tensor.", "TensorBase."))
                     and getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase."))), None)
    return rule


# --- helpers shared by rules ------------------------------------------------

def _require_map(node, geom):
    if geom.kind != MAP:
        raise node.fail(f"its input is {geom.describe()}, not an image-like map")


def _geom_of_shape(geom, shape):
    """``geom``'s values as a tensor of traced ``shape`` (the batch axis kept, as many values): (N, C, h, w) is a
    MAP, (N, C*h*w) a VECTOR (torch's C, H, W order), any other shape a VIEW."""
    (h, w), c, shape = geom.size, geom.channels, tuple(shape)
    return geom.with_(kind=MAP if shape[1:] == (c, h, w) else VECTOR if shape[1:] == (c * h * w,) else VIEW)


def _view_by_channel(geom, shape) -> bool:
    """Whether ``shape``, the traced shape of a reshape (VIEW) of a map or of a vector of one position, keeps the
    channels on dim 1 ((N, C, h*w), the (N, C, 1) of a 1x1 map): the map's C-major order leaves each channel's
    values, for every position, at its index of dim 1."""
    return ((geom.kind == VIEW or geom.kind == VECTOR and geom.is_pixel_vector) and len(shape) >= 2
            and shape[1] == geom.channels and _prod(shape[2:]) == geom.size[0] * geom.size[1])


def _channel_dim(geom, dim, node):
    """Dense channel axis for ``dim`` of a patch tensor, or raise if ``dim`` is spatial or the batch (also for
    reshapes that keep the channels on dim 1, :func:`_view_by_channel`)."""
    shape = tuple(node.in_shapes[0]) if node.in_shapes else ()
    view_by_channel = _view_by_channel(geom, shape)
    rank = 4 if geom.kind in (MAP, TRANSPOSED) else len(shape) if view_by_channel else 2
    if geom.kind == TRANSPOSED and len(shape) == 3:  # the rows of a map, (N, h*w, C), seen as one (see _on_rows)
        rank = 3
    d = dim + rank if dim < 0 else dim
    if geom.kind == TRANSPOSED:
        if d == rank - 1:
            return 3
        raise node.fail(f"it works along dim {dim} of {geom.describe()}, which mixes positions of the patch; only "
                        f"the channel axis (dim -1 of a transposed map) can be made dense")
    if d == 1 and (geom.kind == MAP or geom.is_pixel_vector or view_by_channel):
        return 1
    if d == 0:
        raise node.fail(f"it works along dim {dim}, the batch of patches; only the channel axis (dim 1) can be made "
                        f"dense")
    raise node.fail(f"it works along dim {dim} of {geom.describe()}, which mixes positions of the patch; "
                    f"only the channel axis (dim 1) can be made dense")


def _channels_of(geom, shape) -> int:
    """The channel count of a value of traced ``shape`` with ``geom``'s layout (dim -1 of a transposed map)."""
    return int(shape[-1] if geom.kind == TRANSPOSED else shape[1])


def _same_at_every_position(value, geom, node):
    """A constant of Cp's forward (``torch.zeros(x.shape)``, ``torch.full(x.shape, c)``, ``x.new_ones(...)``)
    whose entries are the same at every position of the patch and for every patch of the example batch: the
    one value per channel it holds, as a new constant of shape (1, C, 1, 1) (a map) or (1, C) (a vector of one
    position), which broadcasts to the same values.  Exact, since such a constant does not depend on the
    input; parameters and values computed from them (which training may make differ) are never replaced.
    ``value`` otherwise."""
    if not isinstance(value, _Const) or value.view is not None or not (geom.kind in (MAP, TRANSPOSED)
                                                                        or geom.is_pixel_vector):
        return value
    rank, tensor = (4 if geom.kind in (MAP, TRANSPOSED) else 2), node.constants[value.index]
    if tensor.dim() > rank:
        return value
    tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))  # as it broadcasts
    first = tensor[:1, :, :1, :1] if geom.kind == MAP else tensor[:1, :1, :1, :] if geom.kind == TRANSPOSED \
        else tensor[:1]
    if first.shape == tensor.shape or not _all_equal(tensor, first.expand_as(tensor)):
        return value
    node.constants.append(first.clone())
    return _Const(len(node.constants) - 1, first.shape)


def _all_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values, NaN equal to NaN."""
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same = same | (a.isnan() & b.isnan())
    return bool(same.all())


def _constant_for(geom, value, node):
    """Reshape a constant operand so that it broadcasts per pixel on the dense tensor."""
    if not isinstance(value, (torch.Tensor,) + _OPERANDS):
        return value
    value = _same_at_every_position(value, geom, node)
    shape = tuple(value.shape)
    if _prod(shape) == 1 and len(shape) <= (4 if geom.kind in (MAP, TRANSPOSED) else 2):
        return value
    if geom.kind == TRANSPOSED:  # (h, w, C) per patch: constants of shape (C,), (1, 1, 1, C) are per channel
        if len(shape) <= 4 and all(n == 1 for n in ((1,) * (4 - len(shape)) + shape)[:3]):
            return value
        raise node.fail(f"a constant of shape {shape} differs across positions of the patch ({geom.describe()}), "
                        f"so overlapping patches cannot share work")
    if geom.kind == MAP:
        padded = (1,) * (4 - len(shape)) + shape
        if len(shape) <= 4 and padded[0] == 1 and padded[2] == 1 and padded[3] == 1:
            return value
        batch = node.in_shapes[0][0] if node.in_shapes and node.in_shapes[0] else None
        if len(shape) == 4 and batch and batch > 1 and padded[0] == batch and padded[2] == padded[3] == 1:
            raise node.fail(f"a constant of shape {shape} has one entry per patch of the example batch convert "
                            f"traces ({batch} patches), as a value expanded or repeated to the batch size "
                            f"(p.expand(x.shape[0], ...)) has; leave the batch axis to broadcasting (x + p with p "
                            f"of shape (1, C, 1, 1)), which CI can make dense")
        if isinstance(value, (_Param, _Derived)):
            what = f"the parameter or buffer {value.name!r}" if isinstance(value, _Param) \
                else "a value computed from Cp's parameters"
            raise node.fail(f"{what} has shape {shape}, one entry per position of the patch ({geom.describe()}), "
                            f"which may differ (training changes them), so overlapping patches cannot share work")
        raise node.fail(f"a constant of shape {shape} differs across positions of the patch "
                        f"({geom.describe()}), so overlapping patches cannot share work")
    if geom.kind == VECTOR and geom.size == (1, 1) and len(shape) <= 2 and (len(shape) < 2 or shape[0] == 1):
        view = (1, shape[-1], 1, 1)
        return value.reshape(view) if isinstance(value, torch.Tensor) else value.with_view(view)
    raise node.fail(f"a constant of shape {shape} differs across the entries of {geom.describe()}")


def _check_same_shape(node, channels_may_broadcast=False, channel_dim=1):
    """The output has the shape of every activation the op reads; with ``channels_may_broadcast``, an input
    of one channel (on ``channel_dim``) may stand against C (the same value for every channel of a pixel is
    still per pixel)."""
    for shape in node.out_shapes:
        for in_shape in node.in_shapes:
            d = channel_dim % len(shape) if shape else 0
            broadcast = channels_may_broadcast and len(shape) > 1 and len(in_shape) == len(shape) \
                and in_shape[d] == 1 and in_shape[:d] + in_shape[d + 1:] == shape[:d] + shape[d + 1:]
            if shape != in_shape and not broadcast:
                raise node.fail(f"its output {shape} does not have the shape of its input {in_shape} "
                                f"(broadcasting an activation over the patch is not per-pixel)")


def _padding_of(p, kernel=None):
    """Whether ``padding`` pads: "same" pads nothing for a 1x1 ``kernel``."""
    if p == "same" and kernel is not None and tuple(kernel) == (1, 1):
        return False
    return any(v != 0 for v in _padding_values(p))


# --- the rules ----------------------------------------------------------------

@_takes_transposed
@_rule_for(["relu", "relu_", "relu6", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
            "leaky_relu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_",
            "softplus", "softsign", "softshrink", "hardshrink", "tanhshrink", "logsigmoid", "threshold",
            "threshold_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "abs_", "exp", "exp_",
            "log", "log_", "log1p", "expm1", "sqrt", "sqrt_", "rsqrt", "square", "neg", "neg_", "sign", "erf",
            "reciprocal", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "pow", "pow_", "add", "add_",
            "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "maximum", "minimum", "where",
            "float", "double", "half", "bfloat16", "long", "int", "short", "bool", "to", "type_as", "sin", "cos",
            "atan", "floor", "ceil", "round", "trunc", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
            "__isub__",
            "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
            "__pow__", "__rpow__", "__neg__", "__abs__", "rsub", "gt", "lt", "ge", "le", "eq", "ne", "greater",
            "less", "greater_equal", "less_equal", "not_equal", "__gt__", "__lt__", "__ge__", "__le__", "__eq__",
            "__ne__", "logical_and", "logical_or", "logical_xor", "logical_not", "__and__", "__or__", "__xor__",
            "__invert__", "isnan", "isinf", "isfinite", "nan_to_num", "zeros_like", "ones_like", "full_like",
            "masked_fill", "masked_fill_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_", "hypot",
            "atan2", "arctan2", "fmod", "fmod_", "remainder", "remainder_", "floor_divide", "floor_divide_",
            "__floordiv__", "__rfloordiv__", "__ifloordiv__", "__mod__", "__rmod__", "__imod__", "tan", "asin", "acos",
            "sinh", "cosh", "asinh", "acosh", "atanh", "arcsin", "arccos", "arctan", "arcsinh", "arccosh", "arctanh",
            "exp2", "log2", "log10", "logit", "xlogy", "copysign", "frac", "sinc", "erfc", "erfinv", "lgamma",
            "digamma", "heaviside", "fmax", "fmin", "float_power", "positive", "negative", "multiply", "divide",
            "subtract", "absolute", "fix", "deg2rad", "rad2deg", "signbit", "sgn", "logaddexp", "logaddexp2",
            "square_", "clamp_min_", "clamp_max_"],
           "element-wise functions, arithmetic, comparisons and casts (applied per pixel)")
def _rule_elementwise(node, geoms):
    """Element-wise functions (activations, arithmetic, casts; torch.special's too): applied unchanged (values of
    streams that pooled differently are unwarped first, see _merge_grids)."""
    geom, unwarps = _merge_grids(node, geoms)
    args = _map_structure(node.args, lambda v: _constant_for(geom, v, node))
    kwargs = _map_structure(node.kwargs, lambda v: _constant_for(geom, v, node))
    transposed = geom.kind == TRANSPOSED  # (then all are: _merge_grids)
    per_channel = all(g.kind in (MAP, TRANSPOSED) or g.is_pixel_vector or _view_by_channel(g, s)
                      for g, s in zip(geoms, node.in_shapes))
    _check_same_shape(node, channels_may_broadcast=per_channel, channel_dim=-1 if transposed else 1)
    if node.in_shapes[0] != node.out_shapes[0]:  # a one-channel value first (g * x): C channels out
        geom = geom.with_(channels=_channels_of(geom, node.out_shapes[0]))
    return _aligned(_CallStep(node, args=args, kwargs=kwargs), unwarps), [geom] * len(node.out_slots)


_SPECIAL_ELEMENTWISE = [n for n in ("expit", "logit", "erf", "erfc", "erfinv", "expm1", "exp2", "log1p", "sinc",
                                    "xlogy", "xlog1py", "ndtr", "ndtri", "log_ndtr", "i0", "i0e", "i1", "i1e",
                                    "gammaln", "digamma", "psi", "entr", "round")
                        if callable(getattr(torch.special, n, None))]  # (torch.special's element-wise functions)
_register_rule(_rule_elementwise, [getattr(torch.special, n) for n in _SPECIAL_ELEMENTWISE],
               [f"special.{n}" for n in _SPECIAL_ELEMENTWISE],
               "element-wise functions, arithmetic, comparisons and casts (applied per pixel)")


class _AlignedStep(_Step):
    """Runs ``inner`` after unwarping the inputs that went through other strides than the rest (streams
    that pool differently, merged as per-position vectors), all cropped to one size."""

    def __init__(self, inner, unwarps):
        super().__init__(inner.inputs, inner.outputs, f"{inner.label} of unwarped streams {list(unwarps)}")
        self.inner, self.unwarps = inner, list(unwarps)

    def run(self, values, net, overwrite=False):
        if _exporting():  # one gather per stream, no reshape of sizes that depend on the image (see unwarp_gather)
            sizes = [(v.shape[2] * _prod(t[0] for t in s), v.shape[3] * _prod(t[1] for t in s)) if s
                     else tuple(v.shape[2:]) for v, s in zip(values, self.unwarps)]
            values = [unwarp_gather(v, list(s), *size) if s else v for v, s, size in zip(values, self.unwarps, sizes)]
        else:
            values = [unwarp(v, list(s), net.naive) if s else v for v, s in zip(values, self.unwarps)]
        h, w = min(v.shape[2] for v in values), min(v.shape[3] for v in values)
        return self.inner.run([v[:, :, :h, :w] for v in values], net, False)


def _aligned(step, unwarps):
    return step if not any(unwarps) else _AlignedStep(step, unwarps)


@_takes_transposed
@_rule_for(["contiguous", "clone", "detach"], "identity (the value passes through; detach also stops gradients)",
           (torch, torch.Tensor))
def _rule_identity(node, geoms):
    """Contiguous, clone: the value passes through; detach: too, without its gradient, as in Cp."""
    return (_DetachStep(node) if node.name.endswith("detach") else _AliasStep(node)), [geoms[0]]


class _DetachStep(_AliasStep):
    """``x.detach()``: the value, out of autograd's graph (no gradient flows back through it, as in Cp)."""

    def run(self, values, net, overwrite=False):
        return [values[0].detach()]


@_takes_transposed
@_rule_for(["rrelu", "rrelu_"], "randomized leaky ReLU (leaky at inference: the mean slope)", (torch, F))
def _rule_rrelu(node, geoms):
    """F.rrelu: at inference a leaky ReLU with the mean slope, per pixel; with training=True whatever Cp's mode
    it draws random slopes, which nothing dense reproduces: refused."""
    p = node.bind(["input", "lower", "upper", "training", "inplace"], {"training": False})
    if p["training"]:
        raise node.fail("it draws random slopes (training=True) whatever Cp's mode, which no dense computation "
                        "reproduces; pass training=self.training (as nn.RReLU does) so that it is leaky at inference")
    return _rule_elementwise(node, geoms)


@_takes_transposed
@_rule_for(["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
            "feature_dropout"], "dropout (the value passes through at inference)", (torch, F))
def _rule_dropout(node, geoms):
    """Dropout: off at inference (nn.Dropout passes training=False in eval mode), the value passes through;
    one that Cp's forward turns on whatever its mode (``F.dropout(x, 0.5)``, whose default is training=True)
    drops random values, which nothing dense reproduces: refused."""
    torch_op = getattr(node.func, "__module__", "") != F.__name__  # torch.dropout(input, p, train)
    names = ["input", "p", "train"] if torch_op else ["input", "p", "training", "inplace"]
    default = not torch_op and node.func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
    p = node.bind(names, {"p": 0.5, names[2]: default})
    if p[names[2]] and p["p"] > 0:
        raise node.fail(f"it drops random values ({names[2]}=True, p={p['p']}) whatever Cp's mode, which no "
                        f"dense computation reproduces; pass {names[2]}=self.training (as nn.Dropout does) so "
                        f"that it is off at inference")
    return _AliasStep(node), [geoms[0]]


@_takes_transposed
@_rule_for(["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"],
           "reshapes that keep the batch axis (the same values, reinterpreted)", (torch, torch.Tensor))
def _rule_reshape(node, geoms):
    """view/reshape/flatten/squeeze/unsqueeze that keep the batch axis: the same values, reinterpreted.

    (N, C, h, w) is a MAP, (N, C*h*w) a VECTOR (torch's C, H, W order); any other shape is a
    VIEW that only element-wise ops and further reshapes may use."""
    geom = geoms[0]
    src, dst = node.in_shapes[0], node.out_shapes[0]
    c, (h, w) = geom.channels, geom.size
    if dst == src:
        return _AliasStep(node), [geom]
    if geom.kind == TRANSPOSED and tuple(dst) == (src[0], h * w, c):  # (N, h, w, C) -> (N, h*w, C): its rows
        return _AliasStep(node), [geom.with_(kind=ROWS)]
    if geom.kind == ROWS:
        if tuple(dst) == (src[0], h, w, c):  # rows.unflatten(1, (h, w)): the transposed map they are the rows of
            return _AliasStep(node), [geom.with_(kind=TRANSPOSED)]
        if (geom.size == (1, 1) or c == 1) and dst[:1] == src[:1]:  # (N, 1, C) holds (N, C, 1, 1)'s order,
            # (N, h*w, 1) (N, 1, h, w)'s: the map's values, transposed back
            return _PermuteStep(node.in_slots[:1], node.out_slots, _FROM_TRANSPOSED), \
                [_geom_of_shape(geom.with_(kind=MAP), dst)]
        raise node.fail(f"it reshapes {geom.describe()} {src} to {dst}: rows hold the channels of one position "
                        f"each, not the values in (C, h, w) order; transpose them back first (x.transpose(1, 2)), "
                        f"or unflatten them to (N, h, w, C)")
    if geom.kind == TRANSPOSED:
        if (geom.size == (1, 1) or geom.channels == 1) and dst[:1] == src[:1]:  # (N, 1, 1, C) holds (N, C, 1, 1)'s
            # order, (N, h, w, 1) (N, 1, h, w)'s: the map's values, transposed back
            return _PermuteStep(node.in_slots[:1], node.out_slots, (0, 3, 1, 2)), \
                [_geom_of_shape(geom.with_(kind=MAP), dst)]
        raise node.fail(f"it reshapes {geom.describe()} {src} to {dst}: the values of a transposed map are not in "
                        f"(C, h, w) order; transpose it back first (x.permute(0, 3, 1, 2))")
    if geom.guessed and len(dst) == 4:  # after a refused op: the rules that follow judge a map of that shape
        return _AliasStep(node), [_guessed_geom(dst, [geom], _MAP_LAYOUT)]
    if (c == 1 or (h, w) == (1, 1)) and tuple(dst) == (src[0], h, w, c) != (src[0], c, h, w):
        # (N, h, w, 1) holds (N, 1, h, w)'s order, (N, 1, 1, C) (N, C, 1, 1)'s: a transposed map, its dense values
        # transposed alike (y[..., 2][..., None] of a transposed map y, keeping one channel)
        return _PermuteStep(node.in_slots[:1], node.out_slots, _TO_TRANSPOSED), [geom.with_(kind=TRANSPOSED)]
    if geom.kind in (MAP, VECTOR, VIEW) and len(dst) >= 5 and dst[0] == src[0] and tuple(dst[-2:]) == (h, w) and \
            _prod(dst[1:-2]) == c:  # the channels split into group axes, the positions kept (maxout, channel
        # shuffle): the dense map's channels split alike
        return _RegroupStep(node, dst[1:-2]), [geom.with_(kind=GROUPS, groups=dst[1:-2])]
    if len(dst) >= 1 and dst[0] == src[0] and _prod(dst[1:]) == c * h * w:
        return _AliasStep(node), [_geom_of_shape(geom, dst)]
    raise node.fail(f"it reshapes {src} to {dst}, which moves values between patches (the batch axis)")


@_rule_for(["conv2d"], "convolution without padding (multi_conv when strided)", (torch, F))
def _rule_conv2d(node, geoms):
    """Convolution without padding: reused as it is; strided ones become multi_conv."""
    p = node.bind(["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    geom = geoms[0]
    _require_map(node, geom)
    if not isinstance(p["weight"], (_Param, _Derived)):
        raise node.fail("its weight is not a parameter of Cp (nor computed from its parameters)")
    if _padding_of(p["padding"], p["weight"].shape[-2:]):
        raise node.fail(f"it pads its input (padding={p['padding']!r}); {_PADDING_REASON}")
    stride, dil = _pair(p["stride"], "stride"), _pair(p["dilation"], "dilation")
    out = node.out_shapes[0]
    return (_ConvStep(node, p["weight"], p["bias"], stride, dil, int(p["groups"])),
            [geom.with_(channels=out[1], size=out[2:], stride=stride)])


@_takes_transposed
@_rule_for(["linear"], "linear layer on a flattened map (an h x w convolution)", (torch, F))
def _rule_linear(node, geoms):
    """Linear layer on a flattened map: a convolution with the map's size (C, h, w order)."""
    p = node.bind(["input", "weight", "bias"], {"bias": None})
    geom = geoms[0]
    if geom.kind == TRANSPOSED:  # (N, h, w, C) -> (N, h, w, K): the same Linear at every position
        return _CallStep(node), [geom.with_(channels=node.out_shapes[0][-1])]
    if geom.kind != VECTOR:
        raise node.fail(f"it is applied to {geom.describe()} and so mixes values along the width axis; "
                        f"flatten the map first")
    if not isinstance(p["weight"], (_Param, _Derived)):
        raise node.fail("its weight is not a parameter of Cp (nor computed from its parameters)")
    c, (h, w) = geom.channels, geom.size
    out = node.out_shapes[0][-1]
    step = _ConvStep(node, p["weight"], p["bias"], (1, 1), (1, 1), 1, weight_shape=(out, c, h, w),
                     label=f"linear_as_conv(kernel={h}x{w}, {c * h * w}->{out})")
    return step, [geom.with_(channels=out, size=(1, 1))]


@_takes_transposed
@_rule_for(["matmul", "__matmul__"], "matrix products with a weight over the channels of a transposed map "
           "(x.permute(0, 2, 3, 1) @ w)", (torch, torch.Tensor))
def _rule_matmul(node, geoms):
    """``y @ w`` / ``torch.matmul(y, w)`` of a transposed map (N, h, w, C) and a (C, K) parameter, buffer or
    constant: the same product at every position, as the recorded call on the dense values (transposed alike).
    Of anything else (a map, whose last axis is its width; two activations) refused."""
    geom = geoms[0]
    p = node.bind(["input", "other"])
    weight = p["other"]
    if geom.kind != TRANSPOSED or not isinstance(node.args[0], _Ref) or isinstance(weight, _Ref) or \
            len(getattr(weight, "shape", ())) != 2:
        other = "an activation" if isinstance(weight, _Ref) else "a matrix"
        raise node.fail(f"it multiplies {geom.describe()} by {other}; only a transposed map (x.permute(0, 2, 3, 1)) "
                        f"times a (C, K) weight is a product over the channels of every position (or write a Linear, "
                        f"a 1x1 Conv2d)")
    return _CallStep(node), [geom.with_(channels=node.out_shapes[0][-1])]


@_takes_transposed
@_rule_for(["einsum"], "einsum of a map (or a transposed map) and a (C, K) weight over the channels of every "
           "position (torch.einsum('nchw,ck->nkhw', x, w))", (torch,))
def _rule_einsum(node, geoms):
    """``torch.einsum("nchw,ck->nkhw", x, w)`` (any letters, either order of the operands and of the weight's axes):
    a product over the channels of every position of a map (or of a transposed map, "nhwc,ck->nhwk") with a
    parameter, buffer or constant matrix, as the recorded call on the dense values; other equations refused."""
    geom = geoms[0]
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    refs = [i for i, v in enumerate(operands) if isinstance(v, _Ref)]
    axis = 3 if geom.kind == TRANSPOSED else 1
    equation = str(node.args[0])
    if len(refs) == 1 and len(operands) == 2 and len(node.in_shapes[0]) == 3 and "." not in equation and \
            "->" in equation:  # the rows of a map (see _on_rows), 'nlc,ck->nlk': on their dense values (N, H, W, C),
        # a letter more for the columns, after the rows' ('nlXc,ck->nlXk')
        spare = next(chr(c) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in equation)
        terms, out = equation.replace(" ", "").split("->")
        terms = terms.split(",")
        if len(terms[refs[0]]) == 3 and len(out) == 3:
            terms[refs[0]] = terms[refs[0]][:2] + spare + terms[refs[0]][2:]
            equation = ",".join(terms) + "->" + out[:2] + spare + out[2:]
    reason = "it multiplies two activations" if len(refs) != 1 else \
        f"it is applied to {geom.describe()}" if geom.kind not in (MAP, TRANSPOSED) else \
        _einsum_over_channels(equation, refs[0], axis) if len(operands) == 2 else "it has other operands"
    if reason is not None:
        raise node.fail(f"{reason}; only an einsum of a map and a (C, K) weight over the channels of every position "
                        f"('nchw,ck->nkhw'; of rows of a map 'nlc,ck->nlk') can be made dense")
    step = _CallStep(node) if equation == node.args[0] else _CallStep(node, args=(equation,) + tuple(node.args[1:]))
    return step, [geom.with_(channels=node.out_shapes[0][1 if geom.kind == MAP else -1])]


def _pool_params(node, kind):
    if kind == "max":
        return node.bind(["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                         {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                          "return_indices": False})
    if kind == "avg":
        return node.bind(["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                          "divisor_override"],
                         {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                          "divisor_override": None})
    return node.bind(["input", "norm_type", "kernel_size", "stride", "ceil_mode"], {"stride": None, "ceil_mode": False})


def _make_pool_rule(kind):
    def rule(node, geoms):
        p = _pool_params(node, kind)
        geom = geoms[0]
        _require_map(node, geom)
        if p.get("return_indices"):
            raise node.fail(_INDICES_REASON)
        if _padding_of(p.get("padding", 0)):
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
        step = _PoolStep(node, kind, kernel, stride, dil, float(p.get("norm_type", 2.0)), p.get("divisor_override"))
        return step, [geom.with_(channels=out[1], size=out[2:], stride=stride)]
    rule.__doc__ = f"{kind} pooling: multipooling with the same kernel and stride."
    return rule


_POOLING_LABEL = "pooling without padding (multipooling)"
_rule_for(["max_pool2d"], _POOLING_LABEL, (torch, F))(_make_pool_rule("max"))
_rule_for(["avg_pool2d"], _POOLING_LABEL, (torch, F))(_make_pool_rule("avg"))
_rule_for(["lp_pool2d"], _POOLING_LABEL, (F,))(_make_pool_rule("lp"))


class _PoolChannelsStep(_PoolStep):
    """A global pooling over the patch-level map, then the same reduction over its channels (``x.mean((1, 2, 3))``,
    ``x.sum((1, 2, 3))``); ``x.amax((1, 2, 3))`` and ``amin``: the extremum over the channels of each pixel, then
    the global pooling of that one channel, whose gradient is shared among every tied channel and position of the
    patch, as amax's is (see _pool_split_ties): one value per patch, (N, 1, H, W) dense.  Over the channels and
    one spatial axis (``x.mean((1, 2))``): the same with a pooling over the rows (or columns) alone."""

    @property
    def per_pixel(self):
        return False

    def run(self, values, net, overwrite=False):
        if self.kind in ("max", "min"):
            if _autodiff_watches(values[0]) and not torch.jit.is_tracing():  # (traced: see _PoolStep.run)
                return [_pool_split_ties(values[0], self.kind, self.kernel, over_channels=True)]
            extreme = torch.amax if self.kind == "max" else torch.amin
            return super().run([extreme(values[0], 1, keepdim=True)], net)
        pooled = super().run(values, net, overwrite)[0]
        return [pooled.mean(1, keepdim=True) if self.kind == "avg" else pooled.sum(1, keepdim=True)]


class _PoolRowsStep(_PoolStep):
    """A global pooling over the rows of a map (``rows.mean(1)``): its dense values (the transposed map's)
    transposed back, pooled as the map's, and transposed again where the rows' axis is kept (keepdim=True)."""

    def __init__(self, node, kind, size, keep_rows):
        super().__init__(node, kind, size, (1, 1))
        self.keep_rows = keep_rows

    def run(self, values, net, overwrite=False):
        pooled = super().run([values[0].permute(_FROM_TRANSPOSED)], net)[0]
        return [pooled.permute(_TO_TRANSPOSED) if self.keep_rows else pooled]


def _pool_rows(node, kind, rows):
    """``rows.mean(1)`` (sum, amax, amin; keepdim or not) of the rows of a map (N, h*w, C): the map's global
    pooling, one row of a 1x1 map, or its (N, C) vector; None where the op reduces over other dims."""
    p = _bind_reduction(node)
    dims = p["dim"]
    dims = [] if dims is None else [dims] if isinstance(dims, numbers.Integral) else list(dims)
    if [d % 3 for d in dims] != [1]:
        return None
    if kind is None or p.get("dtype") is not None:
        raise node.fail(f"over the rows of a map (dim 1: its positions) only mean, sum, amax and amin (without "
                        f"dtype=) can be made dense, as a global pooling")
    return _pool_transposed_values(node, kind, rows, bool(p["keepdim"]))


def _pool_transposed_values(node, kind, geom, keepdim):
    """The global ``kind`` pooling of values whose dense values are a transposed map's (rows of a map, or a
    transposed map over its positions): the map's, transposed again where the positions' axes are kept; without
    them, one row of a 1x1 map's, or its (N, C) vector."""
    step = _PoolRowsStep(node, kind, geom.size, keepdim)
    step.split_ties = kind in ("max", "min")  # (amax, amin)
    pooled = geom.with_(size=(1, 1))
    return step, [pooled if keepdim else _geom_of_shape(pooled.with_(kind=MAP), node.out_shapes[0])]


def _global_pool_step(node, geom, kind, keep_map):
    """Pooling over the whole patch-level map: a stride-1 pooling with the map's size ("sum" and "min": see
    _pool)."""
    step = _PoolStep(node, kind, geom.size, (1, 1))
    return step, [geom.with_(kind=MAP if keep_map else VECTOR, size=(1, 1))]


def _make_adaptive_rule(kind):
    def rule(node, geoms):
        p = node.bind(["input", "output_size", "return_indices"], {"return_indices": False})
        geom = geoms[0]
        _require_map(node, geom)
        if p["return_indices"]:
            raise node.fail(_INDICES_REASON)
        out_size = p["output_size"]
        out_size = (out_size, out_size) if not isinstance(out_size, (tuple, list)) else tuple(out_size)
        out_size = tuple(geom.size[i] if o is None else int(o) for i, o in enumerate(out_size))
        if out_size == (1, 1):
            return _global_pool_step(node, geom, kind, keep_map=True)
        windows = [_adaptive_windows(s, o) for s, o in zip(geom.size, out_size)]
        if None in windows:
            raise node.fail(f"adaptive pooling from {geom.size[0]}x{geom.size[1]} to {out_size[0]}x{out_size[1]} "
                            f"uses windows of varying size or spacing")
        (kh, sh), (kw, sw) = windows
        return _PoolStep(node, kind, (kh, kw), (sh, sw)), [geom.with_(size=out_size, stride=(sh, sw))]
    rule.__doc__ = (f"adaptive {kind} pooling: global pooling, or an ordinary one where its windows have one "
                    f"size and one spacing.")
    return rule


_ADAPTIVE_LABEL = "adaptive pooling (global, or windows of one size and spacing)"
_rule_for(["adaptive_avg_pool2d"], _ADAPTIVE_LABEL, (torch, F))(_make_adaptive_rule("avg"))
_rule_for(["adaptive_max_pool2d"], _ADAPTIVE_LABEL, (torch, F))(_make_adaptive_rule("max"))


def _make_adaptive_rows_rule(kind):
    def rule(node, geoms):
        p = node.bind(["input", "output_size", "return_indices"], {"return_indices": False})
        geom, shape = geoms[0], tuple(node.in_shapes[0])
        if p["return_indices"]:
            raise node.fail(_INDICES_REASON)
        out_size = p["output_size"]
        out_size = tuple(out_size) if isinstance(out_size, (tuple, list)) else (out_size,)
        if not (geom.kind == VIEW and shape[1:] == (geom.channels, geom.size[0] * geom.size[1])) or out_size != (1,):
            raise node.fail(f"it pools {geom.describe()} of shape {shape} to {out_size}; only global pooling "
                            f"(output_size=1) of a map's positions flattened to (N, C, h*w) can be made dense")
        step, (pooled,) = _global_pool_step(node, geom.with_(kind=MAP), kind, keep_map=True)
        return step, [_geom_of_shape(pooled, node.out_shapes[0])]  # (N, C, 1): a view of the 1x1 map
    rule.__doc__ = (f"adaptive {kind} pooling to one value of a map's positions flattened to (N, C, h*w): the map's "
                    f"global pooling.")
    return rule


_ADAPTIVE_ROWS_LABEL = ("global adaptive pooling of a map's positions flattened to (N, C, h*w) (the map's global "
                        "pooling)")
_rule_for(["adaptive_avg_pool1d"], _ADAPTIVE_ROWS_LABEL, (torch, F))(_make_adaptive_rows_rule("avg"))
_rule_for(["adaptive_max_pool1d"], _ADAPTIVE_ROWS_LABEL, (torch, F))(_make_adaptive_rows_rule("max"))


_REDUCE_SIGNATURES = {"norm": ["input", "p", "dim", "keepdim"], "vector_norm": ["x", "ord", "dim", "keepdim"],
                      "linalg_vector_norm": ["x", "ord", "dim", "keepdim"],  # (torch.linalg.vector_norm's __name__)
                      "kthvalue": ["input", "k", "dim", "keepdim"], "quantile": ["input", "q", "dim", "keepdim"],
                      "nanquantile": ["input", "q", "dim", "keepdim"]}
_REDUCE_DEFAULT_DIM = {"kthvalue": -1, "mode": -1}  # (the others without dim reduce the whole tensor)


def _reduce_signature(node):
    """The argument names of a recorded reduction, in order (the input, dim, keepdim, and ord or p of a norm, k of
    kthvalue, q of quantile)."""
    return _REDUCE_SIGNATURES.get(getattr(node.func, "__name__", ""), ["input", "dim", "keepdim"])


def _bind_reduction(node):
    """The arguments of a recorded reduction by name (:func:`_reduce_signature`), dim and keepdim filled in with
    their defaults.  Several quantiles at once (a tensor q) are refused: they put a new axis before the batch."""
    name = getattr(node.func, "__name__", "")
    p = node.bind(_reduce_signature(node), {"dim": _REDUCE_DEFAULT_DIM.get(name), "keepdim": False})
    if len(getattr(p.get("q"), "shape", ())) > 0:
        raise node.fail("it computes several quantiles at once, which puts a new axis before the batch; compute "
                        "one quantile per call (a float q) and concatenate them along the channels")
    return p


def _make_reduce_rule(kind):
    """Reductions: over the channel axis they act per pixel; over both spatial axes of a map they
    are a global pooling (mean -> average pooling, amax -> max pooling)."""
    def rule(node, geoms):
        geom = geoms[0]
        names = _reduce_signature(node)
        p = _bind_reduction(node)
        dim = p.pop("dim")
        if dim is None:
            raise node.fail("it reduces over the whole tensor, batch included")

        dims = [dim] if isinstance(dim, numbers.Integral) else list(dim)
        keepdim = bool(p.pop("keepdim"))
        (h, w), shape = geom.size, tuple(node.in_shapes[0])
        if geom.kind == TRANSPOSED and len(shape) == 4 and sorted({d % 4 for d in dims}) == [1, 2] and \
                kind is not None and p.get("dtype") is None:  # over the positions of (N, h, w, C) (timm's heads
            # of NHWC maps, x.mean((1, 2))): the map's global pooling, as over the rows of a map
            return _pool_transposed_values(node, kind, geom, keepdim)
        if geom.kind == TRANSPOSED:
            return _reduce_transposed(node, geom, dims, keepdim, p.pop(names[0]), p)
        flattened = geom.kind == VIEW and shape[1:] == (geom.channels, h * w) and [d % 3 for d in dims] == [2] or \
            geom.kind == VIEW and geom.channels == 1 and shape[1:] == (h, w) and sorted(d % 3 for d in dims) == [1, 2]
        # (also the (N, h, w) of one channel, x.amax(1), over its positions: the map's global pooling)
        spatial = sorted({d % 4 for d in dims}) if geom.kind == MAP else []
        if spatial in ([2], [3]):  # over the rows (or the columns) of the map: a pooling over windows of h x 1
            if p.get("dtype") is not None or kind is None:
                raise node.fail(f"over one spatial axis only mean, sum, amax and amin (without dtype=) can be made "
                                f"dense (as a pooling of {'h x 1' if spatial == [2] else '1 x w'} windows)")
            window = (h, 1) if spatial == [2] else (1, w)
            pooled = geom.with_(size=(1, w) if spatial == [2] else (h, 1), kind=MAP if keepdim else VIEW)
            step = _PoolStep(node, kind, window, (1, 1))
            step.split_ties = kind in ("max", "min")  # (amax, amin)
            return step, [pooled]  # (N, C, w) without keepdim: a view of it
        if (geom.kind == MAP and spatial == [2, 3]) or flattened:  # x.view(N, C, -1).mean(-1)
            if p.get("dtype") is not None:
                raise node.fail(f"a global pooling with dtype={p['dtype']} (cast before it instead: "
                                f"x.to({p['dtype']}).sum(...))")
            if kind is None:
                hint = " (torch.max / min over positions also give indices, positions inside one patch: use " \
                    "amax / amin)" if node.name.split(".")[-1] in ("max", "min") else ""
                raise node.fail(f"only mean, sum, amax and amin over the spatial axes are supported (as global "
                                f"pooling){hint}")
            step, (pooled,) = _global_pool_step(node, geom.with_(kind=MAP), kind, keep_map=True)
            step.split_ties = kind in ("max", "min")  # (amax, amin)
            return step, [_geom_of_shape(pooled, node.out_shapes[0])]  # (a 1x1 map, its (N, C, 1) or (N, C) views)
        rank = 4 if geom.kind == MAP else len(shape)
        if any(d % rank == 0 for d in dims):
            raise node.fail("it reduces over the batch of patches")
        per_pixel = dims and all(d % rank == 1 for d in dims) and (geom.kind == MAP or geom.is_pixel_vector
                                                                    or _view_by_channel(geom, shape))
        if geom.kind in (VIEW, VECTOR) and not geom.guessed and kind is not None and p.get("dtype") is None and \
                (h, w) != (1, 1) and _prod(shape[1:]) == geom.channels * h * w and \
                sorted({d % len(shape) for d in dims}) == list(range(1, len(shape))):
            # every entry of a flattened map (x.flatten(1).amax(1), x.flatten(2).mean((1, 2))): in any order, as
            # x.amax((1, 2, 3)) of the map
            geom, dims = geom.with_(kind=MAP), [1, 2, 3]
        reduced = {d % 4 for d in dims}
        together = sorted(reduced) in ([1, 2, 3], [1, 2], [1, 3])  # the channels and positions
        if geom.kind == MAP and together and kind is not None and p.get("dtype") is None:  # over the positions (a
            # global pooling, or one over the rows or columns) and the channels: as Keras
            window = (h if 2 in reduced else 1, w if 3 in reduced else 1)
            size = (1 if 2 in reduced else h, 1 if 3 in reduced else w)
            step = _PoolChannelsStep(node, kind, window, (1, 1))
            return step, [_geom_of_shape(geom.with_(channels=1, size=size), node.out_shapes[0])]
        if not per_pixel and geom.kind == MAP and together and kind is not None:
            raise node.fail(f"a reduction over the channels and positions with dtype={p['dtype']} (cast before it "
                            f"instead: x.to({p['dtype']}).{node.name.split('.')[-1]}({tuple(dims)}))")
        if not per_pixel:
            raise node.fail(f"it computes a statistic over positions of each patch (dims {dims} of "
                            f"{geom.describe()}), as per-patch normalisation does; {_PER_PATCH_REASON}")
        first = p.pop(names[0])
        # (N, h, w) without keepdim: a view of the one-channel map the dense values keep (N, 1, H, W)
        return (_CallStep(node, args=(first,), kwargs=dict(p, dim=1, keepdim=True)),
                [_geom_of_shape(geom.with_(channels=1), out) for out in node.out_shapes])  # (torch.max's values,
        # indices)
    rule.pool_kind = kind  # (over the rows of a map: its global pooling, see _on_rows)
    return _takes_transposed(rule)


def _reduce_transposed(node, geom, dims, keepdim, first, kwargs):
    """A reduction (or a statistic) of a transposed map (or of the rows of a map, see _on_rows): over its
    channels (dim -1, keepdim=True) per position, as the recorded function on the dense values (``first``, the
    input, and ``kwargs``, its other arguments but dim and keepdim); over positions of the patch refused."""
    rank = len(node.in_shapes[0])  # 4; 3 for rows, whose channel axis is the dense values' last one too
    if any(d % rank == 0 for d in dims):
        raise node.fail("it reduces over the batch of patches")
    if [d % rank for d in dims] != [rank - 1]:
        pooling = " (only mean, sum, amax and amin, without dtype=, pool them globally)" \
            if rank == 4 and sorted(d % 4 for d in dims) == [1, 2] else ""
        raise node.fail(f"it reduces {geom.describe()} over dims {dims}, which mixes positions of the patch; only "
                        f"the channel axis (dim -1 of a transposed map) can be made dense{pooling}")
    if not keepdim:
        raise node.fail(f"it reduces the channels of {geom.describe()} without keepdim=True; CI keeps a transposed "
                        f"map's channel axis: pass keepdim=True (or transpose back first)")
    return _CallStep(node, args=(first,), kwargs=dict(kwargs, dim=-1, keepdim=True)), \
        [geom.with_(channels=1)] * len(node.out_slots)


_REDUCE_LABEL = "reductions over channels (per pixel) or over the whole map (mean, sum, amax, amin: global pooling)"


@_takes_transposed
@_rule_for(["std", "var", "std_mean", "var_mean"], "standard deviation and variance over channels (per pixel; over "
           "positions of the patch: refused)", (torch, torch.Tensor))
def _rule_statistic(node, geoms):
    """Standard deviation and variance: over the channels (dim=1, keepdim or not, of a map, a vector of one
    position or a (N, C, h*w) reshape) per pixel; over positions of the patch they are per-patch statistics,
    refused as per-patch normalisation."""
    geom, shape = geoms[0], tuple(node.in_shapes[0])
    p = node.bind(["input", "dim", "unbiased", "keepdim"], {"dim": None})
    dim = p.pop("dim")
    dims = None if dim is None else ([dim] if isinstance(dim, numbers.Integral) else list(dim))
    if geom.kind == TRANSPOSED and dims is not None:
        keepdim = bool(p.pop("keepdim", False))
        return _reduce_transposed(node, geom, dims, keepdim, p.pop("input"), p)
    by_channel = geom.kind == MAP or geom.is_pixel_vector or _view_by_channel(geom, shape)
    if dims is not None and by_channel and [d % len(shape) for d in dims] == [1]:  # over the channels: per pixel
        p.pop("keepdim", None)
        # (N, h, w) without keepdim: a view of the one-channel map the dense values keep (N, 1, H, W)
        return (_CallStep(node, args=(p.pop("input"),), kwargs=dict(p, dim=1, keepdim=True)),
                [_geom_of_shape(geom.with_(channels=1), out) for out in node.out_shapes])  # ((std, mean) of std_mean)
    if dims is not None and any(d % len(shape) == 0 for d in dims):
        raise node.fail("it computes a statistic over the batch of patches")
    raise node.fail(f"it computes a statistic over positions of each patch ({node.name.split('.')[-1]} over "
                    f"{'all dims' if dims is None else f'dims {dims}'} of {geom.describe()}), as per-patch "
                    f"normalisation does; {_PER_PATCH_REASON}")
_rule_for(["mean"], _REDUCE_LABEL, (torch, torch.Tensor))(_make_reduce_rule("avg"))
_rule_for(["amax"], _REDUCE_LABEL, (torch, torch.Tensor))(_make_reduce_rule("max"))
_rule_for(["sum"], _REDUCE_LABEL, (torch, torch.Tensor))(_make_reduce_rule("sum"))
_rule_for(["amin"], _REDUCE_LABEL, (torch, torch.Tensor))(_make_reduce_rule("min"))
_CHANNEL_REDUCE_LABEL = "reductions over channels (per pixel)"
_rule_reduce = _rule_for(["norm", "logsumexp"], _CHANNEL_REDUCE_LABEL, (torch, torch.Tensor))(_make_reduce_rule(None))
_register_rule(_rule_reduce, [torch.linalg.vector_norm], ["linalg.vector_norm"], _CHANNEL_REDUCE_LABEL)
_rule_for(["prod", "nansum", "nanmean", "any", "all", "aminmax", "median", "nanmedian", "mode", "kthvalue",
           "quantile", "nanquantile"], _CHANNEL_REDUCE_LABEL, (torch, torch.Tensor))(_rule_reduce)


@_takes_transposed
@_rule_for(["max", "min", "argmax", "argmin"], "maxima and minima: of two values (element-wise), over channels "
           "(values and indices, per pixel)", (torch, torch.Tensor))
def _rule_max_min(node, geoms):
    """``torch.max(x, y)`` / ``min``: element-wise; ``torch.max(x, dim=1, keepdim=True)``, ``argmax``: over the
    channels of each pixel (values and indices); over positions of the patch or the whole tensor: refused."""
    p = node.bind(["input", "dim", "keepdim"], {"dim": None})
    if isinstance(p.get("other", p.get("dim")), (torch.Tensor, _Ref) + _OPERANDS):
        return _rule_elementwise(node, geoms)
    return _rule_reduce(node, geoms)


def _make_channel_rule(dim_name, position, default, resizes=False):
    """Ops that work along one axis (softmax, normalize, cumsum, sort, ...): per pixel when that axis is the
    channels.  ``dim_name`` is the axis argument, ``position`` its place among the positional arguments,
    ``default`` its default (None: no default); ``resizes``: the op changes the channel count (topk)."""
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
        if not resizes:
            _check_same_shape(node)
            return _CallStep(node, args=tuple(args), kwargs=kwargs), [geom] * len(node.out_shapes)
        # (the values and indices of topk)
        return _CallStep(node, args=tuple(args), kwargs=kwargs), [geom.with_(channels=_channels_of(geom, out))
                                                                  for out in node.out_shapes]
    rule.along_channels = True  # (along a group axis of a map with its channels split: see _on_groups)
    return _takes_transposed(rule)


_CHANNEL_LABEL = "ops along the channel axis (normalize, softmax)"
_register_rule(_make_channel_rule("dim", 2, 1), [F.normalize], ["normalize"], _CHANNEL_LABEL)
_rule_for(["softmax", "log_softmax", "softmin"], _CHANNEL_LABEL, (torch, F, torch.Tensor))(
    _make_channel_rule("dim", 1, None))
_ORDER_LABEL = "cumulative ops, sorts and top-k along the channel axis (per pixel)"
_rule_for(["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"], _ORDER_LABEL, (torch, torch.Tensor))(
    _make_channel_rule("dim", 1, None))
_rule_for(["sort", "argsort"], _ORDER_LABEL, (torch, torch.Tensor))(_make_channel_rule("dim", 1, -1))
_rule_for(["topk"], _ORDER_LABEL, (torch, torch.Tensor))(_make_channel_rule("dim", 2, -1, resizes=True))


@_takes_transposed
@_rule_for(["glu"], "gated linear units over the channel axis (per pixel)", (F,))
def _rule_glu(node, geoms):
    """``F.glu`` / ``nn.GLU``: one half of the channels gates the other at each pixel; dim must be the channel
    axis (dim=1 of a map, the default dim=-1 of a vector of one position, as after the flatten)."""
    geom = geoms[0]
    p = node.bind(["input", "dim"], {"dim": -1})
    dense_dim = _channel_dim(geom, int(p["dim"]), node)
    return _CallStep(node, args=(_Ref(node.in_slots[0]),), kwargs={"dim": dense_dim}), \
        [geom.with_(channels=_channels_of(geom, node.out_shapes[0]))]


@_rule_for(["channel_shuffle", "native_channel_shuffle"], "channel shuffle (a permutation of the channels)",
           (torch, F))
def _rule_channel_shuffle(node, geoms):
    """``nn.ChannelShuffle``: the same permutation of the channels at every pixel of a map (or of a reshape that
    keeps the channels on dim 1, see :func:`_channel_dim`)."""
    if geoms[0].kind != MAP:
        _channel_dim(geoms[0], 1, node)
    _check_same_shape(node)
    return _CallStep(node), [geoms[0]]


@_rule_for(["local_response_norm"], "local response normalisation (across channels)", (F,))
def _rule_local_response_norm(node, geoms):
    """Local response normalisation: across channels at each pixel."""
    _require_map(node, geoms[0])
    return _CallStep(node), [geoms[0]]


@_rule_for(["batch_norm"], "batch normalisation with running statistics (per-channel affine)", (torch, F))
def _rule_batch_norm(node, geoms):
    """Batch normalisation with running statistics: a per-channel affine map."""
    p = node.bind(["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    geom = geoms[0]
    if p["running_mean"] is None or p["running_var"] is None:
        raise node.fail("it has no running statistics (track_running_stats=False), so it normalises with "
                        "statistics of the batch of patches")
    if p["training"]:
        raise node.fail("Cp's forward calls it with training=True whatever Cp's mode, so it normalises with "
                        "statistics of the batch of patches; pass training=self.training (as nn.BatchNorm2d "
                        "does) so that it uses its running statistics at inference")
    if geom.kind == VECTOR and geom.size != (1, 1):
        raise node.fail(f"it normalises each entry of {geom.describe()} with its own statistics")
    args = (_Ref(node.in_slots[0]), p["running_mean"], p["running_var"], p["weight"], p["bias"], p["eps"])
    return _CallStep(node, func=_batch_norm_eval, args=args, kwargs={}), [geom]


def _batch_norm_eval(x, mean, var, weight, bias, eps):
    """Batch normalisation with running statistics; without affine parameters, while CI is exported, with
    explicit ones and zeros (the TorchScript-based ONNX exporter needs the channel count they carry)."""
    if _exporting() and weight is None:
        weight = torch.ones_like(mean)
    if _exporting() and bias is None:
        bias = torch.zeros_like(mean)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@_rule_for(["prelu"], "PReLU (one slope per channel)", (torch, F))
def _rule_prelu(node, geoms):
    """PReLU: one slope per channel (or one for all)."""
    geom = geoms[0]
    if geom.kind == VECTOR and geom.size != (1, 1):
        raise node.fail(f"its slopes apply per entry of {geom.describe()}")
    return _CallStep(node), [geom]


def _layer_norm_channels(x, shape, weight, bias, eps):
    return F.layer_norm(x.permute(0, 2, 3, 1), shape, weight, bias, eps).permute(0, 3, 1, 2)


@_takes_transposed
@_rule_for(["layer_norm"], "layer normalisation over the channels of one position", (torch, F))
def _rule_layer_norm(node, geoms):
    """Layer normalisation: per pixel only when it normalises a vector of channels."""
    p = node.bind(["input", "normalized_shape", "weight", "bias", "eps"],
                  {"weight": None, "bias": None, "eps": 1e-5})
    geom = geoms[0]
    shape = tuple(p["normalized_shape"]) if isinstance(p["normalized_shape"], (list, tuple, torch.Size)) \
        else (int(p["normalized_shape"]),)
    if geom.kind == VECTOR and geom.size == (1, 1) and shape == (geom.channels,):
        args = (_Ref(node.in_slots[0]), shape, p["weight"], p["bias"], p["eps"])
        return _CallStep(node, func=_layer_norm_channels, args=args, kwargs={}), [geom]
    if geom.kind == TRANSPOSED and shape == (geom.channels,):  # over the channels of every position
        return _CallStep(node), [geom]
    raise node.fail(f"it normalises {geom.describe()} over {shape}, with statistics of each patch; "
                    f"{_PER_PATCH_REASON}")


class _CropStep(_Step):
    """A constant slice of the channels and a crop of the patch-level map: on the dense tensor, the
    same channels and the crop's start (rows a.. of every patch are rows a.. of the dense map)."""
    aliases = True

    def __init__(self, node, channels, top, bottom, left, right, transposed=False, back=False):
        """``channels``: (start, stop) or (start, stop, step) of the channel axis; ``transposed``: of a transposed
        map ((N, H, W, C) dense values); ``back``: the crop (one channel, or one position) transposed back to a
        map's (N, C, H, W) (a view)."""
        super().__init__(node.in_slots[:1], node.out_slots,
                         f"crop(channels={channels}, rows +{top}/-{bottom}, cols +{left}/-{right})")
        self.channels, self.top, self.bottom, self.left, self.right = channels, top, bottom, left, right
        self.transposed, self.back = transposed, back

    @property
    def per_pixel(self):  # a slice of the channels alone
        return (self.top, self.bottom, self.left, self.right) == (0, 0, 0, 0)

    def run(self, values, net, overwrite=False):
        x = values[0]
        channels = slice(*self.channels)
        if x.dim() == 2:
            return [x[:, channels]]
        if self.transposed:
            y = x[:, self.top:x.shape[1] - self.bottom, self.left:x.shape[2] - self.right, channels]
            return [y.permute(_FROM_TRANSPOSED) if self.back else y]
        return [x[:, channels, self.top:x.shape[2] - self.bottom, self.left:x.shape[3] - self.right]]


def _slices_of(node, rank, channel_dim=1, position_steps=False):
    """The (start, stop) per axis of a constant slice or narrow, or the op's ConversionError; the channel axis
    (``channel_dim``), which may be sliced with a step, gets (start, stop, step), and so do the other axes where
    ``position_steps`` allows a step there (stop just after the last element taken)."""
    shape = node.in_shapes[0]
    bounds = [(0, n) for n in shape]
    if node.name.endswith("narrow"):
        p = node.bind(["input", "dim", "start", "length"])
        if not all(isinstance(p[k], numbers.Integral) for k in ("dim", "start", "length")):
            raise node.fail("it narrows by an amount computed from the data")
        dim, start = int(p["dim"]) % rank, int(p["start"]) % shape[int(p["dim"]) % rank]
        bounds[dim] = (start, start + int(p["length"]))
        bounds[channel_dim] += (1,)
        return bounds
    index = _constant_index(node, rank, "only constant slices (start:stop) and indices of the channel or spatial "
                                        "axes can be made dense (reorder channels with x.flip(1) or "
                                        "x.index_select(1, index))")
    for d, sl in enumerate(index[:rank]):
        if isinstance(sl, numbers.Integral):  # x[:, :, i, j]: a crop to one row or column, that axis dropped
            if not -shape[d] <= sl < shape[d]:
                raise node.fail(f"its index {sl} is out of range for axis {d} of size {shape[d]}")
            sl = slice(sl % shape[d], sl % shape[d] + 1)
        if not all(v is None or isinstance(v, numbers.Integral) for v in (sl.start, sl.stop, sl.step)):
            raise node.fail("it slices by amounts computed from the data")
        start, stop, step = sl.indices(shape[d])
        taken = len(range(start, stop, step))
        if d == channel_dim and taken > 1:  # channels: a step keeps the same channels of every pixel
            bounds[d] = (start, start + (taken - 1) * step + 1, step)
            continue
        if step != 1 and taken > 1 and position_steps:  # (x[:, :, ::2]: a subsampling, see _rule_crop)
            bounds[d] = (start, start + (taken - 1) * step + 1, step)
            continue
        if step != 1 and taken > 1:  # (a step that keeps one element is a crop to it, as in Keras)
            raise node.fail(f"it slices axis {d} with step {step}; only contiguous slices of positions can be "
                            f"made dense")
        bounds[d] = (start, start + taken) + ((1,) if d == channel_dim else ())
    return bounds


@_takes_transposed
@_rule_for(["__getitem__", "narrow"], "crops: constant slices of the channel or spatial axes", (torch.Tensor,))
@_rule_for(["narrow"], "crops: constant slices of the channel or spatial axes", (torch,))
def _rule_crop(node, geoms):
    """A constant slice x[:, c0:c1, a:b, c:d] (or narrow): the same channels, and a crop of the
    patch-level map that is a translation of the dense map (every patch's rows a.. are rows a.. of
    the dense tensor, in every shift branch)."""
    geom = geoms[0]
    index = _index_of(node)
    if None in index and all(i is None or i is Ellipsis or i == slice(None) for i in index):  # x[:, None]: a reshape
        return _rule_reshape(node, geoms)
    shape = tuple(node.in_shapes[0])
    if geom.kind == TRANSPOSED:
        return _crop_transposed(node, geom, shape)
    if geom.kind == ROWS:
        return _crop_rows(node, geom, shape)
    by_channel = _view_by_channel(geom, shape)  # (N, C, h*w), the (N, C, 1) of a 1x1 map: its channels may be sliced
    if not (geom.kind == MAP or geom.is_pixel_vector or by_channel):
        raise node.fail(f"it slices {geom.describe()}; flatten after cropping, not before")
    rank = 4 if geom.kind == MAP else len(shape) if by_channel else 2
    if len(shape) != rank:
        raise node.fail(f"its input has shape {node.in_shapes[0]}")
    bounds = _slices_of(node, rank, position_steps=rank == 4 and not by_channel)
    if bounds[0] != (0, shape[0]):
        raise node.fail("it slices the batch of patches")
    taken = len(range(*bounds[1]))  # channels
    if by_channel and bounds[2:] != [(0, n) for n in shape[2:]]:
        raise node.fail(f"it slices positions of {geom.describe()} ({shape}); crop the (N, C, h, w) map before "
                        f"reshaping or reducing it (the channels alone, x[:, a:b], can be sliced here)")
    if taken < 1:
        raise node.fail("the slice is empty")
    if rank == 2 or by_channel:
        cropped = geom.with_(channels=taken)
        return _CropStep(node, bounds[1], 0, 0, 0, 0), [_geom_of_shape(cropped, node.out_shapes[0])]
    (a, b, sh), (c, d, sw) = (tuple(bounds[2]) + (1,))[:3], (tuple(bounds[3]) + (1,))[:3]
    h, w = geom.size
    if b - a < 1 or d - c < 1:
        raise node.fail("the slice is empty")
    if (sh, sw) != (1, 1):  # x[:, :, a:b:sh, c:d:sw] (YOLOv5's Focus): the crop, subsampled
        step = _SubsampleStep(node, bounds[1], (a, h - b, c, w - d), (sh, sw))
        size = (len(range(0, b - a, sh)), len(range(0, d - c, sw)))
        return step, [_geom_of_shape(geom.with_(channels=taken, size=size, stride=(sh, sw)), node.out_shapes[0])]
    step = _CropStep(node, bounds[1], a, h - b, c, w - d)
    # (integer indices, x[:, :, i, j], drop axes: the same values, reshaped)
    return step, [_geom_of_shape(geom.with_(channels=taken, size=(b - a, d - c)), node.out_shapes[0])]


class _SubsampleStep(_PoolStep):
    """A slice of positions with a step, x[:, :, a:b:sh, c:d:sw]: the crop (and the channels sliced), then
    multipooling of 1x1 windows at stride (sh, sw), whose shifts each keep every s-th position from their own
    offset: a strided layer like any other (output_stride, shifts left in place at the end)."""

    def __init__(self, node, channels, crop, stride):
        super().__init__(node, "avg", (1, 1), stride)
        self.crop = _CropStep(node, channels, *crop)
        self.label = f"subsample(channels={channels}, crop={crop}, stride={stride})"

    def run(self, values, net, overwrite=False):
        return super().run(self.crop.run(values, net), net)


class _PixelUnshuffleStep(_PoolStep):
    """``F.pixel_unshuffle(x, r)`` (nn.PixelUnshuffle, space to depth): the r*r subsamplings x[:, :, i::r, j::r]
    of the map (see _SubsampleStep: each crop keeps rows i .. h-r+i, so that all have one size), interleaved as
    channels c*r*r + i*r + j."""

    def __init__(self, node, factor):
        super().__init__(node, "avg", (1, 1), (factor, factor))
        r = factor
        self.crops = [_CropStep(node, (0, None, 1), i, r - 1 - i, j, r - 1 - j) for i in range(r) for j in range(r)]
        self.label = f"pixel_unshuffle({factor})"

    def run(self, values, net, overwrite=False):
        subsample = super().run  # (each crop, subsampled)
        parts = [subsample(crop.run(values, net), net)[0] for crop in self.crops]
        y = torch.stack(parts, 2)
        return [y.reshape(y.shape[0], -1, y.shape[3], y.shape[4])]


@_rule_for(["pixel_unshuffle"], "space to depth (F.pixel_unshuffle, nn.PixelUnshuffle): r*r subsamplings of the "
           "map as its channels", (torch, F))
def _rule_pixel_unshuffle(node, geoms):
    """``F.pixel_unshuffle(x, r)`` of a map: its r*r subsamplings, a strided layer (see _PixelUnshuffleStep)."""
    geom = geoms[0]
    _require_map(node, geom)
    r = int(node.bind(["input", "downscale_factor"])["downscale_factor"])
    (h, w), c = geom.size, geom.channels
    if r == 1:
        return _AliasStep(node), [geom]
    return _PixelUnshuffleStep(node, r), [geom.with_(channels=c * r * r, size=(h // r, w // r), stride=(r, r))]


def _crop_transposed(node, geom, shape):
    """A constant slice of a transposed map, y[:, a:b, c:d, c0:c1] (or narrow): the crop of the map and the same
    channels, on the dense values transposed alike.  Integer indices that drop axes (y[..., c], y[:, i, j]) are
    that crop reshaped, which gives the map's values in their order where it keeps one channel or one position (the
    dense values transposed back); other such indices are refused (slice i:i+1, or transpose back first)."""
    bounds = _slices_of(node, 4, channel_dim=3)
    if bounds[0] != (0, shape[0]):
        raise node.fail("it slices the batch of patches")
    (a, b), (c, d), (h, w) = bounds[1], bounds[2], geom.size
    taken = len(range(*bounds[3]))
    if b - a < 1 or d - c < 1 or taken < 1:
        raise node.fail("the slice is empty")
    cropped = geom.with_(channels=taken, size=(b - a, d - c))
    if len(node.out_shapes[0]) == 4:
        return _CropStep(node, bounds[3], a, h - b, c, w - d, transposed=True), [cropped]
    if taken != 1 and cropped.size != (1, 1):
        raise node.fail(f"it indexes {geom.describe()} with integers, which drop axes of a transposed map and leave "
                        f"its values out of (C, h, w) order; slice them (i:i+1) or transpose it back first")
    step = _CropStep(node, bounds[3], a, h - b, c, w - d, transposed=True, back=True)
    return step, [_geom_of_shape(cropped.with_(kind=MAP), node.out_shapes[0])]


def _crop_rows(node, geom, shape):
    """A constant slice of the channels of the rows of a map, rows[..., c0:c1] (or narrow(-1, ...)): the same
    channels of the dense values (the transposed map's); slices of the rows (positions of the patch), and integer
    indices that drop the channel axis, refused."""
    bounds = _slices_of(node, 3, channel_dim=2)
    if bounds[0] != (0, shape[0]):
        raise node.fail("it slices the batch of patches")
    if bounds[1] != (0, shape[1]):
        raise node.fail(f"it slices {geom.describe()} along dim 1, the positions of the patch; crop the (N, C, h, w) "
                        f"map before making rows of it (the channels alone, rows[..., a:b], can be sliced here)")
    taken = len(range(*bounds[2]))
    if taken < 1:
        raise node.fail("the slice is empty")
    if len(node.out_shapes[0]) == 3:
        return _CropStep(node, bounds[2], 0, 0, 0, 0, transposed=True), [geom.with_(channels=taken)]
    if shape[1] != 1 and taken != 1:
        raise node.fail(f"it indexes the channels of {geom.describe()} with an integer, which drops their axis; "
                        f"slice them (rows[..., c:c + 1])")
    # (the one row of a 1x1 map, rows[:, 0]: its vector; one channel of every row, rows[..., c]: that channel's
    # values in the map's order) the values transposed back to the map's
    step = _CropStep(node, bounds[2], 0, 0, 0, 0, transposed=True, back=True)
    return step, [_geom_of_shape(geom.with_(kind=MAP, channels=taken), node.out_shapes[0])]


@_takes_transposed
@_rule_for(["cat", "concat", "concatenate"], "concatenation along the channel axis", (torch,))
def _rule_cat(node, geoms):
    """Concatenation along the channel axis of values on the same grid."""
    p = node.bind(["tensors", "dim"], {"dim": 0})
    if any(not isinstance(t, _Ref) for t in p["tensors"]):
        raise node.fail("it concatenates an activation with a constant")
    geom, unwarps = _merge_grids(node, geoms)
    dense_dim = _channel_dim(geom, int(p["dim"]), node)
    out = node.out_shapes[0]
    step = _CallStep(node, args=(p["tensors"],), kwargs={"dim": dense_dim})
    return _aligned(step, unwarps), [geom.with_(channels=_channels_of(geom, out))]


class _StackChannelsStep(_Step):
    """``torch.stack([a, b, ...], dim=1)`` of one-channel values (N, h, w): their dense maps (N, 1, H, W)
    concatenated along the channels; ``dim=-1`` gives the map transposed, (N, h, w, k)."""
    per_pixel = True

    def __init__(self, node, transposed):
        super().__init__(node.in_slots, node.out_slots, f"stack_channels(transposed={transposed})")
        self.transposed = transposed

    def run(self, values, net, overwrite=False):
        stacked = torch.cat(values, 1)
        return [stacked.permute(_TO_TRANSPOSED) if self.transposed else stacked]


@_rule_for(["stack"], "stacks of one-channel values (N, h, w) as the channels of a map (torch.stack([x[:, 2], "
           "x[:, 1], x[:, 0]], 1): RGB to BGR), and of maps along a new dim 1 or 2 (a group axis)", (torch,))
def _rule_stack(node, geoms):
    """``torch.stack(values, dim=1)`` of one-channel values of one grid, (N, h, w) each (a channel x[:, c], a
    channel reduction without keepdim), or of one number per patch, (N,) or (N, 1, 1) (also from streams that pool
    differently, unwarped first as torch.cat does): a map whose channels they are, their dense maps concatenated;
    ``dim=-1`` of (N, h, w) values gives it transposed, (N, h, w, k).  Stacks of anything else add an axis CI
    does not hold: refused."""
    p = node.bind(["tensors", "dim"], {"dim": 0})
    if any(not isinstance(t, _Ref) for t in p["tensors"]):
        raise node.fail("it stacks an activation with a constant")
    shapes, out_shape = [tuple(s) for s in node.in_shapes], tuple(node.out_shapes[0])
    geoms = _numbers_as_vectors(geoms, shapes)
    geom, unwarps = _merge_grids(node, geoms)
    h, w = geom.size
    dim = int(p["dim"]) % len(out_shape)
    if geom.kind == MAP and len(out_shape) == 5 and dim in (1, 2) and not any(unwarps or ()):  # maps along a new
        # group axis (before or after the channels): the dense maps stacked alike
        return _CallStep(node), [geom.with_(kind=GROUPS, groups=out_shape[1:-2])]
    one_channel = geom.kind == VIEW and geom.channels == 1 and all(s[1:] == (h, w) for s in shapes)
    numbers = geom.is_pixel_vector and geom.channels == 1 and all(_prod(s[1:]) == 1 for s in shapes)
    if not (one_channel and dim in (1, 3) or numbers and dim == 1):
        raise node.fail(f"it stacks {len(shapes)} values of {geom.describe()} along a new dim {p['dim']}; only "
                        f"maps stacked along a new dim 1 or 2 (a group axis before or after the channels), "
                        f"one-channel values (N, h, w) stacked as channels (dim 1, or -1 for (N, h, w, k)), or one "
                        f"number per patch stacked along dim 1, can be made dense")
    if numbers:
        out = _geom_of_shape(geom.with_(kind=MAP, channels=len(shapes)), out_shape)
    else:
        out = geom.with_(kind=MAP if dim == 1 else TRANSPOSED, channels=len(shapes))
    return _aligned(_StackChannelsStep(node, dim == 3), unwarps), [out]


@_takes_transposed
@_rule_for(["split", "chunk", "tensor_split"], "splits along the channel axis (chunk(2, dim=1), split): the "
           "channels of every pixel", (torch, torch.Tensor))
def _rule_split(node, geoms):
    """``torch.split`` / ``chunk`` / ``tensor_split`` along the channel axis (max-feature-map: torch.max(*x.chunk(2,
    1))): each part holds some channels of every pixel, the same parts of the dense values; along a spatial axis
    they split positions of the patch (refused)."""
    geom = geoms[0]
    names = {"split": ["tensor", "split_size_or_sections", "dim"], "chunk": ["input", "chunks", "dim"],
             "tensor_split": ["input", "indices_or_sections", "dim"]}[node.name.split(".")[-1]]
    p = node.bind(names, {"dim": 0})
    if geom.kind == MAP and len(node.in_shapes[0]) == 4 and int(p[names[2]]) % 4 in (2, 3):
        return _split_positions(node, geom, int(p[names[2]]) % 4)
    dense = _channel_dim(geom, int(p[names[2]]), node)
    step = _CallStep(node, args=(p[names[0]], p[names[1]]), kwargs={"dim": dense})
    step.aliases = True  # the parts are views of the input: no in-place op may change one while the input is read
    return step, [geom.with_(channels=_channels_of(geom, shape)) for shape in node.out_shapes]


class _SplitPositionsStep(_Step):
    """A split of the patch-level map into bands of rows (or columns): each band a crop, on the dense tensor the
    same rows (a translation of the dense map, see _CropStep)."""
    aliases = True

    def __init__(self, node, dim, bounds):
        """``dim``: 2 (rows) or 3 (columns); ``bounds``: for each part, (first, last + 1) along it of the map."""
        super().__init__(node.in_slots[:1], node.out_slots, f"split(dim={dim}, parts={bounds})")
        self.dim, self.bounds, self.size = dim, bounds, bounds[-1][1]

    def run(self, values, net, overwrite=False):
        x = values[0]
        extent = x.shape[self.dim]
        return [x.narrow(self.dim, a, extent - (self.size - b) - a) for a, b in self.bounds]


def _split_positions(node, geom, dim):
    """``torch.split`` / ``chunk`` / ``tensor_split`` of a map along a spatial axis: each part a crop of the map
    (bands of rows or columns), exact as crops are."""
    sizes = [int(shape[dim]) for shape in node.out_shapes]
    if 0 in sizes:
        raise node.fail(f"it splits {geom.describe()} into parts of sizes {sizes} along dim {dim}, one of them empty")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    bounds = [(a, a + n) for a, n in zip(starts, sizes)]
    h, w = geom.size
    return _SplitPositionsStep(node, dim, bounds), [geom.with_(size=(n, w) if dim == 2 else (h, n)) for n in sizes]


def _unbind_channels(x, dim, back):
    """The one-channel parts of dense values along their channel axis ``dim``, each keeping that axis (the dense
    values of ``x.unbind(1)``); ``back``: parts of a transposed map (dim 3), each transposed back to (N, 1, H, W)."""
    parts = x.split(1, dim)
    return tuple(part.permute(_FROM_TRANSPOSED) for part in parts) if back else parts


@_takes_transposed
@_rule_for(["unbind"], "the channels one by one (r, g, b = x.unbind(1)): one-channel values of every "
           "pixel", (torch, torch.Tensor))
def _rule_unbind(node, geoms):
    """``x.unbind(1)`` of a map (of a vector of one position, of a (N, C, h*w) reshape; dim -1 of a transposed map):
    one (N, h, w) value per channel, as ``x[:, c]`` gives (the dense values keep a one-channel axis); along a spatial
    axis or the batch: refused."""
    geom = geoms[0]
    p = node.bind(["input", "dim"], {"dim": 0})
    dense = _channel_dim(geom, int(p["dim"]), node)
    transposed = geom.kind == TRANSPOSED
    step = _CallStep(node, func=_unbind_channels, args=(p["input"], dense, transposed), kwargs={})
    step.aliases = True  # (views of the input)
    one = geom.with_(kind=MAP, channels=1) if transposed else geom.with_(channels=1)
    return step, [_geom_of_shape(one, shape) for shape in node.out_shapes]


_rule_unbind.along_channels = True  # (along a group axis of a map with its channels split: see _on_groups)


@_takes_transposed
@_rule_for(["flip", "index_select"], "channel reordering: flip or index_select along the channel axis (RGB to "
           "BGR)", (torch, torch.Tensor))
def _rule_channel_order(node, geoms):
    """``x.flip(1)`` and ``x.index_select(1, index)`` (an index not computed from the patch: a constant, a buffer):
    the same channels of every pixel; along a spatial axis they reorder positions of the patch (refused)."""
    geom = geoms[0]
    flip = node.name.split(".")[-1] == "flip"
    if flip and len(node.args) > 2 and not node.kwargs:  # x.flip(1, 2): the dims as separate arguments
        p = {"input": node.args[0], "dims": list(node.args[1:])}
    else:
        p = node.bind(["input", "dims"] if flip else ["input", "dim", "index"])
    dims = p["dims"] if flip else [p["dim"]]
    dims = [dims] if isinstance(dims, numbers.Integral) else list(dims)
    if not flip and isinstance(p["index"], _Ref):
        raise node.fail("its index is computed from the patch")
    if len(dims) != 1:
        raise node.fail(f"it reorders dims {dims}, which moves values between positions of the patch")
    dense = _channel_dim(geom, int(dims[0]), node)
    kwargs = {"dims": [dense]} if flip else {"dim": dense, "index": p["index"]}
    return _CallStep(node, args=(p["input"],), kwargs=kwargs), \
        [geom.with_(channels=_channels_of(geom, node.out_shapes[0]))]


class _PermuteStep(_Step):
    """A map's channels moved to the last axis ((N, C, H, W) -> (N, H, W, C), order (0, 2, 3, 1)) or back (order
    (0, 3, 1, 2)): the same permutation of the dense values, a view of them."""
    aliases = True
    per_pixel = True

    def __init__(self, inputs, outputs, order):
        super().__init__(inputs, outputs, f"permute{tuple(order)}")
        self.order = tuple(order)

    def run(self, values, net, overwrite=False):
        return [values[0].permute(self.order)]


_TO_TRANSPOSED, _FROM_TRANSPOSED = (0, 2, 3, 1), (0, 3, 1, 2)
#: where a map's axes (N, C, h, w) lie in the values of each kind: (N, C, h, w), (N, h, w, C), (N, w, h, C)
_AXES_OF = {MAP: (0, 1, 2, 3), TRANSPOSED: (0, 2, 3, 1), SWAPPED: (0, 3, 2, 1)}


@_takes_transposed
@_rule_for(["permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims"], "transposes of a map to "
           "(N, h, w, C) and back (ConvNeXt's Linear and LayerNorm over the channels between); others refused (but "
           "those that keep the values' order)", (torch, torch.Tensor))
def _rule_transpose(node, geoms):
    """``x.permute(0, 2, 3, 1)`` of a map: a transposed map, its channels last, on which ops per position along
    the channels (Linear, LayerNorm, element-wise ops, softmax(-1), ...) run as they are on the dense values,
    transposed alike; ``permute(0, 3, 1, 2)`` (or any transpose that gives the same) brings it back to a map.
    ``x.transpose(1, 3)`` of a map gives (N, w, h, C), its positions transposed too (SWAPPED), on which the same
    ops run (see _on_swapped) until ``transpose(1, 3)`` brings it back.
    Other transposes swap positions of the patch or move the channels elsewhere: refused (one that keeps the
    values in their order, the identity or moving axes of size 1, is a reshape)."""
    dims = [d for v in list(node.args[1:]) + list(node.kwargs.values())
            for d in (v if isinstance(v, (tuple, list)) else [v])] or [-2, -1]  # (x.mT: a property, no arguments)
    geom, shape = geoms[0], tuple(node.in_shapes[0])
    index = torch.arange(_prod(shape)).reshape(shape)
    moved = node.func(index, *node.args[1:], **node.kwargs)
    if torch.equal(moved, index):  # nothing moves (axes of size 1 swapped): the value as it is
        return _AliasStep(node), [geom]
    if len(shape) == 3 and torch.equal(moved, index.transpose(1, 2)):
        if geom.kind == ROWS:  # rows back to (N, C, h*w), a view of the map
            return _PermuteStep(node.in_slots[:1], node.out_slots, _FROM_TRANSPOSED), \
                [_geom_of_shape(geom.with_(kind=MAP), node.out_shapes[0])]
        if _view_by_channel(geom, shape) and not geom.guessed:  # (N, C, h*w) -> (N, h*w, C): the map's rows
            return _PermuteStep(node.in_slots[:1], node.out_slots, _TO_TRANSPOSED), [geom.with_(kind=ROWS)]
    if geom.kind == ROWS:
        error = node.fail(f"it transposes {geom.describe()} (dims {dims}), which moves the rows (positions of the "
                          f"patch: attention over them mixes them) or their channels elsewhere; rows of a map can "
                          f"only be transposed back to (N, C, h*w) (x.transpose(1, 2))")
        error.taints_outputs = True
        raise error
    if len(shape) == 4 and geom.kind in _AXES_OF:
        for kind, axes in _AXES_OF.items():  # (a 1x1 map too: the step transposes the dense values)
            order = tuple(_AXES_OF[geom.kind].index(a) for a in axes)
            if kind != geom.kind and torch.equal(moved, index.permute(order)) and not (
                    geom.kind == MAP and kind == SWAPPED and torch.equal(moved.flatten(), index.flatten())):
                return _PermuteStep(node.in_slots[:1], node.out_slots, order), [geom.with_(kind=kind)]
    if geom.kind in (TRANSPOSED, SWAPPED):
        error = node.fail(f"it transposes {geom.describe()} (dims {dims}); a transposed map can only be "
                          f"transposed back to (N, C, h, w) (x.permute(0, 3, 1, 2) of (N, h, w, C), "
                          f"x.transpose(1, 3) of (N, w, h, C))")
        error.taints_outputs = True
        raise error
    if torch.equal(moved.flatten(), index.flatten()):
        return _rule_reshape(node, geoms)  # the values keep their order (an identity, axes of size 1): a reshape
    error = node.fail(f"it transposes {geom.describe()} (dims {dims}); CI keeps the channels of every pixel on dim 1 "
                      f"(or, after x.permute(0, 2, 3, 1) of a map, on dim -1), and a value transposed otherwise "
                      f"cannot be made dense: write a Linear over the channels as a 1x1 Conv2d (weight[:, :, None, "
                      f"None]) or between x.permute(0, 2, 3, 1) and x.permute(0, 3, 1, 2), and a norm over them with "
                      f"mean/var over dim 1")
    error.taints_outputs = True  # (what follows a transpose is not judged again: its geometry would be a guess)
    raise error


# x.mT (x.mH, equal for real values): the transpose of the last two dims, a property (its getter is the op traced)
_register_rule(_rule_transpose, [torch.Tensor.mT.__get__, torch.Tensor.mH.__get__], ["Tensor.mT", "Tensor.mH"],
               next(label for label, names in _SUPPORTED.items() if "permute" in names))


class _RepeatChannelsStep(_Step):
    """One channel repeated ``channels`` times along the channel axis (a one-channel gate expanded to a map's)."""
    per_pixel = True

    def __init__(self, node, channels):
        super().__init__(node.in_slots[:1], node.out_slots, f"repeat_channels({channels})")
        self.channels = channels

    def run(self, values, net, overwrite=False):
        return [torch.cat([values[0]] * self.channels, 1)]


@_rule_for(["expand", "expand_as", "repeat", "broadcast_to"], "one channel repeated over the channels (expand, "
           "expand_as, repeat, broadcast_to of a one-channel gate): per pixel", (torch, torch.Tensor))
def _rule_expand_channels(node, geoms):
    """``g.expand_as(x)``, ``g.expand(-1, C, -1, -1)``, ``g.repeat(1, C, 1, 1)``, ``torch.broadcast_to`` of a
    one-channel value to C channels at the same positions: the same channel repeated at every pixel."""
    geom, src, dst = geoms[0], tuple(node.in_shapes[0]), tuple(node.out_shapes[0])
    operand = node.args[0] if node.args else None
    if isinstance(operand, _OPERANDS):  # p.expand_as(x): a parameter, buffer or constant expanded to an activation's
        # shape (the activation is the target): per channel, the same expand of the dense values' shape
        shape, rank = tuple(operand.shape), len(dst)
        padded = (1,) * (rank - len(shape)) + shape
        channel = rank - 1 if geom.kind == TRANSPOSED else 1
        if geom.kind in (MAP, TRANSPOSED) or geom.is_pixel_vector:
            if len(shape) <= rank and all(n == 1 for d, n in enumerate(padded) if d != channel):
                return _CallStep(node), [geom]
        raise node.fail(f"it expands a value of shape {shape} that is not an activation to the shape {dst} of "
                        f"{geom.describe()}; only one value per channel (shape (1, C, 1, 1)) can be made dense")
    if src == dst:
        return _AliasStep(node), [geom]
    by_channel = geom.kind == MAP or geom.is_pixel_vector or _view_by_channel(geom, src)
    if len(src) != len(dst) or src[0] != dst[0] or src[2:] != dst[2:] or src[1] != 1 or not by_channel:
        raise node.fail(f"it expands {geom.describe()} from {src} to {dst}; only one channel repeated over the "
                        f"channels (dim 1) of the same positions can be made dense")
    return _RepeatChannelsStep(node, dst[1]), [geom.with_(channels=dst[1])]


@_rule_for(["group_norm"], "refused: per-patch normalisation", (torch, F))
def _rule_refuse_per_patch(node, geoms):
    """Group normalisation uses statistics of each patch."""
    raise node.fail(f"it normalises with statistics computed over each patch; {_PER_PATCH_REASON}")


@_rule_for(["instance_norm"], "instance normalisation with running statistics (per-channel affine; with "
           "statistics of each patch: refused)", (torch, F))
def _rule_instance_norm(node, geoms):
    """Instance normalisation: with its running statistics (InstanceNorm2d(track_running_stats=True) in eval
    mode) the per-channel affine map of batch normalisation; with statistics of each patch refused."""
    p = node.bind(["input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"],
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
                   "momentum": 0.1, "eps": 1e-5})
    if p["use_input_stats"] or p["running_mean"] is None or p["running_var"] is None:
        raise node.fail(f"it normalises with statistics computed over each patch; {_PER_PATCH_REASON}")
    _require_map(node, geoms[0])
    args = (_Ref(node.in_slots[0]), p["running_mean"], p["running_var"], p["weight"], p["bias"], p["eps"])
    return _CallStep(node, func=_batch_norm_eval, args=args, kwargs={}), [geoms[0]]


@_rule_for(["pad", "constant_pad_nd"], "refused: padding inside Cp (negative amounts crop)", (torch, F))
def _rule_refuse_padding(node, geoms):
    """Explicit padding inside Cp is refused; F.pad with only negative (or zero) amounts of the last
    two axes is a crop (see _rule_crop)."""
    p = node.bind(["input", "pad", "mode", "value"], {"mode": "constant", "value": None})
    amounts = list(p["pad"]) if isinstance(p["pad"], (list, tuple)) else None
    if (amounts and len(amounts) in (2, 4) and all(isinstance(v, numbers.Integral) and v <= 0 for v in amounts)
            and geoms[0].kind == MAP):
        left, right, top, bottom = [-int(v) for v in amounts] + [0] * (4 - len(amounts))
        h, w = geoms[0].size
        if h - top - bottom < 1 or w - left - right < 1:
            raise node.fail("the crop is empty")
        step = _CropStep(node, (0, geoms[0].channels), top, bottom, left, right)
        return step, [geoms[0].with_(size=(h - top - bottom, w - left - right))]
    raise node.fail(f"it pads an activation inside Cp; {_PADDING_REASON}")


@_rule_for(["interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle",
            "conv_transpose2d"], "refused: upsampling and resizing (F.interpolate, nn.Upsample, pixel_shuffle, "
           "ConvTranspose2d)", (torch, F))
def _rule_refuse_resizing(node, geoms):
    """Upsampling, resizing and transposed convolutions inside Cp: refused by name (a nearest downsampling by an
    integer factor is a slice with a step, which converts; a transposed convolution at stride 1 pads)."""
    if node.name.split(".")[-1] == "conv_transpose2d":
        p = node.bind(["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"],
                      {"bias": None, "stride": 1})
        raise node.fail(_transposed_conv_reason(_pair(p["stride"], "stride"), tuple(p["weight"].shape[-2:])))
    hint = "; a nearest downsampling by an integer factor s is x[:, :, ::s, ::s], which converts" \
        if node.name.split(".")[-1] == "interpolate" else ""
    raise node.fail(f"it resizes a map; {_RESIZE_REASON}{hint}")


@_rule_for(["max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"], "refused: pooling indices", (torch, F))
def _rule_refuse_indices(node, geoms):
    """Pooling that returns indices: they refer to positions inside one patch."""
    raise node.fail(_INDICES_REASON)


# ---------------------------------------------------------------------------
# CI as a module: runs a plan of steps on the padded image, whole or tile by tile
# ---------------------------------------------------------------------------

class _ScriptableCI(nn.Module):
    """What ``torch.jit.script(ci)`` compiles: a call of CI's trace (see DenseFeatureNet.__prepare_scriptable__)."""

    def __init__(self, traced):
        super().__init__()
        self.traced = traced

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.traced(images)


_TANH_FUNCS = (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh)


def _tanh_fusions(steps, output_slot):
    """See :meth:`DenseFeatureNet._tanh_fusions`."""
    def readers(slot):
        return [j for j, step in enumerate(steps) if slot in step.inputs] + ([-1] if slot == output_slot else [])

    fusions = {}
    for i, conv in enumerate(steps):
        if type(conv) is not _ConvStep or conv.stride != (1, 1) or len(conv.outputs) != 1:
            continue
        j = i + 1
        if j < len(steps) and type(steps[j]) is _PoolStep and steps[j].kind == "max" \
                and readers(conv.outputs[0]) == [j]:
            j += 1  # conv -> max pooling -> tanh
        if j >= len(steps) or type(steps[j]) is not _CallStep or steps[j].func not in _TANH_FUNCS:
            continue
        act, source = steps[j], steps[j - 1]
        if len(act.args) != 1 or not isinstance(act.args[0], _Ref) or act.kwargs or len(act.outputs) != 1 \
                or act.inputs != source.outputs[:1] or readers(source.outputs[0]) != [j]:
            continue
        fusions[i] = j
    return fusions


def _cpu_autocast() -> bool:
    """True inside ``torch.autocast("cpu")``: its convolutions compute in the autocast dtype, which the fused
    oneDNN op would not follow."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # older PyTorch
        return torch.is_autocast_cpu_enabled()


def _conv_tanh_available() -> bool:
    """True where oneDNN can run a convolution with tanh applied to its output (CPU builds with mkldnn)."""
    if _CONV_TANH_STATE:
        return _CONV_TANH_STATE[0]
    try:
        available = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._convolution_pointwise)
    except (AttributeError, RuntimeError):
        available = False
    _CONV_TANH_STATE.append(available)
    return available


_CONV_TANH_STATE: List[bool] = []  # [available], once known


def _conv_tanh(x: torch.Tensor, net, step) -> torch.Tensor:
    """tanh(conv2d(x)) of a stride-1 convolution step in one oneDNN call (its "tanh" post-op): the tanh is
    applied while the output is in the cache, about half the cost of PyTorch's separate pass (1-ulp Sleef
    tanh) on AVX512 CPUs; it differs from torch.tanh by at most about 1e-7 (tests compare with Cp).  Falls
    back to the two ops where oneDNN refuses (and stops trying)."""
    weight, bias = step.weights(net)
    if torch.backends.mkldnn.enabled and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        try:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [0, 0], [1, 1], list(step.dilation),
                                                           step.groups, "tanh", [], "")
        except RuntimeError:
            _CONV_TANH_STATE[:] = [False]
    return F.conv2d(x, weight, bias, 1, 0, step.dilation, step.groups).tanh_()


class DenseFeatureNet(nn.Module):
    """CI built by :func:`convert`: Cp's output for the patch around every pixel.

    Holds Cp as the submodule ``base_net`` and uses its parameters directly (no copy), so
    ``.to()``, ``.half()`` and ``load_state_dict`` work as for any module.

    Attributes:
        patch_size: (pH, pW).
        in_channels, out_channels: C and K.
        strides: (sh, sw) of each multipooling/striding layer, in network order (those unwarped at the
            end; streams merged as per-position vectors are unwarped where they merge).
        stride_product: (SH, SW), the multiple the image is padded and tiled to: the product of the
            strides (for streams that pool differently, the least common multiple of their products).
        naive: use the paper-faithful per-shift multipooling and per-layer unwarping (read at
            every call).
        tile: "auto" (default: untiled, unless the memory guard needs tiles), None (no tiling), or
            (th, tw): process the image in tiles of this output size.
            Tiling is exact (overlapping inputs) and bounds memory.
        memory_format: torch.channels_last (default) or torch.contiguous_format for the internal tensors.
        max_memory: None, or a budget in bytes: tiles are chosen so that :meth:`estimate_memory`
            stays under it (overrides ``tile``).
        border: "zeros" (the paper's convention), "reflect" or "replicate": how the image is extended
            for the patches of pixels near its edge.
        memory_guard: True (default): without max_memory, CI compares its estimate with the memory
            the process may still allocate (host: available memory, cgroup and address-space limits;
            CUDA: free device memory) and tiles, or raises MemoryError, instead of running out of
            memory.  False: allocate whatever the image needs.
        steps, plan: what CI runs (see :func:`plan_steps`).

    Shape:
        (N, C, H, W) -> (N, K, H, W), any N, H, W >= 1 (N = 0: an empty result, as Cp).  The result
        is contiguous, or channels-last for channels-last images.

    Example:
        >>> cp = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AvgPool2d(2), torch.nn.Conv2d(4, 5, 2))
        >>> ci = FDFE.convert(cp, 6)
        >>> ci.strides, ci.stride_product, ci.out_channels
        ([(2, 2)], (2, 2), 5)
        >>> ci.estimate_memory((480, 640)) > ci.estimate_memory((480, 640), tile=(64, 64))
        True
    """

    def __init__(self, base_net, patch_size, in_channels, out_channels, steps, output_slot, strides,
                 constants, plan, naive=False, tile="auto", memory_format=torch.channels_last, progress=None,
                 max_memory=None, memory_guard=True, grid_multiple=None, border="zeros", output_stride=1,
                 expressions=(), captured=(), settings=None, expression_no_grad=(), gradient_hazards=(), read=()):
        super().__init__()
        self.base_net = base_net
        self.training = base_net.training  # (CI's own mode: Cp's, at convert; see train)
        self.patch_size = _pair(patch_size, "patch_size")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.strides = [tuple(s) for s in strides]
        self._unwarp_product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.stride_product = tuple(grid_multiple) if grid_multiple is not None else self._unwarp_product
        self.steps = steps
        self.output_slot = output_slot
        self.plan = plan
        self.transposed_slots = frozenset()  # values of transposed maps, (N, H, W, C): convert sets them
        for i, c in enumerate(constants):  # (not in CI's state_dict: values of Cp's forward, not of a checkpoint)
            self.register_buffer(f"constant_{i}", c, persistent=False)
        self.n_constants = len(constants)
        made_in = _compute_dtype(base_net)  # Cp's dtype when its forward made the constants
        self._constants_follow_cp = [c.is_floating_point() and c.dtype == made_in for c in constants]
        self.expressions = list(expressions)  # what _Derived placeholders compute from Cp's parameters
        self._expression_no_grad = list(expression_no_grad)  # ... those Cp computed with gradients off
        self._gradient_hazards = list(gradient_hazards)  # what changes Cp's gradients that CI cannot follow
        self.naive = naive
        self.tile = tile
        self.memory_format = memory_format
        self.progress = progress
        self.max_memory = _check_budget(max_memory)
        self.memory_guard = memory_guard
        self.border = border
        self.output_stride = output_stride
        self._captured_attributes = list(captured)
        self._settings_read = dict(settings or {})  # module name -> the attributes compared (_compared_settings)
        self._read = frozenset(read)  # the names of Cp's parameters and buffers CI reads
        self._structure = _module_structure(base_net, captured, self._settings_read, self._read)  # (_check_structure)

    def train(self, mode: bool = True):
        """Set CI's own mode (``ci.training``); Cp's modules keep theirs.

        CI computes Cp's inference whatever either mode (dropout off, batch-norm running statistics: see Train
        densely), and Cp is the user's network, which CI shares: ``torch.onnx.export(ci, ...)`` switches CI to
        eval and back, which through nn.Module's ``train`` would have left Cp (batch norm, dropout) in CI's
        mode.  Set Cp's mode on Cp (``cp.eval()``).

        Returns:
            CI.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for child in self.children():
            if child is not self.base_net:
                child.train(mode)
        return self

    def _check_structure(self):
        """Refuses to run where Cp's modules changed after convert in a way the traced ops do not follow
        (:func:`_module_structure`)."""
        recorded = getattr(self, "_structure", None)
        change = None if recorded is None else _structure_change(recorded, _module_structure(
            self.base_net, getattr(self, "_captured_attributes", ()), getattr(self, "_settings_read", None),
            getattr(self, "_read", None)))
        if change is not None:
            raise ConversionError(f"Cp changed after convert: {change}. CI runs the ops convert traced, which no "
                                  f"longer are Cp's: convert Cp again (new weights, load_state_dict and "
                                  f"parametrizations such as weight_norm are followed without converting again)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """As nn.Module's; checkpoints of CI saved before its constants left its state_dict (keys constant_0, ...)
        load too: those values are Cp's forward's, kept by CI as they are."""
        for key in [k for k in state_dict if k.startswith(prefix + "constant_") and k[len(prefix) + 9:].isdigit()]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _resolve(self, ref):
        """The tensor of a placeholder: Cp's parameter or buffer, a constant of Cp's forward, or a value computed
        from Cp's parameters (evaluated now, from their current values, so that gradients reach them)."""
        if isinstance(ref, _Param):  # by attribute: torch.func.functional_call and parametrizations set them
            path, _, attr = ref.name.rpartition(".")
            try:
                t = getattr(self.base_net.get_submodule(path) if path else self.base_net, attr)
            except AttributeError:
                t = None
            if not isinstance(t, torch.Tensor):
                raise ConversionError(f"CI reads Cp's parameter or buffer '{ref.name}', which Cp no longer has: "
                                      f"convert Cp again after changing its modules")
        elif isinstance(ref, _Derived):
            func, args, kwargs, in_place = self.expressions[ref.index]

            def sub(v):
                return self._resolve(v) if isinstance(v, _OPERANDS) else v
            args, kwargs = _map_structure(args, sub), _map_structure(kwargs, sub)
            no_grad = getattr(self, "_expression_no_grad", ())
            off = torch.no_grad() if ref.index < len(no_grad) and no_grad[ref.index] else contextlib.nullcontext()
            if in_place:  # on a copy of the tensor it changes (never on a parameter or constant of CI), which keeps
                args = (args[0].clone(),) + tuple(args[1:])  # its gradient path, as in Cp, with gradients off
                with off:
                    func(*args, **kwargs)
                t = args[0]
            else:
                with off:
                    out = func(*args, **kwargs)
                t = [leaf for leaf in _leaves(out) if isinstance(leaf, torch.Tensor)][ref.leaf]
        else:
            t = getattr(self, f"constant_{ref.index}")
            if ref.index < len(getattr(self, "_constants_follow_cp", ())) and self._constants_follow_cp[ref.index]:
                t = self._constant_like_cp(t)
        return t if ref.view is None else t.reshape(ref.view)

    def _constant_like_cp(self, t):
        """A constant that Cp's forward made in Cp's dtype (``torch.tensor(..., dtype=x.dtype)``), in Cp's dtype
        and on its device now, where Cp alone was cast or moved after convert.  Its values keep the precision
        they were captured in (convert again after casting Cp to a wider dtype: README, Limits)."""
        param = _first_floating(self.base_net)  # the tensor _compute_dtype reads
        return t if param is None else t.to(device=param.device, dtype=param.dtype)

    def stacked(self, padded: torch.Tensor) -> torch.Tensor:
        """Run CI's steps on padded images; returns the shift-stacked result before unwarping.

        In-place variants run only where the plan allows them and autograd is not recording.  Where
        only per-pixel steps follow the last strided step, its shifts stay in place (see
        :func:`_dense_tail`); M and (SH, SW) then leave its stride out.

        Shape:
            (N, C, H' + pH - 1, W' + pW - 1) -> (M * N, K, >= H'/SH, >= W'/SW).
        """
        values = {0: padded}
        layout = self.memory_format
        if torch.jit.is_tracing() or _vmapped():
            layout, in_place_ok = None, False
        elif torch.compiler.is_compiling():
            in_place_ok = False
        else:
            in_place_ok = not torch.is_grad_enabled() and not _forward_ad_active()
        fused = self._tanh_fusions() if self._fuses_tanh_now(padded) else {}
        for i, (step, free, overwrite) in enumerate(zip(self.steps, self.plan.free_after, self.plan.overwrite)):
            if i in fused:  # a convolution with the tanh that follows it (or follows its max pooling)
                outs = [_conv_tanh(values[step.inputs[0]], self, step)]
            elif i in fused.values():  # that tanh: already applied
                outs = [values[step.inputs[0]]]
            elif step.no_grad and torch.is_grad_enabled():  # as Cp computed it: inside torch.no_grad()
                with torch.no_grad():
                    outs = step.run([values[s] for s in step.inputs], self, overwrite and in_place_ok)
                if step.straight_through:  # its new values, and the gradient path of the value it changed
                    x = values[step.inputs[0]]
                    outs = [outs[0] + torch.where(torch.isfinite(x), x - x.detach(), 0)] + list(outs[1:])
            else:
                outs = step.run([values[s] for s in step.inputs], self, overwrite and in_place_ok)
            for s, v in zip(step.outputs, outs):
                if s in self.transposed_slots:  # (N, H, W, C), contiguous from a channels-last map: as it is
                    pass
                elif torch.compiler.is_compiling() and layout == torch.channels_last and v.dim() == 4:
                    # one channel: NCHW strides (a view of a dense map, else a copy).  Channels-last ones, (h*w, 1, w,
                    # 1), tie the channel axis with the column axis, and ordering them for an element-wise op adds the
                    # guard "1 % w != 0" on the image size, which torch.export fails to prove for some Dim ranges
                    v = v.contiguous(memory_format=layout) if v.shape[1] != 1 else \
                        v.contiguous().squeeze(1).unsqueeze(1)
                elif layout == torch.channels_last and v.dim() == 4 and not _is_channels_last(v) and v.shape[1] > 1:
                    v = v.contiguous(memory_format=layout)  # a 1-channel input leaves convs in NCHW
                values[s] = v
            for s in free:
                values.pop(s, None)
        return values[self.output_slot]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Cp's output for the patch around every pixel of ``images``.

        Args:
            images: floating-point images; cast to Cp's dtype where it differs.

        Returns:
            The dense features: contiguous, or channels-last where ``images`` is channels-last (as
            PyTorch's own convolutions do), whatever layout CI uses inside (``memory_format``).

        Shape:
            (N, C, H, W) -> (N, K, ceil(H / sy), ceil(W / sx)) with (sy, sx) = ``output_stride``.

        Raises:
            ConversionError: where Cp's modules changed after convert in a way CI does not follow (a module
                replaced by another kind, a layer's settings changed, pruning, fusing): convert again.
        """
        if not _recording_graph():
            self._check_structure()
        hazards = list(getattr(self, "_gradient_hazards", ()))
        if not _recording_graph():
            hazards += _global_backward_hooks()
        if hazards and not _recording_graph() and (_forward_ad_active() or torch._C._are_functorch_transforms_active()):
            raise RuntimeError(self._hazard_message(hazards))
        out = self._forward(images)
        if hazards and not _recording_graph() and out.requires_grad:  # a backward through CI is refused when it runs
            out.register_hook(lambda grad: self._refuse_gradient(grad, hazards))
        return out

    def _hazard_message(self, hazards=None):
        hazards = self._gradient_hazards if hazards is None else hazards
        return (f"CI cannot give Cp's gradients: Cp uses {'; and '.join(hazards)}, which set its "
                f"gradients in a way CI's dense ops do not follow. CI's values are exact (call it under "
                f"torch.no_grad() for inference); to train through CI, write those parts with plain ops "
                f"(torch.no_grad() and detach() are followed)")

    def _refuse_gradient(self, grad, hazards=None):
        raise RuntimeError(self._hazard_message(hazards))

    def _check_images(self, images, dtype=None):
        """:func:`check_images` against CI's channels, saying where convert inferred them."""
        try:
            return check_images(images, self.in_channels, dtype=dtype)
        except ValueError as exc:
            if not getattr(self, "_in_channels_inferred", False) or "channels but the network expects" not in str(exc):
                raise
            raise ValueError(f"{exc}; convert inferred in_channels={self.in_channels} from Cp's first layer with "
                             f"in_channels: if Cp takes {images.shape[1]}-channel images (converting them itself), "
                             f"convert with in_channels={images.shape[1]}") from None

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the checks of Cp's structure and gradients."""
        if not _recording_graph() and isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
            # an empty batch, as Cp: Cp's own result on no patches (its dtype, and its gradient path), per pixel
            if min(images.shape[1:]) < 1:
                raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
            self._check_images(images.new_empty((1,) + tuple(images.shape[1:]), device="meta"))
            patches = images[:, :, :1, :1].expand((0, self.in_channels) + self.patch_size)  # no patches, from images
            patches = patches.to(_compute_dtype(self.base_net) or patches.dtype)
            with _EvalMode(self.base_net):
                vectors = self.base_net(patches).reshape(0, self.out_channels)
            (sy, sx), (height, width) = self.output_stride, images.shape[2:]
            return vectors.reshape(0, self.out_channels, 1, 1).expand(0, self.out_channels, _ceil_div(height, sy),
                                                                      _ceil_div(width, sx))
        images = self._check_images(images, dtype=_compute_dtype(self.base_net))
        height, width = images.shape[-2:]
        out_format = torch.channels_last if _is_channels_last(images) else torch.contiguous_format
        multiple = _lcm_pair(self.stride_product, self.output_stride)
        padded = multipool_prepare(images, self.patch_size, multiple, self.border)
        if _exporting():
            # torch.export, torch.compile, torch.jit.trace: one untiled graph, valid for every
            # N, H, W >= 1 (tile sizes and stride checks would add guards on the image size); in
            # memory_format for torch.export and torch.compile, which keep layouts without guards.  One more
            # block of zero rows and columns keeps every stacked map at least 2 wide, since sizes
            # 1 and 0 are special cases the exported graph could not serve.
            padded = F.pad(padded, (0, multiple[1], 0, multiple[0]))
            if self.memory_format == torch.channels_last and torch.compiler.is_compiling() and not _vmapped():
                padded = padded.contiguous(memory_format=torch.channels_last)
            return self._finish(self.stacked(padded), height, width)
        if self.memory_format is not None and self.memory_format != torch.contiguous_format:
            padded = padded.contiguous(memory_format=self.memory_format)
            if self.memory_format == torch.channels_last:
                padded = _one_channel_channels_last(padded)
        tile = self._tile_size(images.device, height, width, images.shape[0], images.dtype)
        if tile is None:
            return self._finish(self.stacked(padded), height, width, out_format)
        return self._tiled(padded, height, width, tile, out_format)

    def __prepare_scriptable__(self):
        """``torch.jit.script(ci)``: CI's steps are a plan, not TorchScript code, so CI is traced instead.

        While traced, CI runs its export graph (see :meth:`forward`), whose every shape is computed
        from the image's; the trace therefore serves any N, H, W, like ``torch.jit.trace(ci, images)``
        with images of any size.  The example is a zero image of a multiple of twice the stride product, at
        least the patch (which a reflected border needs)."""
        param = next(iter(self.base_net.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = _compute_dtype(self.base_net) or torch.float32
        multiple = _lcm_pair(self.stride_product, self.output_stride)
        size = [2 * m * _ceil_div(max(p, 1), 2 * m) for m, p in zip(multiple, self.patch_size)]  # (reflect's reach)
        example = torch.zeros((1, self.in_channels, *size), dtype=dtype, device=device)
        with torch.no_grad():
            return _ScriptableCI(torch.jit.trace(self, example, check_trace=False)).train(self.training)

    @property
    def output_stride(self):
        """(sy, sx): CI gives Cp's output for the pixels (sy * i, sx * j) ((1, 1): every pixel)."""
        return self._output_stride

    @output_stride.setter
    def output_stride(self, value):
        self._output_stride = _pair(value, "output_stride")
        self._grid = _output_grid(self.strides, self._output_stride)

    #: compute each tanh that follows a convolution (directly or after a max pooling) inside that convolution,
    #: where it runs in oneDNN (inference on CPUs, float32; :func:`_conv_tanh`); False: tanh as Cp runs it
    fuse_tanh = True

    def _fuses_tanh_now(self, padded):
        return (self.fuse_tanh and not self.naive and not torch.is_grad_enabled() and not _exporting()
                and not _forward_ad_active()
                and padded.device.type == "cpu" and padded.dtype == torch.float32 and not _cpu_autocast()
                and _conv_tanh_available())

    def _tanh_fusions(self):
        """{index of a stride-1 convolution step: index of the tanh step it can compute}: the tanh reads the
        convolution's output, or the output of a max pooling that reads it (max commutes with tanh, which
        is increasing), and nothing else reads those values."""
        fusions = self.__dict__.get("_tanh_fusions_cache")
        if fusions is None:
            fusions = _tanh_fusions(self.steps, self.output_slot)
            self.__dict__["_tanh_fusions_cache"] = fusions
        return fusions

    def _without_shifts(self, step):
        """True for the strided steps that output_stride lets run as ordinary strided layers."""
        return getattr(step, "depth", 0) and step.depth <= self._grid[0]

    def _shifts_in_place(self, step):
        """True for the last strided step when only per-pixel steps follow it (:func:`_dense_tail`) and it
        keeps its shifts: it runs at stride 1, which leaves its shifts where unwarping would put them
        (no stacking on the batch axis, one copy fewer).  Not in naive mode (the paper's formulation)."""
        return getattr(step, "dense_tail", False) and not self.naive and not self._without_shifts(step)

    def _unwarp_strides(self):
        """The strides whose shifts are stacked on the batch axis of :meth:`stacked`'s result, in network
        order: those output_stride keeps, less the last one where its shifts stay in place."""
        n = len(self.strides) - any(self._shifts_in_place(step) for step in self.steps)
        return self.strides[self._grid[0]:n]

    def _unwarps_across_layouts(self, stacked, strides, dest_channels_last: bool) -> bool:
        """Whether :func:`_unwarp_across_layouts` unwarps ``stacked`` into a destination of the other layout:
        channels-last maps with strides to unwarp, on the CPU, not in naive mode (the paper's per-layer
        unwarping)."""
        return (bool(strides) and not self.naive and stacked.device.type == "cpu" and _is_channels_last(stacked)
                and not dest_channels_last)

    def _finish(self, stacked, height, width, out_format=torch.contiguous_format):
        """Unwarp the strides that kept their shifts, crop to the image, subsample to output_stride;
        the result in the layout ``out_format``."""
        k, (gy, gx), (ry, rx) = self._grid
        strides = self._unwarp_strides()
        if _exporting():  # any (symbolic or traced) image size
            dense = unwarp_gather(stacked, strides, _ceil_div(height, gy), _ceil_div(width, gx))
            for axis, step in ((2, ry), (3, rx)):  # gathers: a strided view would add a guard on the size's parity
                if step > 1:
                    dense = dense.index_select(axis, torch.arange(0, dense.shape[axis], step, device=dense.device))
            return dense
        plain = _autodiff_watches(stacked)  # (differentiated: no copies into slices of a buffer)
        if (not plain and (ry, rx) == (1, 1)
                and self._unwarps_across_layouts(stacked, strides, out_format == torch.channels_last)
                and stacked.numel() >= 2 * _UNWARP_BAND_ELEMENTS):  # (small maps: fewer ops, as before)
            out = torch.empty((stacked.shape[0] // _prod(s[0] * s[1] for s in strides), stacked.shape[1],
                               _ceil_div(height, gy), _ceil_div(width, gx)), dtype=stacked.dtype)
            return _unwarp_across_layouts(stacked, strides, out)
        dense = unwarp(stacked, strides, self.naive)[:, :, :_ceil_div(height, gy), :_ceil_div(width, gx)]
        dense = dense if (ry, rx) == (1, 1) else dense[:, :, ::ry, ::rx]
        if out_format == torch.contiguous_format and _is_channels_last(dense) and not plain:
            return _channels_last_to_contiguous(dense)
        return dense.contiguous(memory_format=out_format)

    @property
    def memory_format(self):
        """The internal layout (torch.channels_last, torch.contiguous_format or None); stored by name,
        since torch.memory_format objects do not pickle with torch.save's protocol."""
        return None if self._memory_format is None else getattr(torch, self._memory_format)

    @memory_format.setter
    def memory_format(self, value):
        if value is not None and value not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be torch.channels_last, torch.contiguous_format or None, "
                             f"got {value!r}")
        self._memory_format = None if value is None else str(value).replace("torch.", "")

    @property
    def tile(self):
        return self._tile

    @tile.setter
    def tile(self, value):
        self._tile = value if value is None or value == "auto" else _pair(value, "tile")

    #: the values alive at once count twice: a multipooling step holds its input, its stride-1 result,
    #: their shift-stacked copy and a channels-last copy of that (4x its input, where the plan counts 2x);
    #: oneDNN's convolutions reorder their input and output likewise (bench/memory_budget.py)
    memory_work_factor = 2.0

    def estimate_memory(self, image_size, batch: int = 1, tile=None, dtype=torch.float32) -> int:
        """Estimated peak bytes of CI on images of ``image_size`` (H, W): the padded input, the
        output, and twice the values alive at once on one tile (``tile`` None: whole image), an upper
        bound of the measured peak (bench/RESULTS_memory.md)."""
        return _memory_estimate(image_size, batch, self.in_channels, self.out_channels, self.patch_size,
                                self.stride_product, self.plan.peak_channels,
                                torch.empty((), dtype=dtype).element_size(),
                                None if tile is None else _pair(tile, "tile"), self.memory_work_factor)

    def tile_for_memory(self, budget: int, image_size, batch: int = 1, dtype=torch.float32):
        """The tile whose tiling fits ``budget`` bytes (:meth:`estimate_memory`) with the least work
        (None: no tiling needed)."""
        return _tile_for_memory(budget, lambda t: self.estimate_memory(image_size, batch, t, dtype),
                                tuple(image_size), self.stride_product, self.patch_size)

    def _tile_size(self, device, height, width, batch=1, dtype=torch.float32):
        """The tile in use (:func:`_choose_tile`): from max_memory; else the one asked for ("auto":
        none), made smaller where the memory guard demands it.

        "auto" asks for no tiles: cache-sized 128x128 CPU tiles, an earlier rule for patches up to
        32 px, measured 1.38x slower than untiled on BaseNet at 960x1280 (2 cores, PyTorch 2.13) and
        1.4-2.9x slower on BaseNet, MC-CNN and TFeat with the other core busy."""
        requested = None if self._tile == "auto" else self._tile
        available = _memory_available(device) if self.memory_guard and self.max_memory is None else None
        return _choose_tile(requested, lambda t: self.estimate_memory((height, width), batch, t, dtype),
                            (height, width), self.stride_product, self.max_memory, available,
                            f"CI on {batch} image(s) of {height}x{width} ({dtype})", self.patch_size)

    def _tiled(self, padded, height, width, tile, out_format=torch.contiguous_format):
        """Exact tiling (:func:`tile_grid`): each output tile from its own crop of the padded image
        (overlap pH-1, pW-1), unwarped straight into the output (of layout ``out_format``)."""
        strides = self._unwarp_strides()
        # the stacked maps' scale: every stride but one whose shifts stay in place
        _, (gy, gx), (ry, rx) = self._grid
        sh, sw = gy * _prod(s[0] for s in strides), gx * _prod(s[1] for s in strides)
        ph, pw = self.patch_size
        oy, ox = self.output_stride
        multiple = _lcm_pair(self.stride_product, (oy, ox))  # tiles start on the stacked and the output grid
        grid = tile_grid(height, width, tile, multiple)
        automatic = self._tile == "auto" and self.max_memory is None  # quiet: the user asked for nothing
        bar = _progress(len(grid), "CI tiles", self.progress if self.progress is not None else
                        (None if len(grid) >= 50 and not automatic else False))
        out_h, out_w = _ceil_div(height, oy), _ceil_div(width, ox)
        out, plain, rows = None, None, {}
        for y0, x0, _, _, hp, wp in grid:
            stacked = self.stacked(padded[:, :, y0:y0 + hp + ph - 1, x0:x0 + wp + pw - 1])
            stacked = stacked[:, :, :hp // sh, :wp // sw]
            plain = _autodiff_watches(stacked) if plain is None else plain
            if plain:  # differentiated: the tiles are concatenated (copies into one output would each pass on
                # the whole output's gradient)
                rows.setdefault(y0, []).append(unwarp(stacked, strides, self.naive)[:, :, ::ry, ::rx][
                    :, :, :min(out_h, (y0 + hp) // oy) - y0 // oy, :min(out_w, (x0 + wp) // ox) - x0 // ox])
                if bar is not None:
                    bar.update(1)
                continue
            if out is None:  # exactly the output's size, so that no crop (copy) is needed at the end
                out = torch.empty((padded.shape[0], stacked.shape[1], out_h, out_w), dtype=stacked.dtype,
                                  device=stacked.device, memory_format=out_format)
            dest = out[:, :, y0 // oy:(y0 + hp) // oy, x0 // ox:(x0 + wp) // ox]
            inside = dest.shape[-2:] == ((hp // oy), (wp // ox))  # else a tile on the bottom or right edge
            mixed = _is_channels_last(stacked) != _is_channels_last(dest)  # the layouts differ
            if (oy, ox) == (1, 1) and self._unwarps_across_layouts(stacked, strides, _is_channels_last(dest)):
                _unwarp_across_layouts(stacked, strides, dest)
            elif self.naive or (oy, ox) != (1, 1) or not inside or mixed:
                # unwarped in the stacked layout first: unwarping straight into a tile of another layout
                # reads across the channels for every element (about 10x slower on CPUs)
                unwarped = unwarp(stacked, strides, self.naive)[:, :, ::ry, ::rx]
                _copy_rows_blocked(dest, unwarped[:, :, :dest.shape[2], :dest.shape[3]])
            else:
                unwarp_into(stacked, strides, dest)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if plain:
            return torch.cat([torch.cat(row, 3) for row in rows.values()], 2).contiguous(memory_format=out_format)
        return out

    def extra_repr(self):
        lines = [f"patch_size={self.patch_size}, in_channels={self.in_channels}, out_channels="
                 f"{self.out_channels}, strides={self.strides}, naive={self.naive}, tile={self.tile}",
                 "steps:"]
        lines += [f"  {i}: {s.label}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# convert(): capture -> rules -> plan -> DenseFeatureNet, then the self-check
# ---------------------------------------------------------------------------

def _infer_in_channels(base_net, patch_size):
    """C of the input: the in_channels of the first module with one that Cp applies to the input.
    Candidates are tried in the order the modules are registered (the first registered one need not be
    the first applied); the first with which Cp runs on a patch wins."""
    candidates = list(dict.fromkeys(c for m in base_net.modules()
                                    if isinstance(c := getattr(m, "in_channels", None), int) and c > 0))
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    dtype, device = _example_kind(base_net)
    for c in candidates:
        try:
            with torch.no_grad(), _EvalMode(base_net):
                base_net(torch.zeros(1, c, *patch_size, dtype=dtype, device=device))
            return c
        except Exception:  # another channel count; try the next
            continue
    return candidates[0]


def _trace_once(base_net, batch, in_channels, patch_size, gradients):
    """Run Cp on a batch of random patches under a _Tracer; returns (tracer, out, example).

    With ``gradients``, gradients are on and the example requires grad: the ops Cp runs with them off
    (torch.no_grad()) show, and the autograd graph of Cp's output shows what sets its gradients otherwise (custom
    autograd.Functions: :meth:`_Tracer.finish`).  Without (a Cp of inference tensors, or one that autograd's watch
    makes fail), gradients are off throughout and CI runs every op with gradients on."""
    dtype, device = _example_kind(base_net)
    gradients = gradients and not any(t.is_inference() for t in list(base_net.parameters()) + list(base_net.buffers()))
    with torch.inference_mode(False), torch.set_grad_enabled(gradients):
        example = torch.randn(batch, in_channels, *patch_size, dtype=dtype, device=device)
        if gradients and example.is_floating_point():  # (a copy, not a leaf: Cp may change its input in place)
            example = example.requires_grad_().clone()
    tracer = _Tracer(base_net, example)
    tracer.watches_gradients = gradients and example.requires_grad
    if tracer.watches_gradients:
        tracer.input_leaf = example.grad_fn.next_functions[0][0].variable  # (the example is a copy of it)
    try:
        with torch.inference_mode(False), torch.set_grad_enabled(gradients), _EvalMode(base_net), tracer:
            out = base_net(example)  # (not in inference mode: its tensors have the version counters _Tracer reads)
        tracer.snapshots.append(_attribute_values(base_net))
    finally:
        tracer.remove_hooks()
    tracer.finish(out)
    return tracer, out, example.detach()


def _trace(base_net, patch_size, in_channels, guessed=False, gradients=True):
    """Run Cp once on random patches and record its ops.  Tries a batch of 2, then of 1, each with gradients
    watched, then without (see :func:`_trace_once`).  ``guessed``: the caller inferred ``in_channels`` (the error
    then says so)."""
    ph, pw = patch_size
    last_error = None
    for batch in (2, 1):
        for watch in (True, False) if gradients else (False,):
            try:
                return _trace_once(base_net, batch, in_channels, (ph, pw), watch)
            except ConversionError:
                raise
            except Exception as exc:  # the net rejected this example (or autograd's watch); report it below
                last_error = exc
    msg = str(last_error)
    hint = ""
    if any(s in msg for s in ("too small", "can't be greater", "larger than", "smaller than", "must be",
                              "shapes cannot be multiplied", "size mismatch")):
        hint = (f" -- the patch {ph}x{pw} may be smaller (or larger) than the net needs; check patch_size "
                f"against the size Cp was trained on")
    if guessed:  # (whatever the error says: an index of a channel the guess lacks, x[:, 2], says "dimension 1")
        hint += f" -- in_channels={in_channels} was inferred from Cp's modules; pass in_channels= if Cp's input " \
                f"has another number of channels"
    dtype = _example_kind(base_net)[0]
    if "type" in msg and any(name in msg for name in ("Double", "double", "Float", "float", "Half", "BFloat")):
        hint += (f" -- convert ran Cp on {str(dtype).replace('torch.', '')} patches, the dtype of its first floating "
                 f"parameter; CI gives images that dtype too (cast Cp to one dtype, or make its first parameter the "
                 f"one its input meets)")
    raise ConversionError(f"running Cp on a batch of {in_channels}x{ph}x{pw} patches failed: "
                          f"{type(last_error).__name__}: {msg}{hint}") from last_error


def _apply_rules(nodes, geoms):
    """Apply each recorded op's rule; returns the steps and fills ``geoms`` (slot -> _Geom)."""
    steps: List[_Step] = []
    problems, tainted = [], set()  # every op that cannot be made dense; values computed from refused ops
    for node in nodes:
        in_geoms = [geoms[s] for s in node.in_slots]
        rule = _lookup_rule(node.func)
        try:
            if rule is None:
                raise ConversionError(_unsupported_message(f"{node.where}: {node.name}", "op"))
            transposed = next((g for g in in_geoms if g.kind == TRANSPOSED), None)
            if any(g.kind == GROUPS for g in in_geoms):
                step, out_geoms = _on_groups(node, rule, in_geoms)
            elif transposed is not None and rule not in _TRANSPOSED_RULES:
                raise node.fail(f"it is applied to {transposed.describe()}, the channels moved to dim -1 by a "
                                f"transpose; only ops per position along the channels (element-wise ops, Linear, "
                                f"LayerNorm, softmax, reductions, slices, splits or concatenations over dim -1) can "
                                f"follow one: transpose it back first (x.permute(0, 3, 1, 2))")
            elif any(g.kind == SWAPPED for g in in_geoms) and rule is not _rule_transpose:
                step, out_geoms = _on_swapped(node, rule, in_geoms)
            elif any(g.kind == ROWS for g in in_geoms) and rule not in (_rule_transpose, _rule_reshape, _rule_crop):
                step, out_geoms = _on_rows(node, rule, in_geoms)
            else:
                step, out_geoms = rule(node, in_geoms)
        except ConversionError as exc:
            # a problem of its own, unless it only follows from a refused op before it (a statistic of
            # the patch reported once, not again where it is subtracted)
            if not tainted.intersection(node.in_slots):
                problems.append(str(exc))
            for s, shape in zip(node.out_slots, node.out_shapes):
                geoms[s] = _guessed_geom(shape, in_geoms, _MAP_LAYOUT)
                if all(i in tainted for i in node.in_slots) or len(shape) != 4 or \
                        getattr(exc, "taints_outputs", False) or \
                        len({g.kind in (TRANSPOSED, SWAPPED, ROWS) for g in in_geoms}) > 1:  # a statistic; a transposed
                    # map; a map and a transposed map combined
                    tainted.add(s)
            continue
        if tainted.intersection(node.in_slots) and all(s in tainted for s in node.in_slots):
            tainted.update(node.out_slots)
        if len(out_geoms) != len(node.out_slots):
            raise AssertionError(f"rule for {node.name} returned {len(out_geoms)} geometries for "
                                 f"{len(node.out_slots)} outputs")
        geoms.update(zip(node.out_slots, out_geoms))
        if node.no_grad:
            step.no_grad, step.straight_through = True, node.straight_through
        steps.append(step)
    if problems:
        raise _all_problems(problems)
    return steps


def _dense_tail(steps, geoms):
    """The last strided step, where only per-pixel steps (``_Step.per_pixel``, keeping the patch-level
    size) on its grid follow it; else None.

    Stacking a stride's shifts on the batch axis lets the layers after it run on each shift as on an
    ordinary map, and unwarping puts the shifts back in place.  Where every later step reads each
    position alone, that round trip changes nothing: the step may run at stride 1 and leave its
    shifts in place (one copy of its output fewer; e.g. Cp ending in max pooling and tanh).
    """
    strided = [i for i, step in enumerate(steps) if getattr(step, "depth", 0)]
    if not strided:
        return None
    last = max(strided, key=lambda i: steps[i].depth)
    grid = geoms[steps[last].outputs[0]].strides
    if sum(steps[i].depth == steps[last].depth for i in strided) != 1:
        return None  # two strided steps at the same depth (streams that pool alike): not one tail
    for step in steps[last + 1:]:
        if not step.per_pixel or any(geoms[slot].strides != grid or geoms[slot].size != geoms[step.outputs[0]].size
                                     for slot in step.inputs):
            return None
    return steps[last]


def convert(base_net: nn.Module, patch_size, in_channels: Optional[int] = None, *, naive: bool = False,
            tile="auto", max_memory: Optional[int] = None, memory_guard: bool = True,
            memory_format=torch.channels_last, check: bool = True, progress: Optional[bool] = None,
            border: str = "zeros", output_stride=1) -> DenseFeatureNet:
    """Turn a patch network Cp into CI, which computes Cp for the patch around every pixel.

    Cp's forward is captured on an example batch of patches (so any ``nn.Module`` works:
    functional calls, reused modules, shape checks), in inference mode (dropout off,
    batch-norm running statistics); the training flags of ``base_net`` are restored
    afterwards and its weights are shared, not copied.  Each captured op is made dense
    by one rule (:func:`supported_layers` lists them); ops that cannot be made exact raise
    :class:`ConversionError` naming the layer and the reason.

    Args:
        base_net: Cp, mapping (B, C, pH, pW) to (B, K) or (B, K, 1, 1).
        patch_size: int or (pH, pW).
        in_channels: C; inferred from the first module with ``in_channels`` when omitted.
        naive: paper-faithful per-shift multipooling and per-layer unwarping (slower, same result).
        tile: "auto" (untiled unless the memory guard needs tiles), None, or (th, tw): process
            images in tiles of this output size (exact, bounded memory).
        max_memory: a budget in bytes; tiles are chosen so that CI's estimated peak stays under it.
        memory_guard: without max_memory, tile (or raise MemoryError) where an image would need more
            memory than the process may still allocate; False turns the guard off.
        memory_format: internal layout; channels_last (default) is fastest on CPU.
        check: compare CI with Cp on a few patches of a small random image before returning.
        progress: progress bar for tiled runs (None: automatic).
        border: how the image is extended for the patches of pixels near its edge: "zeros" (the
            paper's convention), "reflect" or "replicate" (BORDERS); dense_reference takes the same.
        output_stride: int or (sy, sx): features every sy rows and sx columns, out[..., i, j] = Cp at
            pixel (sy * i, sx * j), output (N, K, ceil(H / sy), ceil(W / sx)).  Leading strided layers
            whose stride product divides it skip the shifts no output uses (cheaper); the rest is
            computed at that step and subsampled (exact for every step).

    Returns:
        A :class:`DenseFeatureNet` mapping (N, C, H, W) to (N, K, H, W) (with output_stride:
        (N, K, ceil(H / sy), ceil(W / sx))).

    Example:
        >>> cp = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.Tanh(),
        ...                          torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 6))
        >>> ci = FDFE.convert(cp, 7)      # 7x7 patch -> 6-vector; the Linear becomes a 3x3 conv
        >>> images = torch.randn(1, 1, 9, 11)
        >>> with torch.no_grad():
        ...     print(tuple(ci(images).shape))
        (1, 6, 9, 11)
        >>> try:
        ...     FDFE.convert(torch.nn.Conv2d(1, 2, 3, padding=1), 3)
        ... except FDFE.ConversionError as error:
        ...     print(error)
        Conv2d.forward: torch.conv2d cannot be made dense exactly: it pads its input (padding=(1, 1)); inside Cp ...
    """
    if not isinstance(base_net, nn.Module):
        raise TypeError(f"base_net must be a torch.nn.Module, got {type(base_net).__name__}")
    if isinstance(base_net, torch.jit.ScriptModule):
        raise TypeError(f"base_net is a TorchScript module ({type(base_net).__name__}, from torch.jit.trace or "
                        f"torch.jit.script), whose forward convert() cannot follow op by op; pass the original "
                        f"nn.Module (its state_dict loads into it), and export CI itself afterwards")
    scripted = next((name for name, m in base_net.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise ConversionError(f"module '{scripted}' of Cp is a TorchScript module "
                              f"({type(base_net.get_submodule(scripted)).__name__}, from torch.jit.trace or "
                              f"torch.jit.script), whose forward convert() cannot follow op by op; put the original "
                              f"nn.Module in its place (its state_dict loads into it)")
    ph, pw = _pair(patch_size, "patch_size")
    _check_border(border, (None, None), (ph, pw))
    lazy = [name or "Cp" for name, m in base_net.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ConversionError(f"Cp has lazy modules whose parameters are not created yet ({', '.join(lazy[:4])}"
                              f"{', ...' if len(lazy) > 4 else ''}): run Cp once on a batch of patches first "
                              f"(cp(torch.zeros(1, C, {ph}, {pw}))), which creates them, then convert")
    guessed = in_channels is None
    if guessed:
        in_channels = _infer_in_channels(base_net, (ph, pw))
        if in_channels is None:
            raise ValueError("in_channels cannot be inferred from base_net (no module has in_channels); "
                             "pass in_channels=")
    elif not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    options = dict(naive=naive, tile=tile, memory_format=memory_format, progress=progress, max_memory=max_memory,
                   memory_guard=memory_guard, border=border, output_stride=output_stride, check=check)
    reads = _ConfigReads(base_net.modules())  # (the fields of configuration objects forward reads)
    dtype, device = _example_kind(base_net)
    with torch.inference_mode(False), torch.no_grad():
        example = torch.randn(2, int(in_channels), ph, pw, dtype=dtype, device=device)

    def run():
        with torch.inference_mode(False), torch.no_grad(), _EvalMode(base_net):
            return base_net(example)
    reads.record(run, lambda a, b: isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                 and bool(torch.eq(a, b).logical_or(a.isnan() & b.isnan()).all()))
    ci = _convert_traced(base_net, (ph, pw), int(in_channels), guessed, dict(options, reads=reads))
    ci._in_channels_inferred = guessed  # (for the message where images have other channels: _check_images)
    return ci


def _convert_traced(base_net, patch_size, in_channels, guessed, options):
    """:func:`convert` once its arguments are checked: trace Cp and build CI (again without gradients where Cp gives
    other values with them)."""
    ph, pw = patch_size
    traced = _trace(base_net, (ph, pw), int(in_channels), guessed)
    try:
        return _build(base_net, (ph, pw), int(in_channels), *traced, **options)
    except ConversionError as exc:
        if not traced[0].watches_gradients or not str(exc).startswith("internal check failed"):
            raise
        first = exc  # Cp may give other values with gradients on (a branch on torch.is_grad_enabled()): CI follows
    try:  # its inference, and refuses gradients
        traced = _trace(base_net, (ph, pw), int(in_channels), guessed, gradients=False)
        net = _build(base_net, (ph, pw), int(in_channels), *traced, **options)
    except ConversionError:
        raise first from None
    net._gradient_hazards.append("a forward that computes other values while gradients are recorded (CI, made "
                                 "from Cp's ops at inference, gives those of inference)")
    return net


def _build(base_net, patch_size, in_channels, tracer, out, example, *, naive, tile, memory_format, progress,
           max_memory, memory_guard, border, output_stride, check, reads=None):
    """CI from a trace of Cp (:func:`_trace`): the rules, the plan, the DenseFeatureNet, and its self-check."""
    ph, pw = patch_size
    batch = example.shape[0]
    _refuse_batch_reads(base_net, tracer, batch, in_channels, patch_size)
    geoms = {0: _Geom(MAP, in_channels, (ph, pw))}
    steps = _apply_rules(tracer.nodes, geoms)
    _output_vectors(out, batch)
    if id(out) not in tracer.slot_of:
        raise ConversionError("Cp's output does not depend on its input patch")
    if id(out) in tracer.changed:  # (read by no op after the change, so not refused where it is read)
        raise ConversionError(f"Cp's output is an activation whose memory {tracer.changed[id(out)]} changed in place "
                              f"through another tensor that shares it, after it was computed; CI cannot follow "
                              f"changes through views: compute it out of place")
    out_slot = tracer.slot_of[id(out)]
    geom = geoms[out_slot]
    if geom.kind in (TRANSPOSED, SWAPPED):  # (N, 1, 1, 1) (_output_vectors): CI's output is the map, transposed back
        steps.append(_PermuteStep([out_slot], [max(geoms) + 1], _FROM_TRANSPOSED if geom.kind == TRANSPOSED
                                  else _AXES_OF[SWAPPED]))
        out_slot, geom = max(geoms) + 1, geom.with_(kind=MAP)
        geoms[out_slot] = geom
    out_channels = out.reshape(batch, -1).shape[1]
    channels = {slot: g.channels for slot, g in geoms.items()}
    if geom.size != (1, 1):
        if geom.kind == MAP:
            raise ConversionError(
                f"Cp's output for one patch is a {geom.channels}x{geom.size[0]}x{geom.size[1]} map, not a "
                f"single vector; end Cp with layers that reduce it to 1x1 (or flatten it)")
        steps.append(_UnfoldStep(out_slot, geom))
        channels[out_slot] = max(channels[out_slot], out_channels)
    plan = plan_steps([(s.inputs, s.outputs, s.aliases) for s in steps], channels, out_slot)
    chain = all(g.strides == geom.strides[:len(g.strides)] for g in geoms.values())
    for step in steps:  # how many strided layers up to this one (output_stride skips the first ones' shifts)
        if isinstance(step, (_PoolStep, _ConvStep)) and step.stride != (1, 1):
            step.depth = len(geoms[step.outputs[0]].strides) if chain else len(geom.strides) + 1
    tail = _dense_tail(steps, geoms) if chain else None
    if tail is not None:
        tail.dense_tail = True
    net = DenseFeatureNet(base_net, (ph, pw), in_channels, out_channels, steps, out_slot, list(geom.strides),
                          tracer.constants, plan, naive=naive, tile=tile, memory_format=memory_format,
                          progress=progress, max_memory=max_memory, memory_guard=memory_guard,
                          grid_multiple=_grid_multiple(geoms.values()), border=border, output_stride=output_stride,
                          expressions=tracer.expressions,
                          settings=_compared_settings(base_net, tracer.snapshots, reads),
                          captured=_captured_attributes(base_net, tracer, tracer.snapshots),
                          expression_no_grad=tracer.expression_no_grad,
                          read=_names_read(tracer.nodes, tracer.expressions),
                          gradient_hazards=tracer.hazards + _backward_hooks_of(base_net))
    net.transposed_slots = frozenset(slot for slot, g in geoms.items() if g.kind in (TRANSPOSED, SWAPPED, ROWS))
    if check and _example_kind(base_net)[1].type != "meta":  # a meta Cp has no values to compare
        _self_check(net, base_net)  # (runs Cp again: what it changes is state too)
        snapshots = tracer.snapshots + [_attribute_values(base_net)]
        net._settings_read = _compared_settings(base_net, snapshots, reads)
        net._captured_attributes = _captured_attributes(base_net, tracer, snapshots)
        net._structure = _module_structure(base_net, net._captured_attributes, net._settings_read, net._read)
    return net


#: arithmetic on activations whose number operands CI keeps as they were traced (see _refuse_batch_reads)
_ARITHMETIC = frozenset(
    "add sub mul div true_divide floor_divide remainder fmod pow rsub clamp clip clamp_min clamp_max where maximum "
    "minimum fmax fmin addcmul addcdiv lerp hardtanh threshold leaky_relu masked_fill fill add_ sub_ mul_ div_ pow_ "
    "clamp_ masked_fill_ fill_".split() + [f"__{r}{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv",
                                                                      "mod", "pow") for r in ("", "r", "i")])


def _refuse_batch_reads(base_net, tracer, batch, in_channels, patch_size):
    """Refuse arithmetic whose number operands Cp's forward computes from the batch size (``x / x.shape[0]``,
    ``x * len(x)``): the trace keeps them as numbers (those of the example batch), so CI would compute with them,
    while Cp's value for a patch depends on how many patches are batched with it.  Cp is traced again on a batch
    one larger, and the number operands of its arithmetic compared; nothing is compared where that trace fails or
    records other ops."""
    if not any(node.name.split(".")[-1] in _ARITHMETIC for node in tracer.nodes):
        return
    try:
        other = _trace_once(base_net, batch + 1, in_channels, patch_size, False)[0]
    except Exception:  # (Cp rejects that batch: not a concern here)
        return
    if [node.func for node in other.nodes] != [node.func for node in tracer.nodes]:
        return
    for node, again in zip(tracer.nodes, other.nodes):
        if node.name.split(".")[-1] not in _ARITHMETIC:
            continue
        changed = [(a, b) for a, b in zip(_leaves((node.args, node.kwargs)), _leaves((again.args, again.kwargs)))
                   if isinstance(a, numbers.Number) and not isinstance(a, bool) and a != b]
        if changed:
            a, b = changed[0]
            raise node.fail(f"its operand {a!r} for a batch of {batch} patches is {b!r} for {batch + 1}: it is "
                            f"computed from the batch size (x.shape[0], len(x)), or at random; Cp's output for a patch "
                            f"then depends on how many patches are batched with it, which CI (one pass over whole "
                            f"images) cannot reproduce: compute without the batch size")


def _names_read(nodes, expressions):
    """The names of Cp's parameters and buffers that CI's ops read, directly or through the values computed from them
    that they read (not those only forward's own state reads: a buffer it re-assigns)."""
    names, seen, todo = set(), set(), [(node.args, node.kwargs) for node in nodes]
    while todo:
        for leaf in _leaves(todo.pop()):
            if isinstance(leaf, _Param):
                names.add(leaf.name)
            elif isinstance(leaf, _Derived) and leaf.index not in seen:
                seen.add(leaf.index)
                todo.append(tuple(expressions[leaf.index][1:3]))
    return names


def _global_backward_hooks() -> List[str]:
    """The global module backward hooks (register_module_full_backward_hook, ..._pre_hook) as a gradient hazard:
    they run on Cp's modules in a backward through Cp, not through CI, which does not call them (those of PyTorch's
    own tools are not counted, see :func:`_global_module_hooks`).  Read where CI runs."""
    if _global_module_hooks(("_global_backward_pre_hooks", "_global_backward_hooks")):
        return ["global module backward hooks (register_module_full_backward_hook or "
                "register_module_full_backward_pre_hook)"]
    return []


def _backward_hooks_of(base_net: nn.Module) -> List[str]:
    """Module backward hooks that change or read Cp's gradients (register_full_backward_hook, ..._pre_hook): CI
    does not call Cp's modules, so they would not run.  (The global ones: :func:`_global_backward_hooks`.)"""
    return [f"backward hooks of its module '{name or type(base_net).__name__}' (register_full_backward_hook or "
            f"register_full_backward_pre_hook)"
            for name, module in base_net.named_modules()
            if getattr(module, "_backward_hooks", None) or getattr(module, "_backward_pre_hooks", None)]


def _self_check(net: DenseFeatureNet, base_net: nn.Module) -> None:
    """Compare CI with Cp on a few patches of a small random image (catches unsupported semantics)."""
    dtype, device = _example_kind(base_net)
    gen = torch.Generator().manual_seed(0)
    h, w = _self_check_image_size(net.stride_product, net.patch_size, net.border)
    sy, sx = net.output_stride
    h, w = max(h, 2 * sy + 1), max(w, 2 * sx + 1)
    images = torch.cat([torch.randn(1, net.in_channels, h, w, generator=gen),
                        torch.rand(1, net.in_channels, h, w, generator=gen)]).to(device=device, dtype=dtype)
    grid_positions = torch.tensor(_self_check_positions(_ceil_div(h, sy), _ceil_div(w, sx)))
    positions = grid_positions * torch.tensor([1, sy, sx])
    with torch.no_grad(), _EvalMode(net):
        tile, max_memory = net.tile, net.max_memory  # (the small image runs untiled whatever the user's budget)
        net.tile = net.max_memory = None
        try:
            dense = net(images)
        finally:
            net.tile, net.max_memory = tile, max_memory
        expected = patch_outputs(base_net, images, net.patch_size, positions, border=net.border)
    got = dense[grid_positions[:, 0], :, grid_positions[:, 1], grid_positions[:, 2]]
    tolerance = None
    if dtype == torch.float32 and device.type == "cuda" and (torch.backends.cudnn.allow_tf32
                                                              or torch.backends.cuda.matmul.allow_tf32):
        tolerance = 1e-2  # TF32 tensor cores round operands to 10-bit mantissas
    compute_dtype = dtype
    if torch.is_autocast_enabled(device.type):  # convert() called under torch.autocast
        compute_dtype = torch.get_autocast_dtype(device.type)
    _self_check_compare(got.double().flatten().tolist(), expected.double().flatten().tolist(),
                        str(compute_dtype).replace("torch.", ""), tolerance)
