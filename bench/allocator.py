"""Benchmark: CI's repeated calls with glibc keeping freed memory in the process, against its defaults.

CI's large maps (hundreds of MB at 720x480) are allocated and freed on every call.  With its defaults,
glibc hands allocations above 32 MB back to the system when they are freed, so the next call takes
fresh pages again (page faults, zeroing, huge-page compaction).  Its documented tunables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` keep them in the process instead (its memory
then stays at the call's peak between calls).  Each setting runs in fresh processes, in turns (default,
kept, default, ...), each process timing ``--calls`` calls of CI after two warm-up calls; the figure is
the median over all the calls of a setting.

    python bench/allocator.py [--rows simo_serra:480x720,simo_serra:720x1080] [--backends torch,tf]
                              [--threads 2] [--rounds 3] [--calls 5] [--out bench/RESULTS_allocator.md]

Linux with glibc only (elsewhere the variables do nothing).  Same nets, weights and images as bench.py.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench.py, before torch is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)

from timing import report  # noqa: E402

#: glibc keeps every freed block (up to 1 GiB) for the process's next allocations
KEEP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def child(backend, name, height, width, threads, calls):
    import bench
    runner = (bench.TorchRunner if backend == "torch" else bench.KerasRunner)("cpu", threads)
    net = runner.net(name, "float32")
    image = runner.image(np.random.default_rng(0).standard_normal((1, height, width, 1)).astype(np.float32),
                         "float32")
    ci = runner.convert(net, bench.architectures.PATCH[name])
    for _ in range(2):
        runner.run(ci, image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner.run(ci, image)
        times.append(time.perf_counter() - start)
    print(json.dumps({"backend": runner.name, "times": times}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="simo_serra:480x720,simo_serra:720x1080", help="net:HxW, comma-separated")
    p.add_argument("--backends", default="torch,tf")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3, help="processes per setting, in turns")
    p.add_argument("--calls", type=int, default=5, help="timed calls per process")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        backend, name, height, width = args.child
        return child(backend, name, int(height), int(width), args.threads, args.calls)
    command = "python bench/allocator.py " + " ".join(argv if argv is not None else sys.argv[1:])
    keep = " ".join(f"{k}={v}" for k, v in KEEP.items())
    lines = [f"CI's time per call with glibc's defaults and with `{keep}` (freed memory kept in the process), "
             f"{args.rounds} processes per setting in turns, {args.calls} calls each after two warm-up calls, "
             f"float32, {args.threads} CPU threads, one grey image. Command: `{command.strip()}`", "",
             "| net | image (W×H) | backend | defaults (median, range) | memory kept (median, range) | kept / defaults |",
             "|---|---|---|---|---|---|"]
    for row in args.rows.split(","):
        name, size = row.split(":")
        height, width = (int(v) for v in size.split("x"))
        for backend in args.backends.split(","):
            times, label = {False: [], True: []}, None
            for _ in range(args.rounds):
                for kept in (False, True):
                    env = dict(os.environ, **KEEP) if kept else {k: v for k, v in os.environ.items() if k not in KEEP}
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, name, str(height),
                           str(width), "--threads", str(args.threads), "--calls", str(args.calls)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    times[kept] += result["times"]
                    label = result["backend"]
            d, k = np.array(times[False]), np.array(times[True])
            line = (f"| {name} | {width}×{height} | {label} | {np.median(d):.3f} s ({d.min():.2f}–{d.max():.2f}) | "
                    f"{np.median(k):.3f} s ({k.min():.2f}–{k.max():.2f}) | {np.median(k) / np.median(d):.2f} |")
            lines.append(line)
            print(line, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
