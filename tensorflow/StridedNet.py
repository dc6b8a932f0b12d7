"""StridedNet: CI wired by hand for a descriptor net with a strided convolution, batch
normalisation, a Flatten + Dense head and an L2 normalisation (TensorFlow / Keras).

The second template next to SlimNet (whose BaseNet has only pooling and convolutions).  The
example Cp, StridedPatchNet, maps a 21x21 grey patch to a 32-vector of unit length:

    Conv2D 5x5 1->16, ReLU, MaxPooling2D 2,
    Conv2D 3x3 16->32, BatchNormalization, ReLU,
    Conv2D 2x2 32->32 strides 2, ReLU,        <- a strided convolution: it counts like a pooling layer
    Conv2D 2x2 32->64, Flatten (2x2x64),
    Dense 256->32, UnitNormalization

Each layer kind's hand-wired form (README, "Wiring CI by hand"):

    stride-1 Conv2D, activation     reused unchanged (same layer, same weights)
    pooling                         FDFE.multiMaxPooling / multiAvgPooling / multiLPPooling
    strided Conv2D                  FDFE.multiConv(conv)
    BatchNormalization              reused, called with training=False (moving statistics, per pixel)
    Flatten                         left out
    Dense after the Flatten         FDFE.linearAsConv(dense, in_shape=(h, w, C) of the flattened map)
    Dense after a Dense             FDFE.linearAsConv(dense)  (a 1x1 convolution)
    UnitNormalization(axis=-1)      reused unchanged: it normalises every pixel's vector
    Dropout                         left out (identity at inference)

and the strides: every pooling layer's and every strided convolution's, in network order, in
FDFE.multiPoolPrepare's stride product and in FDFE.unwarpAll's list.  FDFE.check_ci compares the
result with Cp on a few pixels (the constructor does it); FDFE.dense_reference runs Cp on every patch.

The CI is a real Keras model: called eagerly it runs as one traced graph (a cached tf.function),
and it saves and loads (``ci.save("ci.keras")``, ``keras.models.load_model``): get_config holds
Cp's config, the file holds the weights.

No padding may happen inside Cp (see the README's refusals).  FDFE.convert(base_net, 21) builds the
same CI automatically.
"""

import math

import FDFE
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="FDFE_examples")
class StridedPatchNet(keras.Model):
    """The example Cp: a 21x21 grey patch -> a 32-vector of unit length (a descriptor).

    Args:
        seed: seed of the random weights (Glorot-uniform kernels, small random biases; the batch
            normalisation gets random moving statistics, scale and offset, as after training).
        dtype: the layers' dtype ("float32" or "float64").

    Shape:
        (B, 21, 21, 1) -> (B, 32).  Patches of 20 to 23 pixels a side also give one vector.
    """

    def __init__(self, seed: int = 0, dtype="float32", **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        self.seed = int(seed)
        L, init = keras.layers, keras.initializers

        def conv(name, filters, size, strides=1, n=0):
            return L.Conv2D(filters, size, strides=strides, name=name, dtype=dtype,
                            kernel_initializer=init.GlorotUniform(seed=100 * seed + n),
                            bias_initializer=init.RandomUniform(-0.1, 0.1, seed=100 * seed + 50 + n))
        self.conv1 = conv("conv1", 16, 5, n=1)
        self.relu1 = L.ReLU(name="relu1", dtype=dtype)
        self.pool1 = L.MaxPooling2D(2, name="pool1", dtype=dtype)
        self.conv2 = conv("conv2", 32, 3, n=2)
        self.bn2 = L.BatchNormalization(
            epsilon=1e-5, name="bn2", dtype=dtype,
            gamma_initializer=init.RandomUniform(0.5, 1.5, seed=100 * seed + 10),
            beta_initializer=init.RandomUniform(-0.5, 0.5, seed=100 * seed + 11),
            moving_mean_initializer=init.RandomUniform(-0.5, 0.5, seed=100 * seed + 12),
            moving_variance_initializer=init.RandomUniform(0.5, 2.0, seed=100 * seed + 13))
        self.relu2 = L.ReLU(name="relu2", dtype=dtype)
        self.conv3 = conv("conv3", 32, 2, strides=2, n=3)
        self.relu3 = L.ReLU(name="relu3", dtype=dtype)
        self.conv4 = conv("conv4", 64, 2, n=4)
        self.flatten = L.Flatten(name="flatten", dtype=dtype)
        self.fc = L.Dense(32, name="fc", dtype=dtype, kernel_initializer=init.GlorotUniform(seed=100 * seed + 5),
                          bias_initializer=init.RandomUniform(-0.1, 0.1, seed=100 * seed + 55))
        self.l2 = L.UnitNormalization(axis=-1, name="l2", dtype=dtype)
        self.build((None, 21, 21, 1))

    def build(self, input_shape):
        for layer, channels in ((self.conv1, 1), (self.conv2, 16), (self.bn2, 32), (self.conv3, 32),
                                (self.conv4, 32)):
            layer.build((None, None, None, channels))
        self.fc.build((None, 2 * 2 * 64))
        super().build(input_shape)

    def get_config(self):
        return {"seed": self.seed, "dtype": self.dtype_policy.name, "name": self.name}

    def features(self, x, training=False):
        """The layers before the Flatten: (B, pH, pW, 1) -> (B, h, w, 64), h = w = 2 for 21x21 patches."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x), training=training))
        x = self.relu3(self.conv3(x))
        return self.conv4(x)

    def call(self, x, training=False):
        return self.l2(self.fc(self.flatten(self.features(x, training))))


@keras.saving.register_keras_serializable(package="FDFE_examples")
class StridedNet(keras.Model):
    """CI for StridedPatchNet: (N, H, W, 1) -> (N, H, W, 32), Cp's descriptor for the patch around every pixel.

    Args:
        base_net: the trained StridedPatchNet (its layers and weights are shared, not copied).
        pH, pW: patch size Cp was trained on (21 x 21).
        naive: paper-faithful multipooling (s*s shifted poolings and convolutions) and per-layer
            unwarping; the default is one stride-1 layer + space-to-batch and a single unwarping.
        check: compare CI with Cp on a few pixels of random test images (FDFE.check_ci) before
            returning; catches wiring mistakes when you adapt this file.

    The image size is taken from the input at call time: any N, H, W >= 1.  Floating images of another
    precision are cast to the net's; integer images are refused (convert them, e.g.
    ``tf.cast(images, tf.float32) / 255``).  Called eagerly, CI runs as one graph; ``dense`` is the same
    computation layer by layer.

    Shape:
        (N, H, W, 1) -> (N, H, W, 32).
    """

    def __init__(self, base_net, pH: int = 21, pW: int = 21, naive: bool = False, check: bool = True, **kwargs):
        kwargs.setdefault("autocast", False)  # call() casts the images to the net's dtype itself
        super().__init__(**kwargs)
        self.base_net = base_net  # saved with CI: its config in get_config, its weights in the file
        self.patch_size = (int(pH), int(pW))
        self.naive = bool(naive)
        self.in_channels = 1
        self.out_channels = FDFE.check_patch_size(base_net, (pH, pW), self.in_channels)

        # The map Cp flattens before its Dense layer, (h, w, C), at this patch size.
        patch = keras.ops.zeros((1, pH, pW, self.in_channels), dtype=base_net.conv1.compute_dtype)
        flattened = tuple(int(s) for s in base_net.features(patch, training=False).shape[1:])

        # 1. Every stride of Cp in network order, the strided convolution's included: (sh, sw) each.
        self.strides = [tuple(base_net.pool1.strides), tuple(base_net.conv3.strides)]
        self.stride_product = (math.prod(s[0] for s in self.strides), math.prod(s[1] for s in self.strides))

        # 2. Zero padding: a patch around every pixel, and the image size up to a multiple of the stride product.
        self.prepare = FDFE.multiPoolPrepare(pH, pW, stride_product=self.stride_product)

        # 3. Cp layer by layer.
        self.conv1, self.relu1 = base_net.conv1, base_net.relu1           # stride 1: unchanged
        (kh, kw), (sh, sw) = base_net.pool1.pool_size, self.strides[0]
        self.pool1 = FDFE.multiMaxPooling(kw, kh, sw, sh, naive=naive)    # pooling -> multipooling
        self.conv2, self.relu2 = base_net.conv2, base_net.relu2
        self.bn2 = base_net.bn2                                           # called with training=False
        self.conv3 = FDFE.multiConv(base_net.conv3, naive=naive)          # strided Conv2D -> multiConv
        self.relu3 = base_net.relu3
        self.conv4 = base_net.conv4
        # Flatten: left out.  The Dense after it: an h x w convolution on the (h, w, C) map Cp flattens.
        self.fc = FDFE.linearAsConv(base_net.fc, in_shape=flattened)
        self.l2 = base_net.l2                                             # over channels: per pixel, unchanged

        # 4. Unwarping: undo the stacking of shifts (every stride listed above) and crop to the image.
        self.unwarp = FDFE.unwarpAll(self.strides, naive=naive)

        # 5. Check the wiring against Cp (cheap: a few pixels of two small random images).
        if check:
            FDFE.check_ci(self, base_net, (pH, pW))

    def dense(self, images):
        """CI layer by layer: what call() runs (as one graph when called eagerly)."""
        x = self.prepare(images)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x), training=False))
        x = self.relu3(self.conv3(x))
        x = self.l2(self.fc(self.conv4(x)))
        return self.unwarp([x, images])

    def call(self, images):
        images = FDFE.check_images(images, self.in_channels, dtype=self.conv1.compute_dtype)
        # eagerly: one graph for every image size and batch (markedly faster than layer by layer)
        spec = tf.TensorSpec([None, None, None, self.in_channels], images.dtype)
        return FDFE.run_as_graph(self, self.dense, [images], [spec])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[2], self.out_channels)

    def get_config(self):
        return {"base_net": keras.saving.serialize_keras_object(self.base_net), "pH": self.patch_size[0],
                "pW": self.patch_size[1], "naive": self.naive, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base_net = keras.saving.deserialize_keras_object(config.pop("base_net"))
        return cls(base_net, **config)
