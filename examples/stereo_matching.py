"""The framework-neutral half of the stereo example: the data, the weights file, matching and the metric.

numpy and the standard library only (scikit-image for the image pair), so that both backends' descriptors
go through exactly the same matching code and any difference between the disparity maps comes from the
descriptors alone.

    pair = load_pair()                       # left, right (grey, float32 in [0, 1]), ground truth
    disparity, volume = match(left_desc, right_desc)   # (K, H, W) descriptors of each image
    scores = evaluate(disparity, pair.gt, HELD_OUT_ROWS)

The stereo pair is scikit-image's ``data.stereo_motorcycle()`` (Middlebury 2014 "Motorcycle", 500x741,
ground-truth disparities 7-60 px for the left image, inf where unknown): left pixel (y, x) shows the
scene point that right pixel (y, x - d) shows.
"""

import collections
import os
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_FILE = os.path.join(ROOT, "weights", "stereo.npz")

#: the patch the network sees (even: it reaches 9 px up and left, 8 down and right; see README)
PATCH = (18, 18)
#: disparities searched: 0 .. MAX_DISPARITY
MAX_DISPARITY = 63
#: training uses the top half of the rows only; the bottom half is held out for evaluation
TRAIN_ROWS = slice(0, 250)
HELD_OUT_ROWS = slice(250, 500)

#: the network's layers: name -> (out, in, kH, kW) in PyTorch's layout ("OIHW"); a 2x2 max pooling
#: (stride 2) follows conv2.  18x18 -> 16 -> 14 -> pool 7 -> 5 -> 3 -> 1: one 32-vector per patch.
CONV_SHAPES = collections.OrderedDict([
    ("conv1", (32, 1, 3, 3)),
    ("conv2", (32, 32, 3, 3)),
    ("conv3", (32, 32, 3, 3)),
    ("conv4", (32, 32, 3, 3)),
    ("conv5", (32, 32, 3, 3)),
])
#: arrays in the weights file: kernels (OIHW) and biases, float32, and the image normalisation
WEIGHT_SHAPES = {**{f"{n}.weight": s for n, s in CONV_SHAPES.items()},
                 **{f"{n}.bias": (s[0],) for n, s in CONV_SHAPES.items()},
                 "input.mean": (), "input.std": ()}

Pair = collections.namedtuple("Pair", "left right gt left_rgb")


def load_pair():
    """scikit-image's Motorcycle pair: left and right as grey float32 images in [0, 1] (scikit-image's
    rgb2gray), the ground-truth disparity of the left image (float32, NaN where unknown) and the left
    colour image (for the figure)."""
    import skimage.color
    import skimage.data
    left, right, gt = skimage.data.stereo_motorcycle()
    grey = [skimage.color.rgb2gray(im).astype(np.float32) for im in (left, right)]
    gt = np.where(np.isfinite(gt), gt, np.nan).astype(np.float32)
    return Pair(grey[0], grey[1], gt, left)


def normalise(grey, weights):
    """The network's input: a grey image in [0, 1] minus the training rows' mean, over their standard
    deviation (both stored in the weights file).  The zero padding of the patch convention is then the
    mean grey."""
    return ((grey - weights["input.mean"]) / weights["input.std"]).astype(np.float32)


def save_weights(arrays, path=WEIGHTS_FILE):
    """Write the weights (names and shapes of WEIGHT_SHAPES, PyTorch's layout) as float32 to a plain .npz."""
    arrays = {name: np.asarray(arrays[name], np.float32) for name in sorted(WEIGHT_SHAPES)}
    for name, shape in WEIGHT_SHAPES.items():
        assert arrays[name].shape == shape, (name, arrays[name].shape, shape)
    np.savez(path, **arrays)


def load_weights(path=WEIGHTS_FILE):
    """Read the stereo network's weights (no pickle), checking names, shapes and values.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is corrupt or does not hold this network's weights.
    """
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stereo weights file not found: {path} (make it with "
                                f"'python examples/stereo.py --train')")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"stereo weights file {path} is corrupt or not an .npz archive: {exc}") from exc
    if set(arrays) != set(WEIGHT_SHAPES):
        missing, unexpected = sorted(set(WEIGHT_SHAPES) - set(arrays)), sorted(set(arrays) - set(WEIGHT_SHAPES))
        raise ValueError(f"stereo weights file {path} does not match the network: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, shape in WEIGHT_SHAPES.items():
        array = arrays[name]
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"stereo weights file {path}: {name} has shape {array.shape} and dtype "
                             f"{array.dtype}, expected {shape} float32")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"stereo weights file {path} is corrupt: {name} holds NaN or infinity")
    if arrays["input.std"] <= 0:
        raise ValueError(f"stereo weights file {path}: input.std must be positive")
    return arrays


# ------------------------------------------------------------------------------------------------
# Matching: a similarity volume over disparities 0..MAX_DISPARITY, winner-take-all, sub-pixel
# refinement, optional left-right consistency check.

def similarity_volume(left, right, max_disparity=MAX_DISPARITY):
    """S[d, y, x] = <left[:, y, x], right[:, y, x - d]>, the cosine similarity of unit descriptors;
    -inf where x - d falls outside the image.

    Args:
        left, right: (K, H, W) descriptors of the left and right images (float32).

    Returns:
        (max_disparity + 1, H, W) float32.
    """
    left = np.ascontiguousarray(left, np.float32)
    right = np.ascontiguousarray(right, np.float32)
    if left.ndim != 3 or left.shape != right.shape:
        raise ValueError(f"left and right must be (K, H, W) of one shape, got {left.shape} and {right.shape}")
    _, h, w = left.shape
    volume = np.full((max_disparity + 1, h, w), -np.inf, np.float32)
    for d in range(min(max_disparity + 1, w)):
        np.einsum("khw,khw->hw", left[:, :, d:], right[:, :, :w - d], out=volume[d, :, d:])
    return volume


def winner_take_all(volume):
    """The disparity of highest similarity at every pixel, (H, W) int64."""
    return np.argmax(volume, axis=0)


def subpixel(volume, disparity):
    """Refine integer disparities by the vertex of the parabola through the similarities at d - 1, d,
    d + 1 (kept where d has both neighbours and the parabola opens downwards; the offset is clipped
    to half a pixel).  Returns (H, W) float32."""
    d_max = volume.shape[0] - 1
    take = lambda d: np.take_along_axis(volume, np.clip(d, 0, d_max)[None], axis=0)[0]  # noqa: E731
    below, best, above = take(disparity - 1), take(disparity), take(disparity + 1)
    with np.errstate(invalid="ignore"):  # -inf neighbours (x - d outside the image) are not refined
        curvature = below - 2 * best + above
    inner = (disparity > 0) & (disparity < d_max) & np.isfinite(below) & np.isfinite(above) & (curvature < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(inner, 0.5 * (below - above) / np.where(inner, curvature, -1), 0)
    return (disparity + np.clip(offset, -0.5, 0.5)).astype(np.float32)


def right_disparity(volume):
    """Winner-take-all for the right image from the same volume: right pixel (y, x) against left pixels
    (y, x + d).  Returns (H, W) int64."""
    n, h, w = volume.shape
    shifted = np.full_like(volume, -np.inf)
    for d in range(min(n, w)):
        shifted[d, :, :w - d] = volume[d, :, d:]
    return np.argmax(shifted, axis=0)


def left_right_check(disparity, volume, tolerance=1):
    """True where the left disparity d at x and the right image's disparity at x - d agree within
    ``tolerance`` px (occlusions and mismatches fail)."""
    right = right_disparity(volume)
    h, w = disparity.shape
    columns = np.arange(w)[None, :] - disparity
    back = np.take_along_axis(right, np.clip(columns, 0, w - 1), axis=1)
    return (columns >= 0) & (np.abs(back - disparity) <= tolerance)


def match(left, right, max_disparity=MAX_DISPARITY, lr_check=False):
    """Dense disparity of the left image from the two images' descriptors.

    Returns:
        (disparity, volume, integer): disparity (H, W) float32 (sub-pixel; NaN where the left-right
        check, if asked, rejects the pixel), the similarity volume, and the integer winner-take-all
        disparities (before refinement and check).
    """
    volume = similarity_volume(left, right, max_disparity)
    integer = winner_take_all(volume)
    disparity = subpixel(volume, integer)
    if lr_check:
        disparity = np.where(left_right_check(integer, volume), disparity, np.nan).astype(np.float32)
    return disparity, volume, integer


def evaluate(disparity, gt, rows=HELD_OUT_ROWS):
    """The metric over the pixels of ``rows`` with a ground truth.

    bad-k: the share of those pixels whose disparity is missing (NaN) or off by more than k px (a
    missing disparity counts as wrong).  Also: the share without a disparity, and bad-3 among the
    pixels that have one.  All in percent.
    """
    gt = gt[rows]
    disparity = np.asarray(disparity, np.float64)[rows]
    valid = np.isfinite(gt)
    if not valid.any():
        raise ValueError("no pixel with a ground truth in these rows")
    given = np.isfinite(disparity[valid])
    error = np.where(given, np.abs(np.where(given, disparity[valid], 0) - gt[valid]), np.inf)
    return {
        "bad3": 100.0 * np.mean(error > 3),
        "bad1": 100.0 * np.mean(error > 1),
        "missing": 100.0 * np.mean(~given),
        "bad3_given": 100.0 * np.mean(error[given] > 3) if given.any() else float("nan"),
        "pixels": int(valid.sum()),
    }
