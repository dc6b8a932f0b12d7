"""Do memory budgets hold?  CI's peak memory with ``max_memory=B`` against B, on CPUs, both backends.

Each case runs in a fresh process (``--child``): imports, the net and its weights, convert, and a warm-up
call on a tiny image come first; then the resident-set high-water mark is reset (``/proc/self/clear_refs``)
and CI runs once on a random image of the row's size.  The *peak* is the high-water mark after the call
minus the resident set just before it: the kernel's ``ru_maxrss``, which a child spawned from a large parent
would otherwise inherit from that parent (so it is read, reset, as ``VmHWM``; ``ru_maxrss`` is recorded too).
The output CI returns is part of the peak (it counts towards the budget, as in ``estimate_memory``); the input
image is not (it exists before the call).  The time is the median of the following calls, and is shown
relative to the untiled run of the same row and backend (noisy on a shared machine; repeats help a little).

    python bench/memory_budget.py                                  # every row, writes bench/RESULTS_memory.md
    python bench/memory_budget.py --rows simo_serra:480:640 --backends torch
    python bench/memory_budget.py --child torch simo_serra 480 640 0.5  # one case, prints JSON

Budgets (``--budgets``): "none" (``tile=None``, no budget), a fraction of ``ci.estimate_memory((H, W))`` ("0.5"),
or "w0.25": the padded image and the output (the estimate of a 1x1 tile) plus a quarter of the rest of the estimate
(a quarter of the estimate can be less than the output alone).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: (net of shared_tests/architectures.py, H, W)
ROWS = [("simo_serra", 480, 640), ("simo_serra", 720, 1080), ("original_basenet", 720, 1080)]
#: untiled; half the estimate; the padded image and the output plus a quarter of the rest (see _budget)
BUDGETS = ["none", "0.5", "w0.25"]
BACKENDS = ["torch", "tf"]
LABELS = {"torch": "PyTorch", "tf": "TensorFlow"}


def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_peak():
    """Reset the resident-set high-water mark (VmHWM, which ru_maxrss reads) to the current resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _budget(spec, estimate, fixed):
    """The budget in bytes from its spec: "none" (untiled), "0.5" (half the estimate), "w0.25" (the padded
    image and the output, plus a quarter of the rest of the estimate), or bytes ("300000000")."""
    if spec == "none":
        return None
    if spec.startswith("w"):
        return int(fixed + float(spec[1:]) * (estimate - fixed))
    value = float(spec)
    return int(value * estimate) if value <= 1 else int(value)


def child(backend, name, height, width, spec, repeats, threads):
    """One case in this (fresh) process; prints a JSON line."""
    import gc
    import resource
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "shared_tests"))
    import architectures
    from backends import load_backend
    patch = architectures.PATCH[name]
    rng = np.random.default_rng(0)
    array = rng.standard_normal((1, height, width, 1)).astype(np.float32)
    tiny = rng.standard_normal((1, 37, 41, 1)).astype(np.float32)
    if backend == "torch":
        import torch
        torch.set_num_threads(threads)
        fdfe = load_backend("pytorch", "torch").FDFE
        net = architectures.build_torch(name)
        image, tiny = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (array, tiny))
        probe = fdfe.convert(net, patch, tile=None, progress=False)

        def run(ci, x):
            with torch.inference_mode():
                return ci(x)
    else:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        fdfe = load_backend("tensorflow", "tf").FDFE
        net = architectures.build_keras(name, architectures.build_torch(name), fdfe)
        image, tiny = tf.constant(array), tf.constant(tiny)
        probe = fdfe.convert(net, patch, tile=None, progress=False)

        def run(ci, x):
            return ci(x)
    estimate = probe.estimate_memory((height, width))
    fixed = probe.estimate_memory((height, width), tile=(1, 1))  # the padded image, the output, ~no work
    budget = _budget(spec, estimate, fixed)
    result = {"backend": backend, "net": name, "H": height, "W": width, "spec": spec, "estimate": estimate,
              "fixed": fixed, "budget": budget}
    try:
        tile = None if budget is None else probe.tile_for_memory(budget, (height, width))
    except MemoryError as exc:
        print(json.dumps({**result, "error": str(exc)}))
        return
    ci = probe if budget is None else fdfe.convert(net, patch, max_memory=budget, progress=False, check=False)
    del array
    run(ci, tiny)
    gc.collect()
    reset = _reset_peak()
    base = _status("VmRSS:")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = run(ci, image)
    first = time.perf_counter() - start
    peak = _status("VmHWM:") - base
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del out
    times, untiled_times = [], []  # interleaved with untiled calls in this process: the ratio is less noisy
    for _ in range(repeats):
        for which, ts in ((ci, times), (probe, untiled_times)) if budget is not None else ((ci, times),):
            start = time.perf_counter()
            out = run(which, image)
            ts.append(time.perf_counter() - start)
            del out
    if budget is None:
        untiled_times = times
    n_tiles = len(fdfe.tile_grid(height, width, tile, probe.stride_product)) if tile else 1
    print(json.dumps({**result, "tile": tile, "peak": peak, "maxrss": maxrss, "maxrss_before": maxrss_before - base,
                      "reset": reset, "first": first, "n_tiles": n_tiles,
                      "time": float(np.median(times)) if times else first,
                      "time_untiled": float(np.median(untiled_times)) if untiled_times else None,
                      "times": times, "untiled_times": untiled_times}))


def run_case(backend, name, height, width, spec, repeats, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, name, str(height), str(width), spec,
           "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(nbytes):
    return f"{nbytes / 2**20:.0f}"


def describe(spec):
    if spec == "none":
        return "untiled"
    if spec.startswith("w"):
        return f"output + {float(spec[1:]):g} of the work"
    return f"{float(spec):g} × estimate" if float(spec) <= 1 else f"{int(float(spec)) / 2**20:.0f} MiB"


def write_report(results, path, command, slack):
    lines = ["# Memory budgets: measured peak against `max_memory`", "",
             f"Written {datetime.date.today().isoformat()} by `{command}` (CPU, 2 threads, each case in a fresh "
             "process; `make bench` runs it).", "",
             "*Peak*: the resident-set high-water mark during one call of CI minus the resident set just before "
             "it (after imports, weights, convert and a warm-up call on a 37×41 image), read as the kernel's "
             "`ru_maxrss`/`VmHWM` after resetting it with `/proc/self/clear_refs`; it includes CI's output, not "
             "the input image. *Estimate*: `ci.estimate_memory((H, W))`, untiled. *Budget*: "
             "`convert(..., max_memory=budget)`: half the estimate, or the padded image and the output "
             "(the estimate of a 1×1 tile) plus a quarter of the rest. The promise: peak ≤ budget + "
             f"{slack / 2**20:.0f} MiB (`FDFE.MEMORY_SLACK`), and untiled peak ≤ estimate. *Time*: median of "
             "the calls after the measured one; *vs untiled*: the ratio of the medians of tiled and untiled "
             "calls interleaved in the same process (a shared 2-core machine: ±10% is noise).", "",
             "| backend | net | image (H×W) | budget | budget MiB | estimate MiB | tile (tiles) | peak MiB "
             "| peak / budget | within | time | vs untiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {LABELS[r['backend']]} | {r['net']} | {r['H']}×{r['W']} | {describe(r['spec'])} | " \
               f"{'—' if r['budget'] is None else mib(r['budget'])} | {mib(r['estimate'])} | "
        if "error" in r:
            lines.append(head + "MemoryError: the output alone does not fit | | | | | |")
            continue
        limit = r["estimate"] if r["budget"] is None else r["budget"] + slack
        tile = "none" if not r["tile"] else f"{r['tile'][0]}×{r['tile'][1]} ({r['n_tiles']})"
        ratio = "—" if r["budget"] is None else f"{r['peak'] / r['budget']:.2f}"
        relative = "—" if r["budget"] is None or not r["time_untiled"] else f"{r['time'] / r['time_untiled']:.2f}×"
        lines.append(head + f"{tile} | {mib(r['peak'])} | {ratio} | {'yes' if r['peak'] <= limit else '**no**'} | "
                     f"{r['time']:.2f} s | {relative} |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--rows", default=None, help="comma-separated net:H:W (default: " +
                   ",".join(f"{n}:{h}:{w}" for n, h, w in ROWS) + ")")
    p.add_argument("--budgets", default=",".join(BUDGETS),
                   help="none (untiled), a fraction of the estimate (0.5), w<fraction> (the padded image and the "
                        "output plus that fraction of the rest), or bytes")
    p.add_argument("--repeats", type=int, default=2, help="timed calls (tiled and untiled) after the measured one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS_memory.md"))
    args = p.parse_args(argv)
    if args.child:
        backend, name, h, w, spec = args.child
        return child(backend, name, int(h), int(w), spec, args.repeats, args.threads)
    rows = ROWS if args.rows is None else [(n, int(h), int(w)) for n, h, w in
                                           (r.split(":") for r in args.rows.split(","))]
    results = []
    start = time.perf_counter()
    for backend in args.backends.split(","):
        for name, h, w in rows:
            for spec in args.budgets.split(","):
                t0 = time.perf_counter()
                r = run_case(backend, name, h, w, spec, args.repeats, args.threads)
                results.append(r)
                what = r.get("error") or (f"tile {r['tile']}: peak {mib(r['peak'])} MiB (ru_maxrss "
                                          f"{mib(r['maxrss'])}), {r['time']:.2f} s, untiled {r['time_untiled']:.2f} s")
                print(f"{LABELS[backend]} {name} {h}x{w} {describe(spec)}: budget "
                      f"{mib(r['budget']) if r['budget'] else '-'} MiB, estimate {mib(r['estimate'])} MiB, {what} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    command = "python bench/memory_budget.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_report(results, args.out, command, _slack())
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


def _slack():
    """FDFE.MEMORY_SLACK, read from the source (this process imports no framework)."""
    import ast
    with open(os.path.join(ROOT, "pytorch", "FDFE.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MEMORY_SLACK" for t in node.targets):
            return int(eval(compile(ast.Expression(node.value), "FDFE.py", "eval"), {"__builtins__": {}}))
    return 64 * 2**20


if __name__ == "__main__":
    main()
