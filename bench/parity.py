"""Benchmark: PyTorch's CI against TensorFlow's on the same rows, timed in turns.

On a shared machine the speed of the CPUs drifts by tens of percent within minutes, so two
backends timed one after the other (as in bench.py) can differ by the drift alone.  Here each
backend runs in its own process (no thread pool of one spins while the other works), both build CI
for the row once, and the parent asks them in turns, one call at a time, for timed calls after a
warm-up: at least ``--repeats`` each, and more on fast rows, until each backend has run about
``--seconds`` (at most 51 calls).  The ratio of the medians is the figure; the range of the ratios
of neighbouring calls shows the noise.

    python bench/parity.py [--rows simo_serra,original_basenet] [--threads 2] [--repeats 5]
                           [--seconds 10] [--keep-freed-memory] [--out bench/RESULTS_parity.md]

Same weights (the Keras net is built from the PyTorch one), the same grey image, the same number of
threads, `convert`'s defaults; PyTorch's output is contiguous (its grey images are), TensorFlow's NHWC.
"""

import argparse
import io
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from timing import cpu_description, report  # noqa: E402

ROWS = [("simo_serra", 48, 72), ("simo_serra", 240, 360), ("simo_serra", 480, 720), ("simo_serra", 720, 1080),
        ("zagoruyko_siam_l2", 720, 1080), ("siam2stream", 720, 1080), ("bailer_fast", 576, 864),
        ("original_basenet", 960, 1280)]


def worker(backend, name, height, width, threads):
    """Child: build CI for the row, then time one call per line read from stdin ('q' ends)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # appended: never ahead of site-packages
    import time

    import architectures
    from backends import load_backend
    import torch
    torch.set_num_threads(threads)
    patch = architectures.PATCH[name]
    net = architectures.build_torch(name)
    image = np.random.default_rng(0).standard_normal((1, height, width, 1)).astype(np.float32)
    def keep_freed_memory(fdfe):  # --keep-freed-memory: glibc keeps freed memory in this process
        if os.environ.get("PARITY_KEEP_FREED_MEMORY") == "1" and not fdfe.keep_freed_memory():
            raise SystemExit("keep_freed_memory() is not available here (glibc only)")

    if backend == "torch":
        fdfe = load_backend("pytorch", "torch").FDFE
        keep_freed_memory(fdfe)
        ci = fdfe.convert(net, patch, progress=False)
        x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())

        def call():
            with torch.inference_mode():
                return ci(x).numpy().transpose(0, 2, 3, 1)
        version = f"PyTorch {torch.__version__}"
    else:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        fdfe = load_backend("tensorflow", "tf").FDFE
        keep_freed_memory(fdfe)
        ci = fdfe.convert(architectures.build_keras(name, net, fdfe, "float32"), patch, progress=False)
        x = tf.constant(image)

        def call():
            return ci(x).numpy()
        version = f"TensorFlow {tf.__version__}"
    out = call()  # warm-up
    sample = io.BytesIO()
    np.save(sample, out[0, ::7, ::7])  # a sample of the output, to compare the backends
    print(version, len(sample.getvalue()), sep="\n", flush=True)
    sys.stdout.buffer.write(sample.getvalue())
    sys.stdout.buffer.flush()
    for line in sys.stdin:
        if line.strip() == "q":
            break
        start = time.perf_counter()
        call()
        print(f"{time.perf_counter() - start:.6f}", flush=True)


def start(backend, row, threads):
    name, height, width = row
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, name, str(height), str(width),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    version = proc.stdout.readline().decode().strip()
    size = int(proc.stdout.readline())
    sample = np.load(io.BytesIO(proc.stdout.read(size)), allow_pickle=False)
    return proc, sample, version


def timed_call(proc):
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def measure(row, threads, repeats, seconds=0.0):
    """One row: both children built and warmed up, then calls in turns (the one that goes first
    alternates): ``repeats`` each, or more where that takes less than ``seconds`` (at most 51)."""
    procs = {}
    for backend in ("torch", "tf"):  # one at a time: building and warming up uses every core
        procs[backend] = start(backend, row, threads)
    times = {"torch": [], "tf": []}
    i = 0
    while i < repeats or (i < 51 and sum(times["torch"]) < seconds and sum(times["tf"]) < seconds):
        for backend in (("torch", "tf") if i % 2 == 0 else ("tf", "torch")):
            times[backend].append(timed_call(procs[backend][0]))
        i += 1
    for proc, _, _ in procs.values():
        proc.stdin.write(b"q\n")
        proc.stdin.flush()
        proc.wait()
    diff = float(np.abs(procs["torch"][1] - procs["tf"][1]).max() / np.abs(procs["tf"][1]).max())
    pair = [a / b for a, b in zip(times["torch"], times["tf"])]
    return {"torch": float(np.median(times["torch"])), "tf": float(np.median(times["tf"])),
            "ratio": float(np.median(times["torch"]) / np.median(times["tf"])),
            "pair_min": min(pair), "pair_max": max(pair), "diff": diff, "calls": len(pair),
            "versions": (procs["torch"][2], procs["tf"][2])}


def fmt_time(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help="comma-separated net names (default: every row)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=5, help="at least this many timed calls per backend")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="more calls on fast rows, until each backend has run this long (at most 51 calls)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="both processes call FDFE.keep_freed_memory() first (glibc keeps freed memory)")
    p.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        backend, name, height, width = args.worker
        return worker(backend, name, int(height), int(width), args.threads)
    if args.keep_freed_memory:
        os.environ["PARITY_KEEP_FREED_MEMORY"] = "1"  # read by the children
    wanted = None if args.rows is None else set(args.rows.split(","))
    rows = [r for r in ROWS if wanted is None or r[0] in wanted]
    command = "python bench/parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = []
    for row in rows:
        r = measure(row, args.threads, args.repeats, args.seconds)
        if not lines:
            keep = ", both processes after `FDFE.keep_freed_memory()`" if args.keep_freed_memory else ""
            lines = [f"CI in turns, {r['versions'][0]} against {r['versions'][1]}, {args.threads} threads of "
                     f"{cpu_description()}, float32, one grey image, `convert`'s defaults{keep}; median of the calls "
                     f"each (at least "
                     f"{args.repeats}, more on fast rows until each backend ran about {args.seconds:g} s, at most "
                     f"51) after a warm-up, the backends' calls alternating. Command: `{command.strip()}`", "",
                     "| net | image (W×H) | PyTorch | TensorFlow | PyTorch / TensorFlow | calls each | range over "
                     "neighbouring calls | outputs differ by (rel.) |", "|---|---|---|---|---|---|---|---|"]
        name, height, width = row
        line = (f"| {name} | {width}×{height} | {fmt_time(r['torch'])} | {fmt_time(r['tf'])} | {r['ratio']:.2f} | "
                f"{r['calls']} | {r['pair_min']:.2f}–{r['pair_max']:.2f} | {r['diff']:.1e} |")
        lines.append(line)
        print(line, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
