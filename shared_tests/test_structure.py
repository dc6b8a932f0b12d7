"""How FDFE.py is built: the framework-neutral block is identical in both backends, the usage
examples in the docstrings run, the rule registry and the plan do what they say, and the
self-check catches a wrong rule."""

import doctest
import os
import re

import numpy as np
import pytest

from conftest import ROOT, TOL, max_rel_error

BEGIN = "# BEGIN FRAMEWORK-NEUTRAL BLOCK"
END = "# END FRAMEWORK-NEUTRAL BLOCK"


def _neutral_block(folder):
    with open(os.path.join(ROOT, folder, "FDFE.py"), encoding="utf-8") as f:
        text = f.read()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, folder
    return text[text.index(BEGIN):text.index(END)]


def test_neutral_blocks_are_identical():
    torch_block, tf_block = _neutral_block("pytorch"), _neutral_block("tensorflow")
    assert len(torch_block.splitlines()) > 200  # the block holds the shared machinery, not a stub
    for name in ("def plan_steps", "def tile_grid", "def _memory_estimate", "def _tile_for_memory",
                 "class _Geom", "the rule contract", "def _self_check_compare", "def patch_padding"):
        assert name in torch_block, name
    if torch_block != tf_block:
        import difflib
        diff = "\n".join(difflib.unified_diff(torch_block.splitlines(), tf_block.splitlines(), "pytorch/FDFE.py",
                                              "tensorflow/FDFE.py", lineterm="", n=1))
        pytest.fail(f"the framework-neutral blocks differ:\n{diff}")


def test_neutral_block_uses_no_framework():
    block = _neutral_block("pytorch")
    assert not re.search(r"\b(torch|tf|keras|F|nn)\.", block), "the neutral block uses no framework (numpy only)"


def _run_doctests(module):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__, globs=dict(vars(module), FDFE=module))
             if t.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    return tests, results


def test_torch_doctests(tb):
    tests, results = _run_doctests(tb.FDFE)
    names = {t.name.split(".")[-1] for t in tests}
    assert {tb.FDFE.__name__, "convert", "DenseFeatureNet", "tile_grid", "patch_padding"} <= names, names
    assert results.attempted >= 20 and results.failed == 0, results


def test_keras_doctests(kb):
    tests, results = _run_doctests(kb.FDFE)
    names = {t.name.split(".")[-1] for t in tests}
    assert {kb.FDFE.__name__, "convert", "DenseFeatureModel", "tile_grid", "patch_padding"} <= names, names
    assert results.attempted >= 20 and results.failed == 0, results


def test_supported_layers_lists_the_rules(tb, kb):
    t_kinds, k_kinds = tb.FDFE.supported_layers(), kb.FDFE.supported_layers()
    t_names = {n for names in t_kinds.values() for n in names}
    k_names = {n for names in k_kinds.values() for n in names}
    assert {"conv2d", "max_pool2d", "avg_pool2d", "lp_pool2d", "relu", "linear", "batch_norm", "pad"} <= t_names
    assert {"Conv2D", "MaxPooling2D", "AveragePooling2D", "LPPooling2D", "ReLU", "Dense", "ZeroPadding2D"} <= k_names
    assert any(label.startswith("refused") and "pad" in names for label, names in t_kinds.items())
    # every registered rule is listed, and every listed name has a rule
    assert set(tb.FDFE._RULES.values()) and all(callable(r) for r in tb.FDFE._RULES.values())
    assert {cls.__name__ for cls in kb.FDFE._RULES} == k_names


def test_unsupported_message_points_to_the_supported_kinds(tb, kb):
    """An unknown op or layer is named, with where the supported ones are listed; the list itself (3,000
    characters per unknown op, 16,000 for ConvNeXt's first stage) made such errors unreadable."""
    import keras
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, 1).amax((2, 3))
    with pytest.raises(tb.FDFE.ConversionError, match=r"^[^;]*torch\.roll is not supported by convert\(\) "
                                                      r"\(unknown op\): no rule makes it dense\. "
                                                      r"FDFE\.supported_layers\(\) lists the supported ones by kind, "
                                                      r"as the README's Supported layers does$"):
        tb.FDFE.convert(Net(), 3, in_channels=1)
    model = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Masking(0.0), keras.layers.Flatten()])
    with pytest.raises(kb.FDFE.ConversionError, match=r"\(Masking\) is not supported by convert\(\) "
                                                      r"\(unknown layer kind\): no rule makes it dense\. "
                                                      r"FDFE\.supported_layers\(\)[^\n]*$"):
        kb.FDFE.convert(model, 3)
    assert "Conv2D" in str(kb.FDFE.supported_layers()) and "conv2d" in str(tb.FDFE.supported_layers())


def test_unwarping_messages_name_the_causes(tb):
    """The neutral block's diagnosis of a stacked result that does not fit the images: every message names
    the likely wiring mistakes, the width-first order of the multipooling sizes among them."""
    problem = tb.FDFE._stacked_problem
    listed = "the strides [(2, 1)]"
    for args in [(4, (10, 10), (2, 1), listed, (19, 15), 3), (5, (10, 10), (2, 1), listed, (19, 15)),
                 (4, (9, 7), (2, 1), listed, (19, 15))]:
        message = problem("unwarpAll", *args)
        assert "was not replaced" in message and "take kW, kH, dW, dH: width first" in message, message
    assert problem("unwarpAll", 6, (10, 15), (2, 1), listed, (19, 15), 3) is None


def test_tile_grid_covers_the_image_once(tb, kb):
    for height, width, tile, sp in [(5, 7, (4, 4), (2, 2)), (37, 53, (8, 12), (3, 2)), (1, 1, (4, 4), (4, 4)),
                                    (128, 300, (128, 128), (1, 1))]:
        grid = tb.FDFE.tile_grid(height, width, tile, sp)
        assert grid == kb.FDFE.tile_grid(height, width, tile, sp)
        cover = np.zeros((height, width), int)
        for y0, x0, h, w, hp, wp in grid:
            assert y0 % sp[0] == 0 and x0 % sp[1] == 0 and hp % sp[0] == 0 and wp % sp[1] == 0
            assert hp >= h and wp >= w
            cover[y0:y0 + h, x0:x0 + w] += 1
        assert (cover == 1).all()


def test_plan_steps_keeps_aliased_values(tb):
    """No step may overwrite memory that another value still reads, through an alias."""
    plan_steps = tb.FDFE.plan_steps
    # 0 -conv-> 1 -clone(alias)-> 2 -relu-> 3 ; 3 + 1 -> 4
    steps = [([0], [1], False), ([1], [2], True), ([2], [3], False), ([3, 1], [4], False)]
    plan = plan_steps(steps, {s: 4 for s in range(5)}, 4)
    assert plan.overwrite == [False, False, False, False]
    # without the later use of 1, relu may overwrite the clone (and so 1)
    steps = [([0], [1], False), ([1], [2], True), ([2], [3], False), ([3], [4], False)]
    plan = plan_steps(steps, {s: 4 for s in range(5)}, 4)
    assert plan.overwrite == [False, False, True, True]
    assert plan.free_after == [[0], [1], [2], [3]]
    # the padded image (slot 0) and its aliases are never overwritten
    plan = plan_steps([([0], [1], True), ([1], [2], False)], {0: 1, 1: 1, 2: 1}, 2)
    assert plan.overwrite == [False, False]
    assert plan.peak_channels == 2  # {0, 1} then {1, 2}


def test_torch_in_place_plan_is_exact_with_aliases_and_autograd(tb):
    """Nets whose in-place plan could clobber an aliased value, with and without autograd."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, variant):
            super().__init__()
            self.conv1, self.conv2, self.variant = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 4, 3), variant

        def forward(self, x):
            y = F.max_pool2d(self.conv1(x), 2)
            if self.variant == 0:
                y = F.relu(y.clone()) + y
            elif self.variant == 1:
                y = (F.relu(y.flatten(1)) + y.flatten(1)).view(y.shape)
            else:
                y = torch.relu(torch.tanh(torch.sigmoid(y)))
            return self.conv2(y).flatten(1)

    images = torch.randn(2, 1, 11, 13, dtype=torch.float64)
    for variant in range(3):
        net = Net(variant).double()
        ref = tb.FDFE.dense_reference(net, images, 8)
        ci = tb.FDFE.convert(net, 8, check=False)
        with torch.no_grad():
            assert max_rel_error(ci(images), ref) <= TOL["float64"], variant
        x = images.clone().requires_grad_(True)
        out = ci(x)
        assert max_rel_error(out.detach(), ref) <= TOL["float64"], variant
        out.square().sum().backward()  # no in-place op on a value saved for backward
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_naive_is_read_at_run_time(tb, kb):
    """``ci.naive = True`` after conversion switches to the per-shift path in both backends."""
    import tensorflow as tf
    import torch
    t_ci = tb.FDFE.convert(tb.BaseNet.BaseNet().double(), 15, tile=None)
    k_ci = kb.FDFE.convert(kb.BaseNet.BaseNet(dtype="float64"), 15)
    image = np.random.default_rng(5).standard_normal((1, 21, 17, 1))
    calls = []
    original = tb.FDFE._multi

    def spy(x, op, kernel, stride, dil, naive):
        calls.append(naive)
        return original(x, op, kernel, stride, dil, naive)
    tb.FDFE._multi = spy
    try:
        with torch.no_grad():
            t_ci.naive = True
            naive = t_ci(torch.from_numpy(image.transpose(0, 3, 1, 2)))
            assert calls and all(calls)
            calls.clear()
            t_ci.naive = False
            fast = t_ci(torch.from_numpy(image.transpose(0, 3, 1, 2)))
            assert calls and not any(calls)
    finally:
        tb.FDFE._multi = original
    assert max_rel_error(naive, fast) <= TOL["float64"]
    k_fast = k_ci(tf.constant(image))
    k_ci.naive = True
    layers = [l for l in k_ci.core._flatten_layers(include_self=False) if hasattr(l, "naive")]
    assert layers and all(l.naive for l in layers)
    assert max_rel_error(k_ci(tf.constant(image)), k_fast) <= TOL["float64"]
    clone = kb.FDFE.DenseFeatureModel.from_config(k_ci.get_config())
    assert clone.naive and all(l.naive for l in clone.core._flatten_layers(include_self=False)
                               if hasattr(l, "naive"))


def test_torch_self_check_catches_a_wrong_rule(tb, monkeypatch):
    """A deliberately wrong rule (tanh computed as sigmoid) makes convert raise 'internal check failed'."""
    import torch
    import torch.nn as nn
    FDFE = tb.FDFE

    def wrong_rule(node, geoms):
        return FDFE._CallStep(node, func=torch.sigmoid), [geoms[0]]
    for key in [k for k, rule in FDFE._RULES.items() if getattr(k, "__name__", "") == "tanh"]:
        monkeypatch.setitem(FDFE._RULES, key, wrong_rule)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2))
    with pytest.raises(FDFE.ConversionError, match=r"internal check failed: CI differs from Cp by [0-9.e-]+ "
                                                   r"\(scale [0-9.e-]+\) on a test image"):
        FDFE.convert(net, 6)
    FDFE.convert(net, 6, check=False)  # the check is what caught it


def test_keras_self_check_catches_a_wrong_rule(kb, monkeypatch):
    import keras
    FDFE = kb.FDFE

    def wrong_rule(call, geoms):
        return (lambda xs: [xs[0] * 2.0]), [geoms[0]]
    monkeypatch.setitem(FDFE._RULES, keras.layers.ReLU, wrong_rule)
    net = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3), keras.layers.ReLU(),
                            keras.layers.MaxPooling2D(2), keras.layers.Conv2D(2, 2)])
    with pytest.raises(FDFE.ConversionError, match=r"internal check failed: CI differs from Cp by [0-9.e-]+ "
                                                   r"\(scale [0-9.e-]+\) on a test image"):
        FDFE.convert(net, 6)


def test_self_check_compare_flags_nan(tb):
    with pytest.raises(tb.FDFE.ConversionError, match="internal check failed"):
        tb.FDFE._self_check_compare([1.0, float("nan")], [1.0, 2.0], "float64")
    tb.FDFE._self_check_compare([1.0, 2.0 + 1e-12], [1.0, 2.0], "float64")


def test_keras_convert_is_thread_safe(kb):
    """Another thread calling an unrelated Keras model while convert() records Cp's layers: nothing of
    it is recorded (the recording is per thread), every convert succeeds and is exact."""
    import threading
    import keras
    import tensorflow as tf
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten()])
    stop = threading.Event()
    calls = []

    def busy():
        x = tf.zeros((1, 8, 8, 3))
        while not stop.is_set():
            other(x)
            calls.append(1)
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        images = tf.constant(np.random.default_rng(0).standard_normal((1, 19, 17, 1)), tf.float32)
        for _ in range(3):
            net = kb.BaseNet.BaseNet()
            ci = kb.FDFE.convert(net, 15)
            assert max_rel_error(ci(images), kb.FDFE.dense_reference(net, images, 15)) <= TOL["float32"]
    finally:
        stop.set()
        thread.join()
    assert calls  # the other thread really ran


def test_keras_refusals_name_the_real_problem(kb):
    import keras
    L = keras.layers
    lstm = keras.Sequential([keras.Input((5, 5, 1)), L.Reshape((5, 5)), L.LSTM(3)])
    with pytest.raises(kb.FDFE.ConversionError, match=r"layer 'lstm[_0-9]*' \(LSTM\) is not supported by "
                                                      r"convert\(\) \(unknown layer kind\)"):
        kb.FDFE.convert(lstm, 5, in_channels=1)
    a, b = keras.Input((5, 5, 1)), keras.Input((5, 5, 1))
    two_inputs = keras.Model([a, b], L.Add()([L.Conv2D(2, 5)(a), L.Conv2D(2, 5)(b)]))
    with pytest.raises(kb.FDFE.ConversionError, match=r"takes 2 inputs; convert\(\) makes dense a network of "
                                                      r"one input patch"):
        kb.FDFE.convert(two_inputs, 5, in_channels=1)
    declared = keras.Sequential([keras.Input((16, 16, 1)), L.Conv2D(2, 3), L.GlobalMaxPooling2D()])
    for patch in (20, 15):
        with pytest.raises(kb.FDFE.ConversionError, match=rf"declares 16x16 input patches \(keras.Input\(16, 16, "
                                                          rf"1\)\), but patch_size is {patch}x{patch}; pass "
                                                          rf"patch_size=\(16, 16\)"):
            kb.FDFE.convert(declared, patch)


def test_torch_meta_device_cp_converts(tb):
    """A Cp on the meta device (no values) converts (no self-check possible) and gives CI's shapes."""
    import torch
    net = tb.BaseNet.BaseNet(weights=None).to("meta")
    ci = tb.FDFE.convert(net, 15)
    assert ci(torch.empty(2, 1, 30, 41, device="meta")).shape == (2, 113, 30, 41)
    ci.to_empty(device="cpu")  # materialised, it is an ordinary CI
    with torch.no_grad():
        for p in ci.parameters():
            p.copy_(torch.randn_like(p))
        images = torch.randn(1, 1, 20, 19)
        assert max_rel_error(ci(images), tb.FDFE.dense_reference(ci.base_net, images, 15)) <= TOL["float32"]


def test_empty_batch_gives_an_empty_output(tb, kb):
    """Batch 0: Cp accepts it, and so does CI (an empty (0, K, H, W) / (0, H, W, K) result, also at a step)."""
    import tensorflow as tf
    import torch
    t_ci = tb.FDFE.convert(tb.BaseNet.BaseNet(), 15)
    with torch.no_grad():
        assert t_ci(torch.zeros(0, 1, 20, 30)).shape == (0, 113, 20, 30)
    with pytest.raises(ValueError, match="has 3 channels but the network expects 1"):
        t_ci(torch.zeros(0, 3, 20, 30))
    k_ci = kb.FDFE.convert(kb.BaseNet.BaseNet(), 15)
    assert tuple(k_ci(tf.zeros((0, 20, 30, 1))).shape) == (0, 20, 30, 113)
    # at a step: the step's size; in PyTorch Cp's gradient path too (a loss on it backpropagates)
    t_ci = tb.FDFE.convert(tb.BaseNet.BaseNet(), 15, output_stride=(2, 3))
    images = torch.zeros(0, 1, 21, 31, requires_grad=True)
    out = t_ci(images)
    assert out.shape == (0, 113, 11, 11) and out.requires_grad
    out.sum().backward()
    assert images.grad is not None and images.grad.shape == images.shape
    with pytest.raises(ValueError, match=r"images must not be empty, got shape \(0, 1, 0, 5\)"):
        t_ci(torch.zeros(0, 1, 0, 5))
    k_ci = kb.FDFE.convert(kb.BaseNet.BaseNet(), 15, output_stride=(2, 3))
    assert tuple(k_ci(tf.zeros((0, 21, 31, 1))).shape) == (0, 11, 11, 113)


def test_torchscript_cp_is_refused_with_the_way_out(tb):
    import torch
    net = tb.BaseNet.BaseNet()
    traced = torch.jit.trace(net, torch.zeros(1, 1, 15, 15))
    with pytest.raises(TypeError, match=r"base_net is a TorchScript module .*; pass the original nn.Module"):
        tb.FDFE.convert(traced, 15)


def test_every_problem_is_named_at_once(tb, kb):
    """convert() lists every layer that cannot be made dense in one message, not one at a time."""
    import keras
    import torch.nn as nn
    L = keras.layers
    net = keras.Sequential([keras.Input((9, 9, 1)), L.Conv2D(4, 3, padding="same"), L.GroupNormalization(2),
                            L.Conv2D(4, 3, padding="same"), L.MaxPooling2D(3), L.Conv2D(2, 3)])
    with pytest.raises(kb.FDFE.ConversionError, match=r"Cp cannot be made dense exactly; 2 problems:\n  1\. "
                       r"layer 'conv2d[_0-9]*' \(Conv2D\), layer 'conv2d[_0-9]*' \(Conv2D\) cannot be made dense "
                       r"exactly: it pads its input \(padding='same'\).*\n  2\. layer 'group_normalization[_0-9]*' "
                       r"\(GroupNormalization\) cannot be made dense exactly: it normalises with statistics"):
        kb.FDFE.convert(net, 9)
    t_net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.MaxPool2d(3), nn.Conv2d(4, 2, 3))
    with pytest.raises(tb.FDFE.ConversionError, match=r"2 problems:\n  1\. 0 \(Conv2d\): torch\.conv2d cannot be "
                       r"made dense exactly: it pads its input.*\n  2\. 1 \(InstanceNorm2d\)"):
        tb.FDFE.convert(t_net, 9)


def test_torch_in_channels_from_the_first_module_applied(tb):
    """A Cp whose first registered convolution is not the first one applied: in_channels is that of the
    convolution that reads the input."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(8, 4, 3)   # registered first, applied last
            self.stem = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x)))
    net = Net().double()
    ci = tb.FDFE.convert(net, 5)
    assert ci.in_channels == 3
    images = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_error(ci(images), tb.FDFE.dense_reference(net, images, 5)) <= TOL["float64"]
