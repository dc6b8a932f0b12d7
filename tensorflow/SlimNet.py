"""SlimNet: CI for BaseNet, wired by hand from FDFE's building blocks (TensorFlow / Keras).

This file is a template (the original port's; StridedNet.py is a second one, for a net with a
strided convolution, batch normalisation, a Flatten + Dense head and an L2 normalisation).  To
make CI for your own patch network by hand:

  1. Copy it next to your BaseNet.
  2. List every stride of your Cp in ``self.strides``, in network order: each pooling layer's and
     each strided Conv2D's (their product pads the images and all of them are unwarped).
  3. In __init__, go through your Cp layer by layer:
       - a layer without pooling or striding (Conv2D with strides 1, activation, ...) is reused
         unchanged: ``self.x = base_net.x``;
       - a pooling layer becomes multipooling with the same kernel and stride
         (FDFE.multiMaxPooling / multiAvgPooling / multiLPPooling);
       - a strided Conv2D becomes ``FDFE.multiConv(base_net.conv)``;
       - batch normalisation, Flatten + Dense, normalisation: see StridedNet.py.
  4. Mirror your Cp's call in ``dense``, ending with ``self.unwarp([x, images])``; ``call`` runs it
     as one graph.  Save what the constructor needs in ``get_config`` (Cp's own config included).
  5. Keep ``check=True``: FDFE.check_ci compares the result with Cp on a few pixels.

No padding may happen inside Cp (see the README's limits).  FDFE.convert(base_net,
patch_size) does all of this automatically; this file shows what it builds.
"""

import FDFE
import keras
import tensorflow as tf


def _check_stride(pool, stride: int, name: str) -> None:
    """The strides given to SlimNet must be the ones the trained net pools with."""
    actual = pool.strides[0]
    if stride != actual:
        raise ValueError(f"{name}={stride} does not fit the net: its pooling layer pools with stride {actual}")


@keras.saving.register_keras_serializable(package="FDFE_examples")
class SlimNet(keras.Model):
    """CI for BaseNet: (N, H, W, 1) -> (N, H, W, 113), Cp's output for the patch around every pixel.

    Args:
        base_net: the trained BaseNet (its layers and weights are shared, not copied).
        pH, pW: patch size Cp was trained on (BaseNet: 14 to 17 with strides 2, 2).
        sL1, sL2: strides of BaseNet's two pooling layers.
        naive: paper-faithful multipooling (s*s shifted poolings) and per-layer unwarping;
            the default is one stride-1 pooling + space-to-batch and a single unwarping.
        check: compare CI with Cp on a few pixels of random test images (FDFE.check_ci) before
            returning.

    The image size is taken from the input at call time: any N, H, W >= 1.  Floating images of another
    precision are cast to the net's; integer images are refused (convert them, e.g.
    ``tf.cast(images, tf.float32) / 255``).  Called eagerly, CI runs as one graph; ``dense`` is the same
    computation layer by layer.  Saves and loads as a Keras model (``ci.save("ci.keras")``).

    Shape:
        (N, H, W, 1) -> (N, H, W, 113).
    """

    def __init__(self, base_net, pH: int, pW: int, sL1: int = 2, sL2: int = 2, naive: bool = False,
                 check: bool = True, **kwargs):
        kwargs.setdefault("autocast", False)  # call() casts the images to the net's dtype itself
        super().__init__(**kwargs)
        _check_stride(base_net.pool1, sL1, "sL1")
        _check_stride(base_net.pool2, sL2, "sL2")
        self.base_net = base_net  # saved with CI: its config in get_config, its weights in the file
        self.patch_size = (int(pH), int(pW))
        self.naive = bool(naive)
        self.out_channels = FDFE.check_patch_size(base_net, (pH, pW), in_channels=1)
        self.in_channels = 1
        self.strides = [(sL1, sL1), (sL2, sL2)]

        # Zero padding: a patch around every pixel, and the image size up to a multiple of sL1*sL2.
        self.prepare = FDFE.multiPoolPrepare(pH, pW, stride_product=sL1 * sL2)

        # Layers without pooling or striding: used unchanged (same layers, same weights).
        self.conv1, self.relu1 = base_net.conv1, base_net.relu1
        self.conv2, self.relu2 = base_net.conv2, base_net.relu2
        self.conv3, self.relu3 = base_net.conv3, base_net.relu3
        self.conv4 = base_net.conv4

        # Pooling layers -> multipooling with the same kernel and stride (kW, kH, dW, dH).
        k1, k2 = base_net.pool1.pool_size[0], base_net.pool2.pool_size[0]
        self.pool1 = FDFE.multiMaxPooling(k1, k1, sL1, sL1, naive=naive)
        self.pool2 = FDFE.multiMaxPooling(k2, k2, sL2, sL2, naive=naive)

        # Unwarping: undo the stacking of shifts (all layers, innermost last) and crop to the image.
        self.unwarp = FDFE.unwarpAll(self.strides, naive=naive)

        # Check the wiring against Cp (cheap: a few pixels of two small random images).
        if check:
            FDFE.check_ci(self, base_net, (pH, pW))

    def dense(self, images):
        """CI layer by layer: what call() runs (as one graph when called eagerly)."""
        x = self.prepare(images)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        x = self.conv4(x)
        return self.unwarp([x, images])

    def call(self, images):
        images = FDFE.check_images(images, self.in_channels, dtype=self.conv1.compute_dtype)
        # eagerly: one graph for every image size and batch (markedly faster than layer by layer)
        spec = tf.TensorSpec([None, None, None, self.in_channels], images.dtype)
        return FDFE.run_as_graph(self, self.dense, [images], [spec])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[2], self.out_channels)

    def get_config(self):
        (s1, _), (s2, _) = self.strides
        return {"base_net": keras.saving.serialize_keras_object(self.base_net), "pH": self.patch_size[0],
                "pW": self.patch_size[1], "sL1": int(s1), "sL2": int(s2), "naive": self.naive, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base_net = keras.saving.deserialize_keras_object(config.pop("base_net"))
        return cls(base_net, **config)
