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

Usage
-----
Convert a patch network (here 8x8 patches -> 8-vectors) and compare with Cp run on every patch:

>>> import keras
>>> import numpy as np
>>> cp = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
...                        keras.layers.MaxPooling2D(2), keras.layers.Conv2D(8, 3)])
>>> ci = FDFE.convert(cp, patch_size=8)
>>> images = np.random.default_rng(0).standard_normal((2, 20, 30, 1)).astype("float32")
>>> dense = ci(images)
>>> tuple(dense.shape)
(2, 20, 30, 8)
>>> reference = FDFE.dense_reference(cp, images, patch_size=8)   # Cp on all 1200 patches
>>> bool(np.allclose(dense, reference, atol=1e-5))
True

The same CI wired by hand from the blocks (the SlimNet and StridedNet templates): pad, reuse the
layers without strides, replace the pooling by multipooling, unwarp with the list of strides (the
blocks check the wiring; check_ci compares the result with Cp on a few pixels):

>>> x = FDFE.multiPoolPrepare(8, 8, stride_product=2)(images)
>>> x = FDFE.multiMaxPooling(2, 2, 2, 2)(cp.layers[0](x))
>>> x = cp.layers[2](x)
>>> hand = FDFE.unwarpAll([(2, 2)])([x, images])
>>> bool(np.allclose(hand, reference, atol=1e-5))
True

How this file is built
----------------------
convert():  capture (_Tracer traces Cp's call() into a graph on example patches: the leaf Keras
            layers it calls, and the TensorFlow ops between them: keras.ops, tf.*, arithmetic)
         -> rules (one function per layer kind, @_rule_for, and per op kind, @_op_rule_for; each turns
            a recorded call into a builder of CI's layers and says what the result holds: a _Geom)
         -> the builders wire a functional Keras model (``core``) from padded images to the
            shift-stacked result; plan (plan_steps) gives its peak memory
         -> DenseFeatureModel runs core on the padded image (whole, or tile by tile:
            tile_grid) and unwarps the shift-stacked result into (N, H, W, K).
The framework-neutral parts (pairs, patch padding, geometry, the rule contract, planning, memory
estimate, tiles, the self-check's comparison) sit in one block that is identical in the
PyTorch backend.  supported_layers() lists what convert() accepts.

Public API
----------
patch_padding, dense_reference, patch_outputs          -- the ground truth (Cp on patches)
multipool_prepare, space_to_batch, multi_pool,
multi_conv, unwarp, unwarp_layer                        -- stateless building blocks
multiPoolPrepare, multiMaxPooling, multiAvgPooling,
multiLPPooling, multiConv, unwrapPrepare, unwrapPool,
unwarpAll, linearAsConv                                 -- the same as Keras layers (they check the wiring)
check_images, check_patch_size, check_ci               -- checks of images, patch size, a CI against Cp
DenseAsConv                                             -- convert()'s Dense as a convolution (saved models)
LPPooling2D, LocalResponseNormalization                 -- Cp layers Keras lacks (PyTorch semantics)
convert, DenseFeatureModel, ConversionError,
supported_layers, plan_steps, tile_grid                 -- automatic Cp -> CI
"""

import abc
import argparse
import dataclasses
import enum
import functools
import inspect
import numbers
import os
import re
import sys
import threading
import types
from typing import Dict, List, Optional, Sequence, Tuple

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
    "linearAsConv",
    "PerPixel",
    "check_ci",
    "run_as_graph",
    "DenseAsConv",
    "LPPooling2D",
    "LocalResponseNormalization",
    "DenseFeatureModel",
    "convert",
    "supported_layers",
    "plan_steps",
    "tile_grid",
    "keep_freed_memory",
]

#: order of a map's sizes in messages (the framework's layout)
_MAP_LAYOUT = "HWC"


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


_register = keras.saving.register_keras_serializable(package="FDFE")


class _Layer(keras.layers.Layer):
    """Base of FDFE's layers: pure rearrangements and shared-weight ops that keep their input's
    dtype (no autocast to the default float32 policy)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)

    def compute_output_spec(self, *args, **kwargs):
        """Keras' spec, but in the input's floating dtype where the layer gives its shape alone
        (compute_output_shape): Keras would declare the dtype policy's (float32 by default) for a
        float64 Cp, and the ops of Cp applied after the layer would be built for that dtype."""
        spec = super().compute_output_spec(*args, **kwargs)
        if type(self).compute_output_shape is keras.layers.Layer.compute_output_shape:
            return spec  # Keras ran call() on symbolic inputs: its dtypes are the call's
        floating = [t.dtype for t in keras.tree.flatten((args, kwargs))
                    if isinstance(t, keras.KerasTensor) and tf.as_dtype(t.dtype).is_floating]
        return _spec_in_dtype(spec, floating[0]) if floating else spec


def _spec_in_dtype(spec, dtype):
    """``spec`` (KerasTensors) with its floating tensors declared in ``dtype``."""
    return keras.tree.map_structure(
        lambda t: keras.KerasTensor(t.shape, dtype=dtype)
        if isinstance(t, keras.KerasTensor) and tf.as_dtype(t.dtype).is_floating else t, spec)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def check_images(images, in_channels: Optional[int] = None, name: str = "images", dtype=None):
    """Check that ``images`` is a floating (N, H, W, C) tensor (static parts of the shape); return it, cast
    to ``dtype``.

    Floating images of another precision are cast to the network's (as Keras' autocast does, and as
    every CI of this file does through this function); integer images are refused, with how to
    convert them, since their scale (0..255 or 0..1) is the caller's choice.

    Args:
        images: the images (a tensor, a numpy array, or nested lists of numbers, converted by np.asarray).
        in_channels: C the network expects (None: not checked).
        name: the argument's name in messages.
        dtype: the network's floating dtype (None: keep the images' dtype).

    Returns:
        ``images``, or ``images`` cast to ``dtype`` where the dtypes differ.

    Shape:
        (N, H, W, C) -> (N, H, W, C).

    Example:
        >>> FDFE.check_images(np.zeros((1, 4, 4, 1)), 1, dtype="float32").dtype
        tf.float32
        >>> FDFE.check_images(np.zeros((1, 4, 4, 1), np.uint8))
        Traceback (most recent call last):
        ...
        TypeError: images must be a floating-point tensor, got dtype uint8; convert it first, e.g. tf.cast(images, ...
    """
    if in_channels is not None and not _is_positive(in_channels, numbers.Integral):
        raise ValueError(f"in_channels must be None or a positive int, got {in_channels!r}")
    images = _as_images(images, name)
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4 (N, H, W, C), got shape {shape}")
    image_dtype = tf.as_dtype(images.dtype)
    if not image_dtype.is_floating:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {image_dtype.name}; convert it first, "
                        f"e.g. tf.cast({name}, tf.float32) / 255 for 8-bit images (scaled to 0..1, if Cp was "
                        f"trained so) or tf.cast({name}, tf.float32) to keep the values")
    if any(s is not None and s < 1 for s in shape):
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    if in_channels is not None and shape[3] is not None and shape[3] != in_channels:
        raise ValueError(f"{name} has {shape[3]} channels but the network expects {in_channels} "
                         f"(layout is (N, H, W, C))")
    if dtype is not None and tf.as_dtype(dtype) != image_dtype:
        images = keras.ops.cast(images, tf.as_dtype(dtype).name)
    return images


def _known_rank(x):
    """The rank of a tensor or array, or None where it is unknown (a traced tensor of unknown rank)."""
    try:
        return len(x.shape)
    except (TypeError, ValueError):
        return None


def _as_images(images, name="images"):
    """Images as a tensor or numpy array: nested Python lists or tuples of numbers are converted to a numpy
    array (as Keras converts data for a model, e.g. in predict()); other types are refused naming the
    expected ones."""
    if isinstance(images, (tf.RaggedTensor, tf.SparseTensor)):
        raise TypeError(f"{name} must be a dense tensor of shape (N, H, W, C), got a {type(images).__name__}; "
                        f"convert it first (.to_tensor() for a RaggedTensor, tf.sparse.to_dense for a SparseTensor)")
    if isinstance(images, dict) and len(images) == 1:
        images = next(iter(images.values()))  # {name: images}, as a Functional model with one input accepts
    if isinstance(images, (list, tuple)) and len(images) == 1 and (
            tf.is_tensor(images[0]) or isinstance(images[0], (np.ndarray, keras.KerasTensor))) \
            and _known_rank(images[0]) != 3:  # (a list of one (H, W, C) image is a batch of one)
        images = images[0]  # [images], as a Functional model with one input accepts (and predict() passes on)
    if not isinstance(images, (list, tuple)):
        if not (tf.is_tensor(images) or isinstance(images, (np.ndarray, keras.KerasTensor))):
            raise TypeError(f"{name} must be a tensor or numpy array of shape (N, H, W, C), got "
                            f"{type(images).__name__}")
        return images
    try:
        array = np.asarray(images)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{name} must be a tensor or numpy array of shape (N, H, W, C); the {type(images).__name__} "
                        f"given cannot be converted to one ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a tensor or numpy array of shape (N, H, W, C) holding numbers; the "
                        f"{type(images).__name__} given holds {array.dtype} values")
    return array


def _static_or_dynamic(x):
    """Shape of x as a list with Python ints where known and scalar tensors elsewhere."""
    dynamic = tf.shape(x)
    return [s if s is not None else dynamic[i] for i, s in enumerate(x.shape)]


# ---------------------------------------------------------------------------
# Patch convention and the ground truth: Cp run on patches
# ---------------------------------------------------------------------------


def _output_vectors(out, batch: int):
    """Check that Cp returned one vector per patch and return it as (batch, K): (batch, K), (batch, 1, 1, K), or
    one number per patch, (batch,) (K = 1; a matching cost squeezed, also () for one patch)."""
    if not tf.is_tensor(out):
        raise ConversionError(f"Cp must return one tensor, got {type(out).__name__}")
    shape = tuple(out.shape)
    if shape == (batch,) or shape == () and batch == 1:
        return tf.reshape(out, [batch, 1])
    if len(shape) < 2 or shape[0] != batch or any(s != 1 for s in shape[1:-1]):
        raise ConversionError(
            f"Cp's output for one patch is not a single vector: a batch of {batch} patches gave shape "
            f"{shape}; expected ({batch}, K), ({batch}, 1, 1, K) (any axes of size 1 before K) or ({batch},)")
    return tf.reshape(out, [batch, -1])


def check_patch_size(base_net, patch_size, in_channels: int) -> int:
    """Run Cp on one random patch and check that it gives one vector; return its length K.

    Raises a ValueError naming the problem when the patch is smaller (or larger) than the net
    needs, i.e. when Cp fails on it or does not reduce it to a single vector.
    """
    ph, pw = _pair(patch_size, "patch_size")
    try:
        out = base_net(tf.random.normal([1, ph, pw, in_channels], dtype=_input_dtype(base_net)),
                       training=False)
    except (ValueError, tf.errors.OpError) as exc:  # (oneDNN's pooling of a map below its window: AbortedError)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Keras' bold
        raise ValueError(f"patch {ph}x{pw} does not fit the net (smaller than its receptive field needs?): "
                         f"{text}") from exc
    try:
        return int(_output_vectors(out, 1).shape[1])
    except ConversionError as exc:
        raise ValueError(f"patch {ph}x{pw} does not fit the net: {exc}") from exc


def _compute_dtype(model):
    """The dtype Cp computes in: the compute dtype of its first layer with weights (float16 under a
    mixed_float16 policy, whose variables are float32), else the model's own."""
    layers = [model] if not hasattr(model, "_flatten_layers") else model._flatten_layers(include_self=True)
    for layer in layers:
        if getattr(layer, "_trainable_variables", None) or (
                not list(layer._flatten_layers(include_self=False, recursive=False)) and layer.weights):
            dtype = tf.as_dtype(layer.compute_dtype)
            if dtype.is_floating:
                return dtype
    return tf.as_dtype(getattr(model, "compute_dtype", None) or "float32")


def _input_dtype(model):
    """The dtype Cp takes: its declared input's (float32 for a mixed-precision model), else the compute dtype."""
    try:
        dtype = tf.as_dtype(model.inputs[0].dtype)
        if dtype.is_floating:
            return dtype
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return _compute_dtype(model)


def patch_outputs(base_net, images, patch_size, positions, batch_size: int = 256,
                  progress: Optional[bool] = None, differentiable: bool = False, border: str = "zeros"):
    """Run Cp on the patches centred at the given pixels.

    Args:
        base_net: the patch network Cp (a Keras model), mapping (B, pH, pW, C) to (B, K) or
            (B, 1, 1, K); called with training=False.
        images: (N, H, W, C) floating tensor or array (cast to Cp's dtype, see :func:`check_images`).
        patch_size: int or (pH, pW).
        positions: (P, 3) integer array of (n, y, x) triples.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.
        differentiable: let gradients flow to the images and Cp's weights (under a GradientTape),
            e.g. to compare CI's gradients with Cp's; by default the result is a constant.
        border: how the image is extended for patches near its edge: "zeros" (the paper's
            convention), "reflect" or "replicate" (see BORDERS).

    Returns:
        (P, K) tensor: row i is Cp(patch of image n_i centred at (y_i, x_i)).

    Shape:
        images (N, H, W, C), positions (P, 3) -> (P, K).
    """
    dtype = _input_dtype(base_net) if isinstance(base_net, keras.layers.Layer) else None  # else: a function
    images = tf.convert_to_tensor(check_images(images, dtype=dtype))
    ph, pw = _pair(patch_size, "patch_size")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be a (P, 3) integer array of (n, y, x), got shape {pos.shape}")
    if len(pos) == 0:
        raise ValueError("positions is empty")
    upper = np.array([images.shape[0], images.shape[1], images.shape[2]])
    if (pos < 0).any() or (pos >= upper).any():
        raise ValueError("positions must lie inside the images: 0 <= n < N, 0 <= y < H, 0 <= x < W")
    top, bottom, left, right = patch_padding((ph, pw))
    padded = _pad_border(images, (ph, pw), border)
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
        out = _output_vectors(base_net(patches, training=False), b)
        outputs.append(out if differentiable else tf.stop_gradient(out))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return tf.concat(outputs, 0)


def dense_reference(base_net, images, patch_size, batch_size: int = 256, progress: Optional[bool] = None,
                    differentiable: bool = False, border: str = "zeros", output_stride=1):
    """Cp run on every patch: the ground truth that CI must reproduce.

    Args:
        base_net: the patch network Cp (Keras), mapping (B, pH, pW, C) to (B, K) or (B, 1, 1, K).
        images: (N, H, W, C) floating tensor or array.
        patch_size: int or (pH, pW); patches follow the convention in :func:`patch_padding`.
        batch_size: patches per call of Cp.
        progress: show a progress bar (tqdm); None shows one for long runs.
        differentiable: let gradients flow (see :func:`patch_outputs`): the loss of Cp trained on
            every patch, to compare with training through CI.
        border: "zeros" (default), "reflect" or "replicate": how the image is extended (see BORDERS).
        output_stride: int or (sy, sx): only the pixels (sy * i, sx * j).

    Returns:
        (N, H, W, K) tensor with out[n, y, x] = Cp(patch of image n centred at (y, x)); with
        output_stride, (N, ceil(H / sy), ceil(W / sx), K) with out[n, i, j] at (sy * i, sx * j).
    """
    images = check_images(images)
    sy, sx = _pair(output_stride, "output_stride")
    n_img, height, width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    rows, cols = np.arange(0, height, sy), np.arange(0, width, sx)
    grid = np.stack(np.meshgrid(np.arange(n_img), rows, cols, indexing="ij"), -1).reshape(-1, 3)
    out = patch_outputs(base_net, images, patch_size, grid, batch_size=batch_size, progress=progress,
                        differentiable=differentiable, border=border)
    return tf.reshape(out, [n_img, len(rows), len(cols), -1])


# ---------------------------------------------------------------------------
# Wiring checks: what a hand-wired block can tell about the blocks before it
# ---------------------------------------------------------------------------


def _require(condition, message, *data):
    """Raise ValueError(message) where ``condition`` is a Python bool (sizes known when the graph is built, and
    in eager calls); where it is a tensor (sizes known only at run time, e.g. inside a tf.function), return an
    assertion that raises tf.errors.InvalidArgumentError with the message when the graph runs (None otherwise)."""
    if isinstance(condition, (bool, np.bool_)):
        if not condition:
            raise ValueError(message)
        return None
    return tf.debugging.Assert(condition, [message, *data])


def _after(x, checks):
    """``x``, computed only after the run-time ``checks`` passed (so that they fail before the reshapes would)."""
    checks = [c for c in checks if c is not None]
    if not checks:
        return x
    with tf.control_dependencies(checks):
        return tf.identity(x)


def _check_stacked(who, x, images, products, listed):
    """The wiring check of unwarpAll / unwrapPrepare: ``x`` must hold N x SH x SW maps that unwarp to at
    least the images' size (see :func:`_stacked_problem`).  Static sizes raise ValueError; with run-time
    sizes, returns ``x`` after assertions of the same."""
    if len(x.shape) != 4:
        raise ValueError(f"{who}: the stacked result must be (M * N, h, w, K), got shape {tuple(x.shape)}")
    (batch, h, w, _), (n, height, width, _) = _static_or_dynamic(x), _static_or_dynamic(images)
    if all(isinstance(v, int) for v in (batch, h, w, n, height, width)):
        problem = _stacked_problem(who, batch, (h, w), products, listed, (height, width), n)
        if problem:
            raise ValueError(problem)
        return x
    (sh, sw), m = products, products[0] * products[1]
    more = _require(batch <= n * m, f"{who}: the stacked result holds more maps than the images times the {m} shifts "
                                    f"per image of {listed}; likely cause: {_STRIDE_MISSING}",
                    "maps:", batch, "images:", n)
    fewer = _require(batch >= n * m, f"{who}: the stacked result holds fewer maps than the images times the {m} shifts "
                                     f"per image of {listed}; likely cause: {_NOT_REPLACED}; or the list holds a "
                                     f"stride that Cp does not have", "maps:", batch, "images:", n)
    cover_h, cover_w = h * sh >= height, w * sw >= width
    both = isinstance(cover_h, bool) and isinstance(cover_w, bool)
    cover = _require((cover_h and cover_w) if both else tf.logical_and(cover_h, cover_w),
             f"{who}: the stacked maps unwarp to less than the size of the images; likely cause: {_NOT_REPLACED} (and "
             f"its stride is not listed); or {_STRIDE_MISSING}; or multiPoolPrepare got a smaller stride product or "
             f"patch than Cp has", "map:", h, w, "images:", height, width)
    return _after(x, [more, fewer, cover])


# ---------------------------------------------------------------------------
# Stateless building blocks: multipooling and unwarping
# ---------------------------------------------------------------------------

def _pad_border(images, patch_size, border="zeros"):
    """The images extended by :func:`patch_padding` in the way ``border`` says (see BORDERS)."""
    ph, pw = _pair(patch_size, "patch_size")
    shape = _static_or_dynamic(images)
    _check_border(border, (shape[1], shape[2]), (ph, pw))
    top, bottom, left, right = patch_padding((ph, pw))
    if border == "zeros":
        return tf.pad(images, [[0, 0], [top, bottom], [left, right], [0, 0]])
    if border == "reflect" and all(isinstance(v, int) for v in shape[1:3]):
        return tf.pad(images, [[0, 0], [top, bottom], [left, right], [0, 0]], mode="REFLECT")
    if border == "reflect":  # sizes known only as the graph runs (an export): checked there, with the message
        # _check_border gives, and mirrored by indices that stay inside the image; where checks are dropped (a TFLite
        # interpreter, XLA) a smaller image gives NaN (it read memory outside the image, or gave numbers)
        large = tf.logical_and(shape[1] > max(top, bottom), shape[2] > max(left, right))
        check = tf.debugging.Assert(large, [f"border=reflect mirrors the image at its edge, so it must be larger "
                                            f"than the patch reaches beyond it: a {ph}x{pw} patch needs images of at "
                                            f"least {max(top, bottom) + 1}x{max(left, right) + 1}, got", shape[1],
                                            shape[2]])
        with tf.control_dependencies([check]):
            rows, cols = _reflected(shape[1], top, bottom), _reflected(shape[2], left, right)
            scale = tf.where(large, tf.constant(1.0, images.dtype), tf.constant(float("nan"), images.dtype))
            return tf.gather(tf.gather(images, rows, axis=1), cols, axis=2) * scale
    rows = [tf.repeat(images[:, :1], top, axis=1), images, tf.repeat(images[:, -1:], bottom, axis=1)]
    x = tf.concat(rows, 1)
    return tf.concat([tf.repeat(x[:, :, :1], left, axis=2), x, tf.repeat(x[:, :, -1:], right, axis=2)], 2)


def _reflected(size, before, after):
    """Indices into an axis of ``size`` (a scalar tensor) that extend it by ``before`` and ``after`` entries
    mirrored at its ends without repeating them (tf.pad's "REFLECT"), for any size inside the axis (numpy's
    reflection, repeated, where the axis is shorter than the reach)."""
    period = tf.maximum(2 * size - 2, 1)
    index = tf.range(size + before + after) - before + period * (before + 1)  # >= 0: exporters (tf2onnx) may lower
    index = index % period  # % of a negative value to a truncating remainder
    return tf.minimum(tf.where(index >= size, period - index, index), size - 1)


def multipool_prepare(images, patch_size, stride_product=1, border="zeros"):
    """Pad images so that every pixel has a full patch around it.

    Pads by :func:`patch_padding` (zeros, or the image reflected or replicated: ``border``) and, on the
    bottom and right, with zeros up to the next multiple of the stride product so that every
    multipooling divides evenly (those rows only feed outputs beyond the image, which are cropped).

    Shape:
        (N, H, W, C) -> (N, H' + pH - 1, W' + pW - 1, C), H' = ceil(H / SH) * SH, W' likewise.
    """
    top, bottom, left, right = patch_padding(patch_size)
    ph, pw = _pair(patch_size, "patch_size")
    sh, sw = _pair(stride_product, "stride_product")
    shape = _static_or_dynamic(images)
    # "ceil(H / SH) * SH - H", not "(-H) % SH": exporters (tf2onnx) may lower % of a negative
    # dynamic size to a truncating remainder
    extra_h = (shape[1] + sh - 1) // sh * sh - shape[1]
    extra_w = (shape[2] + sw - 1) // sw * sw - shape[2]
    if border == "zeros":
        padded = tf.pad(images, [[0, 0], [top, bottom + extra_h], [left, right + extra_w], [0, 0]])
    else:
        padded = tf.pad(_pad_border(images, patch_size, border), [[0, 0], [0, extra_h], [0, extra_w], [0, 0]])
    # padding by computed amounts hides every static size, the channels' too, which converters such
    # as TFLite's need for the convolutions that follow: a reshape to the same sizes, the known ones
    # as constants, restores them (set_shape would not reach a saved graph)
    return tf.reshape(padded, [shape[0], shape[1] + ph - 1 + extra_h, shape[2] + pw - 1 + extra_w, shape[3]])


def space_to_batch(x, stride):
    """Split a stride-1 result into its s x s shifts and stack them on the batch axis.

    Element (dy, dx, b) of the output batch holds ``x[b, dy::sh, dx::sw, :]``, cropped so
    that all shifts have the same size.

    Shape:
        (B, L_h, L_w, C) -> (sh * sw * B, L_h // sh, L_w // sw, C), shift-major.
    """
    sh, sw = _pair(stride, "stride")
    if len(x.shape) != 4:
        raise ValueError(f"space_to_batch: x must be a (B, H, W, C) map, got shape {tuple(x.shape)}")
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
    # power-average pooling as in PyTorch: t^(1/p), t = sum of x^p over the window (NaN where t < 0 and 1/p is
    # not an integer: an odd p over negative values); p = inf: the max of |x|, -inf: the min.  At t = 0 the
    # root's derivative is infinite; like PyTorch, the gradient there is 0 (not NaN).
    if norm_type in (float("inf"), -float("inf")):
        largest = tf.nn.max_pool2d(tf.abs(x) if norm_type > 0 else -tf.abs(x), kernel, stride, "VALID")
        return largest if norm_type > 0 else -largest
    total = tf.nn.avg_pool2d(tf.pow(x, norm_type), kernel, stride, "VALID") * float(kernel[0] * kernel[1])
    nonzero = tf.not_equal(total, 0)
    root = tf.pow(tf.where(nonzero, total, tf.ones_like(total)), 1.0 / norm_type)
    return tf.where(nonzero, root, tf.zeros_like(root))


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
    _check_window(f"multipooling ({kind}, kernel {kernel[0]}x{kernel[1]}, stride {stride[0]}x{stride[1]})", x,
                  kernel, stride, (1, 1))
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
        # TensorFlow has no strided dilated convolution; and TensorFlow 2.21's oneDNN float32 convolution with row
        # stride 1, column stride > 1 and one output column gives wrong values on batches of 2 or more
        if s != (1, 1) and (dil != (1, 1) or s[0] == 1):
            y = _conv2d(t, kernel, 1, dil)[:, ::s[0], ::s[1], :]
        else:
            y = _conv2d(t, kernel, s, dil)
        return y if bias is None else tf.nn.bias_add(y, bias)
    _check_window(f"multi_conv (kernel {kshape[0]}x{kshape[1]}, stride {stride[0]}x{stride[1]})", x, kshape,
                  stride, dil)
    return _multi(x, conv, kshape, stride, dil, naive)


def _conv2d(x, kernel, stride, dilation):
    """Valid tf.nn.conv2d; a grouped convolution (fewer kernel input channels than x has) runs as one
    convolution per group, since TensorFlow's fused CPU kernels (used in graphs) have no groups."""
    groups = 1 if x.shape[-1] is None else int(x.shape[-1]) // int(kernel.shape[2])
    if groups == 1:
        return tf.nn.conv2d(x, kernel, stride, "VALID", dilations=dilation)
    parts = zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))
    return tf.concat([tf.nn.conv2d(a, k, stride, "VALID", dilations=dilation) for a, k in parts], -1)


def _check_window(what, x, kernel, stride, dil):
    """A multipooling or strided layer needs a 4-D input of at least its window plus the shifts of its stride
    (always true in a correct wiring: the padded image holds every shift of every later layer).  Sizes
    known only at run time are not checked."""
    if len(x.shape) != 4:
        raise ValueError(f"{what}: its input must be a (B, H, W, C) map, got shape {tuple(x.shape)}")
    size = tuple(x.shape[1:3])
    need = [d * (k - 1) + s for k, s, d in zip(kernel, stride, dil)]
    if any(isinstance(n, int) and n < r for n, r in zip(size, need)):
        raise ValueError(f"{what}: its input is {size[0]}x{size[1]}, smaller than the {need[0]}x{need[1]} that its "
                         f"window and all its shifts need; likely cause: the images were not padded by "
                         f"multiPoolPrepare first, multiPoolPrepare got a smaller patch than Cp's, or a layer "
                         f"before this one shrinks the map more than in Cp")


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


def _shift_zero(y, x, kernel, stride, dilation=(1, 1)):
    """``y``, the output of an ordinary strided layer (window ``kernel`` at ``stride``, ``dilation``) on ``x``, cropped
    to the positions of its shift (0, 0) in multipooling: L // s along an axis whose stride-1 output has L positions
    (:func:`space_to_batch` crops every shift to that), where the strided layer gives ceil(L / s).  CI runs its
    leading strided layers so where output_stride skips their shifts (_ShiftOptions.shifts): branches cropped
    differently before such layers (a shortcut cropped to its main branch's size) then keep the sizes they have with
    all shifts, and merge."""
    _, lh, lw, _ = _static_or_dynamic(x)
    hq = (lh - dilation[0] * (kernel[0] - 1)) // stride[0]
    wq = (lw - dilation[1] * (kernel[1] - 1)) // stride[1]
    return y[:, :hq, :wq, :]


def unwarp_layer(x, stride):
    """Undo one multipooling layer (the outermost one): interleave its shifts into the image.

    Shape:
        (sh * sw * B, h, w, K) -> (B, h * sh, w * sw, K).
    """
    sh, sw = _pair(stride, "stride")
    b, h, w, k = _static_or_dynamic(x)
    if isinstance(b, int) and b % (sh * sw):
        raise ValueError(f"batch {b} is not a multiple of the {sh}x{sw} shifts: undo the layers last layer first, "
                         f"one per multipooling layer or multiConv; {_NOT_REPLACED}, or this stride is not Cp's")
    y = tf.transpose(tf.reshape(x, [sh, sw, b // (sh * sw), h, w, k]), [2, 3, 0, 4, 1, 5])
    return tf.reshape(y, [b // (sh * sw), h * sh, w * sw, k])


def unwarp(x, strides: Sequence, naive: bool = False):
    """Unwarping: turn the shift-stacked output of n multipooling layers into the image grid.

    The batch axis holds (y_n, x_n, ..., y_1, x_1, N) (last layer outermost).  The output row
    of (q, y_n, ..., y_1) is q * SH + ... + s_1 * y_2 + y_1 (paper, Section 3.3), likewise for
    columns.  Done as one gather of the stacked shifts (for more than one layer), one 6-D transpose
    and reshapes; ``naive`` instead undoes one layer at a time, innermost last (the paper's Torch
    listing).

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
    if isinstance(b, int) and b % _prod(sizes):
        raise ValueError(f"batch {b} is not a multiple of the {_prod(sizes)} stacked shifts of the strides {strides}: "
                         f"{_NOT_REPLACED}, or the list holds a stride that Cp does not have")
    m = _prod(sizes)
    n_img = b // m
    big_h = _prod(s[0] for s in strides)
    big_w = _prod(s[1] for s in strides)
    if n > 1:
        # Reorder the stacked shifts from (y_n, x_n, ..., y_1, x_1) to (y_n, ..., y_1, x_n, ..., x_1):
        # the y digits then form one index Y = the row offset y_1 + s_1 * y_2 + ..., likewise X, and
        # the unwarping is one 6-D transpose (TFLite's built-in transpose takes at most 6 dimensions)
        order = np.arange(m).reshape(sizes).transpose(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2)))
        x = tf.gather(tf.reshape(x, [m, n_img * h * w * k]), order.reshape(-1))
    v = tf.transpose(tf.reshape(x, [big_h, big_w, n_img, h, w, k]), [2, 3, 0, 4, 1, 5])
    return tf.reshape(v, [n_img, h * big_h, w * big_w, k])


# ---------------------------------------------------------------------------
# The same building blocks as Keras layers, under the original port's names
# ---------------------------------------------------------------------------

@_register
class multiPoolPrepare(_Layer):
    """Zero padding before CI: a patch around every pixel, size up to the stride product.

    Args:
        patchY, patchX: patch height and width (those Cp was trained on).
        stride_product: int or (SH, SW), product of all strides of the net, of its pooling layers and of
            its strided convolutions (default 1).

    Checks the images (rank, floating dtype, non-empty): see :func:`check_images`.

    Shape:
        (N, H, W, C) -> (N, H' + pY - 1, W' + pX - 1, C), H' = ceil(H / SH) * SH.
    """

    def __init__(self, patchY: int, patchX: int, stride_product=1, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = _pair((patchY, patchX), "patch size")
        self.stride_product = _pair(stride_product, "stride_product")

    def call(self, images):
        check_images(images)
        return multipool_prepare(images, self.patch_size, self.stride_product)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "patchY": self.patch_size[0], "patchX": self.patch_size[1],
                "stride_product": list(self.stride_product)}


class _ShiftOptions:
    """How CI runs one of its strided layers (multipooling, multiConv, _MultiDepthwise); DenseFeatureModel
    sets both flags from its own config."""
    #: False: an ordinary strided layer (CI's output_stride skips the shifts no output uses)
    shifts = True
    #: True (CI sets it on its last strided layer where only per-pixel layers follow): stride 1, the shifts left in
    #: place rather than stacked on the batch axis (not in naive mode)
    shifts_in_place = False


class _MultiPoolBase(_ShiftOptions, _Layer):
    kind = "max"

    def __init__(self, kW, kH, dW=None, dH=None, naive: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = _pair((kH, kW), "kernel size")
        self.stride = self.kernel_size if dW is None and dH is None else _pair((dH, dW), "stride")
        self.naive = bool(naive)

    def call(self, x):
        if not self.shifts:
            y = _pool(x, self.kind, self.kernel_size, self.stride, float(self._options().get("norm_type", 2.0)))
            return _shift_zero(y, x, self.kernel_size, self.stride)
        if self.shifts_in_place and not self.naive:
            return _pool(x, self.kind, self.kernel_size, (1, 1), float(self._options().get("norm_type", 2.0)))
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

    Raises a ValueError where its input is smaller than its window and shifts need (the images were
    not padded by :class:`multiPoolPrepare`, or with a smaller patch than Cp's).

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
        if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or not norm_type == norm_type \
                or norm_type == 0:  # (any other power, also negative or infinite: LPPool2d's)
            raise ValueError(f"multiLPPooling: norm_type (the power p) must be a nonzero number, got {norm_type!r}")
        self.norm_type = float(norm_type)

    def _options(self):
        return {"norm_type": self.norm_type}

    def get_config(self):
        return {**super().get_config(), "norm_type": self.norm_type}


def _dense_as_conv(x, dense, h, w):
    """A trained Dense layer on flattened (h, w, C) maps, as an h x w convolution (shared weights), in the
    Dense layer's compute dtype."""
    x, kernel, bias = _in_compute_dtype(dense, x, tf.reshape(dense.kernel, [h, w, -1, dense.units]),
                                        dense.bias if dense.use_bias else None)
    y = tf.nn.conv2d(x, kernel, 1, "VALID")
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    act = _activation_of(dense)
    return y if act is None else act(y)


def _activation_of(layer):
    act = getattr(layer, "activation", None)
    return None if act is None or act is keras.activations.linear else act


def _in_compute_dtype(layer, x, *weights):
    """``x`` and ``weights`` in ``layer``'s compute dtype, as Keras itself casts a layer's floating inputs (and,
    under a mixed policy, its variables) before the layer computes: a float32 Dense head of a mixed_bfloat16
    Cp computes in float32, a bfloat16 convolution in bfloat16 (None weights stay None)."""
    dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or x.dtype)
    if x.dtype.is_floating and x.dtype != dtype:
        x = tf.cast(x, dtype)
    return (x,) + tuple(None if w is None else tf.cast(w, x.dtype) for w in weights)


class _WrapperLayer(_Layer):
    """An FDFE layer that runs a trained layer of Cp (shared weights), held as ``self.<wrapped>``;
    its config holds that layer's, so the wrapper saves and loads with it."""
    wrapped = "layer"

    def compute_output_spec(self, *args, **kwargs):
        """As :class:`_Layer`'s, in the wrapped layer's compute dtype, which its call computes in."""
        spec = super().compute_output_spec(*args, **kwargs)
        dtype = getattr(getattr(self, self.wrapped, None), "compute_dtype", None)
        return spec if dtype is None else _spec_in_dtype(spec, dtype)

    def get_config(self):
        inner = keras.saving.serialize_keras_object(getattr(self, self.wrapped))
        return {**super().get_config(), self.wrapped: inner}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop(cls.wrapped))
        return cls(inner, **config)


def _quantized(layer, form):
    """Why a layer whose ``form`` FDFE computes from its kernel cannot be made dense if it is quantized (its kernel
    is then stored quantized, its scales apply in its own call()); None if it is not."""
    mode = getattr(layer, "quantization_mode", None)
    if mode is None:
        return None
    return (f"it is quantized (quantization_mode={mode!r}) and {form} is computed from its kernel, which is stored "
            f"quantized; convert the float model and do not quantize it (or CI) afterwards")


def _require_float_kernel(layer, what):
    """A layer whose dense form FDFE computes from its kernel must not have been quantized since convert."""
    reason = _quantized(layer, "its dense form")
    if reason is not None:
        raise ValueError(f"{what}: layer '{layer.name}': {reason}")


def _same_pads(size, kernel, stride, dilation=(1, 1)) -> bool:
    """Whether padding="same" pads a map of ``size`` (h, w) for windows of ``kernel`` at ``stride`` and ``dilation``:
    TensorFlow pads (ceil(n / s) - 1) * s + d * (k - 1) + 1 - n entries along an axis of n where that is positive.
    Never for a 1x1 window; at stride 1 always for larger ones; at stride s only where the last window overhangs the
    map (2x2 windows at stride 2 of an even-sized map, a 4x4 stride-4 patchify convolution on 16x16 pad nothing: the
    "valid" layer's windows, outputs and values)."""
    return any((_ceil_div(n, s) - 1) * s + d * (k - 1) + 1 > n
               for n, k, s, d in zip(size, _pair(kernel, "kernel"), _pair(stride, "stride"),
                                     _pair(dilation, "dilation")))


def _pads(conv, size=None) -> bool:
    """Whether a convolution layer pads its input (of ``size`` (h, w) in Cp, where given): padding="same" pads nothing
    for a 1x1 kernel, nor where its windows end inside the map (:func:`_same_pads`), where it is the "valid" layer."""
    if conv.padding == "valid":
        return False
    if conv.padding != "same":
        return True
    if size is None:
        return tuple(conv.kernel_size) != (1, 1)
    return _same_pads(size, conv.kernel_size, conv.strides, conv.dilation_rate)


@_register
class multiConv(_ShiftOptions, _WrapperLayer):
    """A trained strided Conv2D made dense.  Reuses (shares) the layer's weights and activation.

    Its stride counts like a pooling layer's: list it for :class:`unwarpAll` and in the stride product
    of :class:`multiPoolPrepare`.

    Args:
        conv: a trained ``keras.layers.Conv2D`` with padding='valid' (any strides, dilation, groups).
        naive: one strided convolution per shift instead of stride 1 + space-to-batch.
        input_size: (h, w), the size of the convolution's input in Cp, where its padding is 'same': accepted where it
            pads nothing at that size (a kernel equal to its stride on a multiple of it), as the 'valid' layer.

    Raises a ValueError where the input has other channels than the convolution takes, or is smaller
    than its window and shifts need.

    Shape:
        (B, L_h, L_w, C) -> (sh * sw * B, h', w', K).
    """
    wrapped = "conv"

    def __init__(self, conv, naive: bool = False, input_size=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(conv, keras.layers.Conv2D):
            raise TypeError(f"multiConv needs a trained keras.layers.Conv2D, got {type(conv).__name__}")
        self.input_size = None if input_size is None else _pair(tuple(input_size), "input_size")
        if _pads(conv, self.input_size):
            at = "" if self.input_size is None else f" at its {self.input_size[0]}x{self.input_size[1]} input"
            raise ConversionError(f"multiConv: the convolution pads its input (padding={conv.padding!r}{at}); "
                                  f"{_PADDING_REASON}")
        self.conv = conv
        self.naive = bool(naive)

    def build(self, input_shape):
        if not self.conv.built:
            self.conv.build(input_shape)

    def call(self, x):
        c = self.conv
        _require_float_kernel(c, "multiConv")
        channels = int(c.kernel.shape[2]) * int(c.groups)
        if len(x.shape) == 4 and x.shape[-1] is not None and x.shape[-1] != channels:
            raise ValueError(f"multiConv: its input has {x.shape[-1]} channels but the convolution takes "
                             f"{channels} (layout (B, H, W, C)); likely cause: a layer before it is missing, or "
                             f"in another order than in Cp")
        x, kernel, bias = _in_compute_dtype(c, x, c.kernel, c.bias if c.use_bias else None)
        if not self.shifts:  # an ordinary strided convolution (output_stride)
            y = multi_conv(x, kernel, bias, 1, c.dilation_rate)[:, ::c.strides[0], ::c.strides[1], :]
            y = _shift_zero(y, x, tuple(c.kernel_size), tuple(c.strides), tuple(c.dilation_rate))
        elif self.shifts_in_place and not self.naive:
            y = multi_conv(x, kernel, bias, 1, c.dilation_rate)
        else:
            y = multi_conv(x, kernel, bias, c.strides, c.dilation_rate, self.naive)
        act = _activation_of(c)
        return y if act is None else act(y)

    def compute_output_shape(self, input_shape):
        return (None, None, None, self.conv.filters)

    def get_config(self):
        size = {} if self.input_size is None else {"input_size": list(self.input_size)}
        return {**super().get_config(), "naive": self.naive, **size}


@_register
class unwrapPrepare(_Layer):
    """Crop every stacked shift to the image's grid, ready for :class:`unwrapPool`.

    Call as ``unwrapPrepare(stride_product)([stacked, images])``.  Checks the wiring like
    :class:`unwarpAll`: the number of stacked maps against N x SH x SW and that the maps cover the grid.

    Shape:
        (M * N, h, w, K), (N, H, W, C) -> (M * N, ceil(H / SH), ceil(W / SW), K).
    """

    def __init__(self, stride_product=1, **kwargs):
        super().__init__(**kwargs)
        self.stride_product = _pair(stride_product, "stride_product")

    def call(self, inputs):
        x, images = inputs
        sh, sw = self.stride_product
        x = _check_stacked("unwrapPrepare", x, images, (sh, sw), f"the stride product {sh}x{sw}")
        shape = _static_or_dynamic(images)
        h = _ceil_div(shape[1], sh)
        w = _ceil_div(shape[2], sw)
        return x[:, :h, :w, :]

    def get_config(self):
        return {**super().get_config(), "stride_product": list(self.stride_product)}


@_register
class unwrapPool(_Layer):
    """Undo one multipooling layer; apply once per layer (multiConv included), the last layer's first.

    Raises a ValueError where the batch is not a multiple of its shifts (an InvalidArgumentError with
    the same message where the batch is known only at run time).

    Shape:
        (dH * dW * B, h, w, K) -> (B, h * dH, w * dW, K).
    """

    def __init__(self, dW: int, dH: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.stride = _pair((dW if dH is None else dH, dW), "stride")

    def call(self, x):
        if len(x.shape) != 4:
            raise ValueError(f"unwrapPool: the stacked result must be (M * N, h, w, K), got shape {tuple(x.shape)}")
        sh, sw = self.stride
        batch = _static_or_dynamic(x)[0]
        check = _require(batch % (sh * sw) == 0,
                         f"unwrapPool: the stacked result is not a multiple of its {sh}x{sw} shifts: undo the layers "
                         f"last layer first, one per multipooling layer or multiConv; {_NOT_REPLACED}, or this stride "
                         f"is not that of Cp", "maps:", batch)
        return unwarp_layer(_after(x, [check]), self.stride)

    def get_config(self):
        return {**super().get_config(), "dW": self.stride[1], "dH": self.stride[0]}


@_register
class unwarpAll(_Layer):
    """Unwarping of all multipooling layers at once, plus the crop to the image size.

    Checks the wiring before unwarping: the stacked result must hold N x M maps (M = the product of all
    strides listed) and maps that unwarp to at least the image size.  A stride left out of the list, a
    pooling layer or strided convolution not replaced, or a smaller stride product or patch given to
    :class:`multiPoolPrepare` raise a ValueError that names these causes (inside a graph, where the
    sizes are known only at run time: tf.errors.InvalidArgumentError with the same causes); a correct
    wiring always passes (its maps may be larger than needed: they are cropped).

    Args:
        strides: list of (sh, sw) per multipooling layer and per multiConv, in network order.
        naive: undo one layer at a time (the paper's listing); same result.

    Call as ``unwarpAll(strides)([stacked, images])``.

    Shape:
        (M * N, h, w, K), (N, H, W, C) -> (N, H, W, K).

    Example:
        >>> x = np.zeros((2 * 16, 3, 4, 5), "float32")              # 2 images, strides (2, 2) and (2, 2)
        >>> tuple(FDFE.unwarpAll([(2, 2), (2, 2)])([x, np.zeros((2, 10, 13, 1), "float32")]).shape)
        (2, 10, 13, 5)
        >>> FDFE.unwarpAll([(2, 2)])([x, np.zeros((2, 10, 13, 1), "float32")])
        Traceback (most recent call last):
        ...
        ValueError: ...unwarpAll: the stacked result holds 32 maps, ... make 8; likely cause: a stride is missing ...
    """

    def __init__(self, strides: Sequence, naive: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.strides = [_pair(s, "stride") for s in strides]
        self.stride_product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.naive = bool(naive)

    def call(self, inputs):
        x, images = inputs
        x = _check_stacked("unwarpAll", x, images, self.stride_product, f"the strides {self.strides}")
        shape = _static_or_dynamic(images)
        return unwarp(x, self.strides, self.naive)[:, :shape[1], :shape[2], :]

    def compute_output_shape(self, input_shapes):
        x_shape, image_shape = input_shapes
        return (image_shape[0], image_shape[1], image_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "strides": [list(s) for s in self.strides], "naive": self.naive}


# ---------------------------------------------------------------------------
# Fully connected layers made dense, and the check of a CI against Cp
# ---------------------------------------------------------------------------


@_register
class linearAsConv(_WrapperLayer):
    """A trained fully connected layer made dense: a ``keras.layers.Dense`` as a convolution (shared weights).

    In Cp, a Dense after a Flatten sees the (h, w, C) map flattened in H, W, C order: that is an
    h x w convolution of the map with the Dense kernel read as (h, w, C, K), which CI applies at every
    position of the dense map (leave the Flatten out).  A Dense after another Dense (or on a 1 x 1 map)
    is a 1 x 1 convolution.  The Dense layer's activation is applied.  convert() builds the same for
    Flatten + Dense heads (as :class:`DenseAsConv`).

    Args:
        dense: the trained ``keras.layers.Dense`` (kernel and bias shared, not copied).
        in_shape: the map Cp flattens before this layer, (h, w, C), at the patch size CI is built for
            (Cp's layers up to the Flatten, run on one patch, give it), or its (h, w); None (default)
            for a Dense that follows another Dense (a 1 x 1 convolution).

    Raises a ValueError where ``in_shape`` does not flatten to the Dense layer's inputs, or where the
    input has other channels than ``in_shape`` says (e.g. a flattened map, or in_shape left out for the
    first Dense after a Flatten).

    Shape:
        (B, L_h, L_w, C) -> (B, L_h - h + 1, L_w - w + 1, K).

    Example:
        >>> fc = keras.layers.Dense(5)
        >>> maps = np.random.default_rng(0).standard_normal((2, 3, 2, 4)).astype("float32")  # Cp's map
        >>> flat = fc(maps.reshape(2, -1))                             # Cp: Flatten, then Dense
        >>> dense = FDFE.linearAsConv(fc, (3, 2, 4))(maps)             # one position: the whole 3x2 map
        >>> tuple(dense.shape)
        (2, 1, 1, 5)
        >>> bool(np.allclose(np.reshape(dense, (2, 5)), flat, atol=1e-6))
        True
    """
    wrapped = "dense"

    def __init__(self, dense, in_shape=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(dense, keras.layers.Dense):
            raise TypeError(f"linearAsConv needs a trained keras.layers.Dense, got {type(dense).__name__}")
        self.dense = dense
        self.given_shape = None if in_shape is None else list(_in_shape_dims(in_shape, "HWC"))
        if dense.built:
            self.in_shape = _linear_in_shape(int(dense.kernel.shape[0]), in_shape, "HWC")
        elif in_shape is not None and len(in_shape) == 3:
            self.in_shape = tuple(int(v) for v in in_shape)
        else:
            self.in_shape = None  # known when the Dense layer is built (from the input's channels)

    def build(self, input_shape):
        if not self.dense.built:
            h, w = (1, 1) if self.given_shape is None else self.given_shape[:2]
            channels = self.in_shape[2] if self.in_shape is not None else input_shape[-1]
            self.dense.build((None, h * w * channels))
        if self.in_shape is None:
            self.in_shape = _linear_in_shape(int(self.dense.kernel.shape[0]), self.given_shape, "HWC")

    def call(self, x):
        h, w, c = self.in_shape
        if len(x.shape) != 4:
            raise ValueError(f"linearAsConv: its input must be a (B, H, W, C) map, got shape {tuple(x.shape)}; "
                             f"in CI the Flatten before the Dense layer is left out")
        if x.shape[-1] is not None and x.shape[-1] != c:
            raise ValueError(f"linearAsConv: its input has {x.shape[-1]} channels, but in_shape {self.in_shape} "
                             f"says the map Cp flattens has {c}; likely cause: in_shape left out or wrong for the "
                             f"first Dense after a Flatten, or a layer before it is missing")
        _check_window("linearAsConv", x, (h, w), (1, 1), (1, 1))
        return _dense_as_conv(x, self.dense, h, w)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, self.dense.units)

    def get_config(self):
        return {**super().get_config(), "in_shape": self.given_shape}


#: the wiring mistakes check_ci names where CI and Cp differ


def _error_text(exc):
    """An exception's message; for a failed assertion inside a graph, only what the assertion says (not the
    trace of where the graph was built)."""
    text = str(exc)
    start = text.find("assertion failed: ")
    if start < 0:
        return text
    end = text.find("\n\t [[{{node", start)
    return text[start + len("assertion failed: "):end if end > 0 else None].strip()


#: the settings of Keras' layers that decide the ops CI builds from them (compared where they exist)
_LAYER_SETTINGS = ("filters", "kernel_size", "strides", "dilation_rate", "padding", "data_format", "groups",
                   "pool_size", "depth_multiplier", "units", "use_bias", "axis", "epsilon", "center", "scale", "offset",
                   "cropping", "size", "target_shape", "dims", "negative_slope", "max_value", "threshold", "alpha",
                   "shared_axes", "invert", "keepdims", "output_size", "approximate", "height", "width",
                   "rms_scaling", "function", "arguments", "interpolation", "crop_to_aspect_ratio")  # (Normalization's
#: statistics: variables, which CI reads at every call)
#: public attributes of Keras' layers and models that are not settings of what they compute (training state,
#: bookkeeping, inference-mode no-ops), for layers of the user's own, which are compared by all their settings
_KERAS_BOOKKEEPING = frozenset({"name", "built", "trainable", "autocast", "supports_jit", "supports_masking",
                                "call_signature_parameters", "compiled", "loss", "steps_per_execution",
                                "unrolled_steps_per_execution", "stop_training", "jit_compile", "run_eagerly",
                                "train_function", "test_function", "predict_function", "activity_regularizer",
                                "stop_evaluating", "stop_predicting",
                                "seed", "rate", "momentum", "renorm_momentum", "noise_shape", "stddev"})
_PLAIN_TYPES = (bool, int, float, str, type(None), enum.Enum)  # (an Enum's members: by identity)

#: the modules of Keras' layer library (keras.layers' classes and their bases)
_KERAS_LAYER_MODULES = ("keras.src.layers.", "keras.layers.", "keras.src.legacy.", "keras.legacy.")
#: the layer classes keras.layers exports (a few live outside the layer modules: TFSMLayer, JaxLayer)
_PUBLIC_KERAS_LAYERS = frozenset(v for v in vars(keras.layers).values()
                                 if isinstance(v, type) and issubclass(v, keras.layers.Layer))


def _keras_library_layer(kind) -> bool:
    """Whether ``kind`` is a layer class of Keras' layer library (what keras.layers exports, and the classes of its
    modules): layers with ops of their own, such as an LSTM or UpSampling2D, which convert() records as one op and
    refuses by kind where no rule makes them dense, and whose settings it compares by name (_LAYER_SETTINGS).
    Layers that Keras defines elsewhere, written as a user writes layers (keras.applications' ConvNeXt LayerScale and
    StochasticDepth, InceptionResNetV2's CustomScaleLayer), are not: they are traced through and compared as the
    user's own layers are."""
    return kind in _PUBLIC_KERAS_LAYERS or kind.__module__.startswith(_KERAS_LAYER_MODULES)


def _keras_own(kind) -> bool:
    """Whether ``kind`` is a class of Keras' own library of layers and models (see :func:`_keras_library_layer`),
    as opposed to the user's (and to the layers of keras.applications)."""
    return kind.__module__.startswith("keras.") and (issubclass(kind, keras.Model) or _keras_library_layer(kind))


def _is_plain(value, depth=0) -> bool:
    """Numbers, strings, None, numpy arrays (not of objects) and numbers, and tuples, lists and dicts of them:
    settings compared by value (others by identity; :func:`_snapshot`).  (The fields of configuration objects are
    settings of their own: :func:`_setting_paths`.)"""
    if isinstance(value, _PLAIN_TYPES + (np.generic,)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype != object
    if depth < 8 and isinstance(value, (tuple, list)):
        return all(_is_plain(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


class _Same:
    """A recorded setting that is compared by identity (a function, a layer, a tensor): equal to the record of the
    same object only."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self):
        return id(self.value)

    def __repr__(self):
        if tf.is_tensor(self.value):
            return f"a tensor of shape {tuple(self.value.shape)} (id {id(self.value):#x})"
        return repr(getattr(self.value, "__name__", self.value))


def _held_by_identity(name, value, captured=None, depth=0) -> bool:
    """A tensor that call() read as convert traced it (its id in ``captured``, the eager tensors the traced graph
    captured; None: any tensor) or a function that a layer of one's own holds (``self.gain = tf.constant(...)``,
    ``self.act = keras.activations.relu``, a functools.partial), or a list, tuple or dict of them and of plain values:
    one put in its place after convert changes Cp (compared by identity).  Variables (weights, followed), tensors
    call() does not read (a loss a train_step stores) and the methods Keras keeps in a layer's attributes are not."""
    if name in ("build", "quantize") or depth > 8:
        return False
    if isinstance(value, (list, tuple, dict)):
        items = list(value.values()) if isinstance(value, dict) else list(value)
        keys_plain = not isinstance(value, dict) or all(_is_plain(k) for k in value)
        return keys_plain and any(_held_by_identity(name, v, captured, depth + 1) for v in items) and all(
            _is_plain(v) or _held_by_identity(name, v, captured, depth + 1) for v in items)
    if isinstance(value, (tf.Variable, keras.Variable, keras.KerasTensor)):
        return False
    if tf.is_tensor(value):
        return captured is None or id(value) in captured
    return isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial))


def _extends_a_keras_layer(layer) -> bool:
    """Whether ``layer`` is of a subclass of one of Keras' own layers other than Layer and Model (a Normalization of
    one's own): the tensors its Keras base holds (a Normalization's statistics, rebuilt by finalize_state()) are
    Keras' to manage, not settings."""
    return any(issubclass(c, keras.layers.Layer) and _keras_own(c) and c not in (keras.layers.Layer, keras.Model)
               for c in type(layer).__mro__[1:])


class _ArrayRecord:
    """A numpy array or number recorded by value: a copy taken when recorded (a change of the array in place
    differs from it), equal to another record of the same dtype, shape and bytes."""

    __slots__ = ("array",)

    def __init__(self, value):
        self.array = np.array(value, copy=True)

    def __eq__(self, other):
        return (isinstance(other, _ArrayRecord) and self.array.dtype == other.array.dtype
                and self.array.shape == other.array.shape and self.array.tobytes() == other.array.tobytes())

    def __hash__(self):
        return hash((self.array.dtype.str, self.array.shape))

    def __repr__(self):
        with np.printoptions(threshold=8, edgeitems=2):
            return repr(self.array)


class _DictRecord:
    """A dict recorded by the records of its values (:func:`_snapshot`): a change in place, or another dict with
    other values, differs from it."""

    __slots__ = ("items",)

    def __init__(self, value, depth):
        self.items = tuple((k, _snapshot(v, depth)) for k, v in value.items())

    def __eq__(self, other):
        return isinstance(other, _DictRecord) and dict(self.items) == dict(other.items)

    def __hash__(self):
        return hash(frozenset(k for k, _ in self.items))

    def __repr__(self):
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items) + "}"


def _snapshot(value, depth=0):
    """A setting as recorded and compared (:func:`_same_setting`): numbers, strings and None as they are, tuples and
    lists as tuples of their records (a list changed in place differs from its record), dicts by the records of
    their values (_DictRecord), numpy arrays (up to _ARRAY_BY_VALUE entries) and numbers by value (a copy:
    _ArrayRecord), anything else (and what is nested deeper than 8 levels) by identity (_Same)."""
    if isinstance(value, _PLAIN_TYPES):
        return value
    if depth < 8 and isinstance(value, (tuple, list)):
        return tuple(_snapshot(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return _DictRecord(value, depth + 1)
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.dtype != object
                                         and value.size <= _ARRAY_BY_VALUE):
        return _ArrayRecord(value)
    return _Same(value)


#: numpy arrays of one's own layers up to this many entries are compared by value at every call of CI (a copy is
#: kept); larger ones (a lookup table) by identity, which costs nothing per call: replaced, not changed in place
_ARRAY_BY_VALUE = 65536


def _same_setting(a, b) -> bool:
    """Whether two records of a setting (:func:`_snapshot`) are equal: plain values and arrays by value (NaN equal to
    NaN), others by identity."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _attribute_values(layers) -> Dict[Tuple[int, str], object]:
    """(id of the layer, attribute) -> value (a snapshot of lists) of every public attribute of the user's own
    layers: snapshots taken around the runs of Cp that convert makes, to tell state (what call() changes as it
    runs: a counter, a shape seen) from settings."""
    values = {}
    for layer in layers:
        if not _keras_own(type(layer)) and type(layer).__module__ != __name__:
            for k, v in vars(layer).items():
                for path, value in _setting_paths(k, v) if k[0] != "_" else ():
                    values[(id(layer), path)] = _snapshot(value) if _is_plain(value) else id(value)
    return values


def _setting_names(layer, state=None, reads=None, captured=None) -> Tuple[str, ...]:
    """The settings of a layer that :func:`_layer_settings` records: for Keras' own layers those of
    ``_LAYER_SETTINGS`` they have; for layers and models of the user's own (subclasses of Keras' layers included),
    the public attributes with plain values (and the fields of configuration objects that call() read, ``reads``:
    a :class:`_ConfigReads`) but Keras' bookkeeping and the ``state`` that call() changed as
    convert ran Cp ((id of the layer, attribute) pairs; None: none compared, as in a copy made from a config);
    none for Sequential and functional models (their layers are compared) and for the layers FDFE builds (its
    LPPooling2D and LocalResponseNormalization are compared by their settings)."""
    kind, attributes = type(layer), vars(layer)
    if kind in (LPPooling2D, LocalResponseNormalization):
        return tuple(k for k, v in attributes.items() if k[0] != "_" and k not in _KERAS_BOOKKEEPING and _is_plain(v))
    if kind.__module__ == __name__:
        return ()
    if _keras_own(kind):
        return () if isinstance(layer, keras.Model) else tuple(k for k in _LAYER_SETTINGS if k in attributes)
    if state is None:
        return ()
    by_identity = not _extends_a_keras_layer(layer)
    return tuple(path for k, v in attributes.items() if k[0] != "_" and k not in _KERAS_BOOKKEEPING
                 and not k.startswith("is_") and "lora" not in k and "quantiz" not in k
                 and not k.endswith(("_regularizer", "_constraint"))
                 for path, value in _setting_paths(k, v, None if reads is None else reads.read(v))
                 if (id(layer), path) not in state and (_is_plain(value) or k in _LAYER_SETTINGS
                                                        or by_identity and _held_by_identity(k, value, captured)))


def _setting_of(layer, path):
    """The value of a setting of ``layer`` named as by :func:`_setting_names` (an attribute, or a field of a
    configuration object it holds, "cfg.temperature"); None where it is gone."""
    if "." not in path:
        return getattr(layer, path, None)
    return _read_setting(vars(layer), path, None)


def _layer_settings(layers, state=None, reads=None, captured=None) -> List[Tuple]:
    """(layer, setting names, their values, activation) of each layer (:func:`_setting_names`): what the layers CI
    built from them depend on.  A change after convert changes the ops Cp runs, which CI would not follow: refused
    where CI runs (DenseFeatureModel._check_settings, which reads the names listed here)."""
    entries = []
    for layer in layers:
        names = _setting_names(layer, state, reads, captured)
        entries.append((layer, names, tuple(_snapshot(_setting_of(layer, k)) for k in names),
                        getattr(layer, "activation", None)))
    return entries


def _container_records(layers) -> List[Tuple]:
    """(layer, ids of the layers it holds) for the layers among ``layers`` that hold others (Cp itself, its
    Sequential and functional sub-models, Pipelines, layers of one's own): ``Sequential.pop()``/``add()`` and
    a Pipeline's ``layers.pop()`` after convert change the ops Cp runs, which CI would not follow
    (DenseFeatureModel._check_settings refuses them)."""
    records = []
    for layer in layers:
        held = tuple(id(sub) for sub in layer._flatten_layers(include_self=False, recursive=False))
        if held:
            records.append((layer, held))
    return records


#: the end of the message for tiles asked for where the image size is unknown (an export traces such sizes)
_EXPORT_HINT = ("; exports (ci.export, tf.saved_model.save) trace CI for every size: set ci.tile = ci.max_memory = "
                "None before exporting (the artifact runs untiled)")


def _activity_regularized(layers) -> List[str]:
    """The names of the layers that add an activity regularization loss (``activity_regularizer=``, an
    ActivityRegularization layer): Cp adds it for each patch's activations, CI would add it for whole maps (or,
    for the layer, not at all), so CI refuses to train with them (DenseFeatureModel.call)."""
    names = []
    for layer in layers:
        if isinstance(layer, keras.layers.ActivityRegularization):
            if getattr(layer, "l1", 0) or getattr(layer, "l2", 0):
                names.append(layer.name)
        elif getattr(layer, "activity_regularizer", None) is not None:
            names.append(layer.name)
    return names


def _in_stateless_scope() -> bool:
    """Whether Keras runs in a StatelessScope (``model.stateless_call``), where variables read the values the
    scope gives them."""
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope
    except ImportError:  # another Keras layout: no such scope to honour
        return False
    return in_stateless_scope()


def run_as_graph(owner, fn, args, input_signature, cache: str = "_graph"):
    """Run ``fn(*args)`` as one graph when called eagerly (Keras-only; layer-by-layer eager execution is
    markedly slower); inside a graph (a tf.function, Keras tracing a model), run ``fn`` directly.

    Args:
        owner: the model the graph belongs to; the tf.function is cached on it as ``cache``, outside
            Keras' tracking (it is not saved, and is traced anew after loading).
        fn: the function to run, e.g. a hand-wired CI's layer-by-layer ``dense``.
        args: its arguments (tensors matching ``input_signature``).
        input_signature: list of tf.TensorSpec; None dimensions let one trace serve every image size.

    Returns:
        ``fn(*args)``.
    """
    if not tf.executing_eagerly():
        return fn(*args)
    graph = getattr(owner, cache, None)
    if graph is None:
        graph = tf.function(_GraphBody(fn), input_signature=input_signature)
        object.__setattr__(owner, cache, graph)
    return graph(*args)


def check_ci(ci, base_net, patch_size, in_channels: Optional[int] = None, image_size=(25, 37),
             batch: int = 2) -> float:
    """Check a CI (wired by hand, or from :func:`convert`) against Cp on random test images.

    Runs ``ci`` on ``batch`` random images of ``image_size`` and Cp on the patches around some of their
    pixels (every image's corners and middle, and random ones), both with training=False, and
    compares: the output's shape must be (N, H, W, K) and its values Cp's, within the tolerance of the
    dtype (relative to max |Cp|: float64 1e-9, float32 1e-4, 1e-2 on GPUs with TF32, others 3e-2).
    Cheap enough to run in a CI's constructor (the templates do).  For an exactness test use
    :func:`dense_reference` (Cp on every patch).

    Args:
        ci: the dense network (a model or any callable taking ``training=``), (N, H, W, C) -> (N, H, W, K).
        base_net: Cp.
        patch_size: int or (pH, pW).
        in_channels: C (default: ``ci.in_channels``, else Cp's input channels).
        image_size: (H, W) of the test images; by default 1 more than a multiple of the usual stride
            products (2, 3, 4, 6, 12), so that a smaller product given to multiPoolPrepare shows.
        batch: N of the test images.

    Returns:
        float: max |CI - Cp| / max |Cp| over the compared pixels.

    Raises:
        ValueError naming the difference (CI fails on the images, gives another shape, or other values;
        with the pixel) and the common wiring mistakes.

    Example:
        >>> cp = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3), keras.layers.MaxPooling2D(2),
        ...                        keras.layers.Conv2D(4, 2)])
        >>> def ci(images, training=False):                           # wired by hand for 6x6 patches
        ...     x = FDFE.multiPoolPrepare(6, 6, stride_product=2)(images)
        ...     x = cp.layers[2](FDFE.multiMaxPooling(2, 2)(cp.layers[0](x)))
        ...     return FDFE.unwarpAll([(2, 2)])([x, images])
        >>> FDFE.check_ci(ci, cp, 6, in_channels=1) < 1e-5
        True
    """
    ph, pw = _pair(patch_size, "patch_size")
    height, width = _pair(image_size, "image_size")
    if not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if in_channels is None:
        in_channels = getattr(ci, "in_channels", None)
        if not isinstance(in_channels, numbers.Integral):
            try:
                in_channels = base_net.inputs[0].shape[-1]
            except (AttributeError, IndexError, ValueError):
                in_channels = None
        if in_channels is None:
            raise ValueError("check_ci: in_channels cannot be inferred (neither ci nor Cp says it); pass in_channels=")
    out_channels = check_patch_size(base_net, (ph, pw), int(in_channels))
    dtype = _compute_dtype(base_net)
    images = tf.constant(np.random.default_rng(0).standard_normal((batch, height, width, int(in_channels))),
                         dtype=dtype)
    expected_shape = (batch, height, width, out_channels)
    try:
        out = ci(images, training=False)
    except Exception as exc:
        raise ValueError(f"check_ci: running CI on {batch} random {height}x{width}x{in_channels} images failed "
                         f"({type(exc).__name__}: {_error_text(exc)}); {_WIRING_HINTS}") from exc
    if not tf.is_tensor(out) or tuple(out.shape) != expected_shape:
        got = tuple(out.shape) if tf.is_tensor(out) else type(out).__name__
        raise ValueError(f"check_ci: CI gives {got} for {batch} images of {height}x{width}, but Cp on every patch "
                         f"gives {expected_shape} (N, H, W, K); {_WIRING_HINTS}")
    positions = _check_positions(batch, height, width)
    expected = patch_outputs(base_net, images, (ph, pw), positions).numpy().astype(np.float64)
    got = tf.gather_nd(out, positions).numpy().astype(np.float64)
    tolerance = None
    if dtype == tf.float32 and tf.config.list_logical_devices("GPU") \
            and tf.config.experimental.tensor_float_32_execution_enabled():
        tolerance = 1e-2  # TF32 tensor cores round operands to 10-bit mantissas
    return _check_ci_compare(got, expected, positions, dtype.name, tolerance)


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
# Automatic conversion, 1: capture.  Cp's call() is traced once into a TensorFlow graph on example
# patches.  The leaf Keras layers it calls are recorded as they are called (one op each); the
# TensorFlow ops between them (keras.ops, tf.*, Python arithmetic on tensors, casts, slices) are read
# from that graph, from each layer's inputs (and from Cp's output) back to values already recorded.
# ---------------------------------------------------------------------------


class _Call:
    """One recorded call of a leaf Keras layer inside Cp."""
    is_op = False

    def __init__(self, layer, in_slots, in_shapes, out_slots, out_shapes, problem=None):
        self.layer = layer
        self.in_slots, self.in_shapes = in_slots, in_shapes
        self.out_slots, self.out_shapes = out_slots, out_shapes
        self.out_slot, self.out_shape = out_slots[0], out_shapes[0]
        self.problem = problem  # a reason found while recording (several outputs, a constant input)

    @property
    def where(self):
        return f"layer '{self.layer.name}' ({type(self.layer).__name__})"

    def fail(self, reason):
        return ConversionError(f"{self.where} cannot be made dense exactly: {reason}")


class _OpCall:
    """One TensorFlow op of Cp's call() outside its Keras layers (keras.ops, tf.*, arithmetic on tensors).

    Attributes:
        op: the tf.Operation in the traced graph; ``type`` its name (that of its tf.raw_ops function).
        args: the op's inputs by tf.raw_ops argument name: an operand spec, or a list of them for list
            arguments (see :class:`_TFOp`); data operands are ``{"input": k}``, the value of
            ``in_slots[k]``.  Every spec also holds its traced ``"shape"``.
        attrs: the attributes not inferred from the inputs, by tf.raw_ops name: name -> [kind, value].
        variables: Cp's variables the op reads (``{"variable": k}`` specs), shared with CI.
        problem: the reason the op cannot be replayed, found while reading it (a random op among its
            constants, an attribute kind convert() does not copy), or None.
    """
    is_op = True

    def __init__(self, op, args, attrs, variables, in_slots, in_shapes, out_slots, out_shapes):
        self.op, self.type = op, op.type
        self.args, self.attrs, self.variables = args, attrs, variables
        self.in_slots, self.in_shapes = in_slots, in_shapes
        self.out_slots, self.out_shapes = out_slots, out_shapes
        self.problem = None

    @property
    def where(self):
        return f"TensorFlow op '{self.op.name}' ({self.type}{_created_at(self.op)})"

    def fail(self, reason):
        return ConversionError(f"{self.where} cannot be made dense exactly: {reason}")

    def constant(self, name):
        """The value of the constant operand ``name`` (a numpy array), or None if it is not a constant (also one
        computed by ops from constants alone, such as the perm tf.nn.softmax(t, axis=1) builds with tf.range)."""
        spec = self.args.get(name)
        if not isinstance(spec, dict) or "input" in spec or not _constant_only(spec):
            return None
        if "const" in spec:
            return np.asarray(spec["const"], dtype=spec["dtype"])
        try:
            value = np.asarray(_operand_value(spec, [], []))
        except (ValueError, TypeError, IndexError, tf.errors.OpError):
            return None
        # the operand becomes that constant, as one of the graph's own (the rules rebuild operands from its dtype)
        self.args[name] = {"const": value.tolist(), "dtype": value.dtype.name, "shape": spec.get("shape")}
        return value


#: folders whose frames are not the user's code, in the places messages give for traced ops
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (tf, keras))


def _created_at(op):
    """", created at file.py:line": the innermost frame of the user's code that created a traced op."""
    try:
        frames = list(op.traceback)
    except (AttributeError, TypeError, ValueError):
        return ""
    this_file = os.path.abspath(__file__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_LIBRARY_DIRS) and path != this_file:
            return f", created at {os.path.basename(path)}:{frame.lineno}"
    return ""


def _library_gradient(op):
    """Whether the custom gradient an op of tf.custom_gradient carries is TensorFlow's or Keras' own (tf.nn.silu,
    keras.ops.silu: the true gradient, computed to save memory), which CI follows as it runs the same ops: the code
    that called into tf.custom_gradient lies in their folders."""
    try:
        frames = list(op.traceback)
    except (AttributeError, TypeError, ValueError):
        return False
    for outer, frame in zip(frames, frames[1:]):
        if os.path.basename(frame.filename) == "custom_gradient.py":
            return os.path.abspath(outer.filename).startswith(_LIBRARY_DIRS)
    return False


def _flat_specs(args):
    """The operand specs of an op's ``args`` (list arguments flattened), in argument order."""
    for spec in args.values():
        yield from (spec if isinstance(spec, list) else [spec])


def _raw_op_names(op):
    """How tf.raw_ops names the op's inputs and attributes: (input names in op order, {op_def attr name ->
    raw name}) for the attributes not inferred from the inputs.  tf.raw_ops renames a few (Squeeze's
    squeeze_dims is ``axis``): names are matched first, the rest in order."""
    raw = getattr(tf.raw_ops, op.type, None)
    if raw is None:
        raise ValueError(f"TensorFlow has no tf.raw_ops.{op.type} to run it with")
    params = [p for p in inspect.signature(raw).parameters if p != "name"]
    op_def = op.op_def
    inputs = params[:len(op_def.input_arg)]
    inferred = {n for a in op_def.input_arg for n in (a.type_attr, a.number_attr, a.type_list_attr) if n}
    wanted = [a.name for a in op_def.attr if a.name not in inferred]
    free = [p for p in params[len(inputs):] if p not in wanted]
    unmatched = [a for a in wanted if a not in params[len(inputs):]]
    if len(free) != len(unmatched):
        raise ValueError(f"its attributes {wanted} do not match tf.raw_ops.{op.type}'s arguments {params}")
    names = {a: a for a in wanted if a not in unmatched}
    names.update(zip(unmatched, free))
    return inputs, names


def _grouped_inputs(op, names):
    """The op's input tensors grouped by argument: [(raw name, tensors, is_list)]."""
    inputs, start, groups = list(op.inputs), 0, []
    for arg, name in zip(op.op_def.input_arg, names):
        if arg.number_attr:
            count, is_list = op.get_attr(arg.number_attr), True
        elif arg.type_list_attr:
            count, is_list = len(op.get_attr(arg.type_list_attr)), True
        else:
            count, is_list = 1, False
        groups.append((name, inputs[start:start + count], is_list))
        start += count
    return groups


_PLAIN_ATTRS = ("int", "float", "bool", "list(int)", "list(float)", "list(bool)")


def _attr_config(op, name, kind):
    """An op attribute as [kind, JSON value] (read back by _attr_value)."""
    value = op.get_attr(name)
    if kind == "type":
        return [kind, tf.as_dtype(value).name]
    if kind == "list(type)":
        return [kind, [tf.as_dtype(v).name for v in value]]
    if kind == "shape":
        return [kind, None if value.rank is None else value.as_list()]
    if kind == "string":
        return [kind, value.decode() if isinstance(value, bytes) else value]
    if kind == "list(string)":
        return [kind, [v.decode() if isinstance(v, bytes) else v for v in value]]
    if kind in _PLAIN_ATTRS:
        return [kind, list(value) if kind.startswith("list") else value]
    raise ValueError(f"it has an attribute '{name}' of kind {kind}, which convert() does not copy")


def _attr_value(kind, value):
    if kind == "type":
        return tf.as_dtype(value)
    if kind == "list(type)":
        return [tf.as_dtype(v) for v in value]
    if kind == "shape":
        return tf.TensorShape(value)
    return value


def _operand_value(spec, xs, variables):
    """The tensor an operand spec stands for (see :class:`_TFOp`)."""
    if isinstance(spec, list):
        return [_operand_value(s, xs, variables) for s in spec]
    if "input" in spec:
        return xs[spec["input"]]
    if "const" in spec:
        return tf.constant(spec["const"], dtype=spec["dtype"])
    if "variable" in spec:
        variable = variables[spec["variable"]]
        return tf.convert_to_tensor(getattr(variable, "value", variable))
    return _run_op(spec["op"], spec["args"], spec["attrs"], xs, variables, spec.get("output"))


def _run_op(op_type, args, attrs, xs, variables, output=None):
    """Run tf.raw_ops.<op_type> with the operands and attributes recorded from Cp's graph."""
    kwargs = {name: _operand_value(spec, xs, variables) for name, spec in args.items()}
    kwargs.update((name, _attr_value(kind, value)) for name, (kind, value) in attrs.items())
    out = getattr(tf.raw_ops, op_type)(**kwargs)
    if output is not None and not tf.is_tensor(out):
        return out[output]
    return out


def _handle_of(variable):
    """The resource handle of a Keras variable (how the traced graph refers to it), or None."""
    return getattr(getattr(variable, "value", variable), "handle", None)


#: ops whose outputs are their inputs (tf.identity; IdentityN, which tf.custom_gradient wraps results in)
_IDENTITIES = ("Identity", "IdentityN", "Snapshot")


def _identity_source(tensor):
    """The input an identity op passes on as ``tensor``."""
    op = tensor.op
    return op.inputs[tensor.value_index if op.type == "IdentityN" else 0]


class _GraphBody:
    """``fn`` as a callable object for tf.function.  TensorFlow counts traces per function code, so the
    graphs of several models (or several convert() traces) would count as one function retraced over and
    over and print retracing warnings; a callable object is counted on its own."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


#: Keras' layers that only call other layers (traced through, as models are)
_CONTAINERS = tuple(c for c in (getattr(keras.layers, "Pipeline", None),) if isinstance(c, type))


def _is_leaf(layer) -> bool:
    """Layers recorded as one op: those with a rule, and the layers of Keras' layer library (an LSTM, with its
    cell; an unknown kind is named as such: :func:`_keras_library_layer`).  Models, Lambda layers, the user's own
    layers and the layers Keras defines outside its layer library (keras.applications' LayerScale) are traced
    through: their ops are read from the graph."""
    if isinstance(layer, (keras.Model, keras.layers.Lambda) + _CONTAINERS):
        return False
    return _lookup_rule(layer) is not None or _keras_library_layer(type(layer))


#: the tracer of the convert() running in this thread (other threads' Keras calls are not recorded)
_RECORDING = threading.local()
_ORIGINAL_LAYER_CALL = []


def _install_recording_call():
    """Wrap keras.Layer.__call__ once: it records leaf calls for the tracer of the calling thread only."""
    if _ORIGINAL_LAYER_CALL:
        return
    original = keras.Layer.__call__

    def recording_call(layer, *args, **kwargs):
        tracer = getattr(_RECORDING, "tracer", None)
        if tracer is None or tracer.inside or isinstance(layer, keras.layers.InputLayer) or not _is_leaf(layer):
            return original(layer, *args, **kwargs)
        tracer.inside = True  # calls inside a recorded layer (an LSTM's cell) are part of it
        try:
            out = original(layer, *args, **kwargs)
        finally:
            tracer.inside = False
        forced = kwargs.get("training", args[1] if len(args) > 1 else None) is True
        tracer.record(layer, args[:1] or [kwargs.get("inputs")], out, forced)
        return out
    recording_call.__wrapped__ = original
    keras.Layer.__call__ = recording_call
    _ORIGINAL_LAYER_CALL.append(original)


#: Keras' augmentation layers (those this Keras has): random transformations in training, meant to be the
#: identity at inference (each is checked to be so at convert, on maps larger than the patch-level ones too)
_AUGMENTATION = tuple(getattr(keras.layers, name) for name in (
    "RandomBrightness", "RandomColorDegeneration", "RandomColorJitter", "RandomContrast", "RandomCrop",
    "RandomElasticTransform", "RandomErasing", "RandomFlip", "RandomGaussianBlur", "RandomGrayscale", "RandomHue",
    "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomRotation", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "RandAugment", "AugMix", "CutMix", "MixUp")
    if isinstance(getattr(keras.layers, name, None), type))

#: layers that draw random values in training mode (identity at inference)
_RANDOM_IN_TRAINING = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
                       keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
                       keras.layers.AlphaDropout)


#: the raw arguments of ops that take a shape, sizes or bounds (a reshape's target, a slice's bounds, a fill's
#: dims): computed from an activation's shape, they may hold the batch size, which their rules read from the
#: traced shapes instead (_Tracer.refuse_batch_reads compares the other constant operands)
_SHAPE_ARGUMENTS = frozenset({"shape", "dims", "begin", "end", "strides", "size", "multiples", "paddings",
                              "size_splits", "block_shape", "crops", "output_shape"})


def _differ_by_batch(was, now) -> bool:
    """Whether an operand computed from shapes differs between traces of Cp on two batch sizes: by value where
    it has one shape in both; else by the values it holds (a constant of the batch's shape, such as
    ``tf.zeros_like(x)``, holds the same values for any batch)."""
    if "float" in was.dtype.name and was.dtype.kind not in "fc":  # (ml_dtypes' bfloat16, float8: kind "V")
        was, now = was.astype(np.float32), now.astype(np.float32)
    if was.shape == now.shape:
        return not np.array_equal(was, now, equal_nan=was.dtype.kind in "fc")
    return not np.array_equal(np.unique(was), np.unique(now), equal_nan=was.dtype.kind in "fc")


def _short_value(value):
    """A value for messages: its entries where few, else its shape."""
    value = np.asarray(value)
    return repr(value.tolist()) if value.size <= 4 else f"an array of shape {list(value.shape)}"


class _Tracer:
    """Traces Cp's call() into a TensorFlow graph; records its leaf Keras layers as they are called and the
    TensorFlow ops between them (read from the graph), linked through the graph's tensors.

    Attributes:
        calls: the recorded layers (_Call) and ops (_OpCall), each after those it reads.
        slot_of: tensor name in the traced graph -> slot (0: the input patches).
        shapes: slot -> traced shape.
        out_slot: the slot of Cp's output (None where it does not depend on the input).
    """

    def __init__(self, base_net):
        self.base_net = base_net
        self.graph = None
        self.slot_of: Dict[str, int] = {}
        self.shapes: Dict[int, tuple] = {}
        self.calls: list = []
        self.inside = False
        self.out_slot = None
        self._depends_on_input: Dict[str, bool] = {}
        self._variables = {id(h): v for v in base_net.weights for h in [_handle_of(v)] if h is not None}
        self.constant_reads: list = []  # (op call, [(input index, raw argument name)]): see refuse_batch_reads
        self.gradient_hazards: list = []  # what sets Cp's gradients in a way CI cannot follow (tf.custom_gradient)

    def __enter__(self):
        _install_recording_call()
        if getattr(_RECORDING, "tracer", None) is not None:
            raise RuntimeError("convert() is already running in this thread")
        _RECORDING.tracer = self
        return self

    def __exit__(self, *exc):
        _RECORDING.tracer = None
        return False

    def trace(self, example):
        """Trace Cp on patches of ``example``'s shape and dtype (in inference mode) and record it."""
        spec = tf.TensorSpec(example.shape, example.dtype)
        tf.function(_GraphBody(self._body), autograph=False).get_concrete_function(spec)

    def _body(self, patches):
        self.graph = patches.graph
        self._new_slot(patches)
        out = self.base_net(patches, training=False)
        outs = tf.nest.flatten(out)
        if len(outs) == 1 and tf.is_tensor(outs[0]) and self._depends(outs[0]):
            self.out_slot = self._resolve(outs[0])
        return out

    def _new_slot(self, tensor):
        slot = len(self.shapes)
        self.slot_of[tensor.name] = slot
        self.shapes[slot] = tuple(tensor.shape) if tensor.shape.rank is not None else (None,)  # unknown rank
        self._depends_on_input[tensor.name] = True
        return slot

    def record(self, layer, first, out, training=False):
        """A leaf layer was called on ``first`` (a list holding its first argument): record it, after the ops
        that computed its inputs.  ``training``: called with training=True (whatever Cp's mode)."""
        inputs = [t for t in tf.nest.flatten(first) if tf.is_tensor(t)]
        if self.graph is None or not inputs or any(getattr(t, "graph", None) is not self.graph for t in inputs):
            return  # a call outside Cp's traced graph (Keras building a layer symbolically)
        depends = [self._depends(t) for t in inputs]
        if not any(depends):
            return  # a layer applied to constants gives a constant: read from the graph where it is used
        name = f"layer '{layer.name}' ({type(layer).__name__})"
        outs = tf.nest.flatten(out)
        problem = None
        if not all(depends):
            problem = ConversionError(f"{name} cannot be made dense exactly: it combines values computed from "
                                      f"the patch with a constant (a tensor that does not depend on Cp's input)")
        elif len(outs) != 1 or not tf.is_tensor(outs[0]):
            problem = ConversionError(f"{name} returns {len(outs)} values; only layers with one output are "
                                      f"supported")
        elif training and (isinstance(layer, _AUGMENTATION) or isinstance(layer, _RANDOM_IN_TRAINING)
                           and getattr(layer, "rate", getattr(layer, "stddev", 1)) > 0):
            problem = ConversionError(f"{name} cannot be made dense exactly: Cp's call() calls it with "
                                      f"training=True whatever Cp's mode, so it draws random values, which no dense "
                                      f"computation reproduces; pass it the training argument Cp's call() receives")
        elif training and isinstance(layer, keras.layers.BatchNormalization):
            problem = ConversionError(f"{name} cannot be made dense exactly: Cp's call() calls it with "
                                      f"training=True whatever Cp's mode, so it normalises with statistics of the "
                                      f"batch of patches; pass it the training argument Cp's call() receives")
        in_slots = [self._resolve(t) for t, d in zip(inputs, depends) if d]  # before its outputs get slots
        out_slots = [self._new_slot(t) for t in outs if tf.is_tensor(t)]
        if out_slots:
            self.calls.append(_Call(layer, in_slots, [self.shapes[s] for s in in_slots], out_slots,
                                    [self.shapes[s] for s in out_slots], problem))

    def _depends(self, tensor):
        """Whether ``tensor`` is computed from Cp's input (else it is a constant of Cp: constants, weights)."""
        known = self._depends_on_input.get(tensor.name)
        if known is None:
            op = tensor.op
            if op.type in _IDENTITIES:
                known = self._depends(_identity_source(tensor))
            else:
                known = op.type != "Placeholder" and any(self._depends(t) for t in op.inputs)
            self._depends_on_input[tensor.name] = known
        return known

    def _resolve(self, tensor):
        """The slot of a value computed from the input: recorded already, or recorded now as the op that
        computes it (after the ops it reads)."""
        if tensor.name in self.slot_of:
            return self.slot_of[tensor.name]
        op = tensor.op
        if op.type in _IDENTITIES:  # the same value (tf.identity, the outputs of a custom gradient)
            if op.type == "IdentityN" and "_gradient_op_type" in op.node_def.attr and not _library_gradient(op):
                what = f"a custom gradient (tf.custom_gradient, keras.ops.custom_gradient{_created_at(op)})"
                if what not in self.gradient_hazards:
                    self.gradient_hazards.append(what)
            self.slot_of[tensor.name] = self._resolve(_identity_source(tensor))
            return self.slot_of[tensor.name]
        args, attrs, variables, in_slots, problem = {}, {}, [], [], None
        reads = []  # its constant operands, which may hold the batch size (tf.shape(x)[0]: see refuse_batch_reads)
        try:
            input_names, attr_names = _raw_op_names(op)
            for name, tensors, is_list in _grouped_inputs(op, input_names):
                specs = [self._operand(t, in_slots, variables) for t in tensors]
                args[name] = specs if is_list else specs[0]
                reads += [name] * len(tensors)
            kinds = {a.name: a.type for a in op.op_def.attr}
            attrs = {raw: _attr_config(op, name, kinds[name]) for name, raw in attr_names.items()}
        except ValueError as exc:
            problem = str(exc)
        reads = [(k, name) for k, (name, spec) in enumerate(zip(reads, _flat_specs(args)))
                 if name not in _SHAPE_ARGUMENTS and "input" not in spec and "variable" not in spec]
        out_slots = [self._new_slot(t) for t in op.outputs]
        call = _OpCall(op, args, attrs, variables, in_slots, [self.shapes[s] for s in in_slots], out_slots,
                       [self.shapes[s] for s in out_slots])
        if reads:
            self.constant_reads.append((call, reads))
        unknown = [s for s in call.in_shapes + call.out_shapes if None in s]
        if problem is None and unknown:
            problem = f"its traced shapes {unknown} are not fully known"
        call.problem = None if problem is None else call.fail(problem)
        self.calls.append(call)
        return self.slot_of[tensor.name]

    def refuse_batch_reads(self, example):
        """Refuse the ops that compute with the batch size of an activation (``x * tf.cast(tf.shape(x)[0], ...)``,
        ``x * x.shape[0]``): the traced graph holds it as a constant (that of the example batch), so CI would
        compute with it, while Cp's value for a patch depends on how many patches are batched with it.  The
        constant operands of the recorded ops (``constant_reads``; shape arguments of reshapes, slices and fills,
        which their rules read from the traced shapes, aside) are compared with those of a trace of Cp on a batch
        of another size; those that differ make their op's problem.  (Nothing to compare where Cp cannot be traced
        on that batch, or its graph names the op otherwise.)"""
        if not self.constant_reads:
            return
        batch = int(example.shape[0])
        spec = tf.TensorSpec([batch + 1] + list(example.shape[1:]), example.dtype)
        try:
            graph = tf.function(_GraphBody(lambda patches: self.base_net(patches, training=False)),
                                autograph=False).get_concrete_function(spec).graph
        except Exception:  # (Cp rejects the batch size: it is not Cp's concern here)
            return
        for call, reads in self.constant_reads:
            try:
                other = graph.get_operation_by_name(call.op.name)
            except (KeyError, ValueError):
                continue
            if other.type != call.type or len(other.inputs) != len(call.op.inputs) or call.problem is not None:
                continue
            specs = list(_flat_specs(call.args))
            for k, name in reads:
                was, now = self._constant_value(specs[k], call.variables), self._value_in(graph, other.inputs[k])
                if was is not None and now is not None and _differ_by_batch(was, now):
                    call.problem = call.fail(
                        f"its operand '{name}' is computed from the batch size of an activation (such as "
                        f"tf.shape(x)[0] or x.shape[0]): {_short_value(was)} for a batch of {batch} patches, "
                        f"{_short_value(now)} for {batch + 1}; Cp's result for a patch then depends on how many "
                        f"patches are batched with it, which CI (one pass over whole images) cannot reproduce: "
                        f"compute without the batch size")
                    break

    def _constant_value(self, spec, variables):
        """The value (a numpy array) of a constant operand's spec (``variables``: those it reads); None where it
        cannot be computed."""
        try:
            if "const" in spec:
                return np.asarray(spec["const"], dtype=spec["dtype"])
            return np.asarray(_operand_value(spec, [], variables))
        except (ValueError, TypeError, tf.errors.OpError):
            return None

    def _value_in(self, graph, tensor):
        """The value (a numpy array) of a constant ``tensor`` of ``graph``, another trace of Cp, read as this
        tracer reads its own graph's constants (:meth:`_constant`); None where it cannot be read (a random op
        among its constants)."""
        own, self.graph = self.graph, graph
        try:
            variables = []
            spec = self._constant(tensor, variables)
        except ValueError:
            return None
        finally:
            self.graph = own
        return self._constant_value(spec, variables)

    def _operand(self, tensor, in_slots, variables):
        """The operand spec of one input of a recorded op (a value computed from the input, or a constant)."""
        shape = None if tensor.shape.rank is None else list(tensor.shape)
        if self._depends(tensor) and tf.get_static_value(tensor) is None:  # (tf.shape(x) is a constant)
            in_slots.append(self._resolve(tensor))
            return {"input": len(in_slots) - 1, "shape": shape}
        return {**self._constant(tensor, variables), "shape": shape}

    def _constant(self, tensor, variables):
        """The spec of a value that does not depend on the input: a constant, one of Cp's variables (read by
        CI at every call, so that CI follows Cp's training), or an op of those."""
        value = tf.get_static_value(tensor)
        if value is not None:
            return {"const": np.asarray(value).tolist(), "dtype": tensor.dtype.name}
        op = tensor.op
        if op.type in _IDENTITIES:
            return self._constant(_identity_source(tensor), variables)
        if op.type == "ReadVariableOp":
            variable = self._variables.get(id(self._captured(op.inputs[0])))
            if variable is None:
                raise ValueError(f"it reads a variable ('{op.name}') that is not one of Cp's weights")
            index = next((i for i, v in enumerate(variables) if v is variable), None)
            if index is None:
                variables.append(variable)
                index = len(variables) - 1
            return {"variable": index}
        if op.type == "Placeholder":
            captured = self._captured(tensor)
            if captured is None or tensor.dtype == tf.resource:
                raise ValueError(f"it reads '{op.name}', a value captured from outside Cp that convert() cannot "
                                 f"follow")
            return {"const": np.asarray(captured).tolist(), "dtype": tensor.dtype.name}
        if op.op_def.is_stateful:
            raise ValueError(f"it computes a constant with {op.type} ('{op.name}'), a random or stateful op, whose "
                             f"value CI cannot reproduce")
        input_names, attr_names = _raw_op_names(op)
        args = {}
        for name, tensors, is_list in _grouped_inputs(op, input_names):
            specs = [self._constant(t, variables) for t in tensors]
            args[name] = specs if is_list else specs[0]
        kinds = {a.name: a.type for a in op.op_def.attr}
        return {"op": op.type, "args": args, "output": tensor.value_index,
                "attrs": {raw: _attr_config(op, name, kinds[name]) for name, raw in attr_names.items()}}

    def _captured(self, internal):
        """The outside value (an eager tensor or a variable's handle) a placeholder of the graph captures."""
        for external, placeholder in self.graph.captures:
            if placeholder.name == internal.name:
                return external
        return None


# ---------------------------------------------------------------------------
# Automatic conversion, 2: layers that only CI uses
# ---------------------------------------------------------------------------

@_register
class DenseAsConv(_WrapperLayer):
    """A trained Dense layer applied to a flattened (h, w, C) map, as an h x w convolution.

    Shares the Dense layer's weights: its kernel (h*w*C, K) is read as (h, w, C, K) (Keras'
    H, W, C flattening order), and its activation is applied.

    Args:
        dense: a trained ``keras.layers.Dense``.
        size: (h, w) of the map that was flattened before it.

    Shape:
        (B, L_h, L_w, C) -> (B, L_h - h + 1, L_w - w + 1, K).
    """
    wrapped = "dense"

    def __init__(self, dense, size, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense
        self.size = _pair(size, "size")

    def build(self, input_shape):
        if not self.dense.built:
            self.dense.build((None, self.size[0] * self.size[1] * input_shape[-1]))

    def call(self, x):
        _require_float_kernel(self.dense, "DenseAsConv")
        return _dense_as_conv(x, self.dense, self.size[0], self.size[1])

    def compute_output_shape(self, input_shape):
        return (None, None, None, self.dense.units)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size)}


@_register
class PerPixel(_WrapperLayer):
    """Applies a trained layer built for (B, C) vectors to the vector of every position of a map: CI's
    (B, H, W, C) values are read as (B * H * W, C) rows and put back (shared weights, inference mode).

    For layers that accept no 4-D input once built on a Dense head's output (``BatchNormalization``,
    ``PReLU``); ``convert`` wraps them itself, hand-wired CIs wrap them so.  With ``rank=3``, for such a layer
    built for (B, L, C) positions (a map reshaped to (B, h*w, C)): the values are read as (B, H*W, C).

    Args:
        layer: the trained layer, built for (B, C) inputs (``rank=2``) or (B, L, C) inputs (``rank=3``).
        rank: the rank of the inputs the layer was built for, 2 or 3.

    Shape:
        (B, H, W, C) -> (B, H, W, C).

    Example:
        >>> bn = keras.layers.BatchNormalization()
        >>> bn.build((None, 5))
        >>> tuple(FDFE.PerPixel(bn)(np.ones((1, 3, 4, 5), "float32")).shape)
        (1, 3, 4, 5)
    """
    wrapped = "layer"

    def __init__(self, layer, rank=2, **kwargs):
        super().__init__(**kwargs)
        if rank not in (2, 3):
            raise ValueError(f"rank must be 2 or 3 (the rank of the inputs the layer was built for), got {rank!r}")
        self.layer, self.rank = layer, rank

    def call(self, x):
        shape = tf.shape(x)
        rows = self.layer(tf.reshape(x, [-1, x.shape[-1]] if self.rank == 2 else [shape[0], -1, x.shape[-1]]),
                          training=False)
        return tf.reshape(rows, shape)

    def get_config(self):
        return {**super().get_config(), "rank": self.rank}

    def compute_output_shape(self, input_shape):
        return input_shape


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


def _transposer(perm):
    """A layer that transposes dense values by ``perm`` in their own dtype (keras.layers.Permute autocasts to the
    default float32 policy: a float64 CI would lose its precision)."""
    return _TFOp("Transpose", {"x": {"input": 0}, "perm": {"const": list(perm), "dtype": "int32"}}, {})


@_register
class _TFOp(_Layer):
    """A TensorFlow op of Cp's call() applied to dense values: the same op, with the same constants and
    attributes (element-wise ops, reductions over channels, concatenation on channels, ...).

    Args:
        op_type: the op's name (the function tf.raw_ops.<op_type> runs it).
        args: tf.raw_ops argument name -> operand spec, or a list of them for list arguments:
            ``{"input": k}``: the k-th tensor given to the layer; ``{"const": value, "dtype": name}``;
            ``{"variable": k}``: ``variables[k]``, read at every call; ``{"op": type, "args": ...,
            "attrs": ..., "output": i}``: an op of constants and variables (e.g. ``exp`` of a weight).
        attrs: tf.raw_ops argument name -> [attribute kind, value] for the op's attributes.
        variables: Cp's variables the op reads (shared, not copied).  The model holding the op tracks them
            (:class:`DenseFeatureModel`: weights of CI once each) and sets ``variable_refs``, where the config
            says where each is held, so that a copy made from the config binds the op to its own copy of them.
        variable_refs: from a config: for each variable, ["model", k, shape, dtype] (the k-th of the model's read
            variables) or ["layer", name, i, shape, dtype] (the i-th weight of the core's layer ``name``); until
            the model binds them (:meth:`bind`), zeros of that shape stand for them (Keras rebuilding the core).

    Shape:
        the op's: the layer takes the list of dense tensors and returns the op's output (a list for ops
        with several outputs).
    """

    def __init__(self, op_type, args, attrs, variables=(), variable_refs=None, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "_op", (str(op_type), dict(args), dict(attrs), tuple(variables)))
        object.__setattr__(self, "variable_refs", variable_refs)  # (untracked: the model holds the variables)

    def bind(self, variables):
        """Read ``variables`` (a copy's own, resolved from ``variable_refs``) from now on."""
        op_type, args, attrs, _ = self._op
        object.__setattr__(self, "_op", (op_type, args, attrs, tuple(variables)))

    def call(self, inputs):
        op_type, args, attrs, variables = self._op
        if not variables and self.variable_refs:  # (not bound yet)
            variables = [tf.zeros(ref[-2], ref[-1]) for ref in self.variable_refs]
        xs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        out = _run_op(op_type, args, attrs, xs, variables)
        return out if tf.is_tensor(out) else list(out)

    def get_config(self):
        op_type, args, attrs, variables = self._op
        return {**super().get_config(), "op_type": op_type, "attrs": attrs, "args": args,
                "variable_refs": self.variable_refs}


def _window_combine(x, axis, k, combine):
    """``combine`` (an associative and idempotent op: tf.maximum, tf.minimum) over every k consecutive
    entries along ``axis`` (1 or 2) of a 4-D tensor, without padding: windows of 1, 2, 4, ... entries
    from pairs of shifted slices, then two overlapping ones of size k."""
    def head(t, n):
        return t[:, :-n] if axis == 1 else t[:, :, :-n]

    def tail(t, n):
        return t[:, n:] if axis == 1 else t[:, :, n:]
    span = 1
    while 2 * span <= k:
        x = combine(head(x, span), tail(x, span))
        span *= 2
    if span < k:
        x = combine(head(x, k - span), tail(x, k - span))
    return x


def _window_extremum(x, window, combine, over_channels=False):
    """The max (``combine`` tf.maximum) or min (tf.minimum) of every kh x kw window of ``x`` at stride 1
    (:func:`_window_combine`, along the rows, then the columns), whose gradient, like tf.reduce_max's
    (GlobalMaxPooling2D), is shared equally among each window's tied extrema: tf.maximum's gives it to one of them.
    The gradient goes back through the two stages (an entry ties its window's extremum where it ties its column's
    kh entries and that column's extremum ties the window's): kh + kw passes, not kh * kw.  ``over_channels``: the
    window spans the channels too (``keras.ops.max(x, axis=(1, 2, 3))``): each pixel's extremum over its channels
    first, its tied channels counted in the shares, and one channel out."""
    kh, kw = window
    reduce = tf.reduce_max if combine is tf.maximum else tf.reduce_min

    @tf.custom_gradient
    def extremum(v):
        pixels = reduce(v, -1, keepdims=True) if over_channels else v
        columns = _window_combine(pixels, 1, kh, combine)  # (B, L_h - kh + 1, L_w, C): each column's kh entries
        y = _window_combine(columns, 2, kw, combine)

        def grad(upstream):
            h, w = tf.shape(columns)[1], tf.shape(y)[2]
            in_column = [tf.equal(pixels[:, dy:dy + h], columns) for dy in range(kh)]
            if over_channels:  # (each pixel counts as many ties as it has tied channels)
                in_pixel = tf.equal(v, pixels)
                channels = tf.reduce_sum(tf.cast(in_pixel, upstream.dtype), -1, keepdims=True)
                count = tf.add_n([tf.where(t, channels[:, dy:dy + h], tf.zeros_like(columns))
                                  for dy, t in enumerate(in_column)])
            else:
                count = tf.add_n([tf.cast(t, upstream.dtype) for t in in_column])  # ties in each column
            in_window = [tf.equal(columns[:, :, dx:dx + w], y) for dx in range(kw)]
            ties = tf.add_n([tf.where(t, count[:, :, dx:dx + w], tf.zeros_like(upstream))
                             for dx, t in enumerate(in_window)])
            share = upstream / ties
            to_columns = tf.add_n([tf.pad(tf.where(t, share, tf.zeros_like(share)), [[0, 0], [0, 0], [dx, kw - 1 - dx],
                                                                                     [0, 0]])
                                   for dx, t in enumerate(in_window)])
            to_pixels = tf.add_n([tf.pad(tf.where(t, to_columns, tf.zeros_like(to_columns)),
                                         [[0, 0], [dy, kh - 1 - dy], [0, 0], [0, 0]])
                                  for dy, t in enumerate(in_column)])
            return tf.where(in_pixel, to_pixels, tf.zeros_like(v)) if over_channels else to_pixels
        return y, grad
    return extremum(x)


@_register
class _WindowReduce(_Layer):
    """A reduction of Cp over positions of its patch-level map (global pooling, ``keras.ops.max(x, axis=(1,
    2))``, ...), made dense: the same reduction over every kh x kw window, at stride 1.

    ``"max"`` and ``"min"`` combine shifted slices with tf.maximum / tf.minimum, which, like
    tf.reduce_max (GlobalMaxPooling2D), propagate NaN and keep -inf; tf.nn.max_pool2d (a multipooling)
    would skip NaN and give the lowest float for a window of -inf.  Their gradient is shared among tied
    extrema, as tf.reduce_max's (:func:`_window_extremum`).  ``"avg"`` is an average pooling,
    ``"sum"`` that times the window's size.

    Args:
        kind: "max", "min", "avg" or "sum".
        window: (kh, kw), the size of the patch-level map reduced (1 for an axis not reduced).
        over_channels: "max" and "min" only: the channels too (``keras.ops.max(x, axis=(1, 2, 3))``), one channel
            out, the gradient shared among the tied channels and positions of each window.

    Shape:
        (B, L_h, L_w, C) -> (B, L_h - kh + 1, L_w - kw + 1, C) (C = 1 over_channels).
    """
    KINDS = ("max", "min", "avg", "sum")

    def __init__(self, kind, window, over_channels=False, **kwargs):
        super().__init__(**kwargs)
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if over_channels and kind not in ("max", "min"):
            raise ValueError(f"over_channels is for kind 'max' or 'min', got {kind!r}")
        self.kind, self.window, self.over_channels = kind, _pair(window, "window"), bool(over_channels)

    def call(self, x):
        kh, kw = self.window
        if self.kind in ("avg", "sum"):
            y = tf.nn.avg_pool2d(x, (kh, kw), 1, "VALID")
            return y if self.kind == "avg" else y * tf.cast(kh * kw, y.dtype)
        return _window_extremum(x, (kh, kw), tf.maximum if self.kind == "max" else tf.minimum, self.over_channels)

    def compute_output_spec(self, x):
        return keras.KerasTensor((x.shape[0], None, None, 1 if self.over_channels else x.shape[-1]), dtype=x.dtype)

    def get_config(self):
        config = {**super().get_config(), "kind": self.kind, "window": list(self.window)}
        return {**config, "over_channels": True} if self.over_channels else config  # (loads in earlier versions)


# ---------------------------------------------------------------------------
# Automatic conversion, 3: the rules, one small function per layer kind (contract: see
# "the rule contract" in the framework-neutral block).  A rule's ``run`` is called once, on
# symbolic tensors, to wire CI's functional core.
# ---------------------------------------------------------------------------

def _rule_for(*classes, label):
    """Decorator: register a rule for the given Keras layer classes."""
    def register(rule):
        return _register_rule(rule, classes, [cls.__name__ for cls in classes], label)
    return register


_TRANSPOSED_RULES = set()  # the rules that handle transposed maps (TRANSPOSED); the others never see one


def _takes_transposed(rule):
    """Mark ``rule`` as one that handles transposed maps (ops per position along their channels, axis 1)."""
    _TRANSPOSED_RULES.add(rule)
    return rule


def _lookup_rule(layer, rules=None):
    """The rule of the layer's class, or of the nearest base class whose call() it does not override (in ``rules``,
    by default the table of all rules, _RULES)."""
    rules = _RULES if rules is None else rules
    cls = type(layer)
    if cls in rules:
        return rules[cls]
    for base in cls.__mro__[1:]:
        if base in rules and cls.call is base.call:
            return rules[base]
    return None


# --- helpers shared by rules ------------------------------------------------

def _require_map(call, geom):
    if geom.kind != MAP:
        raise call.fail(f"its input is {geom.describe()}, not an image-like map")


def _require_plain_weights(call, form, *methods):
    """For a layer whose dense ``form`` CI computes from its kernel rather than by calling it: refuse a quantized
    layer (its kernel is stored quantized, its scales apply in call()) and a subclass that overrides one of
    ``methods`` of the layer kind convert knows (such as Conv2D.convolution_op), which that form would skip."""
    layer = call.layer
    if _quantized(layer, form) is not None:
        raise call.fail(_quantized(layer, form))
    known = next((base for base in type(layer).__mro__ if base in _RULES), type(layer))
    for name in methods:
        if getattr(type(layer), name, None) is not getattr(known, name, None):
            raise call.fail(f"its class {type(layer).__name__} overrides {name}() of {known.__name__}, which "
                            f"{form} would skip: CI computes that form from the layer's kernel and strides, not "
                            f"by calling the layer (at stride 1 it calls the layer, overrides included)")


def _require_channels_last(call):
    if getattr(call.layer, "data_format", "channels_last") != "channels_last":
        raise call.fail("only data_format='channels_last' is supported")


def _per_pixel_ok(call, geom, what="it", shape=None):
    """Layers acting on the last axis: fine on maps and on vectors of one position (and, given the value's traced
    ``shape``, on reshapes that keep the channels on the last axis: see :func:`_per_channel`)."""
    if not _per_channel(geom, shape):
        raise call.fail(f"{what} acts on each entry of {geom.describe()} differently or together, "
                        f"which mixes positions of the patch")


def _check_channel_axis(call, axis, rank=4):
    axes = [axis] if isinstance(axis, numbers.Integral) else list(axis)
    if [a % rank for a in axes] != [rank - 1]:
        raise call.fail(f"it works along axis {axis}; only the channel axis (-1) can be made dense")


def _pre_activation_channels(call):
    """The channel count a layer's activation receives (glu halves it): an Activation layer's input's, a
    convolution's filters, a Dense layer's units; else the layer's output's."""
    layer = call.layer
    if isinstance(layer, keras.layers.Activation):
        return call.in_shapes[0][-1]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return call.in_shapes[0][-1] * layer.depth_multiplier
    for name in ("filters", "units"):
        if isinstance(getattr(layer, name, None), int):
            return getattr(layer, name)
    return call.out_shape[-1]


def _check_activation_per_pixel(call, in_geoms):
    """A layer's ``activation`` that is not one of ``keras.activations`` (a function of the user's, of TensorFlow's,
    a ``keras.ops`` function) is applied by CI to whole maps (also after a Dense on a flattened map), as a black
    box: refused unless it computes every pixel from that pixel alone, tested on two random maps (one of large
    values, for functions that mix positions only beyond some value) against each of their pixels given alone.
    A centring over the patch or over the batch, a flip, a normalisation by the largest value fail.  An Activation
    layer applied to a flattened map (whose entries are positions of the patch) must moreover be element-wise:
    tested by changing some entries, which must leave the others' outputs unchanged (a softmax fails)."""
    act = _activation_of(call.layer)
    name = getattr(act, "__name__", None)
    channels = _pre_activation_channels(call)
    if act is None or not isinstance(channels, int):
        return
    geom = in_geoms[0] if isinstance(call.layer, keras.layers.Activation) and in_geoms else None
    elementwise = geom is not None and not _per_channel(geom, call.in_shapes[0])
    if name is not None and getattr(keras.activations, name, None) is act and (
            not elementwise or name in ("softmax", "log_softmax", "glu")):
        return  # Keras' own are per pixel (sparsemax is not element-wise: tested); _activation_ok names those three
    dtype = getattr(call.layer, "compute_dtype", None) or "float32"
    tolerance = 1e-5 if tf.as_dtype(dtype).size >= 4 else 3e-2  # (a few bfloat16 rounding units)
    rng = np.random.default_rng(0)
    why, per_pixel, per_entry = "", True, True

    def close(a, b):
        return np.allclose(a, b, rtol=tolerance, atol=tolerance * 1e-1, equal_nan=True)
    try:
        for scale, offset in ((1.0, 0.0), (50.0, 5.0)):
            x = tf.constant(rng.standard_normal((1, 3, 4, channels)) * scale + offset, dtype=dtype)
            whole = np.asarray(tf.cast(act(x), tf.float64))
            pixels = np.stack([np.asarray(tf.cast(act(x[:, i:i + 1, j:j + 1, :]), tf.float64))[0, 0, 0]
                               for i in range(3) for j in range(4)]).reshape(whole.shape)
            per_pixel = per_pixel and close(whole, pixels)
            if elementwise:  # some entries changed (at random, both parities): the rest must not move
                changed = rng.permutation(channels) < channels // 2
                moved = np.asarray(tf.cast(act(x + tf.constant(changed * scale, dtype=dtype)), tf.float64))
                per_entry = per_entry and whole.shape == x.shape and close(whole[..., ~changed],
                                                                           moved[..., ~changed])
    except Exception as exc:  # noqa: BLE001 - any failure means it is not a per-pixel function of a map
        per_pixel, why = False, f" ({type(exc).__name__}: {exc})"
    shown = name or type(act).__name__
    if not per_pixel:
        raise call.fail(f"its activation {shown!r} is not computed pixel by pixel (tested on random maps{why}), "
                        f"which mixes positions of the patch; an activation of your own that is per pixel passes "
                        f"this test, and a Lambda layer has its ops read one by one")
    if not per_entry:
        raise call.fail(f"its activation {shown!r} is applied to {geom.describe()}, whose entries are positions of "
                        f"the patch, and it is not element-wise (tested on random values: changing some entries "
                        f"changes the others' outputs), which mixes positions of the patch")


def _activation_ok(call, geom, layer):
    act = _activation_of(layer)
    if act is not None and getattr(act, "__name__", "") in ("softmax", "log_softmax"):
        _per_pixel_ok(call, geom, "its softmax", call.in_shapes[0])
    if act is getattr(keras.activations, "glu", None):
        _per_pixel_ok(call, geom, "its gated linear unit (glu, over the last axis)", call.in_shapes[0])


def _on_transposed(call, geom):
    """The error for a layer or op that cannot follow a transposed map."""
    return call.fail(f"it is applied to {geom.describe()}, the channels moved to axis 1 by a transpose; only ops per "
                     f"position along the channels (element-wise ops and activations, LayerNormalization, Softmax, "
                     f"UnitNormalization, reductions, slices, splits or concatenations over axis 1) can follow one: "
                     f"transpose it back first (perm (0, 2, 3, 1))")


_SWAPPED_RULES = set()  # the rules that may run on maps with their positions transposed (SWAPPED): see _on_swapped


def _takes_swapped(rule):
    """Mark ``rule`` as one of ops per position along the channels of a map (its last axis), which run as they are
    on a map with its positions transposed (SWAPPED)."""
    _SWAPPED_RULES.add(rule)
    return rule


def _on_swapped(call, rule, geoms):
    """A layer or op of maps with their positions transposed, (N, w, h, C): a rule of ops per position along the
    channels (_SWAPPED_RULES) sees them as maps of size (w, h) and must give such a map on the same grid (the
    op ran per position); anything else is refused (transpose back first)."""
    view = [g.with_positions_transposed(MAP) if g.kind == SWAPPED else g for g in geoms]
    out_geoms, reason = None, ""
    if rule in _SWAPPED_RULES and all(g.kind == SWAPPED for g in geoms):
        try:
            run, out_geoms = rule(call, view)
        except ConversionError as exc:  # (its reason, told of the map seen as (N, h, w, C))
            reason = f" (as a map of (N, h, w, C): {str(exc).split('cannot be made dense exactly: ', 1)[-1]})"
        if out_geoms is not None and all(g.kind == MAP and g.size == view[0].size and g.strides == view[0].strides
                                         for g in out_geoms):
            return run, [g.with_positions_transposed(SWAPPED) for g in out_geoms]
    geom = next(g for g in geoms if g.kind == SWAPPED)
    raise call.fail(f"it is applied to {geom.describe()}, a map transposed to (N, w, h, C) (perm (0, 2, 1, 3) of a "
                    f"map, or (0, 3, 2, 1) of a transposed map, as tf.nn.softmax(t, axis=1) does inside); only ops "
                    f"per position along its channels (element-wise ops and activations, Dense, LayerNormalization, "
                    f"softmax, reductions over the channels) of such maps alone can follow one: transpose it back "
                    f"first (perm (0, 2, 1, 3)){reason}")


def _along_transposed_channels(call, geom, axis, run, channels=None):
    """A layer or op along ``axis`` of a transposed map (N, C, h, w): per position, ``run`` on the dense values
    (transposed alike), where the axis is the channels (1); else refused."""
    axes = [axis] if isinstance(axis, numbers.Integral) else list(np.ravel(axis))
    if [int(a) % 4 for a in axes] != [1]:
        raise call.fail(f"it works along axis {axis} of {geom.describe()}, which mixes positions of the patch; only "
                        f"the channel axis (axis 1 of a transposed map) can be made dense")
    return run, [geom if channels is None else geom.with_(channels=channels)]


def _constant_axis(call, axis):
    """The axis (or axes) of an op, which must be a constant of Cp's call()."""
    if axis is None:
        raise call.fail("its axis is computed from the patch")
    return axis


def _map_geom(call, geom, stride=(1, 1)):
    """The geometry of a layer's output map (its traced shape), after a layer of ``stride``."""
    out = call.out_shape
    return geom.with_(kind=MAP, channels=out[3], size=out[1:3], stride=stride)


def _reuse(layer):
    """CI runs Cp's layer itself (shared weights), in inference mode."""
    return lambda xs: [layer(xs[0], training=False)]


def _pass_through(xs):
    return [xs[0]]


def _cast_as_layer_input(layer, x):
    """``x`` cast as Keras casts a floating input to ``layer``'s compute dtype before the layer computes: CI applies
    it to the inputs of every layer of Cp, also of those it leaves out or computes with its own ops (a Flatten,
    dropout, a pooling, a crop): a float32 Flatten between float64 layers rounds to float32 in Cp, a bfloat16
    pooling or crop in a float32 net rounds to bfloat16.  (Where CI calls the layer itself, Keras casts again:
    nothing changes.)"""
    policy = getattr(layer, "dtype_policy", None)
    if policy is None or not hasattr(policy, "convert_input"):
        return x
    return policy.convert_input(x, getattr(layer, "autocast", True), layer.input_dtype)


# --- the rules ----------------------------------------------------------------

@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.Rescaling, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
           label="element-wise layers (applied per pixel)")
def _rule_reuse(call, geoms):
    """Layers that act per pixel (activations, rescaling): reused unchanged (a Rescaling whose scale or offset is
    an array of the patch's positions that holds one value per channel: see :func:`_rescaling_per_channel`)."""
    if call.out_shape != call.in_shapes[0]:
        raise call.fail(f"its output {call.out_shape} does not have the shape of its input {call.in_shapes[0]}")
    if geoms[0].kind == TRANSPOSED and isinstance(call.layer, keras.layers.Rescaling) and (
            np.ndim(call.layer.scale) or np.ndim(call.layer.offset)):
        raise call.fail(f"its scale or offset has one entry per channel of the last axis, which is not the channel "
                        f"axis of {geoms[0].describe()}")
    if isinstance(call.layer, keras.layers.Rescaling):
        values = [_rescaling_per_channel(call, geoms[0], k) for k in ("scale", "offset")]
        if any(v is not None for v in values):  # CI computes with the values per channel (a Rescaling of its own)
            scale, offset = (getattr(call.layer, k) if v is None else v for k, v in zip(("scale", "offset"), values))
            layer = keras.layers.Rescaling(scale=scale, offset=offset, dtype=call.layer.dtype_policy)
            return _reuse(layer), [geoms[0]]
    return _reuse(call.layer), [geoms[0]]


def _rescaling_per_channel(call, geom, key):
    """A Rescaling layer's ``key`` ("scale" or "offset"): None where it is a scalar, or one value per channel of
    the map's positions; else, where it is an array (of the patch's shape, or of a flattened map) that holds the
    same value per channel at every position of the patch, those values (a list, one per channel); otherwise
    refused: it differs per position of the patch (or per patch of the batch), which no dense computation gives."""
    value, channels, shape = getattr(call.layer, key), geom.channels, tuple(call.in_shapes[0])
    dims = tuple(int(d) for d in getattr(value, "shape", np.shape(value)))  # (also of a tensor or variable)
    if not dims or (dims[-1] in (1, channels) and shape[-1] == channels and all(d == 1 for d in dims[:-1])):
        return None  # a scalar, or one value per channel of the last axis (the layer is reused as it is)
    if not isinstance(value, (list, tuple, np.ndarray)) and not tf.is_tensor(value):
        raise call.fail(f"its {key} is a value of type {type(value).__name__} and shape {dims}; only a scalar, "
                        f"one value per channel, or an array that holds one value per channel at every position of "
                        f"the patch can be made dense")
    if isinstance(value, tf.Variable):  # (its values, read now, would not follow later changes)
        raise call.fail(f"its {key} is a variable of shape {dims}, more than one value per channel; only a scalar "
                        f"or one value per channel can follow a variable")
    array = np.asarray(value)
    rows = np.broadcast_to(array, shape).reshape(-1, channels)  # (a flattened map's entries: H, W, C order)
    if not np.array_equal(rows, np.broadcast_to(rows[:1], rows.shape), equal_nan=array.dtype.kind in "fc"):
        raise call.fail(f"its {key} (shape {tuple(array.shape)}) differs per position of the patch (or per patch "
                        f"of the batch); only scalars and per-channel values (the same at every position) can be "
                        f"made dense")
    return rows[0].tolist()


@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.Activation, keras.layers.Softmax, label="element-wise layers (applied per pixel)")
def _rule_activation(call, geoms):
    """Element-wise activations (and softmax over channels): reused unchanged."""
    if geoms[0].kind == TRANSPOSED and isinstance(call.layer, keras.layers.Softmax):
        return _along_transposed_channels(call, geoms[0], call.layer.axis, _reuse(call.layer))
    _activation_ok(call, geoms[0], call.layer)
    if isinstance(call.layer, keras.layers.Softmax):
        return _rule_channelwise(call, geoms)
    out, src = call.out_shape, call.in_shapes[0]
    if out[:-1] == src[:-1] and out[-1] != src[-1]:  # glu (or a function of one's own, tested per pixel) halves
        _per_pixel_ok(call, geoms[0], f"its activation, which changes the channel count ({src[-1]} -> {out[-1]}),",
                      src)
        return _reuse(call.layer), [geoms[0].with_(channels=out[-1])]
    return _rule_reuse(call, geoms)


@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
           keras.layers.GaussianDropout, keras.layers.AlphaDropout, keras.layers.ActivityRegularization,
           keras.layers.Identity, label="identity at inference (dropout, noise, regularisation)")
def _rule_identity(call, geoms):
    """Dropout, noise and regularisation layers: identity at inference."""
    return _pass_through, [geoms[0]]


@_rule_for(*_AUGMENTATION, label="augmentation layers that are the identity at inference (RandomFlip, "
           "RandomRotation, RandomZoom, RandomContrast, ...)")
def _rule_augmentation(call, geoms):
    """Keras' augmentation layers: CI runs Cp in inference mode (as for dropout), where they must return their
    input unchanged; checked on random values of the traced shape and of a larger one (a layer that resizes or
    crops at inference is refused)."""
    shape = tuple(call.in_shapes[0])
    rng = np.random.default_rng(0)
    for grow in (0, 5):
        size = shape[:1] + tuple(d + grow for d in shape[1:-1]) + shape[-1:] if len(shape) == 4 else shape
        x = tf.constant(rng.uniform(0.0, 1.0, size), call.layer.compute_dtype or "float32")
        y = call.layer(x, training=False)
        if tuple(y.shape) != size or not bool(tf.reduce_all(tf.equal(tf.cast(y, x.dtype), x))):
            raise call.fail(f"it does not return its input unchanged at inference (on {size} values it gives "
                            f"{'shape ' + str(tuple(y.shape)) if tuple(y.shape) != size else 'other values'}), "
                            f"and CI runs Cp in inference mode; apply it to the images before CI instead")
    return _pass_through, [geoms[0]]


@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.BatchNormalization, keras.layers.UnitNormalization, keras.layers.Normalization,
           LocalResponseNormalization, keras.layers.PReLU,
           label="per-channel layers on the channel axis (batch norm, normalisation, PReLU)")
def _rule_channelwise(call, geoms):
    """Layers with per-channel parameters acting on the last axis (BatchNormalization, LayerNormalization
    over channels, UnitNormalization, Normalization, Softmax, PReLU with shared spatial axes,
    LocalResponseNormalization): reused unchanged."""
    geom = geoms[0]
    layer = call.layer
    rank = len(call.in_shapes[0])
    if geom.kind == TRANSPOSED:  # UnitNormalization(axis=1) only: the others' parameters follow the last axis
        if not isinstance(layer, keras.layers.UnitNormalization):
            raise _on_transposed(call, geom)
        return _along_transposed_channels(call, geom, layer.axis, _reuse(layer))
    if isinstance(layer, keras.layers.PReLU):
        shared = sorted(layer.shared_axes or [])
        if (geom.kind == MAP or rank == 3 and not geom.is_pixel_vector) and not set(range(1, rank - 1)) <= set(shared):
            raise call.fail(f"its slopes differ per position (use shared_axes={list(range(1, rank - 1))})")
    scalar = isinstance(layer, keras.layers.Normalization) and not layer.axis  # axis=None: one mean and variance
    if hasattr(layer, "axis") and not scalar:
        _check_channel_axis(call, layer.axis, rank)
    _per_pixel_ok(call, geom, shape=call.in_shapes[0])
    if isinstance(layer, keras.layers.Normalization) and getattr(layer, "input_mean", None) is None \
            and hasattr(layer, "adapt_mean"):
        stale = _stale_statistics(layer)
        if stale is not None:
            raise call.fail(f"Cp does not compute with the statistics it holds: {stale}, and convert again")
        normalization = _AdaptedNormalization(layer)  # its statistics as they are at every call
        return (lambda xs: [normalization(xs[0])]), [geom]
    if rank in (2, 3):  # built for (B, C) vectors or (B, h*w, C) positions: may accept no (B, H, W, C) values
        return (lambda xs: [PerPixel(layer, rank)(xs[0])]), [geom]
    return _reuse(layer), [geom]


@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.LayerNormalization, label="layer normalisation over the channel axis")
def _rule_layer_norm(call, geoms):
    """LayerNormalization: per pixel when it normalises over the channel axis only."""
    axis = call.layer.axis
    if geoms[0].kind == TRANSPOSED:
        return _along_transposed_channels(call, geoms[0], axis, _reuse(call.layer))
    axes = [axis] if isinstance(axis, numbers.Integral) else list(axis)
    rank = len(call.in_shapes[0])
    if [a % rank for a in axes] != [rank - 1] or not _per_channel(geoms[0], call.in_shapes[0]):
        raise call.fail(f"it normalises {geoms[0].describe()} over axes {axis}, with statistics of each patch; "
                        f"{_PER_PATCH_REASON}")
    return _rule_channelwise(call, geoms)


def _stale_statistics(layer):
    """Why an adapted ``keras.layers.Normalization`` (statistics in its ``adapt_mean`` / ``adapt_variance`` variables)
    does not compute with the statistics it holds, or None.  Keras' call() normalises with tensors that
    finalize_state() makes from the variables (adapt(), build and loading call it): statistics given by set_weights()
    or assign() are held, saved and loaded, but Cp keeps computing with the old ones until finalize_state() is
    called.  CI reads the variables (so it follows adapt() and load_weights() after convert) and would differ from
    Cp; following the stale copy instead would make CI differ from the same Cp saved and loaded, or adapted: refused
    (at convert, and where CI runs), naming the call that makes both agree.  (Two small reads per call of CI.)"""
    copies = [getattr(layer, name, None) for name in ("mean", "variance")]
    if not all(tf.is_tensor(c) for c in copies):
        return None
    for name, copy, variable in zip(("mean", "variance"), copies, (layer.adapt_mean, layer.adapt_variance)):
        copy = np.asarray(copy).ravel()
        handle = _handle_of(variable)  # (one read op: a Keras variable's numpy() runs three; in a stateless scope,
        value = variable.value if handle is None else tf.raw_ops.ReadVariableOp(  # the value given)
            resource=handle, dtype=tf.as_dtype(variable.dtype))
        held = np.asarray(value).ravel().astype(copy.dtype)  # (as finalize_state() casts it)
        if not np.array_equal(copy, held, equal_nan=True):
            return (f"its statistics variables ({name}: {_short_value(held)}) were set (set_weights() or assign()) "
                    f"without finalize_state(), and Keras' call() keeps normalising with the copy made before "
                    f"({_short_value(copy)}, refreshed only by finalize_state(), adapt() and loading); call "
                    f"finalize_state() on layer '{layer.name}' (Keras' own step after setting them)")
    return None


@_register
class _AdaptedNormalization(_WrapperLayer):
    """An adapted ``keras.layers.Normalization`` (statistics in its ``adapt_mean``/``adapt_variance`` variables)
    that reads them at every call, as the layer computes: the layer itself keeps them as tensors made when it
    is adapted or loaded, which a CI traced into a graph would keep after ``adapt()`` or ``load_weights()``.

    Shape:
        (..., C) -> (..., C), normalised over the last axis.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, x):
        layer = self.layer
        x = tf.cast(x, layer.compute_dtype)
        mean = tf.cast(tf.reshape(layer.adapt_mean, [-1]), layer.compute_dtype)
        scale = tf.maximum(tf.sqrt(tf.cast(tf.reshape(layer.adapt_variance, [-1]), layer.compute_dtype)),
                           keras.backend.epsilon())
        return mean + x * scale if layer.invert else (x - mean) / scale

    def compute_output_shape(self, input_shape):
        return input_shape


@_register
class _MultiDepthwise(_ShiftOptions, _WrapperLayer):
    """A trained DepthwiseConv2D or SeparableConv2D made dense (shared weights): the depthwise part as
    multi-convolution (all shifts when strided, no padding), then the pointwise part, bias and activation.
    ``input_size``: as for :class:`multiConv`."""
    wrapped = "layer"

    def __init__(self, layer, naive: bool = False, input_size=None, **kwargs):
        super().__init__(**kwargs)
        self.input_size = None if input_size is None else _pair(tuple(input_size), "input_size")
        if _pads(layer, self.input_size):
            raise ConversionError(f"layer '{layer.name}' pads its input (padding={layer.padding!r}); "
                                  f"{_PADDING_REASON}")
        self.layer = layer
        self.naive = bool(naive)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)

    def call(self, x):
        layer = self.layer
        _require_float_kernel(layer, "a strided depthwise convolution made dense")
        separable = isinstance(layer, keras.layers.SeparableConv2D)
        depthwise = layer.depthwise_kernel if separable else layer.kernel
        x, = _in_compute_dtype(layer, x)
        dil, stride = tuple(layer.dilation_rate), tuple(layer.strides)

        def conv(t, s):
            if s == (1, 1) or (s[0] == s[1] and dil == (1, 1)):
                return tf.nn.depthwise_conv2d(t, tf.cast(depthwise, t.dtype), [1, s[0], s[1], 1], "VALID",
                                              dilations=dil)
            y = tf.nn.depthwise_conv2d(t, tf.cast(depthwise, t.dtype), [1, 1, 1, 1], "VALID", dilations=dil)
            return y[:, ::s[0], ::s[1], :]
        if not self.shifts:
            y = _shift_zero(conv(x, stride), x, tuple(depthwise.shape[:2]), stride, dil)
        elif self.shifts_in_place and not self.naive:
            y = conv(x, (1, 1))
        else:
            y = _multi(x, conv, tuple(depthwise.shape[:2]), stride, dil, self.naive)
        if separable:
            y = tf.nn.conv2d(y, tf.cast(layer.pointwise_kernel, y.dtype), 1, "VALID")
        if layer.use_bias:
            y = tf.nn.bias_add(y, tf.cast(layer.bias, y.dtype))
        act = _activation_of(layer)
        return y if act is None else act(y)

    def compute_output_shape(self, input_shape):  # (the channels: the next layers build their weights from them)
        layer = self.layer
        if isinstance(layer, keras.layers.SeparableConv2D):
            return (None, None, None, layer.filters)
        channels = input_shape[-1]
        return (None, None, None, None if channels is None else channels * layer.depth_multiplier)

    def get_config(self):
        size = {} if self.input_size is None else {"input_size": list(self.input_size)}
        return {**super().get_config(), "naive": self.naive, **size}


def _make_conv_rule(dense_layer):
    """Convolutions without padding: reused when stride 1, made dense by ``dense_layer`` (all shifts, no padding)
    when strided.  padding="same" that pads nothing at the patch-level size (:func:`_pads`) is the "valid" layer:
    at stride 1 a 1x1 kernel (reused: "same" pads nothing on any map), strided where the windows end inside the
    map, which ``dense_layer`` computes without padding on the dense map, as it must."""
    def rule(call, geoms):
        geom = geoms[0]
        layer = call.layer
        _require_map(call, geom)
        if _pads(layer, geom.size):
            raise call.fail(f"it pads its input (padding={layer.padding!r}); {_PADDING_REASON}")
        _require_channels_last(call)
        stride = tuple(layer.strides)
        if stride == (1, 1):
            return _reuse(layer), [_map_geom(call, geom)]
        _require_plain_weights(call, "its strided form (all shifts)", "convolution_op")
        size = geom.size if getattr(layer, "padding", "valid") != "valid" else None  # (only a 'same' that pads
        # nothing needs it; a CI of valid layers saves the config it had before input_size existed)
        return (lambda xs: [dense_layer(layer, input_size=size)(xs[0])]), [_map_geom(call, geom, stride)]
    rule.__doc__ = f"convolution without padding: reused at stride 1, {dense_layer.__name__} when strided."
    return rule


_rule_for(keras.layers.Conv2D, label="Conv2D without padding (multiConv when strided)")(_make_conv_rule(multiConv))
_rule_for(keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
          label="DepthwiseConv2D and SeparableConv2D without padding (all shifts when strided)")(
    _make_conv_rule(_MultiDepthwise))


def _pool_padding_reason(kind):
    """Why a padded pooling (Keras' "same", tf.nn's "SAME") cannot be exact: TensorFlow's max and average pooling
    ignore the padded cells (no zeros are seen), so a window that overhangs the patch pools fewer pixels."""
    name, what = ("max", "takes the maximum of") if kind == "max" else ("average", "averages")
    return (f"inside Cp the windows that overhang the patch border pool only the pixels inside the patch ({name} "
            f"pooling ignores the padded cells: it {what} the others), while in a whole image the same windows also "
            f"cover the real neighbours, so the padded windows at the patch border differ from the dense image's and "
            f"CI cannot be exact. Use padding='valid' (\"same\" whose windows end inside the map pads nothing and "
            f"converts), or use dense_reference() for this net")


def _make_pool_rule(kind):
    def rule(call, geoms):
        geom = geoms[0]
        layer = call.layer
        _require_map(call, geom)
        kernel = tuple(layer.pool_size)
        stride = tuple(layer.strides) if layer.strides is not None else kernel
        padding = getattr(layer, "padding", "valid")
        if padding != "valid" and (padding != "same" or _same_pads(geom.size, kernel, stride)):
            raise call.fail(f"it pads its input (padding={layer.padding!r}); {_pool_padding_reason(kind)}")
        _require_channels_last(call)  # ("same" that pads nothing on the patch-level map, such as 2x2 windows of an
        # even-sized map, is "valid")
        cls = {"max": multiMaxPooling, "avg": multiAvgPooling, "lp": multiLPPooling}[kind]
        args = ((layer.norm_type,) if kind == "lp" else ()) + (kernel[1], kernel[0], stride[1], stride[0])
        return (lambda xs: [cls(*args)(xs[0])]), [_map_geom(call, geom, stride)]
    rule.__doc__ = f"{kind} pooling: multipooling with the same kernel and stride."
    return rule


_POOLING_LABEL = "pooling without padding (multipooling)"
_rule_for(keras.layers.MaxPooling2D, label=_POOLING_LABEL)(_make_pool_rule("max"))
_rule_for(keras.layers.AveragePooling2D, label=_POOLING_LABEL)(_make_pool_rule("avg"))
_rule_for(LPPooling2D, label=_POOLING_LABEL)(_make_pool_rule("lp"))


def _make_global_pool_rule(kind):
    def rule(call, geoms):
        geom = geoms[0]
        _require_map(call, geom)
        _require_channels_last(call)
        keep = len(call.out_shape) == 4
        layer = _WindowReduce(kind, geom.size)
        return (lambda xs: [layer(xs[0])]), [geom.with_(kind=MAP if keep else VECTOR, size=(1, 1))]
    rule.__doc__ = (f"global {kind} pooling over the patch-level map: a stride-1 reduction over windows of the "
                    f"map's size (_WindowReduce, with the NaN and -inf semantics of Keras' reduction).")
    return rule


_GLOBAL_LABEL = "global pooling (a stride-1 reduction over windows of the map's size)"
_rule_for(keras.layers.GlobalMaxPooling2D, label=_GLOBAL_LABEL)(_make_global_pool_rule("max"))
_rule_for(keras.layers.GlobalAveragePooling2D, label=_GLOBAL_LABEL)(_make_global_pool_rule("avg"))


def _global_pool_of_rows(call, geom, kind):
    """Global ``kind`` pooling over the positions of (N, h*w, C) rows of a map (axis 1): the map's global pooling, a
    stride-1 reduction over windows of its size; the result reshaped as the op's output."""
    (h, w), c = geom.size, geom.channels
    layer = _WindowReduce(kind, (h, w))
    pooled = geom.with_(kind=MAP, size=(1, 1))
    return (lambda xs: [layer(xs[0])]), [_reshaped_geom(call, pooled, (call.in_shapes[0][0], 1, 1, c),
                                                        call.out_shapes[0])]


def _global_pool_of_transposed(call, geom, kind):
    """Global ``kind`` pooling over the positions of a transposed map (N, C, h, w) (axes 2, 3): the map's global
    pooling of the dense values transposed back (a stride-1 reduction over windows of its size), transposed again
    where the op keeps the axes (a transposed 1x1 map); without them, the (N, C) vector of one position."""
    layer = _WindowReduce(kind, geom.size)
    to_map = _transposer((0, 2, 3, 1))
    if call.attrs.get("keep_dims", ["bool", False])[1]:
        back = _transposer((0, 3, 1, 2))
        return (lambda xs: [back(layer(to_map(xs[0])))]), [geom.with_(size=(1, 1))]
    pooled = geom.with_(kind=MAP, size=(1, 1))
    return (lambda xs: [layer(to_map(xs[0]))]), [_reshaped_geom(call, pooled, (call.in_shapes[0][0], 1, 1,
                                                                                geom.channels), call.out_shapes[0])]


def _make_global_pool_rows_rule(kind):
    def rule(call, geoms):
        geom, src = geoms[0], tuple(call.in_shapes[0])
        (h, w), c = geom.size, geom.channels
        if not (geom.kind == VIEW and src[1:] == (h * w, c)) or getattr(call.layer, "data_format", None) == \
                "channels_first":
            raise call.fail(f"it pools {geom.describe()} of shape {src}; only the rows of positions of a map, "
                            f"(N, h*w, C) with channels last, can be made dense (global pooling over the map)")
        return _global_pool_of_rows(call, geom, kind)
    rule.__doc__ = (f"global {kind} pooling over (N, h*w, C) rows of a map's positions: the map's global {kind} "
                    f"pooling (see _make_global_pool_rule).")
    return rule


_GLOBAL_ROWS_LABEL = "global pooling of (N, h*w, C) rows of a map's positions (the map's global pooling)"
_rule_for(keras.layers.GlobalMaxPooling1D, label=_GLOBAL_ROWS_LABEL)(_make_global_pool_rows_rule("max"))
_rule_for(keras.layers.GlobalAveragePooling1D, label=_GLOBAL_ROWS_LABEL)(_make_global_pool_rows_rule("avg"))


def _make_adaptive_rule(kind):
    def rule(call, geoms):
        geom = geoms[0]
        _require_map(call, geom)
        _require_channels_last(call)
        out_size = tuple(call.out_shape[1:3])
        if out_size == (1, 1):
            layer = _WindowReduce(kind, geom.size)
            return (lambda xs: [layer(xs[0])]), [geom.with_(size=(1, 1))]
        windows = [_adaptive_windows(s, o) for s, o in zip(geom.size, out_size)]
        if None in windows:
            raise call.fail(f"adaptive pooling from {geom.size[0]}x{geom.size[1]} to {out_size[0]}x{out_size[1]} "
                            f"uses windows of varying size or spacing")
        (kh, sh), (kw, sw) = windows
        cls = {"max": multiMaxPooling, "avg": multiAvgPooling}[kind]
        return (lambda xs: [cls(kw, kh, sw, sh)(xs[0])]), [_map_geom(call, geom, (sh, sw))]
    rule.__doc__ = (f"adaptive {kind} pooling: global pooling, or an ordinary one (multipooling) where its windows "
                    f"have one size and one spacing.")
    return rule


_ADAPTIVE_LABEL = "adaptive pooling (global, or windows of one size and spacing)"
for _kind, _name in (("avg", "AdaptiveAveragePooling2D"), ("max", "AdaptiveMaxPooling2D")):
    if hasattr(keras.layers, _name):  # Keras 3.12 and later
        _rule_for(getattr(keras.layers, _name), label=_ADAPTIVE_LABEL)(_make_adaptive_rule(_kind))


@_rule_for(keras.layers.Flatten, keras.layers.Reshape,
           label="Flatten and Reshape that keep the batch axis (the same values, reinterpreted)")
def _rule_flatten(call, geoms):
    """Flatten / Reshape that keep the batch axis: the same values, reinterpreted.

    (N, h, w, C) is a MAP, (N, h*w*C) a VECTOR (Keras' H, W, C order); any other shape is a
    VIEW that only element-wise layers and further reshapes may use."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    if getattr(call.layer, "data_format", "channels_last") == "channels_first" and len(src) >= 3 and \
            src[1] > 1 and _prod(src[2:]) > 1:
        raise call.fail(f"Flatten(data_format='channels_first') moves axis 1 of {src} to the end before flattening, "
                        f"which reorders the values of {geom.describe()}; only channels-last flattening (H, W, C "
                        f"order) can be made dense (reorder the rows of the next Dense's kernel instead)")
    return _reshaped(call, geom, src, call.out_shape)


def _reshaped(call, geom, src, dst):
    """What CI runs for a reshape of ``geom`` (traced shape ``src``) to ``dst``, and the geometry it gives: the
    same values, reinterpreted (see _reshaped_geom).  A one-channel or 1x1 map (or a reshape of one) reshaped to
    the transposed map's shape (N, C, h, w) holds the transposed map's values in their order: a transposed map,
    its dense values transposed alike (x[:, None] of keras.ops.argmax(t, axis=1) of a transposed map t)."""
    src, dst = tuple(src), tuple(dst)
    (h, w), c = geom.size, geom.channels
    if dst != src and geom.kind != TRANSPOSED and not geom.guessed and (c == 1 or (h, w) == (1, 1)) and \
            dst == (src[0], c, h, w) != (src[0], h, w, c):
        transpose = _transposer((0, 3, 1, 2))
        return (lambda xs: [transpose(xs[0])]), [geom.with_(kind=TRANSPOSED)]
    groups = _split_channels(geom, src, dst)
    if groups is not None:  # (N, h, w, g1, ..., gk): the channels of every position split into groups
        split = _ChannelGroups(groups)
        return (lambda xs: [split(xs[0])]), [geom.with_(kind=GROUPS, groups=groups)]
    return _pass_through, [_reshaped_geom(call, geom, src, dst)]


def _split_channels(geom, src, dst):
    """The groups (g1, ..., gk) where a reshape of ``geom`` (a map, or a reshape of one: its dense values are the
    map's) from ``src`` to ``dst`` keeps the batch and the positions as axes 0, 1, 2 and splits the channels into
    k >= 2 axes after them (Keras' H, W, C order keeps every position's channels together); else None."""
    (h, w), c = geom.size, geom.channels
    if geom.kind not in (MAP, VECTOR, VIEW) or len(dst) < 5 or dst[:1] != src[:1] or \
            tuple(dst[1:3]) != (h, w) or _prod(dst[3:]) != c or _prod(src[1:]) != h * w * c:
        return None
    return tuple(int(g) for g in dst[3:])


def _reshaped_geom(call, geom, src, dst):
    """The geometry of ``geom`` (a value of traced shape ``src``) reshaped to ``dst``, keeping the batch axis:
    (N, h, w, C) is a MAP, (N, h*w*C) a VECTOR (Keras' H, W, C order), any other shape a VIEW that only
    element-wise ops and further reshapes may use."""
    src, dst = tuple(src), tuple(dst)
    (h, w), c = geom.size, geom.channels
    if dst == src:
        return geom
    if geom.guessed and len(dst) == 4:  # after a refused op: the rules that follow judge a map of that shape
        return _guessed_geom(dst, [geom], _MAP_LAYOUT)
    if dst[:1] == src[:1] and _prod(dst[1:]) == h * w * c:
        kind = MAP if dst[1:] == (h, w, c) else VECTOR if dst[1:] == (h * w * c,) else VIEW
        return geom.with_(kind=kind)
    hint = ""
    if len(src) > 2 and len(dst) == 2 and dst == (_prod(src[:-1]), src[-1]):  # (N*h*w, C): a product per pixel
        hint = ("; keras.ops.matmul and tensordot of a map (or of rows of its positions) with a matrix reshape it "
                "so: for a product over the channels of every pixel write x @ w, or use a Dense layer")
    raise call.fail(f"it reshapes {src} to {dst}, which moves values between patches (the batch axis){hint}")


@_takes_swapped
@_rule_for(keras.layers.Dense, label="Dense on a flattened map (DenseAsConv, an h x w convolution) or on channels")
def _rule_dense(call, geoms):
    """Dense on a flattened map: an h x w convolution (H, W, C order); on channels: reused."""
    geom = geoms[0]
    layer = call.layer
    units = call.out_shape[-1]
    if geom.kind == VIEW and not _per_channel(geom, call.in_shapes[0]):
        raise call.fail(f"it is applied to {geom.describe()}; flatten the map first")
    if geom.kind in (MAP, VIEW) or geom.size == (1, 1):  # (a VIEW here: rows of positions, (N, h*w, C))
        _activation_ok(call, geom, layer)
        return _reuse(layer), [geom.with_(channels=units)]
    _require_plain_weights(call, "its form on a flattened map (an h x w convolution)")
    return (lambda xs: [DenseAsConv(layer, geom.size)(xs[0])]), [geom.with_(channels=units, size=(1, 1))]


@_takes_swapped
@_takes_transposed
@_rule_for(keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
           keras.layers.Maximum, keras.layers.Minimum, keras.layers.Concatenate,
           label="merges of values on one grid (Add, Multiply, Concatenate on channels, ...)")
def _rule_merge(call, geoms):
    """Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate(axis=-1) of values on one grid,
    or of per-position vectors of streams that pooled differently (unwarped first, see _merge_grids)."""
    first, unwarps = _merge_grids(call, geoms)
    layer = call.layer
    channels = first.channels
    if first.kind == TRANSPOSED:  # (all are: _merge_grids) their channels on axis 1
        out = tuple(call.out_shape)
        for shape in call.in_shapes:
            if tuple(shape)[:1] + tuple(shape)[2:] != out[:1] + out[2:]:
                raise call.fail(f"it merges {first.describe()} with a value of shape {tuple(shape)}, which mixes "
                                f"positions of the patch")
        axis = layer.axis if isinstance(layer, keras.layers.Concatenate) else 1
        return _along_transposed_channels(call, first, axis, lambda xs: [layer(list(xs))], channels=out[1])
    if isinstance(layer, keras.layers.Concatenate):
        _check_channel_axis(call, layer.axis, len(call.in_shapes[0]))
        _per_pixel_ok(call, first, shape=call.in_shapes[0])
        channels = call.out_shape[-1]
    if any(unwarps):
        return (lambda xs: [layer(_AlignStreams(unwarps)(list(xs)))]), [first.with_(channels=channels)]
    return (lambda xs: [layer(list(xs))]), [first.with_(channels=channels)]


@_register
class _AlignStreams(_Layer):
    """Unwarps the inputs that went through other strides than the rest (streams that pool differently,
    merged as per-position vectors) and crops all to one size."""
    naive = False  # set by DenseFeatureModel with its other layers

    def __init__(self, unwarps, **kwargs):
        super().__init__(**kwargs)
        self.unwarps = [[list(s) for s in strides] for strides in unwarps]

    def call(self, inputs):
        values = [unwarp(x, strides, self.naive) if strides else x for x, strides in zip(inputs, self.unwarps)]
        h = tf.reduce_min([tf.shape(v)[1] for v in values])
        w = tf.reduce_min([tf.shape(v)[2] for v in values])
        return [v[:, :h, :w, :] for v in values]

    def compute_output_spec(self, inputs):
        """The inputs' channels and dtypes (a float64 stream stays float64 for the ops after it)."""
        return [keras.KerasTensor((None, None, None, x.shape[-1]), dtype=x.dtype) for x in inputs]

    def get_config(self):
        return {**super().get_config(), "unwarps": self.unwarps}


_CROP_LABEL = "crops (Cropping2D, CenterCrop of a larger map): a translation of the dense map"


@_rule_for(keras.layers.Cropping2D, label=_CROP_LABEL)
def _rule_crop(call, geoms):
    """Cropping2D: a crop of the patch-level map is a translation of the dense map (every patch's rows
    t.. are rows t.. of the dense tensor, in every shift branch): the same crop at the start, and the
    end trimmed by as much."""
    geom = geoms[0]
    _require_map(call, geom)
    _require_channels_last(call)
    (top, bottom), (left, right) = call.layer.cropping
    size = (geom.size[0] - top - bottom, geom.size[1] - left - right)

    def run(xs):
        x = xs[0]
        return [x[:, top:(-bottom or None), left:(-right or None), :]]
    return run, [geom.with_(size=size)]


@_rule_for(keras.layers.CenterCrop, label=_CROP_LABEL)
def _rule_center_crop(call, geoms):
    """CenterCrop of a map at least as large as its target: a crop (Keras' offsets, (size - target) // 2),
    after the layer's cast to its compute dtype, as in Cp; onto a larger target it resizes (refused)."""
    geom = geoms[0]
    _require_map(call, geom)
    _require_channels_last(call)
    layer = call.layer
    (h, w), (th, tw) = geom.size, (int(layer.height), int(layer.width))
    if th > h or tw > w:
        raise call.fail(f"it resizes the {h}x{w} patch-level map to {th}x{tw} (interpolation mixes positions)")
    top, left = (h - th) // 2, (w - tw) // 2
    bottom, right = h - th - top, w - tw - left
    dtype = layer.compute_dtype

    def run(xs):
        x = keras.ops.cast(xs[0], dtype)
        return [x[:, top:(-bottom or None), left:(-right or None), :]]
    return run, [geom.with_(size=(th, tw))]


_PAD_LABEL = "refused: padding inside Cp (of nothing, ZeroPadding2D(0) or tf.pad of zeros, the identity)"


@_rule_for(keras.layers.ZeroPadding2D, label=_PAD_LABEL)
def _rule_refuse_padding(call, geoms):
    """Explicit padding inside Cp (of nothing, ZeroPadding2D(0): the identity)."""
    if call.out_shape == call.in_shapes[0] and np.all(np.asarray(call.layer.padding) == 0):
        return _pass_through, [geoms[0]]
    raise call.fail(f"it pads an activation inside Cp; {_PADDING_REASON}")


_RESIZE_LABEL = "refused: upsampling and resizing (UpSampling2D, Conv2DTranspose, Resizing; tf.image.resize, " \
    "tf.nn.depth_to_space, tf.nn.conv2d_transpose in call())"


@_rule_for(keras.layers.UpSampling2D, keras.layers.Conv2DTranspose, keras.layers.Resizing, label=_RESIZE_LABEL)
def _rule_refuse_resizing(call, geoms):
    """Upsampling, resizing and transposed convolutions inside Cp: refused by name (an UpSampling2D or Resizing that
    keeps the size passes the value through; a transposed convolution at stride 1 pads)."""
    if tuple(call.out_shape) == tuple(call.in_shapes[0]) and not isinstance(call.layer, keras.layers.Conv2DTranspose):
        return _pass_through, [geoms[0]]
    if isinstance(call.layer, keras.layers.Conv2DTranspose):
        raise call.fail(_transposed_conv_reason(call.layer.strides, call.layer.kernel_size))
    raise call.fail(f"it resizes a map; {_RESIZE_REASON}")


@_rule_for(keras.layers.GroupNormalization, label="refused: per-patch normalisation")
def _rule_refuse_per_patch(call, geoms):
    """Normalisation with statistics of each patch."""
    raise call.fail(f"it normalises with statistics computed over each patch; {_PER_PATCH_REASON}")



# --- rules for the TensorFlow ops of call() outside layers (keys: op names, e.g. "AddV2") -------------

class _OpKind:
    """The registry key of a kind of TensorFlow op (layer kinds are keyed by their classes): equal for equal
    op names; ``__name__`` is how supported_layers() lists it."""

    def __init__(self, op_type):
        self.__name__ = f"tf.raw_ops.{op_type}"

    def __eq__(self, other):
        return isinstance(other, _OpKind) and other.__name__ == self.__name__

    def __hash__(self):
        return hash(self.__name__)


def _op_rule_for(*op_types, label):
    """Decorator: register a rule for TensorFlow ops that Cp's call() runs outside its layers (keras.ops,
    tf.*, arithmetic on tensors), by op name (the name of its tf.raw_ops function)."""
    def register(rule):
        kinds = [_OpKind(t) for t in op_types]
        return _register_rule(rule, kinds, [k.__name__ for k in kinds], label)
    return register


def _rule_of(call):
    """The rule of a recorded layer or op, or None."""
    return _RULES.get(_OpKind(call.type)) if call.is_op else _lookup_rule(call.layer)


def _op_runner(call, args=None, unwarps=None):
    """CI runs the recorded op itself (a _TFOp; ``args`` replaces the recorded operands), after unwarping
    the inputs of streams that went through other strides (``unwarps``, see _merge_grids)."""
    layer = _TFOp(call.type, call.args if args is None else args, call.attrs, call.variables,
                  name=_op_layer_name(call))

    def run(xs):
        xs = list(xs)
        if unwarps and any(unwarps):
            xs = _AlignStreams(unwarps)(xs)
        out = layer(xs)
        return out if isinstance(out, list) else [out]
    return run


def _op_layer_name(call):
    """The name of CI's layer for a recorded op: the op's name in Cp's graph ("/" is not allowed)."""
    return call.op.name.replace("/", ".")


def _crop_runner(top, bottom, left, right, c0, c1, channels, transposed=False):
    """CI's crop of dense maps: rows and columns trimmed as in the patch-level map (a translation of the
    dense map, see _rule_crop), channels c0:c1 of ``channels``; of transposed dense values (N, C, H, W) where
    ``transposed``."""
    begin, end = [0, top, left, c0], [0, -bottom, -right, c1]
    masks = [1, 2 if bottom == 0 else 0, 4 if right == 0 else 0, 8 if c1 == channels else 0]
    if transposed:  # the channel axis second
        begin, end, masks = ([v[0], v[3], v[1], v[2]] for v in (begin, end, masks))
    end_mask = sum(bool(m) << i for i, m in enumerate(masks))
    args = {"input": {"input": 0}, "begin": {"const": begin, "dtype": "int32"},
            "end": {"const": end, "dtype": "int32"},
            "strides": {"const": [1, 1, 1, 1], "dtype": "int32"}}
    attrs = {"begin_mask": ["int", 1], "end_mask": ["int", end_mask], "ellipsis_mask": ["int", 0],
             "new_axis_mask": ["int", 0], "shrink_axis_mask": ["int", 0]}
    layer = _TFOp("StridedSlice", args, attrs)
    return lambda xs: [layer(xs[0])]


def _per_channel(geom, shape=None):
    """Values whose last axis is the channels of one position: a map, a vector of one position, or, given its traced
    ``shape``, a reshape of a map that keeps the channels on the last axis ((N, h*w, C): Keras' H, W, C order
    leaves each channel's values, for every position, at its index of that axis)."""
    if geom.kind == MAP or geom.is_pixel_vector:
        return True
    return (geom.kind == VIEW and shape is not None and len(shape) >= 2 and shape[-1] == geom.channels
            and _prod(shape[1:-1]) == geom.size[0] * geom.size[1])


def _same_at_every_position(spec, geom, shape=None):
    """A constant of Cp's call() (``keras.ops.zeros_like(x)``, ``tf.fill(tf.shape(x), c)``) whose entries are the
    same at every position of the patch and for every patch of the example batch: the one value per channel
    it holds, of shape [1, ..., 1, C], which broadcasts to the same values.  Exact, since such a constant does
    not depend on the input; values computed from Cp's variables (which training may make differ) are never
    replaced.  ``spec`` otherwise.  (``shape``: the traced shape of the value it is combined with; of a transposed
    map, (N, C, h, w), the value per channel has shape [1, C, 1, 1].)"""
    transposed = geom.kind == TRANSPOSED and shape is not None and len(shape) == 4
    if not isinstance(spec, dict) or not (_per_channel(geom, shape) or transposed) or not _constant_only(spec):
        return spec
    if "const" in spec:
        value, dtype = np.asarray(spec["const"]), spec["dtype"]
    else:  # an op of constants only (tf.ones_like(x) * 0.5): its value, computed once
        value = _operand_value(spec, [], [])
        value, dtype = np.asarray(value.numpy()), value.dtype.name
    if value.ndim < 2 or transposed and value.ndim != 4:
        return spec
    first = value[:1, :, :1, :1] if transposed else \
        value.reshape(-1, value.shape[-1])[:1].reshape((1,) * (value.ndim - 1) + value.shape[-1:])
    if first.shape == value.shape or not np.array_equal(value, np.broadcast_to(first, value.shape), equal_nan=True):
        return spec
    return {"const": first.tolist(), "dtype": dtype, "shape": list(first.shape)}


def _constant_only(spec):
    """Whether an operand spec stands for a constant: neither computed from the input nor from Cp's variables."""
    if isinstance(spec, list):
        return all(_constant_only(s) for s in spec)
    if "op" in spec:
        return all(_constant_only(s) for s in spec["args"].values())
    return "const" in spec


_ELEMENTWISE_OPS = (
    # activations and other functions of one value
    "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Sigmoid", "Tanh", "Abs", "Neg", "Sign",
    "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Exp", "Expm1", "Log", "Log1p", "Erf", "Erfc", "Floor", "Ceil",
    "Round", "Rint", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "IsNan", "IsInf", "IsFinite", "LogicalNot", "Cast", "StopGradient", "PreventGradient", "Lgamma", "Digamma",
    "Erfinv", "Ndtri", "BesselI0e", "BesselI1e",
    # arithmetic and comparisons of values on one grid and of constants
    "AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "MulNoNan", "FloorDiv", "FloorMod", "TruncateDiv",
    "Maximum", "Minimum", "Pow", "SquaredDifference", "Atan2", "Xdivy", "Xlogy", "Xlog1py", "TruncateMod",
    "NextAfter", "BiasAdd", "ClipByValue",
    "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr",
    "Select", "SelectV2", "AddN",
    # bits (keras.ops.argmax tests the sign bit of zeros): a Bitcast between types of one width keeps the shape
    "Bitcast", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Invert", "LeftShift", "RightShift")


#: element-wise ops that TensorFlow does not broadcast (tf.compat.v1.where and tf.clip_by_norm: Select;
#: tf.raw_ops.ClipByValue with tensor bounds; tf.add_n: AddN): their operands have one shape in Cp
_SAME_SHAPE_OPS = ("Select", "ClipByValue", "AddN")


def _broadcast_replaced(call, recorded, args):
    """For the ops that TensorFlow does not broadcast (_SAME_SHAPE_OPS): the constants of the map's shape that
    _same_at_every_position replaced by their values per channel ([1, ..., 1, C]) are broadcast back, where CI
    runs, to the shape of the op's first dense operand, whose shape they had in Cp (the same values at every
    position).  ``args`` (the operands after replacing) as they are for other ops; ``recorded``: the op's
    operands before."""
    dense = next((spec for spec in _flat_specs(args) if "input" in spec), None)
    if call.type not in _SAME_SHAPE_OPS or dense is None:
        return args
    shape = {"op": "Shape", "args": {"input": dense}, "attrs": {"out_type": ["type", "int32"]}}

    def widen(before, after):
        return after if after is before else {"op": "BroadcastTo", "args": {"input": after, "shape": shape},
                                              "attrs": {}}
    return {name: [widen(b, a) for b, a in zip(recorded[name], spec)] if isinstance(spec, list)
            else widen(recorded[name], spec) for name, spec in args.items()}


@_takes_swapped
@_takes_transposed
@_op_rule_for(*_ELEMENTWISE_OPS, label="TensorFlow element-wise ops in call() (keras.ops, tf.math, tf.nn, "
                                       "arithmetic on tensors, casts, tf.where): applied per pixel")
def _rule_elementwise_op(call, geoms):
    """Element-wise ops of values on one grid and of constants that are the same at every position of the
    patch (scalars, per-channel vectors): the same op on the dense values.  A value of the whole patch
    (1x1, such as its mean) broadcast over a larger map is per-patch normalisation, refused."""
    if call.attrs.get("data_format", ["string", "NHWC"])[1] != "NHWC":
        raise call.fail("only data_format='NHWC' (channels last) is supported")
    out = tuple(call.out_shapes[0])
    data = [spec for spec in _flat_specs(call.args) if "input" in spec]
    shapes = [tuple(spec["shape"]) for spec in data]
    if any(g.kind == TRANSPOSED for g in geoms):
        return _elementwise_transposed(call, geoms, shapes, out)
    for shape, geom in zip(shapes, geoms):
        if len(shape) != len(out) or shape[0] != out[0]:
            raise call.fail(f"it broadcasts a value of shape {shape} to {out}, which moves values between "
                            f"patches or between their axes")
        if shape[1:-1] != out[1:-1]:
            big = next((g.describe() for s, g in zip(shapes, geoms) if s[1:-1] == out[1:-1]), f"a {out} value")
            gate = " (a squeeze-and-excitation gate is such a value; where the gated map is pooled over the patch " \
                "next, pool first: the gate times the map's mean is the mean of the gated map)" if call.type == "Mul" \
                else ""
            raise call.fail(f"it combines {big} with {geom.describe()}, a value of the whole patch (such as its "
                            f"mean or standard deviation) used at every position, as per-patch normalisation "
                            f"does; {_PER_PATCH_REASON}{gate}")
        if shape[-1] != out[-1] and not (shape[-1] == 1 and _per_channel(geom, shape)):
            raise call.fail(f"it broadcasts {geom.describe()} along the last axis of a {out} value, which mixes "
                            f"positions of the patch")
    first, unwarps = _merge_grids(call, geoms)
    args = {name: [_same_at_every_position(s, first, out) for s in spec] if isinstance(spec, list)
            else _same_at_every_position(spec, first, out) for name, spec in call.args.items()}
    for spec in _flat_specs(args):
        if "input" in spec:
            continue
        shape = tuple(spec["shape"] or ())
        per_position = any(s != 1 for s in shape[:-1]) or (shape and shape[-1] != 1
                                                            and not _per_channel(first, out))
        if len(shape) > len(out) or per_position or (shape and shape[-1] not in (1, out[-1])):
            if not _constant_only(spec):
                raise call.fail(f"it combines {first.describe()} with a value of shape {list(shape)} computed from "
                                f"Cp's weights, one entry per position of the patch, which may differ (training "
                                f"changes them); only scalars and per-channel values can be made dense")
            raise call.fail(f"it combines {first.describe()} with a constant of shape {list(shape)}, which differs "
                            f"per position of the patch; only scalars and per-channel constants can be made dense")
    args = _broadcast_replaced(call, call.args, args)
    return _op_runner(call, args, unwarps), [first.with_(channels=out[-1] if _per_channel(first, out) else None)]


def _elementwise_transposed(call, geoms, shapes, out):
    """Element-wise ops of transposed maps (N, C, h, w) on one grid (a one-channel one may stand against C) and of
    constants that are scalars or one value per channel ((C, 1, 1), (1, C, 1, 1)): the op on the dense values."""
    first, unwarps = _merge_grids(call, geoms)  # (refuses a transposed map combined with anything else)
    for shape, geom in zip(shapes, geoms):
        if len(shape) != 4 or shape[:1] + shape[2:] != out[:1] + out[2:] or shape[1] not in (1, out[1]):
            raise call.fail(f"it broadcasts {geom.describe()} ({shape}) to {out}, which mixes positions of the patch")
    args = {name: [_same_at_every_position(s, first, out) for s in spec] if isinstance(spec, list)
            else _same_at_every_position(spec, first, out) for name, spec in call.args.items()}
    for spec in _flat_specs(args):
        shape = tuple(spec.get("shape") or ())
        if "input" in spec or len(shape) <= 4 and all(n == 1 for n in ((1,) * (4 - len(shape)) + shape)[2:]) and (
                len(shape) < 3 or shape[-3] in (1, out[1])) and (len(shape) < 4 or shape[0] == 1):
            continue
        raise call.fail(f"it combines {first.describe()} with a value of shape {list(shape)}, which differs per "
                        f"position of the patch; only scalars and per-channel values ((C, 1, 1)) can be made dense")
    return _op_runner(call, _broadcast_replaced(call, call.args, args), unwarps), [first.with_(channels=out[1])]


_TRANSPOSE_HINT = ("CI keeps the channels of every pixel on the last axis (or, after a transpose (0, 3, 1, 2) of a "
                   "map, on axis 1), and a value transposed otherwise cannot be made dense (Dense acts on the channels "
                   "of every pixel as it is; for PyTorch's C, H, W flattening order, reorder the rows of the next "
                   "Dense's kernel to H, W, C instead)")
_TO_TRANSPOSED, _FROM_TRANSPOSED = [0, 3, 1, 2], [0, 2, 3, 1]
#: where a map's axes (N, h, w, C) lie in the values of each kind: (N, h, w, C), (N, C, h, w), (N, w, h, C)
_AXES_OF = {MAP: (0, 1, 2, 3), TRANSPOSED: (0, 3, 1, 2), SWAPPED: (0, 2, 1, 3)}


def _moves_nothing(shape, perm) -> bool:
    """Whether a transpose ``perm`` of a value of ``shape`` leaves every value where it was (it swaps axes of size
    1 only): no transpose at all, for the dense values too."""
    index = np.arange(_prod(shape)).reshape(shape)
    return np.array_equal(np.transpose(index, perm), index)


def _transposed_geom(call, geom, perm, src):
    """The geometry after a transpose ``perm`` of a value with ``geom``: a map's channels moved to axis 1 (a
    transposed map) or back; a transposed map's channels moved to the end with its positions transposed (a
    SWAPPED map, perm (0, 3, 2, 1), as tf.nn.softmax(t, axis=1) does) or back; or its ConversionError (None where
    the transpose keeps the values' order, a reshape)."""
    index = np.arange(_prod(src)).reshape(src)
    moved = None if perm is None else np.transpose(index, perm)
    kept = moved is not None and np.array_equal(moved.ravel(), index.ravel())
    if moved is not None and len(src) == 4 and geom.kind in _AXES_OF:  # (also of a 1x1 map: the runner transposes
        axes = tuple(_AXES_OF[geom.kind][p] for p in perm)  # the dense values)
        kind = next((k for k, a in _AXES_OF.items() if a == axes), None)
        if kind not in (None, geom.kind) and not (geom.kind == MAP and kind == SWAPPED and kept):
            return geom.with_(kind=kind)
    if moved is not None and geom.kind in (TRANSPOSED, SWAPPED) and np.array_equal(moved, index):
        return geom
    if kept and geom.kind not in (TRANSPOSED, SWAPPED):
        return None  # the values keep their order (the identity, axes of size 1)
    if geom.kind in (TRANSPOSED, SWAPPED):
        raise call.fail(f"it transposes {geom.describe()} (perm {perm}); a transposed map can only be transposed "
                        f"back to (N, h, w, C) (perm (0, 2, 3, 1) of (N, C, h, w), (0, 2, 1, 3) of (N, w, h, C))")
    raise call.fail(f"it transposes {geom.describe()} (perm {perm}); {_TRANSPOSE_HINT}")


@_takes_transposed
@_rule_for(keras.layers.Permute, label="transposes of a map to (N, C, h, w) and back (LayerNormalization, Softmax, "
           "element-wise ops along axis 1 between); others refused (but those that keep the values' order)")
def _rule_permute(call, geoms):
    """Permute((3, 1, 2)) of a map: a transposed map, its channels on axis 1, on which ops per position along the
    channels run as they are on the dense values, transposed alike; Permute((2, 3, 1)) brings it back.  Other
    transposes swap positions of the patch or move the channels elsewhere: refused (one that keeps the values in
    their order, the identity or moving axes of size 1, is a reshape)."""
    dims, src = list(call.layer.dims), tuple(call.in_shapes[0])
    if _moves_nothing(src, [0] + dims):  # (axes of size 1 swapped): the value as it is
        return _pass_through, [geoms[0]]
    geom = _transposed_geom(call, geoms[0], [0] + dims, src)
    if geom is None:  # the values keep their order
        return _pass_through, [_reshaped_geom(call, geoms[0], src, call.out_shape)]
    return _reuse(call.layer), [geom]


@_takes_transposed
@_op_rule_for("Transpose", "ConjugateTranspose",
              label="TensorFlow transposes in call() of a map to (N, C, h, w) and back; others refused (but those "
                    "that keep the values' order)")
def _rule_transpose_op(call, geoms):
    """tf.transpose / keras.ops.transpose: as Permute (perm (0, 3, 1, 2) and back (0, 2, 3, 1))."""
    perm, src = call.constant("perm"), tuple(call.in_shapes[0])
    perm = None if perm is None else [int(d) for d in np.ravel(perm)]
    if perm is not None and _moves_nothing(src, perm):  # (axes of size 1 swapped): the value as it is
        return _pass_through, [geoms[0]]
    geom = _transposed_geom(call, geoms[0], perm, src)
    if geom is None:  # (order kept)
        return _pass_through, [_reshaped_geom(call, geoms[0], src, call.out_shapes[0])]
    return _op_runner(call), [geom]


@_takes_transposed
@_op_rule_for("ArgMax", "ArgMin", label="TensorFlow arg max / min over the channel axis in call() (keras.ops.argmax(x, "
                                        "-1); axis 1 of a transposed map): per pixel")
def _rule_arg_op(call, geoms):
    """``keras.ops.argmax`` / ``argmin`` (``tf.argmax``) over the channels of a map, a vector of one position or
    (N, h*w, C) rows, or over axis 1 of a transposed map: the index of a channel at every pixel (the dense values
    keep a one-channel last axis, a map's)."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    axis = call.constant("dimension")
    if geom.kind == TRANSPOSED:  # its (N, h, w) of indices is the map's
        _along_transposed_channels(call, geom, _constant_axis(call, axis), None)
        axis, geom, src = 1, geom.with_(kind=MAP), (src[0],) + src[2:] + src[1:2]
    elif axis is None or np.ndim(axis) != 0 or int(axis) % len(src) != len(src) - 1 or not _per_channel(geom, src):
        raise call.fail(f"it takes the arg {call.type[3:].lower()} of {geom.describe()} along axis {axis}; only the "
                        f"channel axis (-1) can be made dense")
    else:
        axis = -1
    arg = _TFOp(call.type, dict(call.args, dimension={"const": axis, "dtype": call.args["dimension"]["dtype"]}),
                call.attrs, name=_op_layer_name(call))
    keep = _TFOp("ExpandDims", {"input": {"input": 0}, "axis": {"const": -1, "dtype": "int32"}}, {})
    return (lambda xs: [keep(arg(xs[0]))]), [_reshaped_geom(call, geom.with_(channels=1), src[:-1] + (1,),
                                                            call.out_shapes[0])]


@_op_rule_for("BroadcastTo", "Tile", label="TensorFlow broadcasts and tiles of one channel over the channels in "
                                           "call() (keras.ops.broadcast_to, tf.tile of a one-channel gate): per pixel")
def _rule_broadcast_op(call, geoms):
    """``keras.ops.broadcast_to(g, shape)`` / ``tf.tile(g, [1, 1, 1, C])`` of a one-channel value to C channels at
    the same positions: the same channel repeated at every pixel (a tile of the dense values)."""
    geom, src, dst = geoms[0], tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    if src == dst:
        return _pass_through, [geom]
    if len(src) != len(dst) or src[:-1] != dst[:-1] or src[-1] != 1 or not _per_channel(geom, src):
        raise call.fail(f"it broadcasts {geom.describe()} from {src} to {dst}; only one channel repeated over the "
                        f"channels (the last axis) of the same positions can be made dense")
    tile = _TFOp("Tile", {"input": {"input": 0}, "multiples": {"const": [1, 1, 1, dst[-1]], "dtype": "int32"}}, {})
    return (lambda xs: [tile(xs[0])]), [geom.with_(channels=dst[-1])]


@_takes_swapped
@_op_rule_for("MatMul", label="TensorFlow matrix products in call() with a constant or weight (x @ w): per pixel "
                             "on a vector of one position, an h x w convolution on a flattened map")
def _rule_matmul_op(call, geoms):
    """``x @ w`` (keras.ops.matmul, tf.matmul) of a value computed from the patch and a constant or weight of
    Cp: as a Dense layer, per pixel on a vector of one position, an h x w convolution (H, W, C order) on a
    flattened map."""
    geom = geoms[0]
    a, b = call.args["a"], call.args["b"]
    if "input" not in a or "input" in b or call.attrs["transpose_a"][1]:
        raise call.fail("only x @ w with x computed from the patch and w a constant or weight can be made dense")
    transpose_b = call.attrs["transpose_b"][1]
    units = call.out_shapes[0][-1]
    if geom.is_pixel_vector:
        args = {"x": a, "y": b}
        attrs = {"adj_x": ["bool", False], "adj_y": ["bool", transpose_b]}
        layer = _TFOp("BatchMatMulV2", args, attrs, call.variables, name=_op_layer_name(call))
        return (lambda xs: [layer(xs[0])]), [geom.with_(channels=units)]
    if geom.kind != VECTOR:
        raise call.fail(f"it is applied to {geom.describe()}; flatten the map first")
    (h, w), c = geom.size, geom.channels
    if transpose_b:
        b = {"op": "Transpose", "args": {"x": b, "perm": {"const": [1, 0], "dtype": "int32"}}, "attrs": {}}
    kernel = b
    kernel = {"op": "Reshape", "args": {"tensor": kernel, "shape": {"const": [h, w, c, units], "dtype": "int32"}},
              "attrs": {}}
    args = {"input": a, "filter": kernel}
    attrs = {"strides": ["list(int)", [1, 1, 1, 1]], "padding": ["string", "VALID"]}
    layer = _TFOp("Conv2D", args, attrs, call.variables, name=_op_layer_name(call))
    return (lambda xs: [layer(xs[0])]), [geom.with_(channels=units, size=(1, 1))]


@_takes_swapped
@_op_rule_for("BatchMatMulV2", "BatchMatMulV3", label="TensorFlow matrix products in call() of a map (or rows of "
                                                      "positions) with a matrix (x @ w): per pixel, over the channels")
def _rule_batch_matmul_op(call, geoms):
    """``x @ w`` of a map (N, h, w, C), or of (N, h*w, C) rows of its positions, with a C x K constant or weight of
    Cp: a product over the channels of every pixel, the same op on the dense values."""
    geom, shape = geoms[0], tuple(call.in_shapes[0])
    x, y = call.args["x"], call.args["y"]
    if "input" not in x or "input" in y or call.attrs["adj_x"][1] or len(y.get("shape") or ()) != 2 or \
            not _per_channel(geom, shape) or len(shape) < 3:
        raise call.fail(f"it multiplies {geom.describe()} of shape {shape} by a value of shape {y.get('shape')}; only "
                        f"x @ w of a map (or of a vector of one position) with a constant or weight w of shape "
                        f"(C, K) can be made dense (a product over the channels of every pixel)")
    layer = _TFOp(call.type, call.args, call.attrs, call.variables, name=_op_layer_name(call))
    return (lambda xs: [layer(xs[0])]), [geom.with_(channels=call.out_shapes[0][-1])]


@_takes_swapped
@_takes_transposed
@_op_rule_for("Einsum", label="TensorFlow einsum in call() of a map (or a transposed map) and a (C, K) constant or "
                              "weight over the channels of every position (keras.ops.einsum('nhwc,ck->nhwk', x, w))")
def _rule_einsum_op(call, geoms):
    """``keras.ops.einsum("nhwc,ck->nhwk", x, w)`` (tf.einsum; any letters, either order of the operands and of the
    weight's axes): a product over the channels of every position of a map (or of a transposed map,
    "nchw,ck->nkhw") with a constant or weight of Cp, the same op on the dense values; other equations refused."""
    geom = geoms[0]
    operands = call.args.get("inputs", [])
    refs = [i for i, spec in enumerate(operands) if "input" in spec]
    axis = 1 if geom.kind == TRANSPOSED else 3
    reason = "it multiplies two activations" if len(refs) != 1 else \
        f"it is applied to {geom.describe()}" if geom.kind not in (MAP, TRANSPOSED) else \
        _einsum_over_channels(call.attrs["equation"][1], refs[0], axis) if len(operands) == 2 else \
        "it has other operands"
    if reason is not None:
        raise call.fail(f"{reason}; only an einsum of a map and a (C, K) weight over the channels of every position "
                        f"('nhwc,ck->nhwk') can be made dense")
    return _op_runner(call), [geom.with_(channels=call.out_shapes[0][axis])]


@_op_rule_for("Reshape", "Squeeze", "ExpandDims", label="TensorFlow reshapes in call() that keep the batch axis "
                                                        "(the same values, reinterpreted)")
def _rule_reshape_op(call, geoms):
    """Reshapes that keep the batch axis (keras.ops.reshape, tf.squeeze, x[:, None]): see _reshaped."""
    return _reshaped(call, geoms[0], call.in_shapes[0], call.out_shapes[0])


@_takes_swapped
@_op_rule_for("Softmax", "LogSoftmax", label="TensorFlow ops along the channel axis in call() (softmax): per pixel")
def _rule_channel_op(call, geoms):
    """Softmax and log-softmax along the last axis: per pixel where that axis is the channels."""
    geom = geoms[0]
    if not _per_channel(geom, call.in_shapes[0]):
        raise call.fail(f"it acts along the last axis of {geom.describe()}, which mixes positions of the patch")
    return _op_runner(call), [geom]


@_takes_transposed
@_op_rule_for("Cumsum", "Cumprod", "CumulativeLogsumexp",
              label="TensorFlow cumulative ops along the channel axis in call() (keras.ops.cumsum(x, -1), cumprod, "
                    "tf.math.cumulative_logsumexp; axis 1 of a transposed map): per pixel")
def _rule_cumulative_op(call, geoms):
    """Cumulative sums, products and log-sum-exps along the channels of a map, a vector of one position or (N, h*w,
    C) rows, or along axis 1 of a transposed map: the same op along the channel axis of every pixel."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    axis = _constant_axis(call, call.constant("axis"))
    if geom.kind == TRANSPOSED:
        return _along_transposed_channels(call, geom, axis, _op_runner(call))
    if np.ndim(axis) != 0 or int(axis) % len(src) != len(src) - 1 or not _per_channel(geom, src):
        raise call.fail(f"it works along axis {axis} of {geom.describe()}, which mixes positions of the patch; only "
                        f"the channel axis (-1) can be made dense")
    args = dict(call.args, axis={"const": -1, "dtype": call.args["axis"]["dtype"]})
    return _op_runner(call, args), [geom]


@_op_rule_for("TopKV2", label="TensorFlow top-k and sorts along the channel axis in call() (keras.ops.top_k, "
                              "keras.ops.sort(x, -1), argsort, tf.math.top_k): per pixel")
def _rule_top_k_op(call, geoms):
    """The k largest channels of every pixel (keras.ops.top_k, and keras.ops.sort / argsort along the last axis,
    which TensorFlow computes with top-k): the op along the last axis of a map, a vector of one position or (N, h*w,
    C) rows, where that axis is the channels; the values and their indices have k channels."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    if not _per_channel(geom, src):
        raise call.fail(f"it takes the top k along the last axis of {geom.describe()}, which mixes positions of the "
                        f"patch; only the channel axis can be made dense (sort along axis -1 of a map)")
    return _op_runner(call), [geom.with_(channels=int(out[-1])) for out in call.out_shapes]


@_takes_swapped
@_takes_transposed
@_op_rule_for("ConcatV2", label="TensorFlow concatenation on channels in call() (keras.ops.concatenate, tf.concat; "
                                 "axis 1 of transposed maps)")
def _rule_concat_op(call, geoms):
    """Concatenation of values on one grid (or per-position vectors of streams that pool differently,
    unwarped first) along the channel axis."""
    axis = call.constant("axis")
    if axis is None or any("input" not in spec for spec in call.args["values"]):
        raise call.fail("it concatenates a constant (or along an axis computed from the patch) with values "
                        "computed from the patch")
    rank = len(call.out_shapes[0])
    first, unwarps = _merge_grids(call, geoms)
    if first.kind == TRANSPOSED:  # (all are, on one grid: _merge_grids)
        return _along_transposed_channels(call, first, int(axis), _op_runner(call), channels=call.out_shapes[0][1])
    if int(axis) % rank != rank - 1 or not _per_channel(first, call.in_shapes[0]):
        raise call.fail(f"it concatenates {first.describe()} along axis {int(axis)}; only the channel axis (-1) of "
                        f"maps and of vectors of one position can be made dense")
    args = dict(call.args, axis={"const": -1, "dtype": call.args["axis"]["dtype"]})
    return _op_runner(call, args, unwarps), [first.with_(channels=call.out_shapes[0][-1])]


@_op_rule_for("Pack", label="TensorFlow stacks in call() of one-channel values along a new last axis (keras.ops."
                            "stack([x[..., 2], x[..., 1], x[..., 0]], axis=-1)): a concatenation of channels")
def _rule_stack_op(call, geoms):
    """``keras.ops.stack`` / ``tf.stack`` along a new last axis of values that are each one channel of a map,
    (N, h, w) (``x[..., c]``, a reduction over the channels without keepdims; also the (N,) value of a vector of one
    position or the (N, h*w) of rows of positions): the channels of every pixel side by side, a concatenation of the
    one-channel dense maps (keras.applications' preprocess_input in "caffe" mode turns RGB into BGR so).  A stack
    along any other axis puts the values between positions of the patch (or patches): refused."""
    values, out = call.args["values"], tuple(call.out_shapes[0])
    if any("input" not in spec for spec in values):
        raise call.fail("it stacks a constant with values computed from the patch; only values computed from the "
                        "patch, each one channel of a map, can be made dense")
    axis = int(call.attrs["axis"][1]) % len(out)
    shapes = [tuple(shape) for shape in call.in_shapes]
    if len(out) == 5 and axis >= 3 and all(g.kind == MAP and not g.guessed and len(s) == 4
                                           for g, s in zip(geoms, shapes)):
        # maps (N, h, w, C) stacked along a new axis after their positions: every position's channels side by side,
        # (N, h, w, n, C) or (N, h, w, C, n), a map with its channels split into groups; the same stack of the dense
        # maps (which have as many axes)
        first, unwarps = _merge_grids(call, geoms)
        return _op_runner(call, unwarps=unwarps), [first.with_(kind=GROUPS, groups=out[3:])]
    if axis != len(out) - 1:
        raise call.fail(f"it stacks {len(values)} values of shape {shapes[0]} along axis {axis} of its {out} result, "
                        f"which puts them between positions of the patch (or between patches); only a stack along a "
                        f"new last axis (axis=-1) of one-channel values (N, h, w), such as x[..., c], can be made "
                        f"dense: it is a concatenation of their channels")
    for geom, shape in zip(geoms, shapes):
        if geom.channels != 1 or not _per_channel(geom, shape + (1,)):
            raise call.fail(f"it stacks {geom.describe()} (shape {shape}) along a new last axis; only one-channel "
                            f"values (N, h, w), such as x[..., c] of a map, stack into the channels of every pixel")
    geoms = _numbers_as_vectors(geoms, shapes)
    first, unwarps = _merge_grids(call, geoms)
    concat = _TFOp("ConcatV2", {"values": [{"input": k} for k in range(len(values))],
                                "axis": {"const": -1, "dtype": "int32"}}, {}, name=_op_layer_name(call))

    def run(xs):
        xs = _AlignStreams(unwarps)(list(xs)) if any(unwarps) else list(xs)
        return [concat(xs) if len(xs) > 1 else xs[0]]  # (a stack of one value: its one-channel map)
    stacked = first.with_(kind=MAP, channels=len(values))
    (h, w) = first.size
    return run, [_reshaped_geom(call, stacked, (out[0], h, w, len(values)), out)]


def _sliced_indices(call, index):
    """The entries of ``index`` (the indices of the traced value, any layout) that a recorded slice takes, from the
    op run on them; its ConversionError where its bounds are computed from the patch."""
    probe = {name: {"const": index, "dtype": "int64"} if isinstance(spec, dict) and "input" in spec else spec
             for name, spec in call.args.items()}
    if any("input" in spec for spec in _flat_specs(probe)):
        raise call.fail("its bounds are computed from the patch")
    return np.asarray(_run_op(call.type, probe, call.attrs, [], call.variables))


@_takes_swapped
@_takes_transposed
@_op_rule_for("StridedSlice", "Slice", label="TensorFlow slices in call(): crops of the map (a translation of the "
                                             "dense map) and slices of channels (also of a transposed map)")
def _rule_slice_op(call, geoms):
    """Slices: applied to the indices of the patch-level value, the op shows which entries it takes.  A
    contiguous box of every patch is a crop of the map (the same start in every shift branch, the end
    trimmed by as much: see _rule_crop) and a slice of its channels; anything else is refused.  Of a transposed
    map (N, C, h, w) the indices are those of the map it transposes, so the same analysis applies: a slice that
    keeps the four axes is the same crop of the transposed dense values; one that drops axes takes the values of
    the map transposed back."""
    geom = geoms[0]
    src, dst = tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    transposed = geom.kind == TRANSPOSED
    if transposed:  # the indices of the map (N, h, w, C), transposed as the value is
        src = (src[0],) + src[2:] + src[1:2]
        index = np.arange(_prod(src), dtype=np.int64).reshape(src).transpose(_TO_TRANSPOSED)
        geom = geom.with_(kind=MAP)
    else:
        index = np.arange(_prod(src), dtype=np.int64).reshape(src)
    picked = _sliced_indices(call, index)
    if picked.size == 0:
        raise call.fail("it takes an empty slice")
    if transposed and len(dst) == 4:  # still a transposed map: the same crop and channels of the transposed values
        run, (out,) = _slice_of(call, geom, src, (dst[0],) + dst[2:] + dst[1:2], picked.transpose(_FROM_TRANSPOSED),
                                transposed=True)
        if out.kind != MAP:
            raise AssertionError(f"a slice of a transposed map gave {out.describe()}")
        return run, [out.with_(kind=TRANSPOSED)]
    run, outs = _slice_of(call, geom, src, dst, picked)
    if not transposed:
        return run, outs
    back = _transposer((0, 2, 3, 1))
    return (lambda xs: run([back(xs[0])])), outs


def _slice_of(call, geom, src, dst, picked, transposed=False):
    """What CI runs for a slice that takes the entries ``picked`` (their indices, in the output's shape ``dst``) of a
    value of ``geom`` and traced shape ``src``, and the geometry of the result (see _rule_slice_op).  ``transposed``:
    a slice of a transposed map that keeps it one; ``picked`` and ``dst`` are then those of the map, the runner
    slices transposed dense values."""
    index = np.arange(_prod(src), dtype=np.int64).reshape(src)
    lo, hi = np.unravel_index(picked.min(), src), np.unravel_index(picked.max(), src)
    box = index[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]
    if box.size != picked.size or not np.array_equal(box.ravel(), picked.ravel()):
        channels = _channel_selection(picked, src, geom)
        if channels is None and geom.kind == MAP and len(src) == 4 == picked.ndim + 1:  # every few positions and an
            # integer index that drops an axis (x[:, ::2, ::2, 0]): the same with that axis kept, reshaped
            kept = (_channel_selection(np.expand_dims(picked, axis), src, geom) for axis in (3, 1, 2))
            channels = next((c for c in kept if c is not None and c[3] != (1, 1)), None)
        if channels is None:
            raise call.fail("it takes a reversed or reordered slice of positions; only crops (x[:, a:b, c:d, :], "
                            "also every few positions: x[:, ::2, ::2, :]) and slices, steps or reversals of channels "
                            "can be made dense"
                            + ("; of a transposed map, only those that keep it one or give the values of the map "
                               "transposed back in their order" if geom.kind == MAP and len(src) != len(dst) else ""))
        (y0, x0), (bh, bw), (sh, sw) = channels[1:]
        gather = _TFOp("GatherV2", {"params": {"input": 0}, "indices": {"const": channels[0], "dtype": "int32"},
                                    "axis": {"const": 1 if transposed else -1, "dtype": "int32"}},
                       {"batch_dims": ["int", 0]})
        if geom.kind == MAP and (sh, sw) != (1, 1):  # every (sh, sw)-th position (x[:, ::2, ::2], YOLOv5's Focus):
            if transposed:  # the crop, then multipooling of 1x1 windows at that stride (a strided layer)
                raise call.fail("it takes every few positions of a transposed map; transpose it back first")
            box = geom.size[0] - y0 - (bh - 1) * sh - 1, geom.size[1] - x0 - (bw - 1) * sw - 1
            crop = _crop_runner(y0, box[0], x0, box[1], 0, geom.channels, geom.channels)
            subsample, every = multiAvgPooling(1, 1, sw, sh), channels[0] == list(range(geom.channels))

            def run(xs):  # (the channels first: the strided layer gives the value, as CI's depths expect)
                y = crop(xs)[0]
                return [subsample(y if every else gather(y))]
            picked_geom = geom.with_(size=(bh, bw), channels=len(channels[0]), stride=(sh, sw))
            return run, [_reshaped_geom(call, picked_geom, (src[0], bh, bw, len(channels[0])), dst)]
        if geom.kind == MAP:
            crop = _crop_runner(y0, geom.size[0] - y0 - bh, x0, geom.size[1] - x0 - bw, 0, geom.channels,
                                geom.channels, transposed)
            picked_geom = geom.with_(size=(bh, bw), channels=len(channels[0]))
        else:
            crop, picked_geom = _pass_through, geom.with_(channels=len(channels[0]))
        return (lambda xs: [gather(crop(xs)[0])]), [picked_geom]
    if (lo[0], hi[0]) != (0, src[0] - 1):
        raise call.fail("it slices the batch of patches")
    if box.shape == src:  # every entry, reshaped (x[:, None], x[..., 0] of one channel)
        return _reshaped(call, geom, src, dst)
    if geom.kind == MAP and len(src) == 4:
        (h, w), c = geom.size, geom.channels
        cropped = geom.with_(size=box.shape[1:3], channels=box.shape[3])
        run = _crop_runner(lo[1], h - 1 - hi[1], lo[2], w - 1 - hi[2], lo[3], hi[3] + 1, c, transposed)
        return run, [_reshaped_geom(call, cropped, box.shape, dst)]
    if geom.is_pixel_vector and len(src) == 2 or geom.kind == VIEW and _per_channel(geom, src) and \
            box.shape[:-1] == src[:-1]:  # channels of a vector of one position, or of (N, h*w, C) rows of positions
        run = _crop_runner(0, 0, 0, 0, lo[-1], hi[-1] + 1, geom.channels)
        return run, [_reshaped_geom(call, geom.with_(channels=box.shape[-1]), box.shape, dst)]
    raise call.fail(f"it slices {geom.describe()}; only crops of a (N, h, w, C) map and slices of channels can be "
                    f"made dense")


@_op_rule_for("SpaceToDepth", label="TensorFlow space to depth in call() (tf.nn.space_to_depth(x, r)): r*r "
                                     "subsamplings of the map as its channels")
def _rule_space_to_depth_op(call, geoms):
    """``tf.nn.space_to_depth(x, r)`` of a map: its r*r subsamplings x[:, i::r, j::r, :] side by side as channels
    (i*r + j)*C + c: the crops that keep rows i .. h-r+i (so that all have one size), concatenated, and multipooling
    of 1x1 windows at stride (r, r), a strided layer, like a slice with a step (see _slice_of)."""
    geom = geoms[0]
    _require_map(call, geom)
    if call.attrs.get("data_format", ["string", "NHWC"])[1] != "NHWC":
        raise call.fail("only data_format='NHWC' (channels last) is supported")
    r, (h, w), c = int(call.attrs["block_size"][1]), geom.size, geom.channels
    crops = [_crop_runner(i, r - 1 - i, j, r - 1 - j, 0, c, c) for i in range(r) for j in range(r)]
    subsample = multiAvgPooling(1, 1, r, r)
    concat = _TFOp("ConcatV2", {"values": [{"input": k} for k in range(r * r)],
                                "axis": {"const": -1, "dtype": "int32"}}, {}, name=_op_layer_name(call))

    def run(xs):  # (the strided layer last: it gives the value, as CI's depths expect)
        return [subsample(concat([crop(xs)[0] for crop in crops]))]
    return run, [geom.with_(channels=c * r * r, size=(h // r, w // r), stride=(r, r))]


@_takes_swapped
@_takes_transposed
@_op_rule_for("Split", "SplitV", label="TensorFlow splits along the channel axis in call() (tf.split(x, 2, axis=-1), "
                                        "keras.ops.glu; axis 1 of a transposed map): the channels of every pixel")
def _rule_split_op(call, geoms):
    """``tf.split`` / ``keras.ops.split`` along the channel axis (max-feature-map: maximum of the two halves; the
    halves of ``keras.ops.glu``): each part holds some channels of every pixel, the same parts of the dense
    values."""
    geom, rank = geoms[0], len(call.in_shapes[0])
    axis = call.constant("axis")
    if geom.kind == TRANSPOSED:
        run, _ = _along_transposed_channels(call, geom, _constant_axis(call, axis), _op_runner(call))
        return run, [geom.with_(channels=shape[1]) for shape in call.out_shapes]
    if axis is not None and geom.kind == MAP and rank == 4 and int(axis) % 4 in (1, 2):  # bands of rows or
        # columns: each a crop of the map
        axis, (h, w), c = int(axis) % 4, geom.size, geom.channels
        sizes = [int(shape[axis]) for shape in call.out_shapes]
        if 0 in sizes:
            raise call.fail(f"it splits {geom.describe()} along axis {axis} into parts of sizes {sizes}, one of them "
                            f"empty")
        extent, runs, out = (h, w)[axis - 1], [], []
        for start, n in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes):
            box = (start, extent - start - n, 0, 0) if axis == 1 else (0, 0, start, extent - start - n)
            runs.append(_crop_runner(*box, 0, c, c))
            out.append(geom.with_(size=(n, w) if axis == 1 else (h, n)))
        return (lambda xs: [run(xs)[0] for run in runs]), out
    if axis is None or int(axis) % rank != rank - 1 or not _per_channel(geom, call.in_shapes[0]):
        raise call.fail(f"it splits {geom.describe()} along axis {axis}; only the channel axis (-1) of a map or of a "
                        f"vector of one position, or the rows or columns of a map (crops), can be made dense")
    args = dict(call.args, axis={"const": -1, "dtype": call.args["axis"]["dtype"]})
    return _op_runner(call, args), [geom.with_(channels=shape[-1]) for shape in call.out_shapes]


@_takes_transposed
@_op_rule_for("Unpack", label="TensorFlow unstacks of the channels in call() (r, g, b = keras.ops.unstack(x, axis=-1), "
                               "tf.unstack; axis 1 of a transposed map): one-channel values of every pixel")
def _rule_unstack_op(call, geoms):
    """``keras.ops.unstack(x, axis=-1)`` of a map (of a vector of one position, of (N, h*w, C) rows; axis 1 of a
    transposed map): one (N, h, w) value per channel, as ``x[..., c]`` gives; the dense values are split into
    one-channel maps (N, H, W, 1).  Along a position axis or the batch: refused."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    axis, parts = int(call.attrs["axis"][1]), len(call.out_shapes)
    split = _TFOp("Split", {"axis": {"const": 1 if geom.kind == TRANSPOSED else -1, "dtype": "int32"},
                            "value": {"input": 0}}, {"num_split": ["int", parts]}, name=_op_layer_name(call))
    if geom.kind == TRANSPOSED:
        _along_transposed_channels(call, geom, axis, None)
        back = _transposer((0, 2, 3, 1))
        one = geom.with_(kind=MAP, channels=1)  # (the (N, h, w) of one channel: the map's values)
        return (lambda xs: [back(part) for part in split(xs[0])]), \
            [_reshaped_geom(call, one, (src[0],) + one.size + (1,), out) for out in call.out_shapes]
    if axis % len(src) != len(src) - 1 or not _per_channel(geom, src):
        why = "splits the batch of patches" if axis % len(src) == 0 else "mixes positions of the patch"
        raise call.fail(f"it unstacks {geom.describe()} along axis {axis}, which {why}; only the channel axis (-1) "
                        f"can be made dense")
    return (lambda xs: list(split(xs[0]))), [_reshaped_geom(call, geom.with_(channels=1), src[:-1] + (1,), out)
                                              for out in call.out_shapes]


@_takes_swapped
@_takes_transposed
@_op_rule_for("ReverseV2", label="TensorFlow reversals of the channel axis in call() (keras.ops.flip(x, -1), "
                                  "tf.reverse; axis 1 of a transposed map): per pixel")
def _rule_reverse_op(call, geoms):
    """``tf.reverse(x, [-1])`` / ``keras.ops.flip(x, -1)``: the channels of every pixel in reverse order."""
    geom, rank = geoms[0], len(call.in_shapes[0])
    axes = call.constant("axis")
    if geom.kind == TRANSPOSED:
        return _along_transposed_channels(call, geom, _constant_axis(call, axes), _op_runner(call))
    if axes is None or [int(a) % rank for a in np.ravel(axes)] != [rank - 1] or \
            not _per_channel(geom, call.in_shapes[0]):
        raise call.fail(f"it reverses {geom.describe()} along axes {axes}, which reorders positions of the patch; "
                        f"only the channel axis (-1) can be made dense")
    args = dict(call.args, axis={"const": [-1], "dtype": call.args["axis"]["dtype"]})
    return _op_runner(call, args), [geom]


@_takes_swapped
@_takes_transposed
@_op_rule_for("GatherV2", label="TensorFlow gathers of channels in call() (tf.gather(x, indices, axis=-1); axis 1 of a "
                                 "transposed map): per pixel")
def _rule_gather_op(call, geoms):
    """``tf.gather(x, indices, axis=-1)`` with constant indices: the same channels of every pixel."""
    geom, rank = geoms[0], len(call.in_shapes[0])
    axis, indices = call.constant("axis"), call.args["indices"]
    indices = None if not isinstance(indices, dict) or not _constant_only(indices) else indices
    if geom.kind == TRANSPOSED and indices is not None and len(call.out_shapes[0]) == 3 and "input" in \
            call.args["params"] and call.attrs.get("batch_dims", ["int", 0])[1] == 0:  # one channel by a scalar
        # index (keras.ops.take(t, 2, axis=1)): its (N, h, w), the map's values; gathered as [2] and transposed back
        _along_transposed_channels(call, geom, _constant_axis(call, axis), None)
        _one_index_as_a_list(call)
        gather, back = _TFOp(call.type, call.args, call.attrs, name=_op_layer_name(call)), _transposer((0, 2, 3, 1))
        one = geom.with_(kind=MAP, channels=1)
        return (lambda xs: [back(gather(xs[0]))]), [_reshaped_geom(call, one, (call.in_shapes[0][0],)
                                                                   + one.size + (1,), call.out_shapes[0])]
    if geom.kind == TRANSPOSED:
        if "input" not in call.args["params"] or indices is None or call.attrs.get("batch_dims", ["int", 0])[1] != 0 \
                or len(call.out_shapes[0]) != 4:
            raise call.fail(f"it gathers from {geom.describe()} with indices computed from the patch, batch_dims or "
                            f"indices that are not one list; only constant indices into the channel axis can be made "
                            f"dense")
        return _along_transposed_channels(call, geom, _constant_axis(call, axis), _op_runner(call),
                                          channels=call.out_shapes[0][1])
    if "input" not in call.args["params"] or indices is None or axis is None or int(axis) % rank != rank - 1 \
            or call.attrs.get("batch_dims", ["int", 0])[1] != 0 or not _per_channel(geom, call.in_shapes[0]):
        raise call.fail(f"it gathers from {geom.describe()} along axis {axis}; only constant indices into the channel "
                        f"axis (-1) of a map or of a vector of one position can be made dense")
    src, out = tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    if len(out) > len(src):
        raise call.fail(f"it gathers with indices of {len(out) - len(src) + 1} dims, which add axes after the "
                        f"channels; only one list of channel indices (or one index) can be made dense")
    if len(out) == len(src) - 1:  # one channel by a scalar index (tf.gather(x, 3, axis=-1)), (N, h, w): gathered as
        # [3], since the dense values keep a one-channel axis (as after argmax)
        _one_index_as_a_list(call)
        args = dict(call.args, axis={"const": -1, "dtype": call.args["axis"]["dtype"]})
        return _op_runner(call, args), [_reshaped_geom(call, geom.with_(channels=1), src[:-1] + (1,), out)]
    args = dict(call.args, axis={"const": -1, "dtype": call.args["axis"]["dtype"]})
    return _op_runner(call, args), [geom.with_(channels=call.out_shapes[0][-1])]


def _one_index_as_a_list(call):
    """Make the scalar index of a recorded gather (tf.gather(x, 3, axis=-1)) a list of one, [3]: the dense values keep
    the axis it drops."""
    index = call.constant("indices")
    call.args["indices"] = {"const": [int(index)], "dtype": call.args["indices"]["dtype"]}


def _channel_selection(picked, src, geom):
    """Where a slice of a map (N, h, w, C) or of a vector of one position (N, C) takes every patch, a box of
    positions, contiguous or every (sh, sw)-th (x[:, ::2, ::2, :]), and the same channels at each (x[..., ::-1],
    x[:, a:b, c:d, ::2]), with the output in that order: (channel indices, (y0, x0), (box height, box width),
    (sh, sw)); else None.  Of (N, h*w, C) rows of a map's positions, only slices that keep every position
    (rows[..., ::2]) qualify."""
    rows = geom.kind == VIEW and _per_channel(geom, src) and picked.shape[:-1] == src[:-1]
    if not (geom.kind == MAP and len(src) == 4 or geom.is_pixel_vector and len(src) == 2 or rows) or \
            picked.ndim != len(src):
        return None
    if rows:  # (N, h*w, C) rows of positions: every position is kept, in order (checked below as a box of 1 x h*w)
        n, p, c = (a.reshape(src[0], 1, -1, picked.shape[-1])
                   for a in np.unravel_index(picked, (src[0], _prod(src[1:-1]), src[-1])))
        coords = (n, np.zeros_like(p), p, c)
    elif len(src) == 2:
        n, c = np.unravel_index(picked, src)
        coords = (n[:, None, None, :], np.zeros((1, 1, 1, 1), np.int64), np.zeros((1, 1, 1, 1), np.int64),
                  c[:, None, None, :])
    else:
        coords = np.unravel_index(picked, src)
    n, y, x, c = coords
    (bn, bh, bw, _), (y0, x0) = n.shape, (int(y.flat[0]), int(x.flat[0]))
    sh = int(y[0, 1, 0, 0]) - y0 if bh > 1 else 1
    sw = int(x[0, 0, 1, 0]) - x0 if bw > 1 else 1
    channels = c[0, 0, 0]
    ok = (bn == src[0] and sh >= 1 and sw >= 1 and (not rows or (sh, sw) == (1, 1))
          and np.array_equal(n, np.broadcast_to(np.arange(bn)[:, None, None, None], n.shape))
          and np.array_equal(y, np.broadcast_to((y0 + sh * np.arange(bh))[None, :, None, None], y.shape))
          and np.array_equal(x, np.broadcast_to((x0 + sw * np.arange(bw))[None, None, :, None], x.shape))
          and np.array_equal(c, np.broadcast_to(channels, c.shape)))
    return ([int(i) for i in channels], (y0, x0), (bh, bw), (sh, sw)) if ok else None


_REDUCTIONS = {"Mean": "avg", "Max": "max", "Min": "min", "Sum": "sum", "Prod": None, "All": None, "Any": None,
               "EuclideanNorm": None}


@_takes_swapped
@_takes_transposed
@_op_rule_for(*_REDUCTIONS, label="TensorFlow reductions in call(): over channels (per pixel), over positions of "
                                  "the map (global pooling: mean, max, min, sum)")
def _rule_reduce_op(call, geoms):
    """Reductions over the channels of a map or of a vector of one position: the same op per pixel.  Over the
    positions of a map (keras.ops.mean(x, axis=(1, 2)), GlobalMaxPooling2D written with keras.ops.max, ...):
    a stride-1 reduction over windows of the map's size (_WindowReduce), which holds the patch-level value
    for every pixel.  (Combining such a value with a larger map is refused where it happens.)"""
    geom = geoms[0]
    src, dst = tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    axes = call.constant("axis")
    if axes is None:
        raise call.fail("its axes are computed from the patch")
    axes = sorted({int(a) % len(src) for a in np.ravel(axes)})
    if 0 in axes:
        raise call.fail("it reduces over the batch of patches")
    if not axes:
        return _pass_through, [geom]
    if geom.kind == TRANSPOSED:
        if not call.attrs.get("keep_dims", ["bool", False])[1] and axes == [1]:
            raise call.fail(f"it reduces the channels of {geom.describe()} without keepdims=True; CI keeps a "
                            f"transposed map's channel axis: pass keepdims=True (or transpose back first)")
        if axes == [2, 3]:  # over the positions of (N, C, h, w) (channels-first code): the map's global pooling
            kind = _REDUCTIONS[call.type]
            if kind is None:
                raise call.fail(f"it reduces {geom.describe()} over its positions with {call.type}; only mean, max, "
                                f"min and sum over positions (global pooling) can be made dense")
            return _global_pool_of_transposed(call, geom, kind)
        return _along_transposed_channels(call, geom, axes, _op_runner(call), channels=1)

    def per_pixel():  # the op itself over the channel axis, keeping it (dense values stay 4-D)
        return _TFOp(call.type, dict(call.args, axis={"const": [-1], "dtype": call.args["axis"]["dtype"]}),
                     dict(call.attrs, keep_dims=["bool", True]), call.variables, name=_op_layer_name(call))
    if geom.kind in (VIEW, VECTOR) and not geom.guessed and geom.size != (1, 1) and axes == list(range(1, len(src))) \
            and _prod(src[1:]) == geom.channels * geom.size[0] * geom.size[1]:
        # every entry of a flattened map (keras.ops.max(keras.ops.reshape(x, (-1, h * w * C)), axis=1)), in any order:
        # over the positions and the channels of the map (N, h, w, C)
        geom, src, axes = geom.with_(kind=MAP), (src[0],) + tuple(geom.size) + (geom.channels,), [1, 2, 3]
    if geom.kind == VIEW and geom.channels == 1 and len(src) == 3 and src[1:] == tuple(geom.size):
        # the (N, h, w) of a channel reduction without keepdims (keras.ops.max(x, axis=-1)), whose dense values keep
        # their channel axis: reduced over its positions as the one-channel map (N, h, w, 1)
        geom, src = geom.with_(kind=MAP), src + (1,)
    if geom.kind == MAP and len(src) == 4:
        (h, w), c = geom.size, geom.channels
        steps = []
        if 1 in axes or 2 in axes:
            kind = _REDUCTIONS[call.type]
            if kind is None:
                raise call.fail(f"it reduces over positions of the patch with {call.type}; only mean, max, min and "
                                f"sum over positions (global pooling) can be made dense")
            over_channels = 3 in axes and kind in ("max", "min")  # (ties shared among channels and positions)
            steps.append(_WindowReduce(kind, (h if 1 in axes else 1, w if 2 in axes else 1), over_channels))
        if 3 in axes and not (steps and steps[-1].over_channels):
            steps.append(per_pixel())
        reduced = geom.with_(size=(1 if 1 in axes else h, 1 if 2 in axes else w), channels=1 if 3 in axes else c)

        def run(xs):
            x = xs[0]
            for step in steps:
                x = step(x)
            return [x]
        return run, [_reshaped_geom(call, reduced, (src[0],) + reduced.size + (reduced.channels,), dst)]
    (h, w), c = geom.size, geom.channels
    if geom.kind == VIEW and src[1:] == (h * w, c) and axes == [1]:  # ops.mean(ops.reshape(x, (-1, h * w, C)), 1)
        kind = _REDUCTIONS[call.type]
        if kind is None:
            raise call.fail(f"it reduces over positions of the patch with {call.type}; only mean, max, min and "
                            f"sum over positions (global pooling) can be made dense")
        return _global_pool_of_rows(call, geom, kind)
    if geom.is_pixel_vector and len(src) == 2:
        layer = per_pixel()
        return (lambda xs: [layer(xs[0])]), [_reshaped_geom(call, geom.with_(channels=1), (src[0], 1), dst)]
    if geom.kind == VIEW and _per_channel(geom, src) and axes == [len(src) - 1]:  # channels of a (N, h*w, C) reshape
        layer = per_pixel()
        return (lambda xs: [layer(xs[0])]), [_reshaped_geom(call, geom.with_(channels=1), src[:-1] + (1,), dst)]
    raise call.fail(f"it reduces {geom.describe()} over axes {axes}, which mixes positions of the patch; only "
                    f"reductions of a (N, h, w, C) map over its positions (global pooling) or its channels, and of a "
                    f"vector of one position over its channels, can be made dense")


def _window_size(call):
    """(height, width) of the kernel of a recorded convolution op (its filter's traced shape) or of the window of a
    pooling op (its ksize); None where unknown."""
    if call.type in ("MaxPool", "AvgPool"):
        return tuple(call.attrs["ksize"][1][1:3])
    shape = call.args["filter"].get("shape") if isinstance(call.args.get("filter"), dict) else None
    return tuple(shape[:2]) if shape else None


@_op_rule_for("Conv2D", "DepthwiseConv2dNative", "MaxPool", "AvgPool",
              label="TensorFlow convolutions and poolings in call(), unpadded and at stride 1 (the same op)")
def _rule_window_op(call, geoms):
    """tf.nn.conv2d, depthwise_conv2d, max_pool2d, avg_pool2d in call() without padding (padding="SAME" of a 1x1
    kernel or window pads nothing, as for the layers: _pads) and at stride 1: the same op on the dense map (strided
    ones: use the Keras layers, which convert() makes dense)."""
    geom = geoms[0]
    _require_map(call, geom)
    padding = call.attrs["padding"][1]
    explicit = list(call.attrs.get("explicit_paddings", ["list", []])[1] or [])
    if padding == "EXPLICIT" and not any(explicit):  # (tf.nn.conv2d(x, w, 1, [[0, 0]] * 4): pads nothing)
        padding = "VALID"
    if padding != "VALID" and not (padding == "SAME" and _window_size(call) == (1, 1)):
        reason = _pool_padding_reason({"MaxPool": "max", "AvgPool": "avg"}[call.type]) \
            if call.type in ("MaxPool", "AvgPool") else _PADDING_REASON
        raise call.fail(f"it pads its input (padding={padding!r}); {reason}")
    if call.attrs.get("data_format", ["string", "NHWC"])[1] != "NHWC":
        raise call.fail("only data_format='NHWC' (channels last) is supported")
    if list(call.attrs["strides"][1]) != [1, 1, 1, 1]:
        raise call.fail(f"it strides (strides={call.attrs['strides'][1]}); write it as a Keras layer (Conv2D, "
                        f"DepthwiseConv2D, MaxPooling2D, AveragePooling2D), which convert() makes dense with all "
                        f"its shifts")
    if len(call.in_slots) != 1:
        raise call.fail("its kernel is computed from the patch")
    out = call.out_shapes[0]
    return _op_runner(call), [geom.with_(channels=out[3], size=out[1:3])]


@_op_rule_for("Pad", "PadV2", "MirrorPad", label=_PAD_LABEL)
def _rule_pad_op(call, geoms):
    """tf.pad / keras.ops.pad inside Cp (of nothing, paddings all 0: the identity)."""
    paddings = call.constant("paddings")
    if paddings is not None and not np.any(paddings) and tuple(call.out_shapes[0]) == tuple(call.in_shapes[0]):
        return _pass_through, [geoms[0]]
    raise call.fail(f"it pads a value inside Cp; {_PADDING_REASON}")


@_op_rule_for("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate",
              "DepthToSpace", "Conv2DBackpropInput", label=_RESIZE_LABEL)
def _rule_refuse_resizing_op(call, geoms):
    """tf.image.resize, tf.nn.depth_to_space and tf.nn.conv2d_transpose in call(): refused by name."""
    if call.type == "Conv2DBackpropInput":
        strides = list(call.attrs.get("strides", ["list", [1, 2, 2, 1]])[1])  # (NHWC)
        kernel = tuple(call.in_shapes[1][:2]) if len(call.in_shapes) > 1 and len(call.in_shapes[1]) == 4 else (3, 3)
        raise call.fail(_transposed_conv_reason(tuple(strides[1:3]), kernel))
    raise call.fail(f"it resizes a map; {_RESIZE_REASON}")


@_op_rule_for("SpaceToBatchND", "BatchToSpaceND", label="refused: space-to-batch in call() (TensorFlow's dilated "
                                                         "keras.ops.conv / depthwise_conv, tf.nn.depthwise_conv2d)")
def _rule_refuse_space_to_batch_op(call, geoms):
    """tf.space_to_batch_nd / batch_to_space_nd in call(), which TensorFlow builds for a dilated keras.ops.conv or
    depthwise_conv and a dilated tf.nn.depthwise_conv2d: refused by name, pointing to the dilated layers."""
    raise call.fail("it moves positions of the patch into the batch (or back); TensorFlow computes a dilated "
                    "keras.ops.conv, keras.ops.depthwise_conv or tf.nn.depthwise_conv2d so (space to batch, a "
                    "convolution, batch to space): use the layers (Conv2D, DepthwiseConv2D with dilation_rate) or "
                    "tf.nn.conv2d(..., dilations=d), which convert")


# --- rules for maps with their channels split into groups (GROUPS) --------------------------------------------------
#
# A reshape of a map (N, h, w, C) to (N, h, w, g1, ..., gk) (maxout, channel shuffle, grouped softmax), or a stack of
# maps along a new axis after their positions (selective-kernel attention), holds every position's channels on axes
# of their own.  CI reshapes (stacks) its dense values alike, (B, H, W, g1, ..., gk): every axis but the batch and the
# positions is Cp's, so an op along the group axes alone computes every position as Cp does, replayed as it is (its
# gradient too).  Such values reach only the rules of _GROUPS_RULES (see _apply_rules); the rest refuse them.

@_register
class _ChannelGroups(_Layer):
    """CI's dense values (B, H, W, ...) reshaped to (B, H, W, g1, ..., gk), with B, H and W read where CI runs (the
    image size is unknown where CI is traced for export): a map's channels split into groups as Cp's reshape splits
    them, regrouped, or merged back (``groups=[C]``).

    Args:
        groups: the sizes of the axes after the positions.

    Shape:
        (B, H, W, ...) -> (B, H, W, g1, ..., gk).
    """

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = [int(g) for g in groups]

    def call(self, x):
        shape = tf.shape(x)
        return tf.reshape(x, tf.concat([shape[:3], tf.constant(self.groups, shape.dtype)], 0))

    def get_config(self):
        return {**super().get_config(), "groups": list(self.groups)}


_GROUPS_RULES = {}  # key (a layer class or an _OpKind) -> its rule where an input is a map split into groups

_GROUPS_LABEL = ("maps with their channels split into groups, (N, h, w, g1, ..., gk) (a reshape of the channels: "
                 "maxout, channel shuffle, grouped softmax; a stack of maps along a new axis after the positions): "
                 "ops along the group axes (element-wise ops, reductions, softmax, transposes, concatenations, "
                 "stacks) and reshapes back")


def _groups_rule_for(*kinds):
    """Decorator: the rule of the given layer classes or op names (each also has a rule of its own, for other values)
    where an input is a map with its channels split into groups (GROUPS); listed in supported_layers()."""
    def register(rule):
        keys = [_OpKind(kind) if isinstance(kind, str) else kind for kind in kinds]
        missing = [key.__name__ for key in keys if key not in _RULES]
        if missing:
            raise AssertionError(f"{missing} have no rule of their own")
        _GROUPS_RULES.update((key, rule) for key in keys)
        _SUPPORTED.setdefault(_GROUPS_LABEL, set()).update(key.__name__ for key in keys)
        return rule
    return register


def _on_groups(call, geom, geoms):
    """A layer or op of which an input (``geom``) is a map with its channels split into groups: its rule in
    _GROUPS_RULES, or refused (the rules of other values would read the group axes as positions or channels)."""
    rule = _GROUPS_RULES.get(_OpKind(call.type)) if call.is_op else _lookup_rule(call.layer, _GROUPS_RULES)
    if rule is None:
        raise call.fail(f"it is applied to {geom.describe()}, the channels of every position split into axes of "
                        f"their own (by a reshape or a stack); only ops along those group axes (element-wise ops "
                        f"and activations, reductions, softmax, transposes, concatenations and stacks over the group "
                        f"axes, reshapes) can follow one: reshape it back to (N, h, w, C) first")
    return rule(call, geoms)


def _fits_groups(shape, out, constant=False):
    """Whether a value of ``shape`` broadcasts to ``out``, a map split into groups (N, h, w, g1, ..., gk), along the
    group axes alone: ``out`` but for axes of size 1 among the group axes.  A ``constant`` (or weight) may have fewer
    axes (aligned on the right, as they broadcast) and must have size 1 along the batch and the positions."""
    shape, out = tuple(int(d) for d in shape), tuple(out)
    if len(shape) > len(out) or not constant and len(shape) != len(out):
        return False
    full = (1,) * (len(out) - len(shape)) + shape
    lead = all(d == 1 for d in full[:3]) if constant else full[:3] == out[:3]
    return lead and all(d in (1, o) for d, o in zip(full[3:], out[3:]))


def _groups_constant(spec, out):
    """A constant operand whose axes against the batch and the positions of ``out`` (a map split into groups) are
    larger than 1 (``tf.ones_like(x)``) and that is the same for every patch and position: its values along the
    other axes (size 1 along those), which broadcast to the same values; ``spec`` otherwise (see
    _same_at_every_position)."""
    shape = tuple(spec.get("shape") or ()) if isinstance(spec, dict) else ()
    lead = len(shape) - (len(out) - 3)  # (its axes that stand against the batch and the positions)
    if not isinstance(spec, dict) or "input" in spec or lead <= 0 or len(shape) > len(out) or \
            all(d == 1 for d in shape[:lead]) or not _constant_only(spec):
        return spec
    if "const" in spec:
        value, dtype = np.asarray(spec["const"]), spec["dtype"]
    else:  # an op of constants only: its value, computed once
        value = _operand_value(spec, [], [])
        value, dtype = np.asarray(value.numpy()), value.dtype.name
    first = value[(slice(0, 1),) * lead]
    if value.shape != shape or not np.array_equal(value, np.broadcast_to(first, value.shape), equal_nan=True):
        return spec
    return {"const": first.tolist(), "dtype": dtype, "shape": list(first.shape)}


@_groups_rule_for(*_ELEMENTWISE_OPS)
def _groups_elementwise_op(call, geoms):
    """Element-wise ops of maps split into groups on one grid, broadcast along their group axes (a sum over a group
    with keepdims=True divides its members), and of constants and weights that vary along the group axes alone
    ((g1, ..., gk), (1, 1, 1, g1, ..., gk), scalars; a constant of the value's shape that is the same at every
    position stands for its values along the group axes): the same op on the dense values, which have those axes."""
    if call.attrs.get("data_format", ["string", "NHWC"])[1] != "NHWC":
        raise call.fail("only data_format='NHWC' (channels last) is supported")
    first = _same_grid(call, geoms)
    out = tuple(call.out_shapes[0])
    for spec, geom in zip((spec for spec in _flat_specs(call.args) if "input" in spec), geoms):
        if not _fits_groups(spec["shape"], out):
            raise call.fail(f"it broadcasts {geom.describe()} (shape {tuple(spec['shape'])}) to {out}; only values of "
                            f"the same positions, broadcast along their group axes, can be combined")
    args = {name: [_groups_constant(s, out) for s in spec] if isinstance(spec, list)
            else _groups_constant(spec, out) for name, spec in call.args.items()}
    for spec in _flat_specs(args):
        shape = tuple(spec.get("shape") or ())
        if "input" not in spec and not _fits_groups(shape, out, constant=True):
            what = "a constant" if _constant_only(spec) else "a value computed from Cp's weights"
            raise call.fail(f"it combines {first.describe()} with {what} of shape {list(shape)}, which differs per "
                            f"position of the patch (or per patch); only scalars and values along the group axes "
                            f"(of shape {list(out[3:])} or broadcast to it) can be made dense")
    return _op_runner(call, _broadcast_replaced(call, call.args, args)), [first.with_(groups=out[3:])]


@_groups_rule_for(*_REDUCTIONS)
def _groups_reduce_op(call, geoms):
    """Reductions of a map split into groups over group axes (keras.ops.max(x, axis=-1) of maxout): the same op on
    the dense values; a map split into groups where two or more group axes are left (or keepdims=True), a map where
    one is.  Over every group axis without keepdims, (N, h, w): as a channel reduction of a map without keepdims,
    whose dense values keep a one-channel axis.  Over the positions (or the batch): refused."""
    geom, src, dst = geoms[0], tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    axes = call.constant("axis")
    if axes is None:
        raise call.fail("its axes are computed from the patch")
    axes = sorted({int(a) % len(src) for a in np.ravel(axes)})
    if not axes:
        return _pass_through, [geom]
    if axes == list(range(1, len(src))):  # every entry (a global reduction of the patch): the map's (see
        # _rule_reduce_op), on the map that holds the same values
        merge = _ChannelGroups([geom.channels])
        run, outs = _rule_reduce_op(call, [geom.with_(kind=VIEW)])
        return (lambda xs: run([merge(xs[0])])), outs
    if axes[0] < 3:
        what = "the batch of patches" if axes[0] == 0 else "positions of the patch"
        raise call.fail(f"it reduces {geom.describe()} over axes {axes}, which mixes {what}; only reductions over its "
                        f"group axes ({', '.join(str(a) for a in range(3, len(src)))}) can be made dense (for a global "
                        f"pooling, reshape it back to (N, h, w, C) first)")
    if call.attrs.get("keep_dims", ["bool", False])[1]:
        return _op_runner(call), [geom.with_(groups=dst[3:])]
    left = [g for axis, g in enumerate(src[3:], 3) if axis not in axes]
    if len(left) >= 2:
        return _op_runner(call), [geom.with_(groups=left)]
    if len(left) == 1:
        return _op_runner(call), [geom.with_(kind=MAP, channels=left[0])]
    reduce = _TFOp(call.type, call.args, dict(call.attrs, keep_dims=["bool", True]), call.variables,
                   name=_op_layer_name(call))
    merge = _ChannelGroups([1])
    return (lambda xs: [merge(reduce(xs[0]))]), [_reshaped_geom(call, geom.with_(kind=MAP, channels=1),
                                                                src[:3] + (1,), dst)]


@_groups_rule_for("ArgMax", "ArgMin", "ReverseV2", "GatherV2", "Split", "SplitV", "Cumsum", "Cumprod",
                  "CumulativeLogsumexp")
def _groups_along_op(call, geoms):
    """keras.ops.argmax / argmin, flip, take (tf.gather with constant indices), split and cumulative ops (cumsum,
    cumprod) along group axes of a map split into groups: the same op on the dense values; each result is a map split
    into groups, or a map where one group axis is left.  Along the positions or the batch: refused."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    axes = call.constant("dimension" if call.type.startswith("Arg") else "axis")
    gather = call.type == "GatherV2"
    if axes is None or gather and ("input" not in call.args["params"] or not isinstance(call.args["indices"], dict)
                                   or not _constant_only(call.args["indices"])
                                   or call.attrs.get("batch_dims", ["int", 0])[1] != 0):
        raise call.fail(f"it works along axes or with indices computed from the patch, of {geom.describe()}")
    axes = sorted({int(a) % len(src) for a in np.ravel(axes)})
    if not axes or axes[0] < 3:
        raise call.fail(f"it works along axes {axes} of {geom.describe()}, which mixes positions of the patch (or "
                        f"patches); only its group axes ({', '.join(str(a) for a in range(3, len(src)))}) can be made "
                        f"dense")
    return _op_runner(call), _groups_parts(call, geom)


def _groups_parts(call, geom):
    """The geometries of the results of an op along group axes of a map split into groups: maps split into groups,
    or maps where one group axis is left."""
    return [geom.with_(groups=out[3:]) if len(out) >= 5 else geom.with_(kind=MAP, channels=out[3])
            for out in map(tuple, call.out_shapes)]


@_groups_rule_for("Softmax", "LogSoftmax", "TopKV2")
def _groups_last_axis_op(call, geoms):
    """Softmax, log-softmax and top-k (sorts) along the last axis, a group axis (tf.nn.softmax along another group
    axis transposes it to the end and back: transposes of the group axes): the same op on the dense values."""
    return _op_runner(call), [geoms[0].with_(groups=tuple(out[3:])) for out in call.out_shapes]


def _groups_transposed(call, geom, perm, src):
    """The geometry after a transpose ``perm`` of a map split into groups (traced shape ``src``) that reorders its
    group axes; one that moves the positions or the batch is refused."""
    if list(perm[:3]) != [0, 1, 2]:
        raise call.fail(f"it transposes {geom.describe()} (perm {list(perm)}), which moves the positions of the patch "
                        f"(axes 1, 2) or its batch; only transposes of the group axes among themselves (a perm that "
                        f"begins 0, 1, 2) can be made dense")
    return geom.with_(groups=[src[p] for p in perm[3:]])


@_groups_rule_for("Transpose", "ConjugateTranspose")
def _groups_transpose_op(call, geoms):
    """tf.transpose / keras.ops.transpose of the group axes among themselves (channel shuffle, perm (0, 1, 2, 4, 3)):
    the same op on the dense values."""
    perm, src = call.constant("perm"), tuple(call.in_shapes[0])
    if perm is None:
        raise call.fail(f"it transposes {geoms[0].describe()} with a perm computed from the patch")
    perm = [int(p) for p in np.ravel(perm)]
    if _moves_nothing(src, perm):
        return _pass_through, [geoms[0]]
    return _op_runner(call), [_groups_transposed(call, geoms[0], perm, src)]


@_groups_rule_for(keras.layers.Permute)
def _groups_permute(call, geoms):
    """Permute of the group axes among themselves (Permute((1, 2, 4, 3))): the layer on the dense values."""
    perm, src = [0] + [int(d) for d in call.layer.dims], tuple(call.in_shapes[0])
    if _moves_nothing(src, perm):
        return _pass_through, [geoms[0]]
    return _reuse(call.layer), [_groups_transposed(call, geoms[0], perm, src)]


def _groups_concat(call, geoms, axis, run):
    """A concatenation of maps split into groups on one grid along ``axis``, which must be a group axis."""
    first, out = _same_grid(call, geoms), tuple(call.out_shapes[0])
    if axis % len(out) < 3:
        raise call.fail(f"it concatenates {first.describe()} along axis {axis}, which puts values between positions "
                        f"of the patch (or patches); only a concatenation along a group axis (3 and after) can be "
                        f"made dense")
    return run, [first.with_(groups=out[3:])]


@_groups_rule_for("ConcatV2")
def _groups_concat_op(call, geoms):
    """keras.ops.concatenate / tf.concat of maps split into groups along a group axis: the same op."""
    axis = call.constant("axis")
    if axis is None or any("input" not in spec for spec in call.args["values"]):
        raise call.fail("it concatenates a constant (or along an axis computed from the patch) with values "
                        "computed from the patch")
    return _groups_concat(call, geoms, int(axis), _op_runner(call))


@_groups_rule_for("Pack")
def _groups_stack_op(call, geoms):
    """keras.ops.stack / tf.stack of maps split into groups along a new axis after the positions: the same op."""
    out = tuple(call.out_shapes[0])
    axis = int(call.attrs["axis"][1]) % len(out)
    if any("input" not in spec for spec in call.args["values"]):
        raise call.fail("it stacks a constant with values computed from the patch")
    first = _same_grid(call, geoms)
    if axis < 3:
        raise call.fail(f"it stacks {first.describe()} along axis {axis}, which puts values between positions of the "
                        f"patch (or patches); only a stack along a new axis after the positions can be made dense")
    return _op_runner(call), [first.with_(groups=out[3:])]


@_groups_rule_for("Unpack")
def _groups_unstack_op(call, geoms):
    """keras.ops.unstack / tf.unstack of a map split into groups along a group axis: the same op; each part is a map
    split into groups, or a map where one group axis is left."""
    geom, src = geoms[0], tuple(call.in_shapes[0])
    axis = int(call.attrs["axis"][1]) % len(src)
    if axis < 3:
        raise call.fail(f"it unstacks {geom.describe()} along axis {axis}, which mixes positions of the patch (or "
                        f"patches); only its group axes ({', '.join(str(a) for a in range(3, len(src)))}) can be made "
                        f"dense")
    return _op_runner(call), _groups_parts(call, geom)


@_groups_rule_for("StridedSlice", "Slice")
def _groups_slice_op(call, geoms):
    """Slices of a map split into groups that take the same entries of its groups at every position of every patch
    (``x[..., 0]``, ``x[:, :, :, 1:3]``): applied to the indices of the traced value, the op shows which; CI gathers
    those channels of the map the groups hold and splits them as the result does (a map split into groups, a map, or
    the (N, h, w) of one channel).  A slice of positions of the patch is refused."""
    geom, src, dst = geoms[0], tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    index = np.arange(_prod(src), dtype=np.int64).reshape(src)
    picked = _sliced_indices(call, index)
    channels = picked.reshape(src[:3] + (-1,)) - index.reshape(src[:3] + (-1,))[..., :1] if \
        picked.shape[:3] == src[:3] and picked.size else None
    if channels is None or not np.array_equal(channels, np.broadcast_to(channels[:1, :1, :1], channels.shape)) \
            or channels.min() < 0 or channels.max() >= geom.channels:
        raise call.fail(f"it slices {geom.describe()} across its positions (or patches); only slices of its group "
                        f"axes, the same at every position (x[..., 0], x[:, :, :, 1:3]), can be made dense")
    merge, taken = _ChannelGroups([geom.channels]), [int(c) for c in channels[0, 0, 0]]
    gather = _TFOp("GatherV2", {"params": {"input": 0}, "indices": {"const": taken, "dtype": "int32"},
                                "axis": {"const": 3, "dtype": "int32"}}, {"batch_dims": ["int", 0]},
                   name=_op_layer_name(call))
    groups = list(dst[3:]) if len(dst) > 3 else [1]
    split = _ChannelGroups(groups) if len(groups) != 1 else None

    def run(xs):
        x = gather(merge(xs[0]))
        return [x if split is None else split(x)]
    if len(groups) >= 2:
        return run, [geom.with_(groups=groups)]
    return run, [_reshaped_geom(call, geom.with_(kind=MAP, channels=groups[0]), src[:3] + (groups[0],), dst)]


@_groups_rule_for("Reshape", "Squeeze", "ExpandDims", keras.layers.Reshape, keras.layers.Flatten)
def _groups_reshape(call, geoms):
    """Reshapes of a map split into groups that keep the batch axis: to other groups of the same positions (a dense
    reshape), or, through the map (N, h, w, C) that holds the same values (Keras' H, W, C order), to whatever a
    reshape of that map is (the map itself, a flattened map, ...: see _reshaped)."""
    geom, src, dst = geoms[0], tuple(call.in_shapes[0]), tuple(call.out_shapes[0])
    if dst == src:
        return _pass_through, [geom]
    if geom.guessed:  # (after a refused op: the rules that follow judge a value of that shape)
        return _pass_through, [_guessed_geom(dst, [geom], _MAP_LAYOUT)]
    if not call.is_op and getattr(call.layer, "data_format", "channels_last") == "channels_first":
        raise call.fail(f"Flatten(data_format='channels_first') moves axis 1 of {src} to the end before flattening, "
                        f"which reorders the values of {geom.describe()}; only channels-last flattening can be made "
                        f"dense")
    merge = _ChannelGroups([geom.channels])
    run, outs = _reshaped(call, geom.with_(kind=MAP), src[:3] + (geom.channels,), dst)
    return (lambda xs: run([merge(xs[0])])), outs


@_groups_rule_for(keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
                  keras.layers.GaussianDropout, keras.layers.AlphaDropout, keras.layers.ActivityRegularization,
                  keras.layers.Identity)
def _groups_identity(call, geoms):
    """Dropout, noise and regularisation layers: identity at inference."""
    return _pass_through, [geoms[0]]


@_groups_rule_for(keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Rescaling,
                  keras.layers.Activation, keras.layers.Softmax, keras.layers.UnitNormalization, keras.layers.Dense)
def _groups_layer(call, geoms):
    """Element-wise layers (Keras' own activations; Rescaling by scalars or values along the group axes), Softmax
    and UnitNormalization along group axes, and Dense (a product over the last group axis of every position): the
    layer on the dense values."""
    geom, layer = geoms[0], call.layer
    src, out = tuple(call.in_shapes[0]), tuple(call.out_shape)
    if isinstance(layer, (keras.layers.Softmax, keras.layers.UnitNormalization)):
        axes = [layer.axis] if isinstance(layer.axis, numbers.Integral) else list(layer.axis)
        if any(int(a) % len(src) < 3 for a in axes):
            raise call.fail(f"it works along axes {layer.axis} of {geom.describe()}, which mixes positions of the "
                            f"patch; only its group axes (3 and after) can be made dense")
    if isinstance(layer, keras.layers.Rescaling):
        for key in ("scale", "offset"):
            value = getattr(layer, key)
            dims = tuple(int(d) for d in getattr(value, "shape", np.shape(value)))
            if not _fits_groups(dims, src, constant=True):
                raise call.fail(f"its {key} (shape {dims}) differs per position of the patch; only scalars and values "
                                f"along the group axes of {geom.describe()} can be made dense")
    act = _activation_of(layer)
    name = getattr(act, "__name__", None)
    if act is not None and not (name and getattr(keras.activations, name, None) is act):
        raise call.fail(f"its activation {name or type(act).__name__!r} is not one of keras.activations, and it is "
                        f"applied to {geom.describe()}; write it with keras.ops in a Lambda layer, whose ops are read "
                        f"one by one")
    if len(out) != len(src) or out[:3] != src[:3]:
        raise call.fail(f"its output {out} does not keep the batch and positions of its input {src}")
    return _reuse(layer), [geom.with_(groups=out[3:])]


@_groups_rule_for(keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
                  keras.layers.Maximum, keras.layers.Minimum, keras.layers.Concatenate)
def _groups_merge(call, geoms):
    """Add, Multiply, ... of maps split into groups on one grid (broadcast along their group axes), and Concatenate
    along a group axis: the layer on the dense values."""
    layer, out = call.layer, tuple(call.out_shape)
    if isinstance(layer, keras.layers.Concatenate):
        return _groups_concat(call, geoms, int(layer.axis), lambda xs: [layer(list(xs))])
    first = _same_grid(call, geoms)
    for shape, geom in zip(call.in_shapes, geoms):
        if not _fits_groups(shape, out):
            raise call.fail(f"it broadcasts {geom.describe()} (shape {tuple(shape)}) to {out}; only values of the "
                            f"same positions, broadcast along their group axes, can be combined")
    return (lambda xs: [layer(list(xs))]), [first.with_(groups=out[3:])]


# ---------------------------------------------------------------------------
# CI as a Keras model: runs the functional core on the padded image, whole or tile by tile
# ---------------------------------------------------------------------------

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
        naive: paper-faithful per-shift multipooling and per-layer unwarping (setting it switches
            every multipooling layer of ``core``).
        tile: None, or (th, tw): process the image in tiles of this output size (exact; bounded
            memory; needs the image size to be known, e.g. eager calls).
        max_memory: None, or a budget in bytes: tiles are chosen so that :meth:`estimate_memory`
            stays under it (overrides ``tile``).
        border: "zeros" (the paper's convention), "reflect" or "replicate": how the image is extended
            for the patches of pixels near its edge.
        memory_guard: True (default): without max_memory, on the CPU and with the image size known,
            CI compares its estimate with the memory the process may still allocate (available
            memory, cgroup and address-space limits) and tiles, or raises MemoryError, instead of
            running out of memory.  False: allocate whatever the image needs.

    Shape:
        (N, H, W, C) -> (N, H, W, K), any N, H, W >= 1.

    Example:
        >>> cp = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
        ...                        keras.layers.AveragePooling2D(2), keras.layers.Conv2D(5, 2)])
        >>> ci = FDFE.convert(cp, 6)
        >>> ci.strides, ci.stride_product, ci.out_channels
        ([(2, 2)], (2, 2), 5)
        >>> ci.estimate_memory((480, 640)) > ci.estimate_memory((480, 640), tile=(64, 64))
        True
    """

    def __init__(self, core, patch_size, strides, in_channels, out_channels, naive=False, tile=None,
                 progress=None, peak_channels=None, max_memory=None, memory_guard=True, grid_multiple=None,
                 border="zeros", output_stride=1, skip_shifts=True, shifts_in_place=False, strided_depths=None,
                 read_variable_specs=None, gradient_hazards=(), **kwargs):
        kwargs.setdefault("autocast", False)  # images are cast to the core's dtype in call()
        super().__init__(**kwargs)
        self.core = core
        self._hold_read_variables(read_variable_specs)
        self.gradient_hazards = [str(h) for h in gradient_hazards]  # (see _refusing_gradients)
        self.patch_size = _pair(patch_size, "patch_size")
        self.strides = [_pair(s, "stride") for s in strides]
        product = (_prod(s[0] for s in self.strides), _prod(s[1] for s in self.strides))
        self.stride_product = product if grid_multiple is None else _pair(tuple(grid_multiple), "grid_multiple")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.naive = naive
        self.tile = None if tile is None else _pair(tile, "tile")
        self.progress = progress
        self.peak_channels = int(peak_channels or in_channels + out_channels)
        self.max_memory = _check_budget(max_memory)
        self.memory_guard = bool(memory_guard)
        self.border = border  # (checked where it is set)
        self.skip_shifts = bool(skip_shifts)
        strided = _strided_layers(self.core)
        # how many strided layers each one's output has gone through, itself included (parallel layers, e.g.
        # two poolings of one map, share a depth; by default each one is a level deeper than the one before)
        self.strided_depths = [int(d) for d in strided_depths] if strided_depths is not None else \
            list(range(1, len(strided) + 1))
        if len(self.strided_depths) != len(strided):
            raise ValueError(f"strided_depths has {len(self.strided_depths)} entries for the core's {len(strided)} "
                             f"strided layers")
        self.output_stride = output_stride
        # the last strided layer leaves its shifts in place where only per-pixel layers follow it (_dense_tail)
        self.shifts_in_place = bool(shifts_in_place) and bool(strided)
        if self.shifts_in_place:
            strided[-1].shifts_in_place = True
        # the layers of Cp that CI depends on (the core's; convert adds those it replaced): their settings and
        # activity regularizers are checked where CI runs
        object.__setattr__(self, "_cp_layers", list(self.core._flatten_layers(include_self=False, recursive=True)))
        object.__setattr__(self, "_settings", _layer_settings(self._cp_layers))
        # the adapted Normalization layers whose statistics CI reads (_stale_statistics, checked where CI runs)
        object.__setattr__(self, "_normalizations", [layer.layer for layer in self._cp_layers
                                                     if isinstance(layer, _AdaptedNormalization)])

    def _hold_read_variables(self, specs):
        """The variables of Cp that the core's ops (_TFOp) read outside its layers (``x * exp(self.log_s)`` in a
        layer of the user's): held here once each, as weights of CI (``fit``, ``get_weights``, checkpoints),
        unless a layer of the core holds them.  Built from a config (``specs``), the copy creates its own and
        binds the ops to them, and to its layers' weights, as the original read Cp's."""
        layers = list(self.core._flatten_layers(include_self=False, recursive=True))
        ops = [layer for layer in layers if isinstance(layer, _TFOp)]
        if specs is not None:  # a copy: its own variables, in the order the original held them
            held = [self.add_weight(shape=tuple(v["shape"]), dtype=v["dtype"], trainable=v["trainable"],
                                    initializer="zeros", name=f"read_variable_{k}") for k, v in enumerate(specs)]
            by_name = {layer.name: layer for layer in layers}
            for op in ops:
                op.bind([held[ref[1]] if ref[0] == "model" else by_name[ref[1]].weights[ref[2]]
                         for ref in op.variable_refs or ()])
        else:
            owners = {id(w): ["layer", layer.name, i] for layer in layers if not isinstance(layer, _TFOp)
                      for i, w in enumerate(layer.weights)}
            held, index = [], {}
            for op in ops:
                refs = []
                for v in op._op[3]:
                    if id(v) not in owners and id(v) not in index:
                        index[id(v)] = len(held)
                        held.append(v)
                    where = owners.get(id(v)) or ["model", index[id(v)]]
                    refs.append(where + [[int(d) for d in v.shape], tf.as_dtype(v.dtype).name])
                object.__setattr__(op, "variable_refs", refs)
        self.read_variables = held  # (tracked by Keras: weights of CI)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """TensorFlow's tracking (tf.train.Checkpoint, tf.saved_model.save) also reaches the read variables."""
        children = super()._trackable_children(save_type, **kwargs)
        for k, variable in enumerate(self.read_variables):
            children[f"read_variable_{k}"] = variable
        return children

    @tf.autograph.experimental.do_not_convert  # autograph (export's serving function) cannot convert super()
    def __call__(self, images=None, *args, inputs=None, **kwargs):
        """CI on ``images``: a tensor, a numpy array, or nested lists of numbers (converted as a numpy array;
        Keras itself refuses lists in a model's call).  ``inputs=`` names them too, as for Keras' own models."""
        if (images is None) == (inputs is None):
            raise TypeError("CI takes one batch of images: ci(images), ci(images=x) or ci(inputs=x)" +
                            (", not both" if images is not None else ""))
        return super().__call__(_as_images(images if inputs is None else inputs), *args, **kwargs)

    def build(self, input_shape=None):
        """CI takes images of any N, H, W: built for (None, None, None, C) whatever shape comes first,
        so that export() and tf.saved_model.save serve every image size."""
        self.built = True

    @property
    def inputs(self):
        """[a symbolic (None, None, None, C) image batch]: CI takes any N, H, W."""
        return list(self.core.inputs)

    @property
    def input_dtype(self):
        """The dtype CI takes: Cp's (float32 for a mixed-precision Cp, whose layers cast), not the compute dtype of
        the policy CI was made under (export()'s serving signature and Keras' cast of the images read it)."""
        return self.core.inputs[0].dtype

    @property
    def outputs(self):
        """[a symbolic (None, None, None, K) feature map]: Cp's output at every pixel, CI called on :attr:`inputs`
        (once: the same tensor at every access), so that ``keras.Model(ci.inputs, head(ci.outputs[0]))`` is a
        graph, as for Keras' own models."""
        cached = self.__dict__.get("_symbolic_io")  # (not tracked by Keras; copies and saves call CI again)
        if cached is None or cached[0] is not self.core.inputs[0]:
            cached = (self.core.inputs[0], self(self.core.inputs[0]))
            self.__dict__["_symbolic_io"] = cached
        return [cached[1]]

    @property
    def input(self):
        """:attr:`inputs`' tensor (Keras' ``model.input``)."""
        return self.inputs[0]

    @property
    def output(self):
        """:attr:`outputs`' tensor (Keras' ``model.output``)."""
        return self.outputs[0]

    @property
    def input_shape(self):
        return tuple(self.core.inputs[0].shape)

    @property
    def output_shape(self):
        return tuple(self.outputs[0].shape)

    def summary(self, *args, **kwargs):
        """Keras' summary of the converted layers (``core``: they run on the shift-stacked batch, so
        their batch size is N times the number of shifts), after one line on CI itself."""
        print_fn = kwargs.get("print_fn") or print
        print_fn(f'DenseFeatureModel "{self.name}": {self.input_shape} -> {self.output_shape}, patch '
                 f'{self.patch_size[0]}x{self.patch_size[1]}, strides {self.strides}; its converted layers:')
        return self.core.summary(*args, **kwargs)

    @property
    def output_stride(self):
        """(sy, sx): CI gives Cp's output for the pixels (sy * i, sx * j) ((1, 1): every pixel).  It may be set
        after conversion, as in PyTorch; the strided layers of the first depths that the step lets skip their
        shifts run as ordinary strided layers."""
        return self._output_stride

    @output_stride.setter
    def output_stride(self, value):
        self._output_stride = _pair(tuple(value) if isinstance(value, list) else value, "output_stride")
        self._grid = _output_grid(self.strides if self.skip_shifts else [], self._output_stride)
        for layer, depth in zip(_strided_layers(self.core), self.strided_depths):
            layer.shifts = depth > self._grid[0]
        self._forget_graphs()  # traced with the old value

    #: attributes that a traced graph of CI reads when it is traced (border, output_stride and naive change its
    #: values; tile, max_memory and memory_guard its memory)
    _TRACED_ATTRIBUTES = frozenset({"border", "tile", "max_memory", "memory_guard"})

    def __setattr__(self, name, value):
        if name == "border":
            _check_border(value, (None, None), self.patch_size)
        super().__setattr__(name, value)
        if name in self._TRACED_ATTRIBUTES:
            self._forget_graphs()

    def _forget_graphs(self):
        """Forgets CI's traced graphs: its own and Keras' predict, test and train functions (traced again at the
        next call, with the current settings)."""
        object.__setattr__(self, "_graph_fn", None)
        if hasattr(self, "predict_function"):
            self.predict_function = self.test_function = self.train_function = None

    @property
    def naive(self):
        return self._naive

    @naive.setter
    def naive(self, value):
        self._naive = bool(value)
        for layer in self.core._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, (_MultiPoolBase, multiConv, _MultiDepthwise, _AlignStreams)):
                layer.naive = self._naive
        self._forget_graphs()  # traced with the old value

    #: the values alive at once count once: TensorFlow frees each op's input after its last use, so a
    #: multipooling's stride-1 result, crop and transpose follow one another (measured peaks stay under
    #: 0.6 of this; bench/memory_budget.py)
    memory_work_factor = 1.0

    def estimate_memory(self, image_size, batch: int = 1, tile=None, dtype=None) -> int:
        """Estimated peak bytes of CI on images of ``image_size`` (H, W): the padded input, the
        output, and the values alive at once on one tile (``tile`` None: whole image), an upper bound
        of the measured peak (bench/RESULTS_memory.md).  ``dtype`` None: the widest of the input's dtype and
        the compute dtypes of CI's layers (a float64 Cp behind a float32 Input computes in float64)."""
        itemsize = tf.as_dtype(dtype).size if dtype is not None else self._widest_itemsize()
        return _memory_estimate(image_size, batch, self.in_channels, self.out_channels, self.patch_size,
                                self.stride_product, self.peak_channels, itemsize,
                                None if tile is None else _pair(tile, "tile"), self.memory_work_factor)

    def _widest_itemsize(self):
        sizes = [tf.as_dtype(self.core.inputs[0].dtype).size]
        for layer in self.core._flatten_layers(include_self=False):
            dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or "float32")
            if dtype.is_floating:
                sizes.append(dtype.size)
        return max(sizes)

    def tile_for_memory(self, budget: int, image_size, batch: int = 1, dtype=None):
        """The tile whose tiling fits ``budget`` bytes (:meth:`estimate_memory`) with the least work
        (None: no tiling needed)."""
        return _tile_for_memory(budget, lambda t: self.estimate_memory(image_size, batch, t, dtype),
                                tuple(image_size), self.stride_product, self.patch_size)

    def stacked(self, padded):
        """Run CI's layers on padded images; the shift-stacked result before unwarping.  Where only
        per-pixel layers follow the last strided layer, its shifts stay in place (``shifts_in_place``;
        see :func:`_dense_tail`); M and (SH, SW) then leave its stride out.

        Shape:
            (N, H' + pH - 1, W' + pW - 1, C) -> (M * N, >= H'/SH, >= W'/SW, K).
        """
        return self.core(padded, training=False)

    def _unwarp_strides(self):
        """The strides whose shifts are stacked on the batch axis of :meth:`stacked`'s result, in network
        order: those output_stride keeps, less the last one where its shifts stay in place."""
        n = len(self.strides)
        if self.shifts_in_place and not self.naive and self._grid[0] < n:
            n -= 1
        return self.strides[self._grid[0]:n]

    def _unwarped_crop(self, padded, out_h, out_w):
        """Unwarp the strides that kept their shifts, crop to the image, subsample to output_stride."""
        k, (gy, gx), (ry, rx) = self._grid
        dense = unwarp(self.stacked(padded), self._unwarp_strides(), self.naive)
        dense = dense[:, :(out_h + gy - 1) // gy, :(out_w + gx - 1) // gx, :]
        return dense if (ry, rx) == (1, 1) else dense[:, ::ry, ::rx, :]

    def _layers_state(self):
        """What of Cp's layers a traced graph of CI keeps: their identity, quantization, LoRA and number of
        weights (quantize() and enable_lora() change them after convert)."""
        return tuple((id(layer), getattr(layer, "quantization_mode", None), bool(getattr(layer, "lora_enabled", False)),
                      len(layer.weights)) for layer in self.core._flatten_layers(include_self=False, recursive=True))

    def _check_settings(self):
        """Refuses to run where a setting of Cp's layers changed after convert (:func:`_layer_settings`).
        (Called at every eager call of CI: a plain loop.)"""
        for layer, held in getattr(self, "_containers", ()):
            now = tuple(id(sub) for sub in layer._flatten_layers(include_self=False, recursive=False))
            if now != held:
                raise ValueError(f"Cp changed after convert: '{layer.name}' ({type(layer).__name__}) holds other "
                                 f"layers than at convert ({len(held)} then, {len(now)} now: a layer added, removed "
                                 f"or replaced). CI runs the ops convert built, which no longer are Cp's: convert Cp "
                                 f"again")
        for layer in self._normalizations:
            stale = _stale_statistics(layer)
            if stale is not None:
                raise ValueError(f"Cp changed after convert: layer '{layer.name}' (Normalization) no longer computes "
                                 f"with the statistics it holds, which CI reads: {stale}; CI then follows without "
                                 f"converting again")
        for layer, names, values, activation in getattr(self, "_settings", ()):
            now = tuple(_snapshot(_setting_of(layer, k)) for k in names)
            activation_now = getattr(layer, "activation", None)
            if activation_now is activation and all(map(_same_setting, now, values)):
                continue
            key, was, is_ = "activation", activation, activation_now
            changed = [(k, a, b) for k, a, b in zip(names, values, now) if not _same_setting(a, b)]
            if changed:
                key, was, is_ = changed[0]
            if key == "activation":
                was, is_ = getattr(was, "__name__", was), getattr(is_, "__name__", is_)
            raise ValueError(f"Cp changed after convert: layer '{layer.name}' changed its {key} from {was!r} to "
                             f"{is_!r}. CI runs the ops convert built, which no longer are Cp's: convert Cp again "
                             f"(new weights, LoRA and load_weights are followed without converting again)")

    def _layers_changed(self) -> bool:
        """Whether Cp's layers changed (see _layers_state) since the graphs of CI were traced; forgets those
        graphs (CI's own and Keras' predict, test and train functions) if so.  Refuses changes of their settings
        (:meth:`_check_settings`)."""
        self._check_settings()
        state = self._layers_state()
        seen = getattr(self, "_traced_state", None)
        object.__setattr__(self, "_traced_state", state)
        if seen is None or seen == state:
            return False
        changed = {entry[0] for entry in set(state) - set(seen)}
        layers = {layer.name: layer for layer in self.core._flatten_layers(include_self=False, recursive=True)}
        for layer in layers.values():
            for ref in (getattr(layer, "variable_refs", None) or []) if isinstance(layer, _TFOp) else []:
                if ref[0] == "layer" and id(layers[ref[1]]) in changed:
                    object.__setattr__(self, "_traced_state", seen)  # (refused again at the next call)
                    raise ValueError(f"Cp's layer '{ref[1]}' changed after convert (LoRA or quantization) and Cp's "
                                     f"call() reads its weights outside the layer ('{layer.name}'), which CI "
                                     f"reads as they were: convert again")
        self._forget_graphs()
        return True

    def make_predict_function(self, force=False):
        return super().make_predict_function(force=self._layers_changed() or force)

    def make_test_function(self, force=False):
        return super().make_test_function(force=self._layers_changed() or force)

    def make_train_function(self, force=False):
        return super().make_train_function(force=self._layers_changed() or force)

    def _dense(self, padded, out_h, out_w):
        """Stacked layers + unwarping + crop; called eagerly, it runs as one graph (traced once for
        every image size, and again where Cp's layers changed), which is markedly faster than layer-by-layer
        eager execution."""
        if not tf.executing_eagerly():
            return self._unwarped_crop(padded, out_h, out_w)
        self._layers_changed()
        if _in_stateless_scope():  # (ci.stateless_call: the variables' values come from the scope, which a graph
            return self._unwarped_crop(padded, out_h, out_w)  # traced before would not read)
        spec = tf.TensorSpec([None, None, None, self.in_channels], self.core.inputs[0].dtype)
        scalar = tf.TensorSpec([], tf.int32)
        return run_as_graph(self, self._unwarped_crop, [padded, tf.constant(out_h, tf.int32),
                                                        tf.constant(out_w, tf.int32)], [spec, scalar, scalar],
                            cache="_graph_fn")

    def _check_images(self, images):
        """:func:`check_images` against CI's channels, saying where convert inferred them."""
        try:
            check_images(images, self.in_channels)
        except ValueError as exc:
            if not getattr(self, "_in_channels_inferred", False) or "channels but the network expects" not in str(exc):
                raise
            raise ValueError(f"{exc}; convert inferred in_channels={self.in_channels} from Cp's first Conv2D: if Cp "
                             f"takes {images.shape[-1]}-channel images (converting them itself), convert with "
                             f"in_channels={images.shape[-1]}") from None

    def call(self, images, training=None, mask=None):
        out = self._call(images, training, mask)
        hazards = getattr(self, "gradient_hazards", ())
        return _refusing_gradients(out, _hazard_message(hazards)) if hazards else out

    def _call(self, images, training, mask):
        """:meth:`call`, but for the gradients Cp sets in ways CI cannot follow."""
        if mask is not None:
            raise ValueError("CI takes no mask: Cp's output for every pixel depends on its whole patch (a Keras mask "
                             "marks time steps of sequences); pass mask=None")
        regularized = _activity_regularized(getattr(self, "_cp_layers", ())) if training else []
        if regularized:
            raise ValueError(f"Cp's layer(s) {', '.join(map(repr, regularized))} add an activity "
                             f"regularization loss, which Cp computes from each patch's activations and CI could only "
                             f"compute from whole maps: training through CI would not be training on every patch. "
                             f"Set their activity_regularizer to None (or remove ActivityRegularization layers; "
                             f"outputs do not change) before training through CI")
        if tuple(getattr(images, "shape", ()))[:1] == (0,) and len(images.shape) == 4:  # an empty batch, as Cp
            self._check_images(tf.zeros((1,) + tuple(images.shape[1:]), images.dtype))
            sy, sx = self.output_stride
            return tf.zeros((0, _ceil_div(images.shape[1], sy), _ceil_div(images.shape[2], sx), self.out_channels),
                            self.core.outputs[0].dtype)
        self._check_images(images)
        images = tf.cast(images, self.core.inputs[0].dtype)
        shape = _static_or_dynamic(images)
        padded = multipool_prepare(images, self.patch_size, _lcm_pair(self.stride_product, self.output_stride),
                                   self.border)
        size_known = all(isinstance(s, int) for s in shape[1:3])
        if self.max_memory is not None:
            if not size_known:
                raise ValueError(f"max_memory={self.max_memory} needs the image height and width to be known "
                                 f"when CI is traced (got shape {tuple(images.shape)}): call it eagerly, or trace "
                                 f"it with a fixed height and width{_EXPORT_HINT}")
            if not isinstance(shape[0], int):  # unknown batch: one image at a time, tiled for one image
                tile = self.tile_for_memory(self.max_memory, (shape[1], shape[2]), 1)
                return tf.map_fn(lambda p: self._run(p[None], shape[1], shape[2], tile)[0], padded,
                                 fn_output_signature=tf.TensorSpec([shape[1], shape[2], self.out_channels],
                                                                   padded.dtype))
            return self._run(padded, shape[1], shape[2],
                             self.tile_for_memory(self.max_memory, (shape[1], shape[2]), shape[0]))
        if self.tile is not None and not size_known:
            raise ValueError(f"tile={self.tile} needs the image height and width to be known when CI is traced "
                             f"(got shape {tuple(images.shape)}): call it eagerly, or trace it with a fixed "
                             f"height and width{_EXPORT_HINT}")
        tile = self.tile
        if self.memory_guard and size_known and isinstance(shape[0], int) and "GPU" not in (images.device or ""):
            tile = _choose_tile(tile, lambda t: self.estimate_memory((shape[1], shape[2]), shape[0], t),
                                (shape[1], shape[2]), self.stride_product, None, _host_memory_available(),
                                f"CI on {shape[0]} image(s) of {shape[1]}x{shape[2]} ({images.dtype.name})",
                                self.patch_size)
        return self._run(padded, shape[1], shape[2], tile)

    def _run(self, padded, height, width, tile):
        return self._dense(padded, height, width) if tile is None else self._tiled(padded, height, width, tile)

    def _tiled(self, padded, height, width, tile):
        """Exact tiling (:func:`tile_grid`): each output tile from its own crop of the padded image
        (overlap pH-1, pW-1).  Eagerly on the CPU with no gradient recorded, each tile is written into
        the output as it comes (one output in memory); otherwise the tiles are concatenated
        (differentiable, and traceable in graphs; the tiles and the output are in memory at once)."""
        ph, pw = self.patch_size
        oy, ox = self.output_stride
        grid = tile_grid(height, width, tile, _lcm_pair(self.stride_product, self.output_stride))
        bar = _progress(len(grid), "CI tiles", self.progress if self.progress is not None else
                        (None if len(grid) >= 50 else False))
        in_place = (tf.executing_eagerly() and not _recording_gradients() and "GPU" not in (padded.device or "")
                    and padded.shape[0] * _ceil_div(height, oy) * _ceil_div(width, ox) < 2**31)  # (int32 rows)
        out, rows, row = None, [], []
        for y0, x0, h, w, hp, wp in grid:
            dense = self._dense(padded[:, y0:y0 + hp + ph - 1, x0:x0 + wp + pw - 1, :], h, w)
            if in_place:
                out = _write_rows(out, dense, y0 // oy, x0 // ox, _ceil_div(height, oy), _ceil_div(width, ox))
            else:
                row.append(dense)
                if x0 + w == width:
                    rows.append(row[0] if len(row) == 1 else tf.concat(row, 2))
                    row = []
            del dense
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if in_place:
            return tf.reshape(out, (padded.shape[0], _ceil_div(height, oy), _ceil_div(width, ox), self.out_channels))
        return rows[0] if len(rows) == 1 else tf.concat(rows, 1)

    def compute_output_shape(self, input_shape):
        (sy, sx), (_, height, width) = self.output_stride, tuple(input_shape)[:3]
        return (input_shape[0], None if height is None else _ceil_div(height, sy), None if width is None else
                _ceil_div(width, sx), self.out_channels)

    def get_config(self):
        return {"core": keras.saving.serialize_keras_object(self.core), "patch_size": list(self.patch_size),
                "strides": [list(s) for s in self.strides], "in_channels": self.in_channels,
                "out_channels": self.out_channels, "naive": self.naive,
                "tile": None if self.tile is None else list(self.tile), "peak_channels": self.peak_channels,
                "max_memory": self.max_memory, "memory_guard": self.memory_guard,
                "grid_multiple": list(self.stride_product), "border": self.border,
                "output_stride": list(self.output_stride), "skip_shifts": self.skip_shifts,
                "shifts_in_place": self.shifts_in_place, "strided_depths": list(self.strided_depths),
                "read_variable_specs": [{"shape": [int(d) for d in v.shape], "dtype": tf.as_dtype(v.dtype).name,
                                         "trainable": bool(v.trainable)} for v in self.read_variables],
                "gradient_hazards": list(self.gradient_hazards), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        core = keras.saving.deserialize_keras_object(config.pop("core"))
        return cls(core, **config)


def _hazard_message(hazards):
    return (f"CI cannot give Cp's gradients: Cp uses {'; and '.join(hazards)}, which sets its gradients in a way "
            f"CI's dense ops do not follow. CI's values are exact; to train through CI, write those parts with plain "
            f"ops (tf.stop_gradient is followed)")


def _refusing_gradients(x, message):
    """``x``, whose gradient fails with ``message`` where it is computed (a tf.debugging.Assert, so that
    exporters, which trace gradient functions, still can)."""
    @tf.custom_gradient
    def identity(value):
        def grad(upstream):
            check = tf.debugging.Assert(tf.constant(False), [message])
            with tf.control_dependencies([check]):
                return tf.identity(upstream)
        return tf.identity(value), grad
    return identity(x)


def _recording_gradients():
    """True where a GradientTape (or forward accumulator) may record the ops run now (True if unsure)."""
    try:
        from tensorflow.python.eager import record
        return bool(record.could_possibly_record())
    except (ImportError, AttributeError):
        return True


def _write_rows(out, tile, y0, x0, height, width):
    """Write ``tile`` (N, h, w, K) into the output at (y0, x0), in place; ``out`` holds the output as
    (N * height * width, K) rows (None: allocated here, uninitialised).  Eager only, without gradients:
    InplaceUpdate writes into its input's buffer, so no copy of the output is ever made."""
    n, h, w, k = tile.shape
    if out is None:
        out = tf.raw_ops.Empty(shape=[n * height * width, k], dtype=tile.dtype, init=False)
    pixels = (np.arange(n)[:, None, None] * height + y0 + np.arange(h)[None, :, None]) * width \
        + x0 + np.arange(w)[None, None, :]
    return tf.raw_ops.InplaceUpdate(x=out, i=tf.constant(pixels.reshape(-1), tf.int32),
                                    v=tf.reshape(tile, (n * h * w, k)))


# ---------------------------------------------------------------------------
# convert(): capture -> rules -> core model and plan -> DenseFeatureModel, then the self-check
# ---------------------------------------------------------------------------

def _declared_channels(base_net):
    """The channel count of Cp's declared input (keras.Input), or None."""
    try:
        shape = base_net.inputs[0].shape
        return None if shape[-1] is None else int(shape[-1])
    except (AttributeError, IndexError, ValueError):
        return None


def _infer_in_channels(base_net, patch_size=None):
    """C of the input: declared by Cp's input, else the input channels of one of its built convolutions (Conv2D,
    DepthwiseConv2D, SeparableConv2D).  Candidates are tried in the order the layers were created (the first created
    need not be the first called); the first with which Cp runs on a patch of ``patch_size`` wins."""
    declared = _declared_channels(base_net)
    if declared is not None:
        return declared
    candidates = []
    for layer in base_net._flatten_layers(include_self=False):
        if not layer.built:
            continue
        if isinstance(layer, keras.layers.Conv2D):
            candidates.append(int(layer.kernel.shape[2]) * int(layer.groups))
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            candidates.append(int(layer.kernel.shape[2]))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            candidates.append(int(layer.depthwise_kernel.shape[2]))
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) <= 1 or patch_size is None:
        return candidates[0] if candidates else None
    for c in candidates:
        try:
            base_net(tf.zeros((1,) + tuple(patch_size) + (c,), _input_dtype(base_net)), training=False)
            return c
        except Exception:  # another channel count; try the next
            continue
    return candidates[0]


def _check_declared_input(base_net, patch_size, in_channels):
    """Refuse what Cp's declared inputs rule out: several inputs, another patch size or channel count."""
    try:
        inputs = list(base_net.inputs)
    except (AttributeError, ValueError):
        return
    if len(inputs) > 1:
        raise ConversionError(f"Cp ({base_net.name}) takes {len(inputs)} inputs; convert() makes dense a network "
                              f"of one input patch (convert each branch, or wrap Cp in a model of one input)")
    shape = tuple(inputs[0].shape) if inputs else ()
    if len(shape) == 4:
        declared = tuple(shape[1:3])
        if all(d is not None for d in declared) and declared != tuple(patch_size):
            raise ConversionError(f"Cp ({base_net.name}) declares {declared[0]}x{declared[1]} input patches "
                                  f"(keras.Input{tuple(shape[1:])}), but patch_size is "
                                  f"{patch_size[0]}x{patch_size[1]}; pass patch_size={declared}")
        if shape[3] is not None and shape[3] != in_channels:
            raise ConversionError(f"Cp ({base_net.name}) declares {shape[3]} input channels, but in_channels is "
                                  f"{in_channels}")


def _trace(base_net, patch_size, in_channels, guessed=False):
    """Run Cp eagerly on random patches (building its layers; its output), then trace its call() into a
    graph and record its layers and ops (_Tracer).  Tries a batch of 2, then of 1.  ``guessed``: the caller
    inferred ``in_channels`` from a layer (the error then says so)."""
    ph, pw = patch_size
    last_error = None
    for batch in (2, 1):
        dtype = _input_dtype(base_net)
        example = tf.random.normal([batch, ph, pw, in_channels], dtype=dtype)
        layers = list(base_net._flatten_layers(include_self=True, recursive=True))
        snapshots = [_attribute_values(layers)]  # the user's layers' attributes around convert's runs of Cp
        unbuilt = [(m, m._layers[0] if m._layers else None) for m in layers
                   if isinstance(m, keras.Sequential) and not m.built]
        try:
            out = base_net(example, training=False)  # builds the layers outside the recording
            if _input_dtype(base_net) != dtype:  # the layers' dtypes are known once they are built
                example = tf.random.normal([batch, ph, pw, in_channels], dtype=_input_dtype(base_net))
                out = base_net(example, training=False)
        except Exception as exc:  # the net rejected this example; report it below
            _unbuild_sequentials(unbuilt)
            last_error = exc
            continue
        tracer = _Tracer(base_net)
        try:
            snapshots.append(_attribute_values(layers))
            with tracer:
                tracer.trace(example)
            tracer.refuse_batch_reads(example)
            tracer.snapshots = snapshots + [_attribute_values(layers)]
        except ConversionError:
            raise
        except Exception as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", _error_text(exc))  # Keras' bold
            larger = _larger_patch_that_runs(base_net, (ph, pw), in_channels, example.dtype, traced=True)
            why = "(a forward that reads values of tensors, with Python conditions on them or .numpy(), cannot be " \
                "made dense)" if larger is None else f"-- the patch {ph}x{pw} is " + \
                _too_small_hint(larger, "can be traced on")
            raise ConversionError(
                f"Cp runs on {ph}x{pw}x{in_channels} patches, but its call() cannot be traced into a TensorFlow "
                f"graph ({type(exc).__name__}: {text}); convert() reads Cp's layers and ops from that graph "
                f"{why}") from exc
        return tracer, out, example
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(last_error))  # Keras' bold
    larger = _larger_patch_that_runs(base_net, (ph, pw), in_channels, _input_dtype(base_net))
    hint = f" -- in_channels={in_channels} was inferred from Cp's first Conv2D; pass in_channels= if Cp's input " \
        f"has another number of channels" if guessed and larger is None else ""  # (whatever the error says: x[..., 2]
    # of a guess of 1 channel fails with "slice index 2 of dimension 3 out of bounds"; not where Cp ran on these
    # channels with a larger patch)
    size = "; check patch_size against the size Cp was trained on" if larger is None else \
        f": it is {_too_small_hint(larger, 'runs on')}"
    raise ConversionError(f"running Cp on a batch of {ph}x{pw}x{in_channels} patches failed: "
                          f"{type(last_error).__name__}: {text} -- the patch {ph}x{pw} may be smaller (or larger) "
                          f"than the net needs{size}{hint}") from last_error


def _unbuild_sequentials(unbuilt):
    """Undo what a failed first call left in Sequential models that had no input (``unbuilt``: (model, its first
    layer then)): Keras builds one for the first input's shape, batch included, with an InputLayer in front, and
    keeps that layer where the build fails, so that every later call, convert's with the right patch or batch
    included, fails ("has already been configured to use input shape ..."): a wrong patch_size would break Cp."""
    for model, first in unbuilt:
        if model._layers and model._layers[0] is not first and isinstance(model._layers[0], keras.layers.InputLayer):
            del model._layers[0]
            model._functional, model.built = None, False


def _larger_patch_that_runs(base_net, patch_size, in_channels, dtype, traced=False):
    """Where Cp failed on patches of ``patch_size``: the first of 2, 4 and 8 times that size on which Cp runs (is traced
    into a graph, where ``traced``), which shows the patch to be too small for Cp's layers; None if none does (the
    failure has another cause, or Cp declares its input size).  Where a layer of Cp is not built yet, running Cp on a
    larger patch would build it for that size (a Dense after Flatten) and break Cp for the right one: a Sequential
    Cp is probed through a copy (keras.models.clone_model), others not at all."""
    if not all(layer.built for layer in base_net._flatten_layers(include_self=True, recursive=True)):
        if not isinstance(base_net, keras.Sequential):
            return None
        try:
            base_net = keras.models.clone_model(base_net)  # (new, unbuilt layers of the same configuration)
        except Exception:  # noqa: BLE001 - (layers that cannot be copied from their configuration: no probe)
            return None
    for factor in (2, 4, 8):
        size = (patch_size[0] * factor, patch_size[1] * factor)
        try:
            if traced:
                spec = tf.TensorSpec([1, *size, in_channels], dtype)
                tf.function(_GraphBody(lambda patches: base_net(patches, training=False)),
                            autograph=False).get_concrete_function(spec)
            else:
                base_net(tf.random.normal([1, *size, in_channels], dtype=dtype), training=False)
        except Exception:  # noqa: BLE001 - (any failure: not this size either)
            continue
        return size
    return None


def _too_small_hint(larger, runs):
    """Why the patch is too small for Cp (Cp ``runs`` on the ``larger`` patch)."""
    return (f"likely too small, since Cp {runs} {larger[0]}x{larger[1]} patches (its layers may shrink this patch "
            f"below the window of a later layer: a convolution or pooling gets a map smaller than its window, or an "
            f"empty one); pass the patch_size Cp was trained on")


def _apply_rules(calls, geoms, values):
    """Apply each recorded call's rule and wire its layers; fills ``geoms`` and ``values`` (slot ->
    symbolic tensor of CI's core)."""
    problems = []  # every layer and op that cannot be made dense, reported together
    for call in calls:
        in_geoms = [geoms[s] for s in call.in_slots]
        rule = _rule_of(call)
        try:
            if call.problem is not None:
                raise call.problem
            grouped, back = next((g for g in in_geoms if g.kind == GROUPS), None), []
            if grouped is not None:  # only the rules for maps split into groups see one (_GROUPS_RULES)
                run, out_geoms = _on_groups(call, grouped, in_geoms)
            elif rule is None:
                raise ConversionError(_unsupported_message(call.where, "op" if call.is_op else "layer kind"))
            else:
                run, out_geoms, back = _apply_rule(call, rule, in_geoms)
        except Exception as exc:  # noqa: BLE001 - (a rule's own failure on a guessed geometry: see below)
            if not isinstance(exc, ConversionError) and not (problems and _reads_guessed(call, geoms)):
                raise
            if isinstance(exc, ConversionError):  # (else: a rule given a guessed value where an earlier problem
                problems.append(str(exc))         # left one, such as a rank-0 statistic of the whole batch)
            geoms.update((s, _guessed_geom(shape, in_geoms, _MAP_LAYOUT))
                         for s, shape in zip(call.out_slots, call.out_shapes))
            continue
        if problems:  # CI will not be built: later layers only report their own problems
            geoms.update(zip(call.out_slots, out_geoms))
            continue
        inputs = [_transposer((0, 2, 3, 1))(values[s]) if i in back else values[s]
                  for i, s in enumerate(call.in_slots)]
        outs = run(inputs if call.is_op else [_cast_as_layer_input(call.layer, x) for x in inputs])
        if len(out_geoms) != len(call.out_slots) or len(outs) != len(call.out_slots):
            raise AssertionError(f"rule for {call.where} returned {len(out_geoms)} geometries and {len(outs)} "
                                 f"values for {len(call.out_slots)} outputs")
        geoms.update(zip(call.out_slots, out_geoms))
        values.update(zip(call.out_slots, outs))
    if problems:
        raise _all_problems(problems)


def _apply_rule(call, rule, in_geoms):
    """``rule`` applied to ``call`` (of inputs of ``in_geoms``, none of them a map split into groups): what CI runs,
    the output geometries, and the inputs that are transposed 1x1 maps given to a rule of other values (transposed
    back where CI runs; ``in_geoms`` is changed in place to the geometries the rule saw)."""
    transposed = next((g for g in in_geoms if g.kind == TRANSPOSED), None)
    back = []  # inputs that are transposed 1x1 maps, given to a rule of other values
    if transposed is not None and rule not in _TRANSPOSED_RULES and all(
            g.kind != TRANSPOSED or g.size == (1, 1) or g.channels == 1 for g in in_geoms):
        # (N, C, 1, 1) (or (N, 1, h, w)) holds the values of (N, 1, 1, C) (of (N, h, w, 1)) in their order:
        # a reshape of the map, on whose dense values (transposed back) the rule runs
        back = [i for i, g in enumerate(in_geoms) if g.kind == TRANSPOSED]
        in_geoms[:] = [_reshaped_geom(call, g.with_(kind=MAP), (s[0],) + tuple(s[2:]) + (s[1],), s)
                       if i in back else g for i, (g, s) in enumerate(zip(in_geoms, call.in_shapes))]
        transposed = None
    if transposed is not None and rule not in _TRANSPOSED_RULES:
        raise _on_transposed(call, transposed)
    if not call.is_op:
        _check_activation_per_pixel(call, in_geoms)
    if any(g.kind == SWAPPED for g in in_geoms) and rule not in (_rule_permute, _rule_transpose_op):
        run, out_geoms = _on_swapped(call, rule, in_geoms)
    else:
        run, out_geoms = rule(call, in_geoms)
    return run, out_geoms, back


def _reads_guessed(call, geoms):
    """Whether ``call`` reads a value whose geometry was guessed after a refused call (see _guessed_geom)."""
    return any(geoms[s].guessed for s in call.in_slots)


def _strided_layers(core):
    """The multipooling and strided layers of CI's core, in the core's (topological) order."""
    return [layer for layer in core._flatten_layers(include_self=False)
            if isinstance(layer, (multiConv, _MultiDepthwise))
            or (isinstance(layer, _MultiPoolBase) and layer.stride != (1, 1))]


def _dense_tail(calls, geoms):
    """The output slot of the last strided layer where only per-pixel calls (keeping the patch-level size)
    on its grid follow it and it is the only one of its depth; else None.

    Stacking a stride's shifts on the batch axis lets the layers after it run on each shift as on an
    ordinary map, and unwarping puts the shifts back in place.  Where every later layer reads each
    position alone, that round trip changes nothing: the layer may run at stride 1 and leave its
    shifts in place (one copy of its output fewer; e.g. Cp ending in max pooling and tanh).  CI's rules
    accept no layer that keeps the patch-level size of a map but reads neighbours (padding is refused),
    so a call that keeps the size on the same grid is per-pixel.
    """
    def depth(slot):
        return len(geoms[slot].strides)
    strided = [i for i, call in enumerate(calls)
               if any(depth(s) > max([depth(t) for t in call.in_slots] or [0]) for s in call.out_slots)]
    if not strided:
        return None
    n = max(depth(s) for i in strided for s in calls[i].out_slots)
    last = [i for i in strided if any(depth(s) == n for s in calls[i].out_slots)]
    if len(last) != 1:
        return None  # two strided layers at the same depth (streams that pool alike): not one tail
    grid = geoms[calls[last[0]].out_slots[0]].strides
    for call in calls[last[0] + 1:]:
        for s in call.in_slots:
            if geoms[s].strides != grid or any(geoms[s].size != geoms[o].size for o in call.out_slots):
                return None
    return calls[last[0]].out_slots[0]


def convert(base_net, patch_size, in_channels: Optional[int] = None, *, naive: bool = False, tile=None,
            max_memory: Optional[int] = None, memory_guard: bool = True, check: bool = True,
            progress: Optional[bool] = None, border: str = "zeros", output_stride=1) -> DenseFeatureModel:
    """Turn a patch network Cp (Keras) into CI, which computes Cp for the patch around every pixel.

    Cp is run once on an example batch of patches and its call() traced into a TensorFlow graph:
    the Keras layers it calls are recorded, and the ops between them (keras.ops, tf.*, arithmetic
    on tensors, casts, slices, reductions; in Sequential, functional and subclassed models, Lambda
    and the user's own layers) are read from the graph.  Each layer or op is made dense by one rule
    (:func:`supported_layers` lists them), in inference mode (dropout off, batch-norm moving
    statistics); the layers and their weights are shared with Cp, not copied.  What cannot be made
    exact raises :class:`ConversionError` naming every such layer and op and why.

    Args:
        base_net: Cp, a keras.Model mapping (B, pH, pW, C) to (B, K) or (B, 1, 1, K).
        patch_size: int or (pH, pW).
        in_channels: C; inferred from the model's input or first Conv2D when omitted.
        naive: paper-faithful per-shift multipooling and per-layer unwarping (slower, same result).
        tile: None or (th, tw): process images in tiles of this output size (exact, bounded memory).
        max_memory: a budget in bytes; tiles are chosen so that CI's estimated peak stays under it.
        memory_guard: without max_memory, tile (or raise MemoryError) where an image would need more
            memory than the process may still allocate; False turns the guard off.
        check: compare CI with Cp on a few patches of a small random image before returning.
        progress: progress bar for tiled runs (None: automatic).
        border: how the image is extended for the patches of pixels near its edge: "zeros" (the
            paper's convention), "reflect" or "replicate" (BORDERS); dense_reference takes the same.
        output_stride: int or (sy, sx): features every sy rows and sx columns, out[:, i, j] = Cp at
            pixel (sy * i, sx * j), output (N, ceil(H / sy), ceil(W / sx), K).  Leading strided layers
            whose stride product divides it skip the shifts no output uses (cheaper); the rest is
            computed at that step and subsampled (exact for every step).

    Returns:
        A :class:`DenseFeatureModel` mapping (N, H, W, C) to (N, H, W, K) (with output_stride:
        (N, ceil(H / sy), ceil(W / sx), K)).

    Example:
        >>> cp = keras.Sequential([keras.Input((7, 7, 1)), keras.layers.Conv2D(4, 3, strides=2),
        ...                        keras.layers.Activation("tanh"), keras.layers.Flatten(),
        ...                        keras.layers.Dense(6)])
        >>> ci = FDFE.convert(cp, 7)      # 7x7 patch -> 6-vector; the Dense becomes a 3x3 conv
        >>> tuple(ci(np.zeros((1, 9, 11, 1), "float32")).shape)
        (1, 9, 11, 6)
        >>> padded = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Conv2D(2, 3, padding="same")])
        >>> try:
        ...     FDFE.convert(padded, 3)
        ... except FDFE.ConversionError as error:
        ...     print(error)
        layer 'conv2d...' (Conv2D) cannot be made dense exactly: it pads its input (padding='same'); ...
    """
    if not isinstance(base_net, keras.layers.Layer):
        raise TypeError(f"base_net must be a Keras model or layer, got {type(base_net).__name__}")
    ph, pw = _pair(patch_size, "patch_size")
    guessed = in_channels is None and _declared_channels(base_net) is None
    if in_channels is None:
        in_channels = _infer_in_channels(base_net, (ph, pw))
        if in_channels is None:
            raise ValueError(f"in_channels cannot be inferred from base_net ({base_net.name}): it declares no input "
                             f"(no keras.Input) and has no built convolution whose kernel gives the channel count; "
                             f"pass in_channels= (or build Cp first)")
    elif not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    _check_declared_input(base_net, (ph, pw), int(in_channels))
    reads = _ConfigReads(base_net._flatten_layers(include_self=True, recursive=True))  # (fields call() reads)
    patches = np.random.default_rng(0).standard_normal((2, ph, pw, int(in_channels))).astype("float32")
    reads.record(lambda: np.asarray(base_net(patches, training=False)),
                 lambda a, b: a.shape == b.shape and np.array_equal(a, b, equal_nan=True))
    tracer, out, example = _trace(base_net, (ph, pw), int(in_channels), guessed)
    batch = int(example.shape[0])
    dtype = tf.as_dtype(example.dtype)
    images = keras.Input((None, None, in_channels), dtype=dtype.name, name="padded_images")
    values = {0: images}
    geoms = {0: _Geom(MAP, in_channels, (ph, pw))}
    _apply_rules(tracer.calls, geoms, values)
    _output_vectors(out, batch)
    if tracer.out_slot is None:
        raise ConversionError("Cp's output does not depend on its input patch (a constant)")
    out_slot = tracer.out_slot
    geom = geoms[out_slot]
    stacked = values[out_slot]
    out_channels = int(_output_vectors(out, batch).shape[1])
    channels = {slot: g.channels for slot, g in geoms.items()}
    if geom.kind == GROUPS:  # (N, 1, 1, 1, K): the vector of one position, its channels merged back
        stacked = _ChannelGroups([geom.channels])(stacked)
    if geom.size != (1, 1):
        if geom.kind == MAP:
            raise ConversionError(
                f"Cp's output for one patch is a {geom.size[0]}x{geom.size[1]}x{geom.channels} map, not a "
                f"single vector; end Cp with layers that reduce it to 1x1 (or flatten it)")
        stacked = _FlattenOutput(geom.size)(stacked)
        channels[out_slot] = max(channels[out_slot], out_channels)
    name = _unique_name(f"{base_net.name}_dense")  # (two CIs of one Cp can be used in one model)
    core = keras.Model(images, stacked, name=f"{name}_core")
    chain = all(g.strides == geom.strides[:len(g.strides)] for g in geoms.values())
    # the output's unfolding (_FlattenOutput) reads neighbouring positions: no shifts may stay in place before it
    tail = _dense_tail(tracer.calls, geoms) if chain and geom.size == (1, 1) else None
    # DenseFeatureModel marks the last of the core's strided layers: it must be the tail's own layer
    tail = tail is not None and _strided_layers(core)[-1:] == [values[tail]._keras_history.operation]
    depth_of = {id(values[s]._keras_history.operation): len(geoms[s].strides)
                for call in tracer.calls for s in call.out_slots if hasattr(values.get(s), "_keras_history")}
    plan = plan_steps([(c.in_slots, c.out_slots, False) for c in tracer.calls], channels, out_slot)
    net = DenseFeatureModel(core, (ph, pw), list(geom.strides), in_channels, out_channels, naive=naive,
                            tile=tile, progress=progress, peak_channels=plan.peak_channels, max_memory=max_memory,
                            memory_guard=memory_guard, grid_multiple=_grid_multiple(geoms.values()),
                            border=border, output_stride=output_stride,
                            skip_shifts=chain, shifts_in_place=tail,
                            strided_depths=[depth_of[id(layer)] for layer in _strided_layers(core)],
                            gradient_hazards=tracer.gradient_hazards, name=name)
    net.build((None, None, None, in_channels))
    # Cp's layers that CI replaced by its own (poolings, flattening heads) are not in the core: their settings are
    # checked as well (by this CI; a copy made from its config has no Cp), and so are the settings of the user's own
    # layers, but the state their call() changed as convert ran Cp
    seen = {id(layer) for layer in net._cp_layers}
    replaced = [layer for layer in base_net._flatten_layers(include_self=True, recursive=True)
                if id(layer) not in seen]
    object.__setattr__(net, "_cp_layers", net._cp_layers + replaced)
    if check:
        _self_check(net, base_net, dtype)  # (runs Cp again: what it changes is state too)
    snapshots = tracer.snapshots + [_attribute_values(net._cp_layers)]
    state = _changed_between(snapshots)
    captured = {id(external) for external, _ in tracer.graph.captures} if tracer.graph is not None else None
    object.__setattr__(net, "_settings", _layer_settings(net._cp_layers, state, reads, captured))
    object.__setattr__(net, "_containers", _container_records(replaced))
    object.__setattr__(net, "_in_channels_inferred", guessed)  # (for the message where images have other channels)
    return net


def _unique_name(stem):
    """``stem`` the first time, then ``stem_1``, ``stem_2``, ...: names unique as those Keras gives its layers
    (the same counter, keras.backend.get_uid), so that several CIs of one Cp can be layers of one model."""
    uid = keras.backend.get_uid(stem)
    return stem if uid == 1 else f"{stem}_{uid - 1}"


def _self_check(net, base_net, dtype):
    """Compare CI with Cp on a few patches of a small random image (catches unsupported semantics)."""
    h, w = _self_check_image_size(net.stride_product, net.patch_size, net.border)
    sy, sx = net.output_stride
    h, w = max(h, 2 * sy + 1), max(w, 2 * sx + 1)
    rng = np.random.default_rng(0)
    images = tf.constant(np.concatenate([rng.standard_normal((1, h, w, net.in_channels)),
                                         rng.random((1, h, w, net.in_channels))]), dtype=dtype)
    grid_positions = np.array(_self_check_positions(_ceil_div(h, sy), _ceil_div(w, sx)))
    positions = grid_positions * np.array([1, sy, sx])
    tile, max_memory = net.tile, net.max_memory
    net.tile = net.max_memory = None
    try:
        dense = net(images)
    except tf.errors.UnimplementedError as error:  # (TensorFlow's graph optimizer fuses ops it cannot run)
        lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()
                 if line.strip() and not line.strip().startswith(("File ", "[[", "Detected at"))]
        what = next((line for line in lines if "not implemented" in line.lower()), lines[-1] if lines else "")
        raise ConversionError(f"convert's self-check could not run CI, a TensorFlow graph: {what} -- "
                              f"TensorFlow's oneDNN graph optimizer fused ops it has no kernel for; Cp fails the same "
                              f"way as a graph (tf.function(cp), predict). TF_ENABLE_ONEDNN_OPTS=0, set before "
                              f"TensorFlow is imported, avoids it") from error
    finally:
        net.tile, net.max_memory = tile, max_memory
    expected = patch_outputs(base_net, images, net.patch_size, positions,
                             border=net.border).numpy().astype(np.float64)
    got = tf.gather_nd(dense, grid_positions).numpy().astype(np.float64)
    dtype_name = _coarsest_compute_dtype(base_net)
    try:
        _self_check_compare(got.ravel().tolist(), expected.ravel().tolist(), dtype_name)
    except ConversionError as error:
        alone = np.concatenate([patch_outputs(base_net, images, net.patch_size, positions[i:i + 1],
                                              border=net.border).numpy() for i in range(len(positions))])
        try:  # Cp on each patch alone: does CI match it, where Cp on a batch of patches gave other values?
            _self_check_compare(got.ravel().tolist(), alone.astype(np.float64).ravel().tolist(), dtype_name)
        except ConversionError:
            raise error from None
        raise ConversionError("convert's self-check: Cp gives other values for a batch of patches than for each "
                              "patch alone, and CI matches Cp on each patch alone; TensorFlow 2.21's oneDNN float32 "
                              "convolution with row stride 1 and column stride > 1 does this (see the README's "
                              "Limits; TF_ENABLE_ONEDNN_OPTS=0 avoids it). Pass check=False to use CI") from None


def _coarsest_compute_dtype(model) -> str:
    """The name of the least precise floating dtype Cp computes in anywhere (the self-check's tolerance): a float64
    first layer followed by float32 ones computes, and rounds, in float32."""
    names = {_compute_dtype(model).name}
    for layer in model._flatten_layers(include_self=True):
        dtype = getattr(layer, "compute_dtype", None)
        if dtype is not None and tf.as_dtype(dtype).is_floating:
            names.add(tf.as_dtype(dtype).name)
    return max(sorted(names), key=lambda name: _SELF_CHECK_TOLERANCE.get(name, 3e-2))
