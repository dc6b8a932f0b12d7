"""The stereo example (examples/stereo*.py): its network converts exactly in both backends, matching from
CI's descriptors gives the disparities that matching from Cp run on every patch gives, and the committed
weights file (weights/stereo.npz) loads in both backends to the same network."""

import os
import sys

import numpy as np
import pytest

from conftest import ROOT, TOL, max_rel_error

sys.path.append(os.path.join(ROOT, "examples"))  # appended: never ahead of site-packages

import stereo_matching as sm  # noqa: E402

#: a crop of the pair (rows, columns): held-out rows, the motorcycle's wheel and frame
CROP = (slice(300, 332), slice(416, 544))
#: near-ties: pixels whose best and second-best similarity differ by less than this may pick either
TIE = 1e-5


@pytest.fixture(scope="module")
def weights():
    return sm.load_weights()


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("skimage")
    return sm.load_pair()


@pytest.fixture(scope="module")
def st(tb):
    import stereo_torch
    assert stereo_torch.FDFE is tb.FDFE  # the one cached loader: the same FDFE as the other tests
    return stereo_torch


@pytest.fixture(scope="module")
def sk(kb):
    import stereo_keras
    assert stereo_keras.FDFE is kb.FDFE
    return stereo_keras


@pytest.fixture(scope="module")
def torch_ci(st):
    """(Cp with the committed weights, its CI) in PyTorch."""
    net, _ = st.load()
    return net, st.FDFE.convert(net, sm.PATCH)


@pytest.fixture(scope="module")
def keras_ci(sk):
    net, _ = sk.load()
    return net, sk.FDFE.convert(net, sm.PATCH)


def _images(seed, n=2, size=(27, 35)):
    """Random non-zero normalised grey images, (n, H, W) float32."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (n,) + size).astype(np.float32)


def _crop(pair, weights):
    rows, cols = CROP
    return [sm.normalise(pair.left, weights)[rows, cols], sm.normalise(pair.right, weights)[rows, cols]]


def _runner_up_gap(volume):
    top2 = -np.partition(-volume, 1, axis=0)[:2]
    return top2[0] - top2[1]


# ---------------------------------------------------------------------------------------------------
# the weights file

def test_weights_file_holds_the_network(weights, tmp_path):
    assert set(weights) == set(sm.WEIGHT_SHAPES)
    assert all(weights[name].shape == shape and weights[name].dtype == np.float32
               for name, shape in sm.WEIGHT_SHAPES.items())
    assert weights["input.std"] > 0
    with pytest.raises(FileNotFoundError, match="examples/stereo.py --train"):
        sm.load_weights(str(tmp_path / "missing.npz"))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**weights, "conv1.weight": np.array([object()], dtype=object)})
    with pytest.raises(ValueError):
        sm.load_weights(str(pickled))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{**weights, "conv1.weight": weights["conv1.weight"][:16]})
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(16, 1, 3, 3\)"):
        sm.load_weights(str(wrong))


def test_weights_load_in_both_backends_to_the_same_network(st, sk, weights):
    """Both backends read the same file; the Keras kernels are the file's OIHW arrays transposed to HWIO,
    and the two Cp agree on random patches."""
    torch = pytest.importorskip("torch")
    net_t, _ = st.load()
    net_k, _ = sk.load()
    for name in sm.CONV_SHAPES:
        np.testing.assert_array_equal(getattr(net_t, name).weight.detach().numpy(), weights[f"{name}.weight"])
        kernel, bias = getattr(net_k, name).get_weights()
        np.testing.assert_array_equal(kernel, weights[f"{name}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(bias, weights[f"{name}.bias"])
    patches = np.random.default_rng(1).normal(0.0, 1.0, (64, 1) + sm.PATCH).astype(np.float32)
    with torch.no_grad():
        out_t = net_t(torch.from_numpy(patches)).numpy()
    out_k = np.asarray(net_k(patches.transpose(0, 2, 3, 1)))
    assert out_t.shape == out_k.shape == (64, 32)
    np.testing.assert_allclose(np.linalg.norm(out_t, axis=1), 1.0, atol=1e-5)
    assert max_rel_error(out_k, out_t) <= TOL["float32"]


# ---------------------------------------------------------------------------------------------------
# the network converts exactly: CI against Cp run on every patch, random non-zero images, float32

def test_torch_ci_equals_cp_on_every_patch(st, torch_ci):
    torch = pytest.importorskip("torch")
    net, ci = torch_ci
    assert [tuple(s) for s in ci.strides] == [(2, 2)]  # the pooling layer: CI multipools
    images = torch.from_numpy(_images(2))[:, None]
    with torch.no_grad():
        got = ci(images)
    ref = st.FDFE.dense_reference(net, images, sm.PATCH, progress=False)
    assert got.shape == ref.shape == (2, 32, 27, 35)
    assert max_rel_error(got.numpy(), ref.numpy()) <= TOL["float32"]


def test_keras_ci_equals_cp_on_every_patch(sk, keras_ci):
    net, ci = keras_ci
    images = _images(3)[..., None]
    got = np.asarray(ci(images))
    ref = np.asarray(sk.FDFE.dense_reference(net, images, sm.PATCH, progress=False))
    assert got.shape == ref.shape == (2, 27, 35, 32)
    assert max_rel_error(got, ref) <= TOL["float32"]


# ---------------------------------------------------------------------------------------------------
# matching: the same disparities from CI's descriptors as from Cp's on every patch, on a crop of the pair

def test_matching_from_ci_equals_matching_from_cp_patches(st, torch_ci, pair, weights):
    torch = pytest.importorskip("torch")
    net, ci = torch_ci
    crop = _crop(pair, weights)
    from_ci = st.dense(ci, crop)
    batch = torch.from_numpy(np.stack(crop))[:, None]
    from_cp = list(st.FDFE.dense_reference(net, batch, sm.PATCH, batch_size=2048, progress=False).numpy())
    assert max_rel_error(np.stack(from_ci), np.stack(from_cp)) <= TOL["float32"]

    disp_ci, volume_ci, int_ci = sm.match(*from_ci)
    disp_cp, volume_cp, int_cp = sm.match(*from_cp)
    tie = _runner_up_gap(volume_cp) < TIE
    assert tie.mean() < 0.01
    np.testing.assert_array_equal(int_ci[~tie], int_cp[~tie])
    same = int_ci == int_cp
    np.testing.assert_allclose(disp_ci[same], disp_cp[same], atol=1e-3)
    # the left-right check keeps and rejects the same pixels
    keep_ci, keep_cp = sm.left_right_check(int_ci, volume_ci), sm.left_right_check(int_cp, volume_cp)
    assert (keep_ci != keep_cp).mean() <= tie.mean() * 2


def test_keras_matching_equals_pytorch_matching_on_a_crop(st, sk, torch_ci, keras_ci, pair, weights):
    crop = _crop(pair, weights)
    from_t = st.dense(torch_ci[1], crop)
    from_k = sk.dense(keras_ci[1], crop)
    assert max_rel_error(np.stack(from_k), np.stack(from_t)) <= TOL["float32"]
    _, volume_t, int_t = sm.match(*from_t)
    _, _, int_k = sm.match(*from_k)
    tie = _runner_up_gap(volume_t) < TIE
    np.testing.assert_array_equal(int_k[~tie], int_t[~tie])


def test_committed_weights_match_the_training_rows(st, torch_ci, pair, weights):
    """A smoke check of the trained weights on the training rows (never the held-out ones), cut as in
    training: winner-take-all is within 3 px of the ground truth on 84.5% of the pixels there (an
    untrained net of this architecture: about 76%)."""
    ci = torch_ci[1]
    rows = sm.TRAIN_ROWS
    left, right = st.dense(ci, [sm.normalise(pair.left, weights)[rows], sm.normalise(pair.right, weights)[rows]])
    disparity, _, _ = sm.match(left, right)
    scores = sm.evaluate(disparity, pair.gt[rows], slice(None))
    assert scores["bad3"] < 18, scores


# ---------------------------------------------------------------------------------------------------
# the matching functions on synthetic descriptors

def test_matching_recovers_a_known_shift_and_the_metric_counts_missing_pixels():
    rng = np.random.default_rng(4)
    right = rng.normal(size=(8, 6, 90)).astype(np.float32)
    right /= np.linalg.norm(right, axis=0)
    shift = 17
    left = rng.normal(size=right.shape).astype(np.float32)
    left /= np.linalg.norm(left, axis=0)
    left[:, :, shift:] = right[:, :, :-shift]  # left (y, x) shows right (y, x - 17)
    disparity, volume, integer = sm.match(left, right)
    assert np.all(integer[:, shift:] == shift)
    assert np.all(np.isneginf(volume[40][:, :40])) and np.all(np.isfinite(volume[40][:, 40:]))
    assert np.all(np.abs(disparity[:, shift:] - shift) <= 0.5)
    # x < 17 see no true match: the left-right check rejects most of them, keeps every true match
    keep = sm.left_right_check(integer, volume)
    assert keep[:, shift:].all() and keep[:, :shift].mean() < 0.5
    gt = np.full(disparity.shape, float(shift), np.float32)
    gt[0] = np.nan
    checked = np.where(keep, disparity, np.nan)
    scores = sm.evaluate(checked, gt, slice(None))
    assert scores["pixels"] == 5 * 90
    missing = np.isnan(checked[1:]).mean() * 100
    assert scores["missing"] == pytest.approx(missing)
    assert scores["bad3"] >= missing and scores["bad3_given"] <= scores["bad3"]


def test_subpixel_refinement_finds_the_vertex_of_a_parabola():
    """Similarities on a parabola with its vertex at 20.3 (and at 0.7 and 62.6, near the ends of the
    range): winner-take-all gives 20, the refinement the vertex; at d = 0 or 63 it keeps the integer."""
    d = np.arange(sm.MAX_DISPARITY + 1, dtype=np.float32)[:, None, None]
    vertices = np.array([20.3, 19.8, 0.7, 62.6, -0.2], np.float32)[None, None, :]
    volume = (1 - 0.001 * (d - vertices) ** 2).astype(np.float32)   # (64, 1, 5)
    integer = sm.winner_take_all(volume)
    np.testing.assert_array_equal(integer[0], [20, 20, 1, 63, 0])
    refined = sm.subpixel(volume, integer)
    np.testing.assert_allclose(refined[0], [20.3, 19.8, 0.7, 63, 0], atol=2e-3)
