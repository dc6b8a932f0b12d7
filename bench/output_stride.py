"""Benchmark: CI at an output stride s (features every s pixels) against s = 1.

Simo-Serra net (64x64 patches, strides 2, 3, 4) on a 720x480 image, float32, CPU, both backends;
median of repeated calls after a warm-up.  Aligned steps (2, 6, 24: products of leading strides) skip
the shifts no output pixel uses; other steps are computed at the largest aligned divisor and subsampled.

    python bench/output_stride.py [--steps 1,2,3,6] [--out bench/RESULTS_output_stride.md]
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


def torch_times(steps, height, width, repeats, threads):
    import torch
    torch.set_num_threads(threads)
    fdfe = load_backend("pytorch", "torch").FDFE
    net = architectures.build_torch("simo_serra")
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, height, width)).astype(np.float32))
    out = {}
    for s in steps:
        ci = fdfe.convert(net, 64, output_stride=s)
        with torch.no_grad():
            out[s] = median_time(lambda: ci(images), repeats)
    return f"PyTorch {torch.__version__}", out


def keras_times(steps, height, width, repeats, threads):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    fdfe = load_backend("tensorflow", "tf").FDFE
    net = architectures.build_keras("simo_serra", architectures.build_torch("simo_serra"), fdfe)
    images = tf.constant(np.random.default_rng(0).standard_normal((1, height, width, 1)).astype(np.float32))
    out = {}
    for s in steps:
        ci = fdfe.convert(net, 64, output_stride=s)
        out[s] = median_time(lambda: ci(images).numpy(), repeats)
    return f"TensorFlow {tf.__version__}", out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="1,2,3,6")
    p.add_argument("--size", default="480,720", help="H,W")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    height, width = (int(v) for v in args.size.split(","))
    rows = [torch_times(steps, height, width, args.repeats, args.threads),
            keras_times(steps, height, width, args.repeats, args.threads)]
    lines = [f"CI of the Simo-Serra net on a {width}x{height} image at output stride s, float32, CPU "
             f"({platform.machine()}, {args.threads} threads); time and its ratio to s = 1.", "",
             "| backend | " + " | ".join(f"s = {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, times in rows:
        lines.append(f"| {label} | " + " | ".join(f"{times[s]:.3f} s ({times[s] / times[steps[0]]:.2f}x)"
                                                  for s in steps) + " |")
    lines += ["", f"Command: `python bench/output_stride.py --steps {args.steps} --size {args.size}`"]
    report(lines, args.out)


if __name__ == "__main__":
    main()
