"""Bad input gets a clear error that names the problem; what cannot be exact is refused, with the reason."""

import re

import numpy as np
import pytest

from conftest import TOL, max_rel_error


# --- refusals of convert(): PyTorch ----------------------------------------------------------------

def _torch_refusal(tb, forward_modules, patch, match, in_channels=1, forward=None):
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(forward_modules)

        def forward(self, x):
            if forward is not None:
                return forward(self, x)
            for m in self.layers:
                x = m(x)
            return x
    with pytest.raises(tb.FDFE.ConversionError, match=match):
        tb.FDFE.convert(Net(), patch, in_channels=in_channels)


def test_torch_refuses_padded_convolution(tb):
    import torch.nn as nn
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5)], 5,
                   r"layers\.0 \(Conv2d\).*pads its input \(padding=\(1, 1\)\).*patch border")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3, padding="same"), nn.Conv2d(4, 2, 5)], 5,
                   r"layers\.0 \(Conv2d\).*pads its input \(padding='same'\)")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 2, 5)], 5,
                   r"layers\.0 \(Conv2d\): F\.pad cannot be made dense exactly: it pads an activation inside Cp")


def test_torch_names_a_parameter_expanded_to_the_batch(tb):
    """A parameter expanded to x.shape[0] is the same for every patch but is traced as one entry per patch of the
    example batch: the message says so and how to write it instead (not "differs across positions")."""
    import torch
    import torch.nn as nn

    class Cp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.token = nn.Conv2d(1, 4, 3), nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.token.expand(x.shape[0], -1, -1, -1)
    with pytest.raises(tb.FDFE.ConversionError, match=r"Tensor\.add.*one entry per patch of the example batch"
                                                      r".*p\.expand\(x\.shape\[0\].*broadcasting"):
        tb.FDFE.convert(Cp(), 3)


def test_torch_refuses_padded_pooling_and_partial_windows(tb):
    import torch.nn as nn
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(4, 2, 2)], 5,
                   r"layers\.1 \(MaxPool2d\).*pads its input \(padding=1\)")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.MaxPool2d(2, 2, ceil_mode=True), nn.Conv2d(4, 2, 3)], 6,
                   r"layers\.1 \(MaxPool2d\).*ceil_mode=True makes a last, partial window")


def test_torch_refuses_per_patch_normalisation(tb):
    import torch.nn as nn
    _torch_refusal(tb, [nn.InstanceNorm2d(1), nn.Conv2d(1, 2, 5)], 5,
                   r"layers\.0 \(InstanceNorm2d\).*statistics computed over each patch.*cannot be exact")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 4)], 5,
                   r"layers\.1 \(GroupNorm\).*statistics computed over each patch")

    def standardise(self, x):  # subtract the patch mean, divide by its standard deviation
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
        return self.layers[0](x)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5,
                   r"Tensor\.sub, Net\.forward: Tensor\.div cannot be made dense exactly: it combines a 1x5x5 map "
                   r"with a 1x1x1 map.*a statistic of the whole patch(.|\n)*Tensor\.std cannot be made dense exactly: "
                   r"it computes a statistic over positions of each patch", forward=standardise)

    def layer_norm(self, x):
        import torch.nn.functional as F
        return self.layers[0](F.layer_norm(x, x.shape[1:]))
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5,
                   r"F\.layer_norm cannot be made dense exactly: it normalises a 1x5x5 map over \(1, 5, 5\), "
                   r"with statistics of each patch", forward=layer_norm)
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 2, 4)], 5,
                   r"layers\.1 \(BatchNorm2d\).*no running statistics \(track_running_stats=False\)")


def test_torch_refuses_ops_that_mix_positions(tb):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.Linear(4, 3)], 5,
                   r"layers\.1 \(Linear\).*applied to a 4x4x4 map.*flatten the map first")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 5)], 5,
                   r"Tensor\.view .*reshapes \(2, 4, 1, 1\) to \(8,\), which moves values between patches",
                   forward=lambda self, x: self.layers[0](x).view(-1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2)], 5, r"torch\.roll is not supported.*unknown op",
                   forward=lambda self, x: torch.roll(self.layers[0](x), 1, 2).mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.MaxPool2d(2, return_indices=True)], 5,
                   r"layers\.1 \(MaxPool2d\).*returns pooling indices, which refer to positions inside one patch",
                   forward=lambda self, x: self.layers[1](self.layers[0](x))[0].flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 2, 3)], 5,
                   r"Tensor\.softmax .*along dim 1 of a flattened 2x3x3 map, which mixes positions of the patch",
                   forward=lambda self, x: self.layers[0](x).flatten(1).softmax(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.GLU(dim=2), nn.Flatten()], 5,
                   r"layers\.1 \(GLU\).*F\.glu .*along dim 2 of a 4x4x4 map.*only the channel axis")
    _torch_refusal(tb, [nn.Conv2d(1, 2, 3), nn.Flatten(), nn.GLU()], 5,
                   r"layers\.2 \(GLU\).*F\.glu .*along dim -1 of a flattened 2x3x3 map, which mixes positions")
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3), nn.Linear(3, 2)], 5,  # (the Linear after it is not judged again)
                   r"^[^\n]*Tensor\.permute cannot be made dense exactly: it transposes a 4x3x3 map "
                   r"\(dims \[0, 1, 3, 2\]\); CI keeps the channels of every pixel on dim 1.*1x1 Conv2d[^\n]*$",
                   forward=lambda self, x: self.layers[1](self.layers[0](x).permute(0, 1, 3, 2)).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(1, 2, 5)], 7,  # 3x3 maps at strides 2 and 1
                   r"torch\.cat .*combines a 2x3x3 map with a 2x3x3 map \(strides \[\(2, 2\)\] vs \[\]\); maps that "
                   r"went through different strides \(even where.*merge exactly only as one vector per "
                   r"position each", forward=lambda self, x: torch.cat([self.layers[0](x), self.layers[1](x)], 1))
    # ops over the batch of patches say so (they were "positions of the patch"), and index tensors are named
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"F\.softmax .*it works along dim 0, the batch of patches",
                   forward=lambda self, x: F.softmax(self.layers[0](x).flatten(1), 0))
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.std .*it computes a statistic over the batch of patches",
                   forward=lambda self, x: (self.layers[0](x) - self.layers[0](x).std(0, keepdim=True)).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"it indexes with \(<a constant tensor of shape \(2,\)>,\)",
                   forward=lambda self, x: self.layers[0](x).flatten(1)[torch.arange(x.shape[0]).flip(0)])
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2)], 5, r"Tensor\.flip cannot be made dense exactly: it reorders dims "
                   r"\[1, 2\], which moves values between positions",  # (was "unexpected arguments to Tensor.flip")
                   forward=lambda self, x: self.layers[0](x).flip(1, 2).mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2)], 5, r"Tensor\.sum cannot be made dense exactly: a reduction over the "
                   r"channels and positions with dtype=torch\.float64 \(cast before it instead: "
                   r"x\.to\(torch\.float64\)\.sum\(\(1, 2, 3\)\)\)",  # (was "per-patch normalisation")
                   forward=lambda self, x: self.layers[0](x).sum((1, 2, 3), dtype=torch.float64)[:, None])
    _torch_refusal(tb, [nn.Conv2d(1, 4, 2), nn.MultiheadAttention(4, 2, batch_first=True)], 5,  # (not is_nested)
                   r"Tensor\.transpose cannot be made dense exactly: it transposes the rows of a 4x4 map \(16x4, one "
                   r"per position\) \(dims \[1, 0\]\), which moves the rows \(positions of the patch: attention",
                   forward=lambda self, x: (lambda t: self.layers[1](t, t, t)[0].mean(1))(
                       self.layers[0](x).flatten(2).transpose(1, 2)))
    _torch_refusal(tb, [nn.Linear(2, 3).double(), nn.Conv2d(1, 2, 5)], 5,  # (a float64 head declared first)
                   r"should be the same -- convert ran Cp on float64 patches, the dtype of its first floating",
                   forward=lambda self, x: self.layers[0](self.layers[1](x).flatten(1).double()).float())


def test_torch_refuses_data_dependent_forward_and_non_vector_output(tb):
    import torch
    import torch.nn as nn

    def branchy(self, x):
        y = self.layers[0](x)
        return y if float(y.max()) > 0 else -y
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.__float__ reads the values of an activation",
                   forward=branchy)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 3)], 5, r"not a single vector.*\(2, 2, 3, 3\)")
    for forward in (lambda self, x: (self.layers[0](x) / x.shape[0]).flatten(1),  # (check=False gave a wrong CI)
                    lambda self, x: (self.layers[0](x) + float(len(x))).flatten(1)):
        _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.(div|add) cannot be made dense exactly: its operand "
                       r"2(\.0)? for a batch of 2 patches is 3(\.0)? for 3: it is computed from the batch size",
                       forward=forward)

    def writes_a_slice(self, x):
        y = self.layers[0](x)
        y[:, :1] = 0.0
        return y.flatten(1)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.__setitem__ writes into an activation in place.*torch\.where",
                   forward=writes_a_slice)

    def reads_its_bias(self, x):  # a parameter read as a number would stay at its value of conversion time
        return self.layers[0](x).flatten(1) * float(self.layers[0].bias[0]) + self.layers[0].bias.sum().item()
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.__float__ reads a value computed from Cp's parameters as "
                   r"a Python value.*load_state_dict", forward=reads_its_bias)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.__int__ reads a value computed from Cp's parameters",
                   forward=lambda self, x: self.layers[0](x).flatten(1) * int(self.layers[0].bias.sum() > -1e9))

    def zeroes_through_a_view(self, x):  # the clone's value changes through a view: CI cannot follow views
        scale = self.layers[0].bias.clone()
        scale[1:].zero_()
        return (self.layers[0](x) * scale.view(1, -1, 1, 1)).flatten(1)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.zero_ changed a value computed from Cp's parameters in "
                   r"place, and this one shares its memory \(a view\)", forward=zeroes_through_a_view)

    for draw in (lambda y: y * torch.rand(2, 1, 1), lambda y: y + 0.1 * torch.randn_like(y), lambda y: y.normal_()):
        _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"(torch|Tensor)\.(rand|randn_like|normal_) draws random numbers "
                       r"as Cp runs, so Cp's output changes from call to call",  # (was "internal check failed")
                       forward=lambda self, x, draw=draw: draw(self.layers[0](x)).flatten(1))
    class Shuffled(nn.Module):  # a draw from a generator seeded at every call is the same every time: converts
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 5)

        def forward(self, x):
            order = torch.randperm(4, generator=torch.Generator().manual_seed(7))
            return self.conv(x).index_select(1, order).flatten(1)
    shuffled, images = Shuffled(), torch.randn(1, 1, 9, 8)
    with torch.no_grad():
        assert (tb.FDFE.convert(shuffled, 5)(images) - tb.FDFE.dense_reference(shuffled, images, 5)).abs().max() < 1e-5
    conv = nn.Conv2d(1, 2, 5)
    for scripted in (torch.jit.script(conv), torch.jit.trace(conv, torch.zeros(1, 1, 5, 5))):
        with pytest.raises(tb.FDFE.ConversionError, match=r"module '0' of Cp is a TorchScript module \(\w+, from "
                           r"torch\.jit\.trace or torch\.jit\.script\).*put the original nn\.Module in its place"):
            tb.FDFE.convert(nn.Sequential(scripted, nn.Flatten()), 5)  # (was a message about hooks, or the next op)
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(tb.FDFE.ConversionError, match=r"Cp has lazy modules whose parameters are not created yet "
                                                      r"\(0, 4\): run Cp once on a batch of patches first "
                                                      r"\(cp\(torch\.zeros\(1, C, 8, 8\)\)\)"):
        tb.FDFE.convert(lazy, 8, in_channels=2)  # (was "running Cp on a batch of 2x8x8 patches failed")
    lazy(torch.randn(2, 2, 8, 8))
    images = torch.randn(1, 2, 11, 9)
    with torch.no_grad():
        assert (tb.FDFE.convert(lazy, 8)(images) - tb.FDFE.dense_reference(lazy, images, 8)).abs().max() < 1e-5

    def grows_its_bias(self, x):  # a forward that changes its own parameter: CI would repeat it at every call
        self.layers[0].bias.add_(1.0)
        return self.layers[0](x).flatten(1)
    _torch_refusal(tb, [nn.Conv2d(1, 2, 5)], 5, r"Tensor\.add_ changes the parameter or buffer 'layers\.0\.bias'",
                   forward=grows_its_bias)


def test_keras_in_channels_inferred_from_the_convolution_cp_calls_first(kb):
    """A subclassed Cp without keras.Input that creates its convolutions in another order than it calls them (or
    starts with a DepthwiseConv2D) got the channel count of the first one created, and convert failed: the count
    with which Cp runs on a patch is taken now."""
    import keras
    L = keras.layers

    class Cp(keras.Model):
        def __init__(self):
            super().__init__()
            self.second, self.first, self.head = L.Conv2D(5, 3), L.Conv2D(4, 3), L.Dense(3)

        def call(self, x):
            return self.head(keras.ops.mean(self.second(self.first(x)), axis=(1, 2)))

    class Depthwise(keras.Model):
        def __init__(self):
            super().__init__()
            self.depthwise, self.head = L.DepthwiseConv2D(3), L.Dense(3)

        def call(self, x):
            return self.head(keras.ops.mean(self.depthwise(x), axis=(1, 2)))
    for net, channels in ((Cp(), 2), (Depthwise(), 3)):
        net(np.zeros((1, 8, 8, channels), "float32"))
        images = np.random.default_rng(channels).standard_normal((1, 10, 9, channels)).astype("float32")
        ci = kb.FDFE.convert(net, 8)
        assert ci.in_channels == channels
        np.testing.assert_allclose(ci(images), kb.FDFE.dense_reference(net, images, 8), rtol=0, atol=1e-5)


# --- refusals of convert(): Keras ----------------------------------------------------------------------

def _keras_refusal(kb, layers, patch, match, channels=1):
    import keras
    net = keras.Sequential([keras.Input((patch, patch, channels))] + layers)
    with pytest.raises(kb.FDFE.ConversionError, match=match):
        kb.FDFE.convert(net, patch)


def test_keras_refusals(kb):
    import keras
    import tensorflow as tf
    L = keras.layers
    _keras_refusal(kb, [L.Conv2D(4, 3, padding="same"), L.Conv2D(2, 5)], 5,
                   r"layer 'conv2d.*' \(Conv2D\).*pads its input \(padding='same'\).*patch border")
    _keras_refusal(kb, [L.ZeroPadding2D(1), L.Conv2D(2, 7)], 5,
                   r"\(ZeroPadding2D\).*pads an activation inside Cp; inside Cp the padded border")
    _keras_refusal(kb, [L.Conv2D(4, 2), L.MaxPooling2D(2, padding="same"), L.Conv2D(2, 3)], 6,
                   r"\(MaxPooling2D\).*pads its input \(padding='same'\)")  # (5x5 map: it pads one row, column)
    _keras_refusal(kb, [L.Conv2D(4, 2), L.GroupNormalization(2), L.Conv2D(2, 4)], 5,
                   r"\(GroupNormalization\).*statistics computed over each patch")
    _keras_refusal(kb, [L.LayerNormalization(axis=[1, 2, 3]), L.Conv2D(2, 5)], 5,
                   r"\(LayerNormalization\).*normalises a 5x5x1 map over axes \[1, 2, 3\], "
                   r"with statistics of each patch")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Masking(0.0), L.Conv2D(2, 3)], 5,
                   r"\(Masking\) is not supported by convert\(\) \(unknown layer kind\)")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.PReLU(), L.Conv2D(2, 3)], 5,
                   r"\(PReLU\).*slopes differ per position \(use shared_axes=\[1, 2\]\)")
    _keras_refusal(kb, [L.Conv2D(2, 3)], 5, r"not a single vector.*\(2, 3, 3, 2\)")
    _keras_refusal(kb, [L.Conv2D(2, 3), L.Flatten(), L.Softmax()], 5,
                   r"\(Softmax\).*a flattened 3x3x2 map.*which mixes positions of the patch")
    _keras_refusal(kb, [L.Conv2D(2, 3), L.Flatten(), L.Activation("glu")], 5,
                   r"\(Activation\).*its gated linear unit.*a flattened 3x3x2 map.*which mixes positions")
    _keras_refusal(kb, [L.Conv2D(2, 3), L.Permute((1, 3, 2)), L.Flatten(), L.Dense(3)], 5,
                   r"\(Permute\).*it transposes a 3x3x2 map \(perm \[0, 1, 3, 2\]\); CI keeps the channels of every "
                   r"pixel on the last axis")
    _keras_refusal(kb, [L.Conv2D(2, 3), L.Lambda(lambda x: keras.ops.transpose(x, (0, 2, 1, 3))), L.Flatten()], 5,
                   r"\(Flatten\) cannot be made dense exactly: it is applied to a map with its positions transposed "
                   r"\(3x3x2\), a map transposed to \(N, w, h, C\) \(perm \(0, 2, 1, 3\) of a map")
    _keras_refusal(kb, [L.Conv2D(2, 3), L.Flatten(data_format="channels_first"), L.Dense(3)], 5,
                   r"\(Flatten\).*Flatten\(data_format='channels_first'\) moves axis 1 of \(\d, 3, 3, 2\) to the end "
                   r"before flattening, which reorders the values of a 3x3x2 map")
    for rows in [(9, 2), (9, 2, 1)]:  # (N, h*w, C) rows, and a 4-D reshape of them, are reordered too
        _keras_refusal(kb, [L.Conv2D(2, 3), L.Reshape(rows), L.Flatten(data_format="channels_first"), L.Dense(3)], 5,
                       r"\(Flatten\).*moves axis 1 of \(\d, 9, 2(, 1)?\) to the end .*a reshaped 3x3x2 map")
    # a problem after a refused layer is not guessed from the stand-in: the 36 rows reshaped back make a map
    inp = keras.Input((8, 8, 2))
    rows = L.Conv1D(4, 3, padding="same")(L.Reshape((36, 4))(L.Conv2D(4, 3)(inp)))
    with pytest.raises(kb.FDFE.ConversionError) as refused:
        kb.FDFE.convert(keras.Model(inp, L.Flatten()(L.Conv2D(3, 6)(L.Reshape((6, 6, 4))(rows)))), 8)
    assert "(Conv1D) is not supported" in str(refused.value) and "problems" not in str(refused.value)
    rows = L.Reshape((36, 4))(L.Conv2D(4, 3)(inp))  # a refused slice of rows, then a pooling of the stand-in
    with pytest.raises(kb.FDFE.ConversionError) as refused:
        kb.FDFE.convert(keras.Model(inp, L.GlobalAveragePooling1D()(L.Lambda(lambda r: r[:, 1:, :])(rows))), 8)
    assert "slices a reshaped 6x6x4 map" in str(refused.value) and "problems" not in str(refused.value)

    class ScaledByBatch(keras.Model):  # a rank-0 statistic of the whole batch (its square root crashed: IndexError)
        def __init__(self, statistic):
            super().__init__()
            self.conv, self.pool, self.statistic = L.Conv2D(4, 3), L.GlobalAveragePooling2D(), statistic

        def call(self, x):
            return self.pool(self.conv(x) / self.statistic(x))
    for statistic in (keras.ops.std, tf.math.reduce_std):
        net = ScaledByBatch(statistic)
        net(np.zeros((1, 7, 7, 3), "float32"))
        with pytest.raises(kb.FDFE.ConversionError, match=r"Mean.*cannot be made dense exactly: it reduces over the "
                                                          r"batch of patches"):
            kb.FDFE.convert(net, 7)


def test_keras_refuses_unknown_tensorflow_ops_between_layers(kb):
    """TensorFlow ops between layers are read from the traced graph (shared_tests/test_keras_ops.py); one
    without a rule is named, with where the user's code created it."""
    import keras
    import tensorflow as tf

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Conv2D(3, 3), keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.b(tf.roll(self.a(x), 1, axis=1))
    net = Net()
    net(np.zeros((1, 5, 5, 1), np.float32))
    with pytest.raises(kb.FDFE.ConversionError, match=r"TensorFlow op '.*Roll' \(Roll, created at "
                                                      r"test_errors.py:\d+\) is not supported by convert\(\) "
                                                      r"\(unknown op\)"):
        kb.FDFE.convert(net, 5)
    weight = np.random.default_rng(0).standard_normal((3, 3, 1, 2)).astype("float32")

    class Dilated(keras.Model):  # TensorFlow: space to batch, a convolution, batch to space (were "unknown op"s)
        def call(self, x):
            return keras.ops.mean(keras.ops.conv(x, weight, 1, "valid", dilation_rate=2), axis=(1, 2))
    with pytest.raises(kb.FDFE.ConversionError, match=r"1 problem:\n.*\(SpaceToBatchND, created at test_errors.py:"
                                                      r"\d+\), .*\(BatchToSpaceND, .*it moves positions of the patch "
                                                      r"into the batch.*use the layers \(Conv2D, DepthwiseConv2D with "
                                                      r"dilation_rate\) or tf.nn.conv2d\(..., dilations=d\)"):
        kb.FDFE.convert(Dilated(), 9, in_channels=1)


# --- bad input to CI, dense_reference, convert and SlimNet ------------------------------------------

def test_layers_forced_into_training_mode_are_refused_by_name(tb, kb):
    """Dropout and batch normalisation that Cp's forward / call() runs in training mode whatever Cp's mode
    (F.dropout(x, 0.5), whose default is training=True; layer(x, training=True)) draw random values or use
    statistics of the batch of patches: named, with the fix; they failed only the self-check, whose message
    named no layer.  p=0, and the flags of eval mode, convert."""
    import keras
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
    for forward, match in [
            (lambda s, x: F.dropout(conv(x), 0.5), r"F\.dropout .*drops random values \(training=True, p=0\.5\)"),
            (lambda s, x: F.dropout2d(conv(x), 0.3, True), r"F\.dropout2d .*training=self\.training"),
            (lambda s, x: torch.dropout(conv(x), 0.5, True), r"dropout .*\(train=True, p=0\.5\)"),
            (lambda s, x: F.rrelu(conv(x), training=True), r"F\.rrelu .*draws random slopes \(training=True\)"),
            (lambda s, x: F.batch_norm(conv(x), bn.running_mean, bn.running_var, training=True),
             r"F\.batch_norm .*training=True whatever Cp's mode, so it normalises with statistics of the batch")]:
        _torch_refusal(tb, [conv, bn], 5, match, forward=lambda s, x, f=forward: f(s, x).amax((2, 3)))
    net = nn.Sequential(conv, nn.Dropout(0.5), bn, nn.Dropout2d(0.5), nn.RReLU(), nn.Conv2d(4, 3, 3)).train()
    images = torch.randn(2, 1, 8, 9)
    with torch.no_grad():  # converted and compared in inference mode, the flags left as they were
        assert max_rel_error(tb.FDFE.convert(net, 5)(images), tb.FDFE.dense_reference(net, images, 5)) \
            <= TOL["float32"] and net.training

    L = keras.layers

    class Forced(keras.Model):
        def __init__(self, layer):
            super().__init__()
            self.conv, self.layer, self.head = L.Conv2D(4, 3), layer, L.GlobalMaxPooling2D()

        def call(self, x, training=None):
            return self.head(self.layer(self.conv(x), training=True))
    for layer, match in [(L.Dropout(0.5), r"layer 'dropout.*' \(Dropout\) .*training=True whatever Cp's mode, "
                                          r"so it draws random values"),
                         (L.GaussianNoise(0.1), r"\(GaussianNoise\) .*draws random values"),
                         (L.BatchNormalization(), r"\(BatchNormalization\) .*training=True whatever Cp's mode, "
                                                  r"so it normalises with statistics of the batch of patches")]:
        net = Forced(layer)
        net(np.zeros((1, 5, 5, 1), "float32"))
        with pytest.raises(kb.FDFE.ConversionError, match=match):
            kb.FDFE.convert(net, 5, in_channels=1)
    for layer in (L.Dropout(0.0), L.GaussianNoise(0.0)):  # nothing random
        net = Forced(layer)
        net(np.zeros((1, 5, 5, 1), "float32"))
        kb.FDFE.convert(net, 5, in_channels=1)


def test_an_inferred_channel_count_that_fails_says_so(tb, kb):
    """Cp whose first convolution is not a module / layer with in_channels (F.conv2d with its own weight):
    convert infers the channels of its first Conv2d; when Cp then fails, the error says the count was
    inferred and to pass in_channels= (it showed the framework's error alone); where Cp converts (an RGB Cp
    that makes its input grey first) and CI then gets images of other channels, CI's error says so too."""
    import keras
    import tensorflow as tf
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.conv = nn.Conv2d(4, 3, 3)

        def forward(self, x):
            return self.conv(F.conv2d(x, self.w)).flatten(1)
    with pytest.raises(tb.FDFE.ConversionError, match=r"4x5x5 patches failed: .* -- in_channels=4 was inferred "
                                                      r"from Cp's modules; pass in_channels="):
        tb.FDFE.convert(Net(), 5)
    tb.FDFE.convert(Net(), 5, in_channels=1)

    class Grey(nn.Module):  # RGB made grey inside Cp: convert infers 1 channel, and CI says so when given 3
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv(x.mean(1, keepdim=True)).flatten(1)
    images = torch.randn(2, 3, 6, 7)
    with pytest.raises(ValueError, match=r"images has 3 channels but the network expects 1 .*; convert inferred "
                                         r"in_channels=1 from Cp's first layer .* convert with in_channels=3"):
        tb.FDFE.convert(Grey(), 3)(images)
    with pytest.raises(ValueError, match=r"expects 1 \(layout is \(N, C, H, W\)\)$"):  # (given: no hint)
        tb.FDFE.convert(Grey(), 3, in_channels=1)(images)
    grey = Grey()
    with torch.no_grad():
        assert max_rel_error(tb.FDFE.convert(grey, 3, in_channels=3)(images),
                             tb.FDFE.dense_reference(grey, images, 3)) <= TOL["float32"]

    class KerasNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.w = self.add_weight(shape=(3, 3, 3, 4), initializer="random_normal")
            self.conv = keras.layers.Conv2D(3, 3)

        def call(self, x):
            return keras.ops.reshape(self.conv(tf.nn.conv2d(x, self.w, 1, "VALID")), (-1, 3))
    net = KerasNet()
    net(np.zeros((1, 5, 5, 3), "float32"))
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)5x5x4 patches failed: [^\x1b]* -- in_channels=4 was "
                                                      r"inferred from Cp's first Conv2D; pass in_channels="):
        kb.FDFE.convert(net, 5)
    kb.FDFE.convert(net, 5, in_channels=3)

    class KerasGrey(keras.Model):  # the same in Keras: its channels inferred from its first Conv2D
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3)

        def call(self, x):
            return keras.ops.reshape(self.conv(keras.ops.mean(x, -1, keepdims=True)), (-1, 3))
    grey = KerasGrey()
    grey(np.zeros((1, 3, 3, 3), "float32"))
    images = tf.random.normal((2, 6, 7, 3))
    with pytest.raises(ValueError, match=r"images has 3 channels but the network expects 1 .*; convert inferred "
                                         r"in_channels=1 from Cp's first Conv2D: .* convert with in_channels=3"):
        kb.FDFE.convert(grey, 3)(images)
    assert max_rel_error(kb.FDFE.convert(grey, 3, in_channels=3)(images),
                         kb.FDFE.dense_reference(grey, images, 3)) <= TOL["float32"]

    # grey by channel indices: Cp fails on the inferred single channel with an index error that names no channel
    # (the hint was given only where the framework's error mentioned channels)
    class IndexGrey(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv((0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]).flatten(1)
    with pytest.raises(tb.FDFE.ConversionError, match=r"1x3x3 patches failed: IndexError: .* -- in_channels=1 was "
                                                      r"inferred from Cp's modules; pass in_channels="):
        tb.FDFE.convert(IndexGrey(), 3)

    class KerasIndexGrey(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3)

        def call(self, x):
            grey = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
            return keras.ops.reshape(self.conv(grey[..., None]), (-1, 3))
    grey = KerasIndexGrey()
    grey(np.zeros((1, 3, 3, 3), "float32"))
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)3x3x1 patches failed: .* -- in_channels=1 was inferred "
                                                      r"from Cp's first Conv2D; pass in_channels="):
        kb.FDFE.convert(grey, 3)


def test_torch_bad_inputs(tb):
    import torch
    net = tb.BaseNet.BaseNet()
    ci = tb.FDFE.convert(net, 15)
    with pytest.raises(ValueError, match=r"rank 4 \(N, C, H, W\).*\(5, 5\)"):
        ci(torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"3 channels but the network expects 1"):
        ci(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"floating-point.*torch.int64"):
        ci(torch.ones(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"images must not be empty, got shape \(1, 1, 0, 8\)"):
        ci(torch.randn(1, 1, 0, 8))
    with pytest.raises(ValueError, match=r"patch_size must be at least 1, got 0"):
        tb.FDFE.convert(net, 0)
    with pytest.raises(TypeError, match=r"patch_size must be an int or a pair of ints, got '15'"):
        tb.FDFE.convert(net, "15")
    with pytest.raises(tb.FDFE.ConversionError, match=r"running Cp on a batch of 1x7x7 patches failed: .*"
                       r"the patch 7x7 may be smaller"):
        tb.FDFE.convert(net, 7)
    with pytest.raises(tb.FDFE.ConversionError, match=r"not a single vector: .* gave shape \(\d, 113, 2, 2\)"):
        tb.FDFE.convert(net, 21)
    with pytest.raises(ValueError, match=r"in_channels cannot be inferred from base_net \(no module has "
                                         r"in_channels\)"):
        tb.FDFE.convert(torch.nn.Sequential(torch.nn.Tanh()), 3)
    with pytest.raises(ValueError, match=r"positions must lie inside the images: 0 <= n < N, 0 <= y < H, 0 <= x < W"):
        tb.FDFE.patch_outputs(net, torch.randn(1, 1, 4, 4), 15, [[0, 4, 0]])
    with pytest.raises(ValueError, match=r"sL1=3 does not fit the net: its pooling layer pools with stride 2"):
        tb.SlimNet.SlimNet(net, 15, 15, sL1=3)
    with pytest.raises(ValueError, match=r"patch 5x5 does not fit the net \(smaller than its receptive "
                                         r"field needs\?\)"):
        tb.SlimNet.SlimNet(net, 5, 5)
    with pytest.raises(ValueError, match=r"patch 19x19 does not fit the net.*not a single vector"):
        tb.SlimNet.SlimNet(net, 19, 19)


def test_keras_bad_inputs(kb):
    import keras
    import tensorflow as tf
    net = kb.BaseNet.BaseNet()
    ci = kb.FDFE.convert(net, 15)
    with pytest.raises(ValueError, match=r"rank 4 \(N, H, W, C\).*\(5, 5\)"):
        ci(tf.random.normal((5, 5)))
    with pytest.raises(ValueError, match=r"3 channels but the network expects 1"):
        ci(tf.random.normal((1, 8, 8, 3)))
    with pytest.raises(TypeError, match=r"floating-point.*int32"):
        ci(tf.ones((1, 8, 8, 1), tf.int32))
    images = tf.random.normal((2, 9, 8, 1))  # inputs= names the images, as for Keras' own models (a TypeError)
    assert np.array_equal(ci(inputs=images), ci(images)) and np.array_equal(ci(images=images, training=False),
                                                                            ci(images))
    for call in (lambda: ci(), lambda: ci(images, inputs=images)):
        with pytest.raises(TypeError, match=r"CI takes one batch of images: ci\(images\), ci\(images=x\) or "
                                            r"ci\(inputs=x\)"):
            call()
    with pytest.raises(ValueError, match=r"patch_size must be at least 1, got \(15, 0\)"):
        kb.FDFE.convert(net, (15, 0))
    with pytest.raises(kb.FDFE.ConversionError, match=r"(?s)running Cp on a batch of 7x7x1 patches failed: .*"
                       r"the patch 7x7 may be smaller"):
        kb.FDFE.convert(net, 7)
    with pytest.raises(ValueError, match=r"positions must lie inside the images: 0 <= n < N, 0 <= y < H, 0 <= x < W"):
        kb.FDFE.patch_outputs(net, tf.random.normal((1, 4, 4, 1)), 15, np.array([[1, 0, 0]]))
    unbuilt = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.Flatten()], name="unbuilt")
    with pytest.raises(ValueError, match=r"in_channels cannot be inferred from base_net \(unbuilt\): it declares no "
                                         r"input \(no keras.Input\) and has no built convolution"):
        kb.FDFE.convert(unbuilt, 3)
    with pytest.raises(ValueError, match=r"sL2=3 does not fit the net: its pooling layer pools with stride 2"):
        kb.SlimNet.SlimNet(net, 15, 15, sL2=3)
    for patch in (5, 9):  # 9: a map below the pooling window, which oneDNN's pooling reports as AbortedError
        with pytest.raises(ValueError, match=rf"patch {patch}x{patch} does not fit the net \(smaller than its "
                                             rf"receptive field needs\?\)"):
            kb.SlimNet.SlimNet(net, patch, patch)


# --- the weights file ----------------------------------------------------------------------------------

@pytest.fixture(params=["torch", "keras"])
def basenet_module(request, tb, kb):
    return tb.BaseNet if request.param == "torch" else kb.BaseNet


def test_public_functions_name_bad_arguments(tb, kb):
    """Budgets, tiles, image sizes, channel counts, LP powers and map ranks are checked where they come in, with
    a message naming the argument (they once ended in a TypeError deep inside, a ZeroDivisionError, a negative
    estimate or an empty tile list), in both backends."""
    import tensorflow as tf
    import torch
    import torch.nn as nn
    t_net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Flatten())
    t_ci = tb.FDFE.convert(t_net, 6)
    for fdfe, convert in [(tb.FDFE, lambda **kw: tb.FDFE.convert(t_net, 6, **kw)),
                          (kb.FDFE, lambda **kw: kb.FDFE.convert(kb.BaseNet.BaseNet(), 15, **kw))]:
        for budget in (-1, 0, "1GB"):
            with pytest.raises(ValueError, match=r"max_memory must be None or a positive number of bytes"):
                convert(max_memory=budget)
        for tile in ((0, 2), (-4, 4)):
            with pytest.raises(ValueError, match=r"tile must be at least 1"):
                fdfe.tile_grid(10, 10, tile, (2, 2))
        with pytest.raises(ValueError, match=r"in_channels must be None or a positive int, got -1"):
            fdfe.check_images(np.zeros((1, 4, 4, 1), np.float32) if fdfe is kb.FDFE else torch.zeros(1, 1, 4, 4), -1)
        with pytest.raises(ValueError, match=r"norm_type \(the power p\) must be a nonzero number, got 0"):
            fdfe.multiLPPooling(0, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"image_size must be at least 1, got \(-10, 10\)"):
        t_ci.estimate_memory((-10, 10))
    with pytest.raises(ValueError, match=r"space_to_batch: x must be a \(B, C, H, W\) map, got shape \(2, 11, 13\)"):
        tb.FDFE.space_to_batch(torch.zeros(2, 11, 13), 2)
    with pytest.raises(ValueError, match=r"space_to_batch: x must be a \(B, H, W, C\) map, got shape \(2, 11, 13\)"):
        kb.FDFE.space_to_batch(tf.zeros((2, 11, 13)), 2)
    with pytest.raises(TypeError, match=r"got a RaggedTensor; convert it first \(\.to_tensor\(\)"):
        kb.FDFE.check_images(tf.RaggedTensor.from_row_lengths(tf.zeros((3, 4, 4, 1)), [1, 2]))


def test_missing_weights_file(basenet_module, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nothere\.npz.*make_weights"):
        basenet_module.BaseNet(weights=str(tmp_path / "nothere.npz"))


def test_corrupt_weights_file(basenet_module, tmp_path):
    from conftest import WEIGHTS_DIR
    good = open(f"{WEIGHTS_DIR}/basenet.npz", "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all" * 10)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF                       # one bit flip inside the data: CRC mismatch
    bitflip = tmp_path / "bitflip.npz"
    bitflip.write_bytes(bytes(flipped))
    for path in (truncated, garbage, bitflip):
        with pytest.raises(ValueError, match=rf"weights file .*{re.escape(path.name)} is corrupt or not an \.npz "
                                             r"archive"):
            basenet_module.BaseNet(weights=str(path))
    pickled = tmp_path / "pickled.npz"
    arrays = dict(np.load(f"{WEIGHTS_DIR}/basenet.npz"))
    arrays["conv1.bias"] = np.array([object()], dtype=object)
    np.savez(pickled, **arrays)
    with pytest.raises(ValueError, match=r"corrupt or not an \.npz archive.*allow_pickle"):
        basenet_module.BaseNet(weights=str(pickled))
    arrays = dict(np.load(f"{WEIGHTS_DIR}/basenet.npz"))
    arrays["conv2.bias"] = arrays["conv2.bias"] * np.nan
    nan = tmp_path / "nan.npz"
    np.savez(nan, **arrays)
    with pytest.raises(ValueError, match=r"conv2\.bias holds NaN"):
        basenet_module.BaseNet(weights=str(nan))


def test_mismatched_weights_file(basenet_module, tmp_path):
    from conftest import WEIGHTS_DIR
    arrays = dict(np.load(f"{WEIGHTS_DIR}/basenet.npz"))
    wrong = dict(arrays, **{"conv3.weight": arrays["conv3.weight"][:, :, :1, :1]})
    path = tmp_path / "wrong.npz"
    np.savez(path, **wrong)
    with pytest.raises(ValueError, match=r"does not match BaseNet: conv3\.weight has shape \(128, 16, 1, 1\)"):
        basenet_module.BaseNet(weights=str(path))
    missing = {k: v for k, v in arrays.items() if k != "conv4.bias"}
    np.savez(path, **missing)
    with pytest.raises(ValueError, match=r"missing \['conv4\.bias'\]"):
        basenet_module.BaseNet(weights=str(path))


def test_transposed_maps_refuse_what_is_not_per_position_along_their_channels(tb, kb):
    """After a map's channels are moved to the other end (PyTorch dim -1, Keras axis 1), only ops per position along
    the channels and the transpose back convert; the rest is refused by name, and the transpose back after a refused
    op is no second problem."""
    import keras
    import torch
    import torch.nn as nn
    after = r"[^\n]*cannot be made dense exactly: "
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(3)], 5,
                   r"^[^\n]*layers\.1 \(BatchNorm2d\)" + after + r"it is applied to a transposed map \(3x3x4\), the "
                   r"channels moved to dim -1 by a transpose;.*transpose it back first \(x\.permute\(0, 3, 1, 2\)\)$",
                   forward=lambda self, x: self.layers[1](self.layers[0](x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                   .mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.flatten" + after + r"it reshapes a transposed map "
                   r"\(3x3x4\) \(2, 3, 3, 4\) to \(2, 36\): the values of a transposed map are not in "
                   r"\(C, h, w\) order",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.mean" + after + r"it reduces the channels of a transposed "
                   r"map \(3x3x4\) without keepdim=True",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).mean(-1).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.mean" + after + r"it reduces a transposed map \(3x3x4\) "
                   r"over dims \[1\], which mixes positions of the patch",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).mean(1, keepdim=True).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"^[^\n]*Tensor\.softmax" + after + r"it works along dim 1 of a "
                   r"transposed map \(3x3x4\), which mixes positions of the patch[^\n]*$",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).softmax(1).permute(0, 3, 1, 2)
                   .mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.mul" + after + r"a constant of shape \(3, 3, 4\) differs "
                   r"across positions of the patch \(a transposed map \(3x3x4\)\)",
                   forward=lambda self, x: (self.layers[0](x).permute(0, 2, 3, 1) * torch.arange(36.0).view(3, 3, 4))
                   .permute(0, 3, 1, 2).mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"^[^\n]*Tensor\.permute" + after + r"it transposes a map with its "
                   r"positions transposed \(3x3x4\) \(dims \[0, 3, 1, 2\]\); a transposed map can only be transposed "
                   r"back[^\n]*$",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).transpose(1, 2).permute(0, 3, 1, 2)
                   .mean((2, 3)))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.__getitem__" + after + r"it indexes a transposed map "
                   r"\(3x3x4\) with integers, which drop axes of a transposed map",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1)[:, 0].flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.mean" + after + r"it reduces over the batch of patches",
                   forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1).mean(0, keepdim=True).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.std" + after + r"it reduces a transposed map \(3x3x4\) "
                   r"over dims \[1, 2\], which mixes positions of the patch;.*\(only mean, sum, amax and amin, without "
                   r"dtype=, pool them globally\)", forward=lambda self, x: self.layers[0](x).permute(0, 2, 3, 1)
                   .std((1, 2)))
    _torch_refusal(tb, [nn.Conv2d(1, 3, 3)], 5, r"^[^\n]*Tensor\.add" + after + r"it combines a 3x3x3 map with a "
                   r"transposed map \(3x3x3\); one holds the channels of every position "
                   r"where a transpose moved them and the other does not[^\n]*$",
                   forward=lambda self, x: (lambda m: m + m.permute(0, 2, 3, 1))(self.layers[0](x)).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"Tensor\.matmul" + after + r"it multiplies a 4x3x3 map by a "
                   r"matrix; only a transposed map \(x\.permute\(0, 2, 3, 1\)\) times a \(C, K\) weight",
                   forward=lambda self, x: (self.layers[0](x) @ torch.ones(3, 3)).flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"einsum" + after + r"it moves or contracts other axes of the map; "
                   r"only an einsum of a map and a \(C, K\) weight over the channels of every position",
                   forward=lambda self, x: torch.einsum("nchw,ck->nkwh", self.layers[0](x), torch.ones(4, 2))
                   .flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"einsum" + after + r"it moves or contracts other axes of the map",
                   forward=lambda self, x: torch.einsum("...chw,ck->...hwk", self.layers[0](x), torch.ones(4, 2))
                   .flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3)], 5, r"einsum" + after + r"it multiplies two activations",
                   forward=lambda self, x: (lambda m: torch.einsum("nchw,nkhw->nck", m, m))(self.layers[0](x))
                   .flatten(1))
    _torch_refusal(tb, [nn.Conv2d(1, 4, 3), nn.Linear(4, 4)], 5, r"Tensor\.mul" + after + r"it combines a 4x3x3 map "
                   r"with a 4x1x1 map.*a squeeze-and-excitation gate is one; where the gated map is pooled over the "
                   r"patch next, pool first", forward=lambda self, x: (lambda y: y * torch.sigmoid(self.layers[1](
                       y.mean((2, 3))))[:, :, None, None])(self.layers[0](x)).mean((2, 3)))
    L = keras.layers
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Lambda(lambda t: t * keras.ops.sigmoid(keras.ops.mean(t, axis=(1, 2),
                                                                                                 keepdims=True))),
                        L.GlobalAveragePooling2D()], 5, r"\(Mul, created at.*a value of the whole patch.*a "
                   r"squeeze-and-excitation gate is such a value; where the gated map is pooled over the patch next, "
                   r"pool first")
    swap = np.ones((4, 2), "float32")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Lambda(lambda t: keras.ops.einsum("nhwc,ck->nwhk", t, swap)), L.Flatten()],
                   5, r"\(Einsum, created at" + after + r"it moves or contracts other axes of the map")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Lambda(lambda t: keras.ops.einsum("...hwc,ck->...whk", t, swap)),
                        L.Flatten()], 5, r"\(Einsum, created at" + after + r"it moves or contracts other axes")
    back, pool = L.Permute((2, 3, 1)), L.GlobalAveragePooling2D()
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.BatchNormalization(axis=1), back, pool], 5,
                   r"^[^\n]*\(BatchNormalization\)" + after + r"it is applied to a transposed map \(4x3x3\), the "
                   r"channels moved to axis 1 by a transpose;.*transpose it back first \(perm \(0, 2, 3, 1\)\)$")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Lambda(lambda t: t[:, :, 0]), L.Flatten()], 5,
                   r"\(StridedSlice, created at" + after + r"it takes a reversed or reordered slice of "
                   r"positions;.*; of a transposed map, only those that keep it one or give the values of the map "
                   r"transposed back in their order")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Dense(3), L.Permute((2, 3, 1)), pool], 5,
                   r"^[^\n]*\(Dense\)" + after + r"it is applied to a transposed map \(4x3x3\)[^\n]*$")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.LayerNormalization(), L.Permute((2, 3, 1)), pool], 5,
                   r"^[^\n]*\(LayerNormalization\)" + after + r"it works along axis \[-1\] of a transposed map "
                   r"\(4x3x3\), "
                   r"which mixes positions of the patch[^\n]*$")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Rescaling([1.0, 2.0, 3.0]), L.Permute((2, 3, 1)),
                        pool], 5, r"\(Rescaling\)" + after + r"its scale or offset has one entry per channel of the "
                   r"last axis, which is not the channel axis of a transposed map")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Lambda(lambda t: t * keras.ops.ones((3,))),
                        L.Permute((2, 3, 1)), pool], 5,
                   r"^[^\n]*\(Mul, created at[^\n]*" + after + r"it combines a transposed map \(4x3x3\) with a "
                   r"value of "
                   r"shape \[3\], which differs per position of the patch[^\n]*$")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)),
                        L.Lambda(lambda t: keras.ops.prod(t, axis=(2, 3), keepdims=True)), L.Flatten()], 5,
                   r"\(Prod, created at.*it reduces a transposed map \(4x3x3\) over its positions with Prod; only "
                   r"mean, max, min and sum over positions \(global pooling\) can be made dense")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Lambda(lambda t: keras.ops.mean(t, axis=1)),
                        L.Flatten()], 5, r"\(Mean, created at.*it reduces the channels of a transposed map \(4x3x3\) "
                   r"without keepdims=True")
    _keras_refusal(kb, [L.Conv2D(4, 3), L.Permute((3, 1, 2)), L.Permute((1, 3, 2)), L.Permute((2, 3, 1)), pool], 5,
                   r"^[^\n]*\(Permute\)" + after + r"it transposes a transposed map \(4x3x3\) \(perm \[0, 1, 3, 2\]\); "
                   r"a transposed map can only be transposed back[^\n]*$")


def test_upsampling_and_resizing_are_refused_by_name(tb, kb):
    """Upsampling, resizing and transposed convolutions inside Cp: the resized maps of neighbouring patches are not
    shifted copies of one another, so no dense map holds them; refused with that reason (they were unknown ops).  A
    transposed convolution at stride 1 pads; F.interpolate names the slice that downsamples."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Interpolate(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=0.5)
    cases = [(nn.Upsample(scale_factor=2), 4, r"F\.interpolate cannot be made dense exactly: it resizes a map; the "
              r"resized maps of neighbouring patches are not shifted copies"),
             (nn.UpsamplingBilinear2d(scale_factor=2), 4, r"F\.interpolate .*it resizes a map"),
             (Interpolate(), 4, r"it resizes a map;.*x\[:, :, ::s, ::s\], which converts"),
             (nn.PixelShuffle(2), 1, r"torch\.pixel_shuffle cannot be made dense exactly: it resizes a map"),
             (nn.ConvTranspose2d(4, 4, 2, 2), 4, r"torch\.conv_transpose2d .*it resizes a map"),
             (nn.ConvTranspose2d(4, 4, 1), 4, r"a 1x1 transposed convolution at stride 1 is a 1x1 convolution"),
             (nn.ConvTranspose2d(4, 4, 3), 4, r"a transposed convolution at stride 1 pads its input by the kernel "
              r"size - 1 on every side; inside Cp the padded border")]
    for layer, channels, says in cases:
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), layer, nn.Conv2d(channels, 5, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        with pytest.raises(tb.FDFE.ConversionError, match=says):
            tb.FDFE.convert(net, 10)
    # Keras: the layers, and the ops in call()
    import keras
    import tensorflow as tf
    L = keras.layers
    resized = r"it resizes a map; the resized maps of neighbouring patches are not shifted copies"
    cases = [(L.UpSampling2D(2), r"\(UpSampling2D\) cannot be made dense exactly: " + resized),
             (L.Resizing(8, 8), r"\(Resizing\) .*" + resized),
             (L.Conv2DTranspose(4, 2, 2), r"\(Conv2DTranspose\) .*" + resized),
             (L.Conv2DTranspose(4, 3), r"a transposed convolution at stride 1 pads its input"),
             (L.Conv2DTranspose(4, 1), r"a 1x1 transposed convolution at stride 1 is a 1x1 convolution"),
             (L.Lambda(lambda t: tf.image.resize(t, (8, 8))), r"\(ResizeBilinear, created at .*" + resized),
             (L.Lambda(lambda t: tf.nn.depth_to_space(t, 2)), r"\(DepthToSpace, created at .*" + resized)]
    for layer, says in cases:
        inp = keras.Input((10, 10, 3))
        y = layer(L.MaxPooling2D(2)(L.Conv2D(4, 3)(inp)))
        cp = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(5, 1)(y)))
        with pytest.raises(kb.FDFE.ConversionError, match=says):
            kb.FDFE.convert(cp, 10)
    inp = keras.Input((10, 10, 3))  # an UpSampling2D of size 1 (and a Resizing to the same size) pass values through
    x = L.Resizing(4, 4)(L.UpSampling2D(1)(L.MaxPooling2D(2)(L.Conv2D(4, 3)(inp))))
    cp = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(5, 1)(x)))
    images = np.random.default_rng(0).standard_normal((2, 13, 11, 3)).astype("float32")
    assert max_rel_error(kb.FDFE.convert(cp, 10)(images), kb.FDFE.dense_reference(cp, images, 10)) <= TOL["float32"]
