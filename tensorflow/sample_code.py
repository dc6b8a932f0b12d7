"""Run Cp (BaseNet) and CI (SlimNet or FDFE.convert) on a random image, compare and time them.

    python tensorflow/sample_code.py                    # 960x1280, 15x15 patches, strides 2 and 2
    python tensorflow/sample_code.py --imH 101 --imW 77 --pH 16 --pW 17
    python tensorflow/sample_code.py --mode singlePatch --patch_i_center 42 --patch_j_center 20
    python tensorflow/sample_code.py --net convert --all_patches

In allPatches mode Cp runs on a random sample of patches (--samples) unless --all_patches
asks for every one; the output says which.  A PNG figure (CI channel, Cp channel,
difference) is written to --figure.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import FDFE  # noqa: E402
from BaseNet import BaseNet  # noqa: E402
from SlimNet import SlimNet  # noqa: E402

DTYPES = ["float32", "float64", "float16", "bfloat16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imH", type=int, default=960, help="image height")
    p.add_argument("--imW", type=int, default=1280, help="image width")
    p.add_argument("--pH", type=int, default=15, help="patch height")
    p.add_argument("--pW", type=int, default=15, help="patch width")
    p.add_argument("--sL1", type=int, default=2, help="stride of the first pooling layer")
    p.add_argument("--sL2", type=int, default=2, help="stride of the second pooling layer")
    p.add_argument("--batch_size", type=int, default=10, help="patches per call of Cp")
    p.add_argument("--mode", choices=["allPatches", "singlePatch"], default="allPatches")
    p.add_argument("--patch_i_center", type=int, default=42, help="row of the patch in singlePatch mode")
    p.add_argument("--patch_j_center", type=int, default=20, help="column of the patch in singlePatch mode")
    p.add_argument("--all_patches", action="store_true", help="compare every patch, not a random sample")
    p.add_argument("--samples", type=int, default=2000, help="patches compared in allPatches mode")
    p.add_argument("--net", choices=["slim", "convert"], default="slim",
                   help="CI wired by hand (SlimNet) or built by FDFE.convert")
    p.add_argument("--naive", action="store_true", help="paper-faithful per-shift multipooling")
    p.add_argument("--device", default="gpu" if tf.config.list_physical_devices("GPU") else "cpu",
                   help="cpu or gpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of CI before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of CI (the median is printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=os.path.join("outputs", "sample_tensorflow.png"))
    return p.parse_args(argv)


def time_ci(ci, image, warmup, repeats):
    ci = tf.function(ci)  # one graph instead of layer-by-layer eager execution
    for _ in range(warmup):
        out = ci(image)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = ci(image)
        out.numpy()  # wait for the result
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def time_cp(base_net, image, patch, positions, batch_size, progress):
    graph = tf.function(lambda x, training=False: base_net(x, training=False))  # as CI: one graph
    graph(tf.zeros([batch_size, patch[0], patch[1], 1], image.dtype))
    start = time.perf_counter()
    ref = FDFE.patch_outputs(graph, image, patch, positions, batch_size=batch_size, progress=progress)
    ref.numpy()
    return ref, (time.perf_counter() - start) / len(positions)


def save_figure(path, ci_map, cp_map, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    diff = np.abs(ci_map - cp_map)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, img, name in zip(axes, (ci_map, cp_map, diff), ("CI, channel 0", "Cp, channel 0", "|CI - Cp|")):
        shown = ax.imshow(img, cmap="viridis")
        ax.set_title(name)
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    with tf.device(f"/{args.device.upper()}:0"):
        return run(args)


def run(args):
    patch = (args.pH, args.pW)
    base_net = BaseNet(args.sL1, args.sL2, dtype=args.dtype)
    if args.net == "slim":
        ci = SlimNet(base_net, args.pH, args.pW, args.sL1, args.sL2, naive=args.naive)
    else:
        ci = FDFE.convert(base_net, patch, naive=args.naive)
    rng = np.random.default_rng(args.seed)
    image = tf.constant(rng.standard_normal((1, args.imH, args.imW, 1)), dtype=args.dtype)
    print(f"TensorFlow {tf.__version__}, {args.device}, {args.dtype}, image {args.imH}x{args.imW}, "
          f"patch {args.pH}x{args.pW}, strides {args.sL1} and {args.sL2}, CI: {args.net}"
          f"{' (naive)' if args.naive else ''}")

    out, ci_time = time_ci(ci, image, args.warmup, args.repeats)
    print(f"Total time for C_I: {ci_time:.6f} sec (median of {max(args.repeats, 1)} after {args.warmup} warm-up)")
    print("-" * 60)

    height, width = args.imH, args.imW
    if args.mode == "singlePatch":
        if not (0 <= args.patch_i_center < height and 0 <= args.patch_j_center < width):
            raise SystemExit(f"--patch_i_center/--patch_j_center must lie inside the {height}x{width} image")
        positions = np.array([[0, args.patch_i_center, args.patch_j_center]])
        what = f"the patch at i={args.patch_i_center}, j={args.patch_j_center}"
    elif args.all_patches or args.samples >= height * width:
        grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(-1, 2)
        positions = np.concatenate([np.zeros((len(grid), 1), np.int64), grid], 1)
        what = f"all {len(positions)} patches"
    else:
        flat = rng.choice(height * width, size=args.samples, replace=False)
        positions = np.stack([np.zeros_like(flat), flat // width, flat % width], 1)
        what = f"a random sample of {len(positions)} of the {height * width} patches"
    ref, cp_time = time_cp(base_net, image, patch, positions, args.batch_size,
                           None if args.all_patches else False)
    if args.mode == "singlePatch":  # one cold call on one patch: no basis for a per-patch time or a speedup
        print(f"Time for C_P on this one patch (one call, no warm-up): {cp_time:.8f} sec; for the speedup of "
              f"C_I, run --mode allPatches")
    else:
        print(f"Averaged time for C_P per Patch without warm up: {cp_time:.8f} sec (batch {args.batch_size})")
        cp_all = cp_time * height * width
        print(f"C_P on all {height * width} patches: about {cp_all:.3f} sec (extrapolated); "
              f"speedup of C_I: {cp_all / ci_time:.1f}x")

    got = tf.gather_nd(out, positions).numpy().astype(np.float64)
    ref = ref.numpy().astype(np.float64)
    diff = np.abs(got - ref)
    print(f"------- Comparison between Cp (base_net) and CI ({args.net}) on {what} -------")
    print(f"aggregated difference percentage = {100.0 * diff.sum() / max(np.abs(ref).sum(), 1e-30):.10f} %")
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    i, j = positions[worst[0], 1], positions[worst[0], 2]
    print(f"maximal abs difference = {diff.max():.10f} at index i={i},j={j}")
    print(f"(largest |Cp| = {np.abs(ref).max():.4f}; relative maximal difference = "
          f"{diff.max() / max(np.abs(ref).max(), 1e-30):.3g})")
    print("-" * 60)

    # Figure: CI and Cp (run on every patch of a window around the worst pixel) side by side.
    y0, x0 = max(0, min(i - 32, height - 64)), max(0, min(j - 32, width - 64))
    y1, x1 = min(height, y0 + 64), min(width, x0 + 64)
    crop_pos = np.stack(np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij"), -1).reshape(-1, 2)
    crop_pos = np.concatenate([np.zeros((len(crop_pos), 1), np.int64), crop_pos], 1)
    cp_crop = FDFE.patch_outputs(base_net, image, patch, crop_pos, batch_size=4096, progress=False)
    cp_map = cp_crop.numpy()[:, 0].astype(np.float64).reshape(y1 - y0, x1 - x0)
    ci_map = out.numpy()[0, y0:y1, x0:x1, 0].astype(np.float64)
    save_figure(args.figure, ci_map, cp_map, f"TensorFlow, rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1}")
    print(f"figure written to {args.figure}")
    return diff.max()


if __name__ == "__main__":
    main()
