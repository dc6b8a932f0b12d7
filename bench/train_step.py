"""Benchmark: one training step through CI against the same step on all patches.

The step: a student Cp (the Simo-Serra net, 64x64 patches) regresses a fixed dense target at every
pixel of a 128x128 image (loss = mean squared error over all pixels and channels), backward, SGD.
Through CI it is one forward and one backward pass.  On all patches the same loss needs Cp on each
of the 16384 patches; its gradient is accumulated over chunks of patches (the whole graph would not
fit in memory), and the time of the full step is extrapolated from the chunks timed.

    python bench/train_step.py [--backends torch,tf] [--size 128] [--chunks 3] [--out bench/RESULTS_train.md]

Prints a Markdown table (and writes it to --out).
"""

import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # appended: never ahead of site-packages
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import architectures  # noqa: E402
from backends import load_backend  # noqa: E402
from timing import median_time, report  # noqa: E402

NET = "simo_serra"
CHUNK = 512


def torch_row(size, chunks, repeats, threads):
    import torch
    torch.set_num_threads(threads)
    tb = load_backend("pytorch", "torch")
    net = architectures.build_torch(NET)
    patch = architectures.PATCH[NET]
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((1, 1, size, size)).astype(np.float32))
    ci = tb.FDFE.convert(net, patch)
    with torch.no_grad():
        target = ci(images) + 0.1
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)

    def ci_step():
        loss = ((ci(images) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    grid = np.stack(np.meshgrid([0], np.arange(size), np.arange(size), indexing="ij"), -1).reshape(-1, 3)
    flat_target = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    n_total = len(grid)

    def patch_chunk(start):
        out = tb.FDFE.patch_outputs(net, images, patch, grid[start:start + CHUNK], batch_size=CHUNK,
                                    differentiable=True)
        loss = ((out - flat_target[start:start + CHUNK]) ** 2).sum() / flat_target.numel()
        loss.backward()  # gradients accumulate over chunks: the same step as one big batch

    def patches_step():
        opt.zero_grad()
        for c in range(chunks):
            patch_chunk(c * CHUNK)

    t_ci = median_time(ci_step, repeats)
    t_chunks = median_time(patches_step, 1)
    return {"backend": f"PyTorch {torch.__version__}", "ci": t_ci, "patches": t_chunks * n_total / (chunks * CHUNK)}


def keras_row(size, chunks, repeats, threads):
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    kb = load_backend("tensorflow", "tf")
    tb = load_backend("pytorch", "torch")  # the Keras net copies the PyTorch net's weights
    net = architectures.build_keras(NET, architectures.build_torch(NET), kb.FDFE)
    patch = architectures.PATCH[NET]
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((1, size, size, 1)).astype(np.float32))
    ci = kb.FDFE.convert(net, patch)
    target = ci(images) + 0.1
    opt = keras.optimizers.SGD(1e-6)
    variables = net.trainable_weights
    del tb

    @tf.function
    def ci_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((ci(images) - target) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    grid = np.stack(np.meshgrid([0], np.arange(size), np.arange(size), indexing="ij"), -1).reshape(-1, 3)
    flat_target = tf.reshape(target, [-1, target.shape[-1]])
    n_total = len(grid)
    n_values = float(np.prod(target.shape))

    def patches_step():
        grads = None
        for c in range(chunks):
            start = c * CHUNK
            with tf.GradientTape() as tape:
                out = kb.FDFE.patch_outputs(net, images, patch, grid[start:start + CHUNK], batch_size=CHUNK,
                                            differentiable=True)
                loss = tf.reduce_sum((out - flat_target[start:start + CHUNK]) ** 2) / n_values
            g = tape.gradient(loss, variables)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        opt.apply_gradients(zip(grads, variables))

    t_ci = median_time(ci_step, repeats)
    t_chunks = median_time(patches_step, 1)
    return {"backend": f"TensorFlow {tf.__version__}", "ci": t_ci, "patches": t_chunks * n_total / (chunks * CHUNK)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,tf")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--chunks", type=int, default=3, help=f"chunks of {CHUNK} patches timed (extrapolated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for backend in args.backends.split(","):
        fn = {"torch": torch_row, "tf": keras_row}[backend.strip()]
        rows.append(fn(args.size, args.chunks, args.repeats, args.threads))
    lines = [f"One SGD step of the Simo-Serra net (64x64 patches) regressing a dense target on a "
             f"{args.size}x{args.size} image, float32, CPU ({platform.processor() or platform.machine()}, "
             f"{args.threads} threads). Cp on all patches: {args.chunks} chunks of {CHUNK} patches timed, "
             f"extrapolated to all {args.size * args.size}.", "",
             "| backend | step through CI | step on all patches (extrapolated) | speedup |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['ci']:.3f} s | {r['patches']:.1f} s | {r['patches'] / r['ci']:.0f}x |")
    lines.append("")
    lines.append(f"Command: `python bench/train_step.py --size {args.size} --chunks {args.chunks}`")
    report(lines, args.out)


if __name__ == "__main__":
    main()
