"""`make bench`: CI against Cp on the rows of the paper's Table 1 and the original port's BaseNet.

For every row and backend/device it measures
  - Cp on a large random sample of patches, batched (256 per call on CPUs), in the same layout care as
    CI (channels-last in PyTorch), extrapolated to all H x W patches (labelled as such);
  - CI: median of repeated calls after a warm-up, synchronised;
  - the speedup, and the FLOP ratio Cp/CI (Cp's multiply-adds on all patches over those CI executed,
    counted while it runs): the speedup an equally efficient CI would reach;
  - CI's peak memory untiled, and with a memory budget of half its estimated need (tiled), plus the
    largest difference between the tiled and untiled outputs;
and writes bench/RESULTS.md (+ bench/results.png, and JSON with --json).

    python bench/bench.py                                  # every row, every backend found, CPU
    python bench/bench.py --device cuda --backends torch   # on a GPU (PyTorch only)
    python bench/bench.py --rows original_basenet --quick  # one row, fewer repeats

PyTorch is given transparent huge pages for its large CPU buffers (THP_MEM_ALLOC_ENABLE=1, set
before it is imported, for every variant alike): first-touch page faults otherwise dominate the
writing of large outputs.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))
sys.path.append(HERE)

import architectures  # noqa: E402
from backends import load_backend  # noqa: E402
from memory import PeakMemory  # noqa: E402

# (net, H, W, the paper's Table 1: Cp time s, CI time s, speedup, CI memory MB).  The paper writes
# image sizes as width x height.
ROWS = [
    ("simo_serra", 48, 72, (1.25, 0.099, 12.6, 348)),
    ("simo_serra", 240, 360, (28.42, 0.103, 275, 1142)),
    ("simo_serra", 480, 720, (112.76, 0.116, 972, 3448)),
    ("simo_serra", 720, 1080, (252.97, 0.117, 1550, 7222)),
    ("zagoruyko_siam_l2", 720, 1080, (223.55, 0.127, 1760, 11495)),
    ("siam2stream", 720, 1080, None),
    ("bailer_fast", 576, 864, (363.45, 0.113, 3216, 9850)),
    ("original_basenet", 960, 1280, None),
]
LABELS = {"simo_serra": "Simo-Serra et al. (paper's Torch example)", "zagoruyko_siam_l2": "Zagoruyko et al. (siam-L2)",
          "siam2stream": "Zagoruyko et al. (siam2stream, two streams)",
          "bailer_fast": "Bailer et al. (fast arch., reconstructed)", "original_basenet": "original port's BaseNet"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,tf", help="comma-separated: torch, tf")
    p.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch)")
    p.add_argument("--dtypes", default="float32", help="comma-separated; float16 on GPUs")
    p.add_argument("--rows", default=None, help="comma-separated net names (default: all rows)")
    p.add_argument("--quick", action="store_true", help="1 timed repeat, smaller Cp samples")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both frameworks")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--merge", nargs="*", default=[], help="JSON results of other runs to include in RESULTS.md")
    p.add_argument("--tf32", action="store_true", help="on CUDA: also time float32 with TF32 tensor cores")
    p.add_argument("--tf-memory", nargs=4, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- one backend ---------------------------------------------------------------------------------------

class Runner:
    """What both backends' runners do alike; ``b`` is the backend's namespace (see backends.py)."""
    on_gpu = False

    def sync(self):
        pass

    def convert(self, net, patch, **kw):
        return self.b.FDFE.convert(net, patch, progress=False, **kw)


class TorchRunner(Runner):
    name = "PyTorch"

    def __init__(self, device, threads, tf32=False):
        import torch
        self.torch = torch
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
        self.b = load_backend("pytorch", "torch")
        self.label = f"PyTorch {torch.__version__}, {self.device_name()}" + (", TF32" if tf32 else "")

    def device_name(self):
        if self.on_gpu:
            return self.torch.cuda.get_device_name(self.device)
        return f"CPU ({platform.processor() or platform.machine()}, {self.torch.get_num_threads()} threads)"

    def sync(self):
        if self.on_gpu:
            self.torch.cuda.synchronize()

    def net(self, name, dtype):
        return architectures.build_torch(name).to(device=self.device, dtype=getattr(self.torch, dtype))

    def image(self, array, dtype):
        return self.torch.from_numpy(array.transpose(0, 3, 1, 2)).to(device=self.device, dtype=getattr(self.torch, dtype))

    def run(self, ci, image):
        with self.torch.inference_mode():
            out = ci(image)
        self.sync()
        return out

    def patches(self, image, patch, positions):
        t = self.torch
        top, bottom, left, right = self.b.FDFE.patch_padding(patch)
        padded = t.nn.functional.pad(image, (left, right, top, bottom))
        pos = t.from_numpy(positions).to(self.device)
        rows = t.arange(patch, device=self.device)
        yy = (pos[:, 1, None] + rows)[:, :, None]
        xx = (pos[:, 2, None] + rows)[:, None, :]
        out = padded[pos[:, 0, None, None], :, yy, xx].permute(0, 3, 1, 2)
        return out.contiguous(memory_format=t.channels_last)

    def time_cp(self, net, batches):
        with self.torch.inference_mode():
            net(batches[0])
            self.sync()
            start = time.perf_counter()
            for b in batches[1:]:
                net(b)
            self.sync()
        return time.perf_counter() - start

    def to_numpy_nhwc(self, out):
        return out.float().cpu().numpy().transpose(0, 2, 3, 1)

    def mem_dtype(self, dtype):
        return getattr(self.torch, dtype)


class KerasRunner(Runner):
    name = "TensorFlow"

    def __init__(self, device, threads, tf32=False):
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.tf = tf
        self.b = load_backend("tensorflow", "tf")
        self.label = f"TensorFlow {tf.__version__}, CPU ({threads} threads)"

    def net(self, name, dtype):
        return architectures.build_keras(name, architectures.build_torch(name), self.b.FDFE, dtype)

    def image(self, array, dtype):
        return self.tf.constant(array, dtype=dtype)

    def run(self, ci, image):
        out = ci(image)
        out.numpy()
        return out

    def patches(self, image, patch, positions):
        top, bottom, left, right = self.b.FDFE.patch_padding(patch)
        padded = np.pad(image.numpy(), ((0, 0), (top, bottom), (left, right), (0, 0)))
        idx = np.arange(patch)
        out = padded[positions[:, 0, None, None], positions[:, 1, None, None] + idx[None, :, None],
                     positions[:, 2, None, None] + idx[None, None, :]]
        return self.tf.constant(out)

    def time_cp(self, net, batches):
        fn = self.tf.function(lambda x: net(x, training=False))
        fn(batches[0]).numpy()
        start = time.perf_counter()
        for b in batches[1:]:
            out = fn(b)
        out.numpy()
        return time.perf_counter() - start

    def to_numpy_nhwc(self, out):
        return self.tf.cast(out, self.tf.float32).numpy()

    def mem_dtype(self, dtype):
        return dtype


# --- one row -------------------------------------------------------------------------------------------

def measure_row(runner, name, height, width, dtype, args):
    patch = architectures.PATCH[name]
    heavy = name in ("bailer_fast", "zagoruyko_siam_l2")
    rng = np.random.default_rng(0)
    net = runner.net(name, dtype)
    array = rng.standard_normal((1, height, width, 1)).astype(np.float32)
    image = runner.image(array, dtype)
    result = {"net": name, "label": LABELS.get(name, name), "H": height, "W": width, "backend": runner.label,
              "dtype": dtype, "patch": patch}

    # Cp on a random sample of patches, in batches, extrapolated to all patches
    on_gpu = runner.on_gpu
    batch = 1024 if on_gpu else 256
    n_sample = min(height * width, (4 if args.quick else 8) * batch if not heavy or on_gpu else 4 * batch)
    flat = rng.choice(height * width, size=n_sample, replace=False)
    positions = np.stack([np.zeros_like(flat), flat // width, flat % width], 1)
    patches = runner.patches(image, patch, positions)
    batches = [patches[i:i + batch] for i in range(0, n_sample, batch)]
    batches = [batches[0]] + batches  # the first call warms up
    cp_time = runner.time_cp(net, batches)
    result["cp_sample"] = n_sample
    result["cp_per_patch"] = cp_time / n_sample
    result["cp_all"] = result["cp_per_patch"] * height * width
    del patches, batches

    # CI: warm-up (PyTorch: its peak memory is read on this first call), then the median of repeats
    ci = runner.convert(net, patch)  # the defaults (PyTorch: "auto" tiles for small patches on the CPU)
    untiled = runner.convert(net, patch, tile=None) if runner.name == "PyTorch" else ci
    device = "cuda" if on_gpu else "cpu"
    gc.collect()
    if on_gpu:  # on GPUs the allocator's peak is exact, but the first call holds cuDNN's autotuning
        runner.run(untiled, image)
    start = time.perf_counter()
    with PeakMemory(device) as m:  # untiled (PyTorch on the CPU: the first call, see PeakMemory)
        out = runner.run(untiled, image)
    first = time.perf_counter() - start
    if untiled is not ci:
        out = runner.run(ci, image)
    repeats = 1 if args.quick else (2 if first > 4 else 3)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = runner.run(ci, image)
        times.append(time.perf_counter() - start)
    result["ci"] = float(np.median(times))
    result["ci_repeats"] = repeats
    result["speedup"] = result["cp_all"] / result["ci"]
    ref = runner.to_numpy_nhwc(out)
    del out

    # FLOP ratio: Cp's multiply-adds on all patches / those CI executes (counted on PyTorch's meta device)
    cp_macs = architectures.macs_per_patch(architectures.build_torch(name), patch) * height * width
    result["cp_macs"] = cp_macs
    result["ci_macs"] = ci_macs(name, height, width)
    result["flop_ratio"] = cp_macs / result["ci_macs"]
    result["efficiency"] = result["speedup"] / result["flop_ratio"]

    # memory: untiled (the first call above), then with a budget of half the estimated need.  TensorFlow
    # keeps freed CPU memory for reuse, so its peaks are read in a fresh process.
    mem_dtype = runner.mem_dtype(dtype)
    estimate = untiled.estimate_memory((height, width), dtype=mem_dtype)
    budget = estimate // 2
    result.update(estimate=estimate, budget=budget)
    try:
        result["tile"] = list(ci.tile_for_memory(budget, (height, width), dtype=mem_dtype) or [])
    except MemoryError as exc:
        result["tile_error"] = str(exc)
        result["mem"] = m.peak
        return result
    if runner.name == "PyTorch":
        tiled = runner.convert(net, patch, max_memory=budget, check=False)
        result["mem"] = m.peak
        gc.collect()
        if on_gpu:
            runner.run(tiled, image)
        with PeakMemory(device) as m:
            out = runner.run(tiled, image)
        result["mem_tiled"] = m.peak
        result["tiled_max_diff"] = float(np.abs(runner.to_numpy_nhwc(out) - ref).max())
    else:  # the child process runs both and compares them
        result.update(fresh_process_memory(name, height, width, budget, args.threads))
    result["tiled_max_abs"] = float(np.abs(ref).max())
    return result


def ci_macs(name, height, width):
    """Multiply-adds CI executes on one image, counted on PyTorch's meta device (nothing computed)."""
    import copy
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    fdfe = load_backend("pytorch", "torch").FDFE
    net = copy.deepcopy(architectures.build_torch(name)).to("meta")
    ci = fdfe.convert(net, architectures.PATCH[name], tile=None, check=False)
    with FlopCounterMode(display=False) as counter:
        ci(torch.empty(1, 1, height, width, device="meta"))
    return counter.get_total_flops() / 2


def fresh_process_memory(name, height, width, budget, threads):
    """TensorFlow's peak memory untiled and tiled, in a fresh process (its allocator keeps memory)."""
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--tf-memory", name, str(height), str(width),
                          str(budget), "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tf_memory_child(name, height, width, budget, threads):
    """Child of fresh_process_memory: peak resident memory of a tiled call, then of an untiled one,
    both over the same baseline (the untiled call reuses what the tiled one left, then grows)."""
    runner = KerasRunner("cpu", threads)
    net = runner.net(name, "float32")
    image = runner.image(np.random.default_rng(0).standard_normal((1, height, width, 1)).astype(np.float32), "float32")
    untiled = runner.convert(net, architectures.PATCH[name], check=False)
    tiled = runner.convert(net, architectures.PATCH[name], max_memory=budget, check=False)
    small = runner.image(np.zeros((1, 8, 8, 1), np.float32), "float32")
    runner.run(untiled, small)
    runner.run(tiled, small)
    gc.collect()
    with PeakMemory() as tiled_peak:
        tiled_out = runner.run(tiled, image).numpy()
    with PeakMemory() as untiled_peak:
        untiled_out = runner.run(untiled, image).numpy()
    base = tiled_peak.base
    print(json.dumps({"mem_tiled": tiled_peak.peak,
                      "mem": max(untiled_peak.base + untiled_peak.peak, base + tiled_peak.peak) - base,
                      "tiled_max_diff": float(np.abs(tiled_out - untiled_out).max())}))


def basenet_variants(runner, dtype, args):
    """BaseNet at 960x1280: the fast path against the paper-faithful per-shift implementation."""
    net = runner.net("original_basenet", dtype)
    image = runner.image(np.random.default_rng(1).standard_normal((1, 960, 1280, 1)).astype(np.float32), dtype)
    variants = {"fast (default)": {}, "fast, 240×320 tiles": {"tile": (240, 320)},
                "naive: per-shift multipooling, per-layer unwarping": {"naive": True}}
    if runner.name == "PyTorch":
        variants = {
            "fast, channels-last inside (default)": {},
            "fast, channels-last inside, 240×320 tiles": {"tile": (240, 320)},
            "naive: per-shift multipooling, per-layer unwarping, NCHW (the original port's scheme)":
                {"naive": True, "memory_format": None},
            "naive, channels-last inside": {"naive": True},
        }
    out = {}
    for label, kw in variants.items():
        ci = runner.convert(net, 15, **kw)
        runner.run(ci, image)
        times = []
        for _ in range(1 if args.quick else 3):
            start = time.perf_counter()
            runner.run(ci, image)
            times.append(time.perf_counter() - start)
        out[label] = float(np.median(times))
    return out


# --- report ----------------------------------------------------------------------------------------------

def fmt_time(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_mb(nbytes):
    return f"{nbytes / 2**20:.0f}"


def write_report(results, variants, args, path, commands):
    lines = ["# Benchmark results", "", f"Written {datetime.date.today().isoformat()} from these runs (`make bench` "
             "re-measures the CPU rows and merges the committed GPU run, bench/results_cuda.json):", ""]
    lines += [f"- `{c}`" for c in commands] + [""]
    lines += [
             "Cp runs on a random sample of patches (batched: 256 per call on CPUs, 1024 on GPUs; "
             "channels-last in PyTorch) and its time is **extrapolated** to all H×W patches. CI is the "
             "median of repeated synchronised calls after a warm-up, with `convert`'s defaults (untiled "
             "unless the memory guard needs tiles; PyTorch's output is contiguous like its grey images, "
             "TensorFlow's NHWC). *FLOP ratio* = Cp's "
             "multiply-adds on all patches / the multiply-adds CI executes (counted on PyTorch's meta device, "
             "padding included): the speedup an equally efficient CI would reach. *Efficiency* = speedup / FLOP ratio "
             "(≥ 1: CI is at least as efficient per FLOP as batched Cp). Peak memory is the increase while "
             "CI runs (CPU: sampled resident set, on the first call for PyTorch and in a fresh process for "
             "TensorFlow, which keeps freed memory; GPU: the allocator's peak after a warm-up), untiled and with a budget of "
             "half the estimated need (`convert(..., max_memory=budget)`), which picks the tile; *tiled diff* "
             "is the largest difference between tiled and untiled outputs. The paper's figures (GTX Titan X, "
             "Torch7, apparently without synchronisation) are shown beside ours, not compared.", "",
             "| net | image (W×H) | backend, device, dtype | Cp, all patches (extrap.) | CI | speedup | FLOP ratio "
             "| efficiency | CI peak MB | budget MB → tile → peak MB | tiled diff | paper: Cp / CI / speedup / MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        paper = next((p for n, h, w, p in ROWS if n == r["net"] and h == r["H"] and w == r["W"]), None)
        paper_s = "—" if paper is None else f"{paper[0]} s / {paper[1]} s / {paper[2]}× / {paper[3]}"
        if "tile_error" in r:
            tiled = "budget too small"
            diff = "—"
        else:
            tile = "none" if not r["tile"] else f"{r['tile'][0]}×{r['tile'][1]}"
            tiled = f"{fmt_mb(r['budget'])} → {tile} → {fmt_mb(r['mem_tiled'])}"
            diff = f"{r['tiled_max_diff']:.1e}"
        lines.append(
            f"| {r['label']} | {r['W']}×{r['H']} | {r['backend']}, {r['dtype']} | {fmt_time(r['cp_all'])} "
            f"({r['cp_sample']} patches) | {fmt_time(r['ci'])} (median of {r['ci_repeats']}) | "
            f"{r['speedup']:.1f}× | {r['flop_ratio']:.1f} | {r['efficiency']:.2f} | {fmt_mb(r['mem'])} | {tiled} | "
            f"{diff} | {paper_s} |")
    if variants:
        lines += ["", "## BaseNet at 960×1280: fast path against the paper-faithful per-shift implementation", "",
                  "| backend | variant | CI time (median) |", "|---|---|---|"]
        for backend, times in variants.items():
            for label, t in times.items():
                lines.append(f"| {backend} | {label} | {fmt_time(t)} |")
    lines += ["", "Notes:", "",
              "- Bailer et al.'s architecture is reconstructed from memory of arXiv 1607.08064 (its table could "
              "not be consulted while writing this); its layer sizes are approximate, with random weights.",
              "- The paper's CI times look unsynchronised: its Zagoruyko row would need more FLOP/s than a Titan X "
              "has. Compare our speedups with our FLOP ratios instead.",
              "- Budgets against peaks measured in fresh processes, both backends: bench/RESULTS_memory.md "
              "(bench/memory_budget.py; on CPUs peak ≤ budget + `FDFE.MEMORY_SLACK`). On GPUs cuDNN's "
              "workspaces (autotuned, `cudnn.benchmark=True`) come on top and some tiled peaks exceed the budget.",
              "- GPU float32 means strict float32 unless the row says TF32 (cuDNN's default for convolutions on "
              "Ampere and later: 10-bit mantissas, hence tiled differences near 1e-4); CI and Cp use the same "
              "setting. Tiled and untiled outputs differ by rounding only where cuDNN picks other algorithms per "
              "tile shape.",
              "- Rows merged from earlier runs (see the commands above) keep the labels of their time: the "
              "H100 run's BaseNet variants name the then default of 128×128 CPU tiles, which no longer exists "
              "(CPU runs are untiled unless the memory guard needs tiles).",
              "- PyTorch runs with transparent huge pages for its CPU buffers (`THP_MEM_ALLOC_ENABLE=1`, set by "
              "this script for every variant), TensorFlow and PyTorch with the same number of threads.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


SHORT = {"simo_serra": "Simo-Serra", "zagoruyko_siam_l2": "Zagoruyko", "bailer_fast": "Bailer",
         "original_basenet": "BaseNet"}


def plot(results, path):
    """One panel per backend/device/dtype: measured speedup beside the FLOP ratio, per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}
    for r in results:
        groups.setdefault(f"{r['backend']}, {r['dtype']}", []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], groups.items()):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["speedup"] for r in rows], 0.4, label="measured speedup of CI over Cp")
        ax.bar(x + 0.2, [r["flop_ratio"] for r in rows], 0.4, label="FLOP ratio Cp/CI")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{SHORT.get(r['net'], r['net'])} {r['W']}×{r['H']}" for r in rows], fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.tf_memory:
        name, height, width, budget = args.tf_memory
        return tf_memory_child(name, int(height), int(width), int(budget), args.threads)
    command = "python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    wanted = None if args.rows is None else set(args.rows.split(","))
    rows = [r for r in ROWS if wanted is None or r[0] in wanted]
    results, variants = [], {}
    for backend in [b for b in args.backends.split(",") if b]:
        if backend == "tf" and args.device != "cpu":
            continue
        try:
            cls = TorchRunner if backend == "torch" else KerasRunner
            for dtype in args.dtypes.split(","):
                for tf32 in ([False, True] if args.tf32 and dtype == "float32" else [False]):
                    runner = cls(args.device, args.threads, tf32)
                    for name, h, w, _ in rows:
                        t0 = time.perf_counter()
                        result = measure_row(runner, name, h, w, dtype, args)
                        results.append(result)
                        print(f"{runner.label} {dtype} {name} {w}x{h}: Cp(all) {fmt_time(result['cp_all'])}, CI "
                              f"{fmt_time(result['ci'])}, speedup {result['speedup']:.1f}x, FLOP ratio "
                              f"{result['flop_ratio']:.1f}, peak {fmt_mb(result['mem'])} MB, tiled "
                              f"{fmt_mb(result.get('mem_tiled', 0))} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
                        gc.collect()
                    if (wanted is None or "original_basenet" in wanted) and not tf32:
                        variants[f"{runner.label}, {dtype}"] = basenet_variants(runner, dtype, args)
                        print(variants[f"{runner.label}, {dtype}"], flush=True)
        except ImportError as exc:
            print(f"skipping {backend}: {exc}")
    commands = [command] if results else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "variants": variants, "command": command}, f, indent=1)
    for path in args.merge:
        if not os.path.exists(path):
            print(f"not merging {path}: missing")
            continue
        with open(path) as f:
            other = json.load(f)
        results += other["results"]
        variants.update(other["variants"])
        commands.append(other.get("command", path))
    write_report(results, variants, args, args.out, commands)
    try:
        plot(results, os.path.join(os.path.dirname(args.out), "results.png"))
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
