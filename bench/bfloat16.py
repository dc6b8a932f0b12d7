"""Benchmark: CI in bfloat16 on the CPU against CI in float32, with its error against float32 Cp.

The Simo-Serra net (64x64 patches) on one grey image, in both backends: CI's time in float32 and
in bfloat16 (PyTorch: the net and image cast to torch.bfloat16; Keras: the net built with a
bfloat16 dtype), and the largest error of the bfloat16 output against float32 Cp run on a random
sample of patches, relative to the largest float32 feature.  CPUs with AVX512-BF16 or AMX run
bfloat16 convolutions natively; others emulate them (then bfloat16 is slower).

    python bench/bfloat16.py [--threads 2] [--size 480x720] [--sample 512] [--out bench/RESULTS_bfloat16.md]

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


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bfloat16 instructions"


def _relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def torch_rows(image, positions, threads, repeats):
    import torch
    torch.set_num_threads(threads)
    tb = load_backend("pytorch", "torch")
    patch = architectures.PATCH[NET]
    net = architectures.build_torch(NET)
    x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want = tb.FDFE.patch_outputs(net, x, patch, positions).numpy()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        net_d = architectures.build_torch(NET).to(dtype)
        ci = tb.FDFE.convert(net_d, patch)
        xd = x.to(dtype)
        with torch.no_grad():
            seconds = median_time(lambda: ci(xd), repeats)
            out = ci(xd).float().numpy()
        got = out[positions[:, 0], :, positions[:, 1], positions[:, 2]]
        rows.append((f"PyTorch {torch.__version__}", str(dtype).replace("torch.", ""), seconds,
                     _relative_error(got, want)))
    return rows


def tf_rows(image, positions, threads, repeats):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    kb = load_backend("tensorflow", "tf")
    patch = architectures.PATCH[NET]
    torch_net = architectures.build_torch(NET)
    net = architectures.build_keras(NET, torch_net, kb.FDFE)
    want = kb.FDFE.patch_outputs(net, tf.constant(image), patch, positions).numpy()
    rows = []
    for dtype in ("float32", "bfloat16"):
        ci = kb.FDFE.convert(architectures.build_keras(NET, torch_net, kb.FDFE, dtype), patch)
        x = tf.constant(image, dtype=dtype)
        seconds = median_time(lambda: ci(x).numpy(), repeats)
        out = tf.cast(ci(x), tf.float32).numpy()
        got = out[positions[:, 0], positions[:, 1], positions[:, 2], :]
        rows.append((f"TensorFlow {tf.__version__}", dtype, seconds, _relative_error(got, want)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="480x720", help="H x W")
    parser.add_argument("--sample", type=int, default=512, help="patches Cp runs on for the error")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="torch,tf")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    image = rng.random((1, height, width, 1), dtype=np.float32)
    flat = rng.choice(height * width, size=args.sample, replace=False)
    positions = np.stack([np.zeros_like(flat), flat // width, flat % width], 1)
    rows = []
    if "torch" in args.backends:
        rows += torch_rows(image, positions, args.threads, args.repeats)
    if "tf" in args.backends:
        rows += tf_rows(image, positions, args.threads, args.repeats)
    lines = [f"CI of the {NET} net on one {width}x{height} grey image, {args.threads} CPU threads "
             f"({platform.machine()}, {_cpu_flags()}); median of {args.repeats} calls after a warm-up; error: "
             f"largest |CI - float32 Cp| on {args.sample} random patches / largest |float32 Cp|; "
             f"`python bench/bfloat16.py --threads {args.threads} --size {args.size}`.", "",
             "| framework | dtype | CI time | vs float32 | relative error vs float32 Cp |", "|---|---|---|---|---|"]
    base = {}
    for framework, dtype, seconds, error in rows:
        base.setdefault(framework, seconds)
        lines.append(f"| {framework} | {dtype} | {seconds:.2f} s | {seconds / base[framework]:.2f}× | {error:.1e} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
