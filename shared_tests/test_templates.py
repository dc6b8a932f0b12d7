"""Wiring CI by hand: the StridedNet template (strided convolution, batch norm, flatten + Linear/Dense head,
L2 normalisation) against Cp on every patch in both backends; linearAsConv; the wiring checks of the blocks
and check_ci, one test per mistake; hand-wired CIs of random nets (the checks never reject a correct
wiring); dtype handling of every CI; the Keras templates as real models (save/load, one graph)."""

import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

import netspec
from conftest import TOL, max_rel_error
from test_convert import patch_networks  # the random valid nets of the convert() property tests

# (batch, H, W): sizes not multiples of the stride product (4, 4), smaller than the 21x21 patch, batches > 1
CASES = [(2, 19, 26), (3, 6, 11)]


def _torch_images(n, h, w, dtype="float32", seed=0, device="cpu"):
    import torch
    return torch.from_numpy(netspec.random_images(n, 1, h, w, seed).transpose(0, 3, 1, 2)).to(
        device=device, dtype=getattr(torch, dtype))


def _keras_images(n, h, w, dtype="float32", seed=0):
    import tensorflow as tf
    return tf.constant(netspec.random_images(n, 1, h, w, seed), dtype=dtype)


# --- the StridedNet template equals Cp on every patch ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,h,w", CASES, ids=[f"n{n}-{h}x{w}" for n, h, w in CASES])
def test_torch_stridednet_equals_cp(tb, torch_device, dtype, n, h, w):
    import torch
    cp = tb.StridedNet.StridedPatchNet(seed=1).to(device=torch_device, dtype=getattr(torch, dtype))
    images = _torch_images(n, h, w, dtype, device=torch_device)
    ref = tb.FDFE.dense_reference(cp, images, 21).cpu()
    for naive in (False, True):
        ci = tb.StridedNet.StridedNet(cp, naive=naive)
        with torch.no_grad():
            out = ci(images).cpu()
        assert out.shape == (n, 32, h, w) and out.dtype == getattr(torch, dtype)
        assert max_rel_error(out, ref) <= TOL[dtype]
    assert torch.allclose(out.norm(dim=1), torch.ones(()).to(out))  # unit descriptors: the L2 normalisation ran


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,h,w", CASES, ids=[f"n{n}-{h}x{w}" for n, h, w in CASES])
def test_keras_stridednet_equals_cp(kb, tf_scope, dtype, n, h, w):
    cp = kb.StridedNet.StridedPatchNet(seed=1, dtype=dtype)
    images = _keras_images(n, h, w, dtype)
    ref = kb.FDFE.dense_reference(cp, images, 21)
    for naive in (False, True):
        out = kb.StridedNet.StridedNet(cp, naive=naive)(images)
        assert tuple(out.shape) == (n, h, w, 32) and out.dtype.name == dtype
        assert max_rel_error(out, ref) <= TOL[dtype]


def _keras_weights_from_torch(t_cp, k_cp):
    """PyTorch StridedPatchNet's weights into the Keras one: OIHW -> HWIO kernels; the Linear's (K, C*h*w)
    weight in C, H, W order -> the Dense kernel (h*w*C, K) in H, W, C order."""
    sd = {k: v.detach().double().numpy() for k, v in t_cp.state_dict().items()}
    for name in ("conv1", "conv2", "conv3", "conv4"):
        getattr(k_cp, name).set_weights([sd[f"{name}.weight"].transpose(2, 3, 1, 0), sd[f"{name}.bias"]])
    k_cp.bn2.set_weights([sd["bn2.weight"], sd["bn2.bias"], sd["bn2.running_mean"], sd["bn2.running_var"]])
    fc = sd["fc.weight"].reshape(32, 64, 2, 2).transpose(2, 3, 1, 0).reshape(256, 32)
    k_cp.fc.set_weights([fc, sd["fc.bias"]])


def test_stridednet_torch_equals_keras(tb, kb):
    """The two templates compute the same on the same weights (C,H,W vs H,W,C flattening orders included)."""
    import tensorflow as tf
    import torch
    t_cp = tb.StridedNet.StridedPatchNet(seed=2).double()
    k_cp = kb.StridedNet.StridedPatchNet(seed=2, dtype="float64")
    _keras_weights_from_torch(t_cp, k_cp)
    images = netspec.random_images(2, 1, 13, 10, seed=3)
    with torch.no_grad():
        t_out = tb.StridedNet.StridedNet(t_cp)(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    k_out = kb.StridedNet.StridedNet(k_cp)(tf.constant(images)).numpy()
    assert max_rel_error(t_out.transpose(0, 2, 3, 1), k_out) <= TOL["cross_float64"]


def test_stridednet_loads_with_its_backend(tb, kb):
    assert tb.StridedNet.FDFE is tb.FDFE and kb.StridedNet.FDFE is kb.FDFE


# --- linearAsConv ---------------------------------------------------------------------------------------------

def test_torch_linear_as_conv_equals_linear(tb):
    import torch
    gen = torch.Generator().manual_seed(0)
    fc = torch.nn.Linear(4 * 3 * 2, 5).double()
    big = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    for in_shape in ((4, 3, 2), (3, 2), torch.Size([4, 3, 2])):
        with torch.no_grad():
            dense = tb.FDFE.linearAsConv(fc, in_shape)(big)
            assert dense.shape == (2, 5, 5, 5)
            for y, x in [(0, 0), (4, 4), (2, 3)]:  # every position: the Linear on the flattened 3x2 crop there
                expected = fc(big[:, :, y:y + 3, x:x + 2].flatten(1))
                assert torch.allclose(dense[:, :, y, x], expected, rtol=0, atol=1e-12)
    fc2 = torch.nn.Linear(5, 3).double()  # a Linear after a Linear: 1x1
    with torch.no_grad():
        out = tb.FDFE.linearAsConv(fc2)(dense)
        assert torch.allclose(out.permute(0, 2, 3, 1), fc2(dense.permute(0, 2, 3, 1)), rtol=0, atol=1e-12)


def test_keras_linear_as_conv_equals_dense(kb):
    import keras
    import tensorflow as tf
    big = np.random.default_rng(0).standard_normal((2, 7, 6, 4))
    for in_shape, built in (((3, 2, 4), True), ((3, 2), True), ((3, 2, 4), False), ((3, 2), False)):
        fc = keras.layers.Dense(5, activation="tanh", dtype="float64")
        if built:
            fc.build((None, 24))
        dense = kb.FDFE.linearAsConv(fc, in_shape)(tf.constant(big))  # builds fc where it is not built
        assert tuple(dense.shape) == (2, 5, 5, 5) and fc.kernel.shape == (24, 5)
        for y, x in [(0, 0), (4, 4), (2, 3)]:  # the Dense (activation included) on the flattened 3x2 crop
            expected = fc(big[:, y:y + 3, x:x + 2, :].reshape(2, -1))
            np.testing.assert_allclose(dense[:, y, x, :], expected, rtol=0, atol=1e-12)
    fc2 = keras.layers.Dense(3, dtype="float64")
    out = kb.FDFE.linearAsConv(fc2)(dense)  # a Dense after a Dense: 1x1
    np.testing.assert_allclose(out, fc2(dense), rtol=0, atol=1e-12)


def test_linear_as_conv_refuses_wrong_shapes(tb, kb):
    import keras
    import tensorflow as tf
    import torch
    dense = keras.layers.Dense(5)
    dense.build((None, 24))  # trained: its number of inputs is known
    for fdfe, fc, shape, maps, flat in (
            (tb.FDFE, torch.nn.Linear(24, 5), (4, 3, 2), torch.zeros(1, 2, 5, 5), torch.zeros(1, 24)),
            (kb.FDFE, dense, (3, 2, 4), tf.zeros((1, 5, 5, 2)), tf.zeros((1, 24)))):
        with pytest.raises(ValueError, match=r"linearAsConv: the layer has 24 inputs, but in_shape .* flattens to "
                                             r"36; in_shape must be the map Cp flattens before this layer"):
            fdfe.linearAsConv(fc, (3, 3, 4))
        with pytest.raises(ValueError, match=r"in_shape \(5, 5\) does not divide them"):
            fdfe.linearAsConv(fc, (5, 5))
        with pytest.raises(ValueError, match=r"in_shape must be the map Cp flattens before this layer, .* got 6"):
            fdfe.linearAsConv(fc, 6)
        with pytest.raises(TypeError, match=r"linearAsConv needs a trained"):
            fdfe.linearAsConv(fc.weight if fdfe is tb.FDFE else keras.layers.Conv2D(2, 1), shape)
        block = fdfe.linearAsConv(fc, shape)
        with pytest.raises(ValueError, match=r"linearAsConv: its input has 2 channels, but in_shape .* says the map "
                                             r"Cp flattens has 4; likely cause: in_shape left out or wrong"):
            block(maps)
        with pytest.raises(ValueError, match=r"linearAsConv: its input must be a .* map, got shape \(1, 24\); in CI "
                                             r"the (F|f)latten before the .* is left out"):
            block(flat)
        with pytest.raises(ValueError, match=r"its input has 4 channels, but in_shape .* flattens has 24"):
            fdfe.linearAsConv(fc)(torch.zeros(1, 4, 3, 2) if fdfe is tb.FDFE else tf.zeros((1, 3, 2, 4)))


# --- every wiring mistake gets a clear error -----------------------------------------------------------------

def _wired(ns, cp, **changes):
    """A StridedNet with some blocks changed (a wiring mistake), built without its check."""
    ci = ns.StridedNet.StridedNet(cp, check=False)
    for name, value in changes.items():
        setattr(ci, name, value)
    return ci


def _torch_mistakes(tb):
    """(mistake, CI, expected message) for the wiring mistakes of issue 14, on the PyTorch StridedNet."""
    cp = tb.StridedNet.StridedPatchNet()
    F = tb.FDFE
    return cp, [
        ("stride left out of unwarpAll", _wired(tb, cp, unwarp=F.unwarpAll([(2, 2)])),
         r"unwarpAll: the stacked result holds 32 maps, but 2 image\(s\) with the strides \[\(2, 2\)\] \(4 shifts "
         r"per image\) make 8; likely cause: a stride is missing from the list .*: there are 4 times more shifts"),
        ("strided conv not replaced", _wired(tb, cp, conv3=cp.conv3),
         r"unwarpAll: the stacked result holds 8 maps, but 2 image\(s\) with the strides \[\(2, 2\), \(2, 2\)\] \(16 "
         r"shifts per image\) make 32; likely cause: a pooling layer or strided convolution of Cp was not replaced"),
        ("strided conv neither replaced nor listed", _wired(tb, cp, conv3=cp.conv3, unwarp=F.unwarpAll([(2, 2)])),
         r"unwarpAll: the stacked maps are 10x14 and unwarp to 20x28, smaller than the images \(37x53\); likely "
         r"cause: a pooling layer or strided convolution of Cp was not replaced"),
        ("stride product too small for multiPoolPrepare", _wired(tb, cp, prepare=F.multiPoolPrepare(21, 21, 2)),
         r"unwarpAll: the stacked maps are 9x13 and unwarp to 36x52, smaller than the images \(37x53\); .*"
         r"multiPoolPrepare got a smaller stride product or patch than Cp has"),
        ("no multiPoolPrepare", _wired(tb, cp, prepare=torch_identity()),
         r"unwarpAll: the stacked maps are 4x8 and unwarp to 16x32, smaller than the images \(37x53\); .*"
         r"multiPoolPrepare got a smaller stride product or patch than Cp has"),
        ("a layer left out before multiConv", _wired(tb, cp, conv2=torch_identity(), relu2=torch_identity(),
                                                       bn2=torch_batch_norm(16)),
         r"multiConv: its input has 16 channels but the convolution takes 32 \(layout \(B, C, H, W\)\); likely "
         r"cause: a layer before it is missing"),
        ("Linear reused as it is", _wired(tb, cp, fc=cp.fc),
         r"mat1 and mat2 shapes cannot be multiplied"),
    ]


def torch_identity():
    import torch
    return torch.nn.Identity()


def torch_batch_norm(channels):
    import torch
    return torch.nn.BatchNorm2d(channels).eval()


def test_torch_wiring_mistakes_raise_clear_errors(tb):
    import torch
    cp, mistakes = _torch_mistakes(tb)
    images = _torch_images(2, 37, 53)
    for what, ci, message in mistakes:
        with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match=message):
            ci(images)
        # check_ci (what the templates run in their constructor) reports each, with the common mistakes
        with pytest.raises(ValueError, match=r"check_ci: .*common wiring mistakes: a Linear \(Keras: Dense\) after a "
                                             r"flatten reused as it is, where it must become FDFE\.linearAsConv"):
            tb.FDFE.check_ci(ci, cp, 21)
    # the correct wiring passes both
    ci = tb.StridedNet.StridedNet(cp, check=False)
    assert tb.FDFE.check_ci(ci, cp, 21) <= 1e-5
    with torch.no_grad():
        assert ci(images).shape == (2, 32, 37, 53)


def test_keras_wiring_mistakes_raise_clear_errors(kb):
    import keras
    import tensorflow as tf
    cp = kb.StridedNet.StridedPatchNet()
    F = kb.FDFE
    identity = keras.layers.Identity
    mistakes = [
        ("stride left out of unwarpAll", dict(unwarp=F.unwarpAll([(2, 2)])),
         r"unwarpAll: the stacked result holds 32 maps, but 2 image\(s\) with the strides \[\(2, 2\)\] \(4 shifts "
         r"per image\) make 8; likely cause: a stride is missing from the list .*: there are 4 times more shifts",
         r"unwarpAll: the stacked result holds more maps than the images times the 4 shifts per image of the "
         r"strides \[\(2, 2\)\]; likely cause: a stride is missing from the list"),
        ("strided conv not replaced", dict(conv3=cp.conv3),
         r"unwarpAll: the stacked result holds 8 maps, but 2 image\(s\) with the strides \[\(2, 2\), \(2, 2\)\] \(16 "
         r"shifts per image\) make 32; likely cause: a pooling layer or strided convolution of Cp was not replaced",
         r"unwarpAll: the stacked result holds fewer maps than the images times the 16 shifts per image .*likely "
         r"cause: a pooling layer or strided convolution of Cp was not replaced"),
        ("strided conv neither replaced nor listed", dict(conv3=cp.conv3, unwarp=F.unwarpAll([(2, 2)])),
         r"unwarpAll: the stacked maps are 10x14 and unwarp to 20x28, smaller than the images \(37x53\); likely "
         r"cause: a pooling layer or strided convolution of Cp was not replaced",
         r"unwarpAll: the stacked maps unwarp to less than the size of the images; likely cause: a pooling layer or "
         r"strided convolution of Cp was not replaced"),
        ("no multiPoolPrepare", dict(prepare=identity()),
         r"unwarpAll: the stacked maps are 4x8 and unwarp to 16x32, smaller than the images \(37x53\); .*"
         r"multiPoolPrepare got a smaller stride product or patch than Cp has",
         r"unwarpAll: the stacked maps unwarp to less than the size of the images; .*multiPoolPrepare got a smaller"),
        ("a layer left out before multiConv", dict(conv2=identity(), relu2=identity(), bn2=identity()),
         r"multiConv: its input has 16 channels but the convolution takes 32 \(layout \(B, H, W, C\)\); likely "
         r"cause: a layer before it is missing", None),
        ("Dense reused as it is", dict(fc=cp.fc),
         r"expected axis -1 of input shape to have value 256", None),
    ]
    images = _keras_images(2, 37, 53)
    for what, changes, eager_message, graph_message in mistakes:
        ci = _wired(kb, cp, **changes)
        with pytest.raises(ValueError, match=eager_message):  # layer by layer: sizes known, ValueError
            ci.dense(images)
        if graph_message:  # as one graph (the default): sizes known only at run time, the same causes
            with pytest.raises(tf.errors.InvalidArgumentError, match=graph_message):
                ci(images)
        with pytest.raises(ValueError, match=r"(?s)check_ci: .*common wiring mistakes: a Linear \(Keras: Dense\) "
                                             r"after a flatten reused as it is, where it must become FDFE\.linearAsConv"
                           ) as failure:
            F.check_ci(ci, cp, 21)
        assert "Detected at node" not in str(failure.value)  # what the assertion says, not where the graph was built
        if graph_message:
            assert re.search(graph_message.split("; likely cause")[0], str(failure.value)), str(failure.value)
    ci = kb.StridedNet.StridedNet(cp, check=False)
    assert F.check_ci(ci, cp, 21) <= 1e-5
    assert tuple(ci(images).shape) == (2, 37, 53, 32)


def test_templates_check_their_wiring_when_built(tb, kb):
    """A template adapted with a mistake fails in its constructor (check=True, the default)."""
    class TorchMistake(tb.StridedNet.StridedNet):
        def __init__(self, cp):
            super().__init__(cp, check=False)
            self.unwarp = tb.FDFE.unwarpAll(self.strides[:1])
            tb.FDFE.check_ci(self, cp, 21)

    with pytest.raises(ValueError, match=r"check_ci: running CI on 2 random 1x25x37 images failed \(ValueError: "
                                         r"unwarpAll: .*a stride is missing from the list"):
        TorchMistake(tb.StridedNet.StridedPatchNet())

    class KerasMistake(kb.StridedNet.StridedNet):
        def dense(self, images):  # the L2 normalisation forgotten
            x = self.prepare(images)
            x = self.pool1(self.relu1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(x), training=False))
            x = self.fc(self.conv4(self.relu3(self.conv3(x))))
            return self.unwarp([x, images])
    with pytest.raises(ValueError, match=r"check_ci: CI differs from Cp by .* at image \d, pixel \(\d+, \d+\): the "
                                         r"wiring does not compute Cp"):
        KerasMistake(kb.StridedNet.StridedPatchNet())


def test_unwarp_blocks_check_the_number_of_shifts_and_the_size(tb, kb):
    """unwarpAll, unwrapPrepare, unwrapPool: the exact check with N, the weaker one with (H, W) only."""
    import tensorflow as tf
    import torch
    F = tb.FDFE
    x = torch.zeros(2 * 16, 5, 10, 14)
    images = torch.zeros(2, 1, 37, 53)
    for second in (images, images.shape, images.shape[-2:]):
        assert F.unwarpAll([(2, 2), (2, 2)])(x, second).shape == (2, 5, 37, 53)
        assert F.unwrapPrepare(4)(x, second).shape == (32, 5, 10, 14)
    assert F.unwarpAll([(2, 2), (2, 2)])(x, (37, 53), batch=2).shape == (2, 5, 37, 53)
    # the paper's chain (crop, then one unwrapPool per layer, last layer first) equals unwarpAll's crop
    values = torch.randn(2 * 16, 5, 10, 14, dtype=torch.float64)
    chain = F.unwrapPool(2)(F.unwrapPool(2)(F.unwrapPrepare(4)(values, images)))[:, :, :37, :53]
    assert torch.equal(chain, F.unwarpAll([(2, 2), (2, 2)])(values, images))
    # a stride left out: exact with N; with (H, W) only, the map comes out too small
    with pytest.raises(ValueError, match=r"holds 32 maps, but 2 image\(s\) .*a stride is missing from the list"):
        F.unwarpAll([(2, 2)])(x, (37, 53), batch=2)
    with pytest.raises(ValueError, match=r"stacked maps are 10x14 and unwarp to 20x28, smaller than the images "
                                         r"\(37x53\).*a stride is missing from the list"):
        F.unwarpAll([(2, 2)])(x, images.shape[-2:])
    with pytest.raises(ValueError, match=r"unwrapPrepare: the stacked result holds 32 maps, but 2 image\(s\) with "
                                         r"the stride product 2x2 \(4 shifts per image\) make 8"):
        F.unwrapPrepare(2)(x, images)
    with pytest.raises(ValueError, match=r"unwrapPrepare: the stacked result holds 32 maps, not a multiple of the "
                                         r"36 shifts per image of the stride product 6x6"):
        F.unwrapPrepare(6)(x, (37, 53))
    with pytest.raises(ValueError, match=r"unwarpAll: batch=3 but the images are 2"):
        F.unwarpAll([(2, 2)])(x, images, batch=3)
    with pytest.raises(ValueError, match=r"unwarpAll: call it with the images \(N, C, H, W\), their shape, or their "
                                         r"\(H, W\); got 37"):
        F.unwarpAll([(2, 2)])(x, 37)
    with pytest.raises(ValueError, match=r"batch 6 is not a multiple of the 2x2 shifts: undo the layers last layer "
                                         r"first, one per multipooling layer or multiConv"):
        F.unwrapPool(2)(torch.zeros(6, 1, 2, 2))
    # Keras: the same messages, eagerly and inside a graph
    K = kb.FDFE
    kx, kimages = tf.zeros((32, 10, 14, 5)), tf.zeros((2, 37, 53, 1))
    assert tuple(K.unwarpAll([(2, 2), (2, 2)])([kx, kimages]).shape) == (2, 37, 53, 5)
    assert tuple(K.unwrapPrepare(4)([kx, kimages]).shape) == (32, 10, 14, 5)
    k_values = tf.constant(values.numpy().transpose(0, 2, 3, 1))
    k_chain = K.unwrapPool(2)(K.unwrapPool(2)(K.unwrapPrepare(4)([k_values, kimages])))[:, :37, :53, :]
    np.testing.assert_array_equal(k_chain, K.unwarpAll([(2, 2), (2, 2)])([k_values, kimages]))
    np.testing.assert_array_equal(k_chain, chain.numpy().transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"unwrapPrepare: the stacked result holds 32 maps, but 2 image\(s\)"):
        K.unwrapPrepare(2)([kx, kimages])
    with pytest.raises(ValueError, match=r"unwrapPool: the stacked result is not a multiple of its 2x2 shifts"):
        K.unwrapPool(2)(tf.zeros((6, 2, 2, 1)))
    spec = tf.TensorSpec([None, None, None, None])
    unwarp = tf.function(lambda a, b: K.unwarpAll([(2, 2), (2, 2)])([a, b]), input_signature=[spec, spec])
    assert tuple(unwarp(kx, kimages).shape) == (2, 37, 53, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"unwarpAll: the stacked result holds fewer maps"):
        unwarp(kx, tf.zeros((3, 37, 53, 1)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"unwarpAll: the stacked maps unwarp to less than the "
                                                             r"size of the images"):
        unwarp(kx, tf.zeros((2, 41, 53, 1)))
    pool = tf.function(lambda a: K.unwrapPool(2)(a), input_signature=[spec])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"unwrapPool: the stacked result is not a multiple"):
        pool(tf.zeros((6, 2, 2, 1)))


def test_multipooling_blocks_check_their_input(tb, kb):
    """multipooling and multiConv refuse inputs smaller than their window and shifts (no multiPoolPrepare, or a
    smaller patch), and 2-D inputs; in a template without multiPoolPrepare, small images hit it first."""
    import keras
    import tensorflow as tf
    import torch
    window = (r"multipooling \(max, kernel 2x2, stride 2x2\): its input is 2x2, smaller than the 3x3 that its "
              r"window and all its shifts need; likely cause: the images were not padded by multiPoolPrepare first")
    conv = torch.nn.Conv2d(1, 2, 3, stride=2)
    k_conv = keras.layers.Conv2D(2, 3, strides=2)
    k_conv.build((None, None, None, 1))
    for what, run, message in [
            ("torch pool", lambda: tb.FDFE.multiMaxPooling(2, 2, 2, 2)(torch.zeros(1, 1, 2, 2)), window),
            ("keras pool", lambda: kb.FDFE.multiMaxPooling(2, 2, 2, 2)(tf.zeros((1, 2, 2, 1))), window),
            ("torch conv", lambda: tb.FDFE.multiConv(conv)(torch.zeros(1, 1, 3, 9)),
             r"multi_conv \(kernel 3x3, stride 2x2\): its input is 3x9, smaller than the 4x4"),
            ("keras conv", lambda: kb.FDFE.multiConv(k_conv)(tf.zeros((1, 3, 9, 1))),
             r"multi_conv \(kernel 3x3, stride 2x2\): its input is 3x9, smaller than the 4x4"),
            ("torch 2-D", lambda: tb.FDFE.multiAvgPooling(2, 2)(torch.zeros(3, 4)),
             r"multipooling \(avg, .*its input must be a \(B, C, H, W\) map, got shape \(3, 4\)"),
            ("torch template", lambda: _wired(tb, tb.StridedNet.StridedPatchNet(), prepare=torch_identity())(
                _torch_images(1, 6, 6)), window),
            ("keras template", lambda: _wired(kb, kb.StridedNet.StridedPatchNet(), prepare=keras.layers.Identity()
                                              ).dense(_keras_images(1, 6, 6)), window)]:
        with pytest.raises(ValueError, match=message):
            run()
            pytest.fail(what)


def test_check_ci_catches_what_shapes_cannot(tb, kb):
    """Strides listed out of network order, or a larger patch given to multiPoolPrepare, keep every shape
    right: only the values show it, and check_ci reports them."""
    import torch
    spec = [{"type": "conv", "out": 4, "k": [3, 2]}, {"type": "pool", "kind": "max", "k": [2, 3], "stride": [2, 3]},
            {"type": "conv", "out": 5, "k": 2}, {"type": "pool", "kind": "avg", "k": [3, 2], "stride": [3, 2]},
            {"type": "conv", "out": 3, "k": 2}]
    patch = (17, 16)
    weights = netspec.make_weights(spec, 1, patch)
    cp = netspec.build_torch(spec, 1, patch, weights)
    ci = netspec.hand_wired_torch(cp, spec, patch, tb.FDFE)
    assert tb.FDFE.check_ci(ci, cp, patch) <= 1e-10
    assert tb.FDFE.check_ci(lambda images: ci(images), cp, patch, in_channels=1) <= 1e-10  # any callable
    ci.unwarp = tb.FDFE.unwarpAll([(3, 2), (2, 3)])  # out of order: same product, same shapes
    with pytest.raises(ValueError, match=r"check_ci: CI differs from Cp by .* the wiring does not compute Cp; "
                                         r"common wiring mistakes: .*the list not in network order"):
        tb.FDFE.check_ci(ci, cp, patch)
    ci = netspec.hand_wired_torch(cp, spec, patch, tb.FDFE)
    ci.prepare = tb.FDFE.multiPoolPrepare(19, 18, (6, 6))  # a larger patch: shifted, cropped, same shape
    with torch.no_grad():
        assert ci(torch.zeros(1, 1, 9, 8, dtype=torch.float64)).shape == (1, 3, 9, 8)
    with pytest.raises(ValueError, match=r"check_ci: CI differs from Cp"):
        tb.FDFE.check_ci(ci, cp, patch)
    k_cp = netspec.build_keras(spec, 1, patch, weights, kb.FDFE)
    k_ci = netspec.hand_wired_keras(k_cp, spec, patch, kb.FDFE)
    assert kb.FDFE.check_ci(k_ci, k_cp, patch) <= 1e-10
    with pytest.raises(ValueError, match=r"check_ci: CI gives \(2, 25, 37, 2\) for 2 images of 25x37, but Cp on "
                                         r"every patch gives \(2, 25, 37, 3\)"):
        kb.FDFE.check_ci(lambda images, training=False: k_ci(images)[..., :2], k_cp, patch, in_channels=1)


@given(patch_networks(), st.integers(0, 2**16))
def test_hand_wired_random_nets_equal_cp(tb, kb, net_case, seed):
    """Property: random valid nets (strides, dilation, groups, batch norm, LRN, flatten + Linear/Dense heads, L2
    normalisation, odd/even/non-square patches, any image size) wired by hand from the public blocks equal Cp on
    every patch in both backends: no wiring check ever rejects a correct wiring."""
    import tensorflow as tf
    import torch
    spec, channels, patch, batch, h, w = net_case
    weights = netspec.make_weights(spec, channels, patch, seed)
    images = netspec.random_images(batch, channels, h, w, seed)
    t_net = netspec.build_torch(spec, channels, patch, weights)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        t_out = netspec.hand_wired_torch(t_net, spec, patch, tb.FDFE)(t_images)
    assert max_rel_error(t_out, tb.FDFE.dense_reference(t_net, t_images, patch)) <= TOL["float64"]
    k_net = netspec.build_keras(spec, channels, patch, weights, kb.FDFE)
    k_out = netspec.hand_wired_keras(k_net, spec, patch, kb.FDFE)(tf.constant(images))
    assert max_rel_error(k_out, kb.FDFE.dense_reference(k_net, tf.constant(images), patch)) <= TOL["float64"]


# --- dtypes: float images are cast to the CI's dtype, integer images refused with how to convert them -----------

def test_torch_image_dtypes(tb):
    import torch
    cp = tb.StridedNet.StridedPatchNet()
    images = _torch_images(2, 9, 7)
    cis = [tb.StridedNet.StridedNet(cp), tb.SlimNet.SlimNet(tb.BaseNet.BaseNet(), 15, 15),
           tb.FDFE.convert(cp, 21)]
    for ci in cis:
        with torch.no_grad():
            expected = ci(images)
            for dtype in (torch.float64, torch.float16, torch.bfloat16):
                out = ci(images.to(dtype))  # cast to float32, as the framework's layers would need
                assert out.dtype == torch.float32
                assert torch.equal(out, ci(images.to(dtype).float()))
            assert max_rel_error(ci(images.double()), expected) <= TOL["float32"]
            for dtype in (torch.uint8, torch.int64, torch.bool):
                with pytest.raises(TypeError, match=rf"images must be a floating-point tensor, got dtype {dtype}; "
                                                    rf"convert it first, e\.g\. images\.float\(\) / 255 for 8-bit "
                                                    rf"images"):
                    ci(images.to(dtype))
    ref = tb.FDFE.dense_reference(cp, images.double(), 21)  # Cp in float32, on images cast to it
    assert ref.dtype == torch.float32 and max_rel_error(ref, tb.FDFE.dense_reference(cp, images, 21)) == 0


def test_keras_image_dtypes(kb):
    import tensorflow as tf
    cp = kb.StridedNet.StridedPatchNet()
    images = _keras_images(2, 9, 7)
    cis = [kb.StridedNet.StridedNet(cp), kb.SlimNet.SlimNet(kb.BaseNet.BaseNet(), 15, 15),
           kb.FDFE.convert(cp, 21)]
    for ci in cis:
        expected = ci(images)
        for dtype in (tf.float64, tf.float16, tf.bfloat16):
            out = ci(tf.cast(images, dtype))
            assert out.dtype == tf.float32
            np.testing.assert_array_equal(out, ci(tf.cast(tf.cast(images, dtype), tf.float32)))
        assert max_rel_error(ci(tf.cast(images, tf.float64)), expected) <= TOL["float32"]
        assert max_rel_error(ci(images.numpy().astype(np.float64)), expected) <= TOL["float32"]
        for dtype in (tf.uint8, tf.int32):
            with pytest.raises(TypeError, match=rf"images must be a floating-point tensor, got dtype {dtype.name}; "
                                                rf"convert it first, e\.g\. tf\.cast\(images, tf\.float32\) / 255 "
                                                rf"for 8-bit images"):
                ci(tf.cast(images, dtype))
    ref = kb.FDFE.dense_reference(cp, tf.cast(images, tf.float64), 21)
    assert ref.dtype == tf.float32 and max_rel_error(ref, kb.FDFE.dense_reference(cp, images, 21)) == 0


# --- the Keras templates are real models: saved and loaded, run as one graph ----------------------------------

@pytest.mark.parametrize("template", ["SlimNet", "StridedNet"])
def test_keras_templates_save_and_load(kb, template, tmp_path):
    import keras
    if template == "SlimNet":
        cp = kb.BaseNet.BaseNet(2, 2, dtype="float64")
        ci = kb.SlimNet.SlimNet(cp, 16, 15, naive=True)
    else:
        cp = kb.StridedNet.StridedPatchNet(seed=3, dtype="float64")
        ci = kb.StridedNet.StridedNet(cp)
    images = _keras_images(2, 11, 13, "float64", seed=5)
    path = str(tmp_path / "ci.keras")
    ci.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(ci) and type(loaded.base_net) is type(cp)
    assert loaded.strides == ci.strides and loaded.patch_size == ci.patch_size and loaded.naive == ci.naive
    assert loaded.base_net.dtype_policy.name == "float64"
    for a, b in zip(ci.base_net.weights, loaded.base_net.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    out = ci(images).numpy()
    np.testing.assert_array_equal(loaded(images).numpy(), out)  # bitwise
    assert max_rel_error(out, kb.FDFE.dense_reference(cp, images, ci.patch_size)) <= TOL["float64"]


@pytest.mark.parametrize("template", ["SlimNet", "StridedNet"])
def test_keras_templates_run_as_one_graph(kb, template):
    """Called eagerly, a template runs its layers as one cached graph, traced once for every image size and
    batch, with the same result as layer by layer; inside a user's graph it runs inline."""
    import tensorflow as tf
    ci = (kb.SlimNet.SlimNet(kb.BaseNet.BaseNet(), 15, 15) if template == "SlimNet" else
          kb.StridedNet.StridedNet(kb.StridedNet.StridedPatchNet()))
    for n, h, w in [(1, 9, 10), (3, 17, 6), (2, 33, 35)]:
        images = _keras_images(n, h, w, seed=h)
        out = ci(images)
        np.testing.assert_allclose(out, ci.dense(images), rtol=0, atol=1e-6)
    assert ci._graph.experimental_get_tracing_count() == 1
    outer = tf.function(lambda x: ci(x) * 2.0)
    np.testing.assert_allclose(outer(images), out * 2.0, rtol=0, atol=1e-6)
    assert ci._graph.experimental_get_tracing_count() == 1
