"""Benchmark: ConvNeXt-style blocks written with transposes against the same blocks written with 1x1 convolutions.

A block (a valid 3x3 depthwise convolution, a layer norm over the channels, a 4x MLP over the channels with GELU,
a residual) can be written on a transposed map (PyTorch: x.permute(0, 2, 3, 1), LayerNorm, Linear, permute
back; Keras: Permute((3, 1, 2)), LayerNormalization(axis=1), Permute((2, 3, 1)) around a Dense-free norm) or
directly on the map (1x1 convolutions, a channel norm over dim 1; Keras: LayerNormalization(axis=-1), Dense on
the map).  Both forms have the same weights; their CIs are timed in turns in one process (the one that goes
first alternates) and their outputs compared.  CI runs the transposes on its dense values as they are, so the
two should cost the same.

    python bench/transposed.py [--sizes 240x320,480x640] [--threads 2] [--repeats 7]
                               [--out bench/RESULTS_transposed.md]
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench.py, before torch is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import sys  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # appended: never ahead of site-packages

from backends import load_backend  # noqa: E402
from timing import pair_rows, report  # noqa: E402

CHANNELS, PATCH = 48, 16  # conv 3x3, max pool 2, two blocks, conv 3x3: a 16x16 patch to one vector


def torch_pair(threads):
    """(label, transposed CI, 1x1-convolution CI, image maker, run) for PyTorch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fdfe = load_backend("pytorch", "torch").FDFE
    c = CHANNELS

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.norm = nn.Conv2d(c, c, 3, groups=c), nn.LayerNorm(c)
            self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):
            y = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
            return x[:, :, 1:-1, 1:-1] + y

    class Convolutions(nn.Module):  # the same block on the map: a channel norm over dim 1, 1x1 convolutions
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, x):
            t = self.t
            y = t.dw(x)
            y = (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, keepdim=True, unbiased=False) + t.norm.eps)
            y = y * t.norm.weight[:, None, None] + t.norm.bias[:, None, None]
            y = F.conv2d(F.gelu(F.conv2d(y, t.pw1.weight[:, :, None, None], t.pw1.bias)),
                         t.pw2.weight[:, :, None, None], t.pw2.bias)
            return x[:, :, 1:-1, 1:-1] + y
    blocks = [Transposed(), Transposed()]
    head = [nn.Conv2d(1, c, 3), nn.MaxPool2d(2)]
    transposed = nn.Sequential(*head, *blocks, nn.Conv2d(c, 16, 3), nn.Flatten()).eval()
    convolutions = nn.Sequential(*head, *[Convolutions(b) for b in blocks], transposed[-2], nn.Flatten()).eval()

    def run(ci, image):
        with torch.inference_mode():
            return ci(image).numpy()
    return (f"PyTorch {torch.__version__}", fdfe.convert(transposed, PATCH, check=False),
            fdfe.convert(convolutions, PATCH, check=False), lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2)), run)


def keras_pair(threads):
    """The same for Keras: a norm through (N, C, h, w) against LayerNormalization(axis=-1)."""
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    fdfe = load_backend("tensorflow", "tf").FDFE
    L, c = keras.layers, CHANNELS
    keras.utils.set_random_seed(0)

    def build(transposed, shared=None):
        inp = keras.Input((PATCH, PATCH, 1))
        x = L.MaxPooling2D(2)(L.Conv2D(c, 3)(inp))
        layers = []
        for i in range(2):
            dw = L.DepthwiseConv2D(3) if shared is None else shared[i][0]
            norm = L.LayerNormalization(axis=1 if transposed else -1, epsilon=1e-5)
            pw1 = L.Dense(4 * c, activation="gelu") if shared is None else shared[i][2]
            pw2 = L.Dense(c) if shared is None else shared[i][3]
            y = dw(x)
            y = L.Permute((2, 3, 1))(norm(L.Permute((3, 1, 2))(y))) if transposed else norm(y)
            x = L.Add()([L.Cropping2D(1)(x), pw2(pw1(y))])
            layers.append((dw, norm, pw1, pw2))
        return keras.Model(inp, L.Flatten()(L.Conv2D(16, 3)(x))), layers
    transposed, layers = build(True)
    convolutions, _ = build(False, layers)
    convolutions.layers[1].set_weights(transposed.layers[1].get_weights())
    convolutions.layers[-2].set_weights(transposed.layers[-2].get_weights())

    def run(ci, image):
        return ci(image).numpy().transpose(0, 3, 1, 2)
    return (f"TensorFlow {tf.__version__}", fdfe.convert(transposed, PATCH, check=False),
            fdfe.convert(convolutions, PATCH, check=False), tf.constant, run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="240x320,480x640", help="comma-separated HxW")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    command = "python bench/transposed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Two ConvNeXt-style blocks ({CHANNELS} channels, 16x16 patch) written with transposes against the same "
             f"blocks written on the map (1x1 convolutions; Keras: LayerNormalization(axis=-1)), same weights, "
             f"timed in turns in one process: median of {args.repeats} calls each after a warm-up, float32, "
             f"{args.threads} CPU threads, one grey image. Command: `{command.strip()}`", "",
             "| backend | image (W×H) | with transposes | on the map | ratio | outputs differ by (max abs) |",
             "|---|---|---|---|---|---|"]
    for line in pair_rows((torch_pair, keras_pair), args.threads, args.sizes, args.repeats):
        lines.append(line)
        print(line, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
