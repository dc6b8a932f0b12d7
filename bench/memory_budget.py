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
    python bench/memory_budget.py --child torch simo_serra 480 640 0.5 # one case, prints JSON

Budgets are fractions of ``ci.estimate_memory((H, W))`` ("untiled" is ``tile=None``, no budget).
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
#: budgets as fractions of the untiled estimate; None: untiled
BUDGETS = [None, 0.5, 0.25]
BACKENDS = ["torch", "tf"]
#: what RESULTS_memory.md and the README promise: peak <= budget + SLACK (see FDFE.MEMORY_SLACK)
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


def child(backend, name, height, width, fraction, repeats, threads):
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
    budget = None if fraction is None else int(estimate * fraction)
    ci = probe if budget is None else fdfe.convert(net, patch, max_memory=budget, progress=False, check=False)
    tile = None if budget is None else ci.tile_for_memory(budget, (height, width))
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
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(ci, image)
        times.append(time.perf_counter() - start)
        del out
    print(json.dumps({"backend": backend, "net": name, "H": height, "W": width, "fraction": fraction,
                      "estimate": estimate, "budget": budget, "tile": tile, "peak": peak, "maxrss": maxrss,
                      "maxrss_before": maxrss_before - base, "reset": reset, "first": first,
                      "time": float(np.median(times)) if times else first, "times": times}))


def run_case(backend, name, height, width, fraction, repeats, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, name, str(height), str(width),
           "none" if fraction is None else str(fraction), "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(nbytes):
    return f"{nbytes / 2**20:.0f}"


def write_report(results, path, command, slack):
    lines = ["# Memory budgets: measured peak against `max_memory`", "",
             f"Written {datetime.date.today().isoformat()} by `{command}` (CPU, each case in a fresh process).", "",
             "*Peak*: the resident-set high-water mark during one call of CI minus the resident set just before it "
             "(after imports, weights, convert and a warm-up call on a 37×41 image), read as the kernel's "
             "`ru_maxrss`/`VmHWM` after resetting it; it includes CI's output, not the input image. "
             "*Estimate*: `ci.estimate_memory((H, W))` (untiled). *Budget*: `convert(..., max_memory=budget)`; "
             f"the promise is peak ≤ budget + {mib(slack)} MiB (`FDFE.MEMORY_SLACK`), and for untiled runs "
             "peak ≤ estimate. *Time*: median of the calls after the measured one, relative to the untiled "
             "run of the same row and backend (a shared 2-core machine: differences of ±10% are noise).", "",
             "| backend | net | image (H×W) | budget MiB | estimate MiB | tile | peak MiB | peak / budget "
             "| within budget + slack | time | time vs untiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    untiled = {(r["backend"], r["net"], r["H"], r["W"]): r["time"] for r in results if r["budget"] is None}
    for r in results:
        key = (r["backend"], r["net"], r["H"], r["W"])
        limit = r["estimate"] if r["budget"] is None else r["budget"] + slack
        tile = "none" if not r["tile"] else f"{r['tile'][0]}×{r['tile'][1]}"
        ratio = "—" if r["budget"] is None else f"{r['peak'] / r['budget']:.2f}"
        base = untiled.get(key)
        relative = "—" if base is None else f"{r['time'] / base:.2f}×"
        lines.append(f"| {LABELS[r['backend']]} | {r['net']} | {r['H']}×{r['W']} | "
                     f"{'untiled' if r['budget'] is None else mib(r['budget'])} | {mib(r['estimate'])} | {tile} | "
                     f"{mib(r['peak'])} | {ratio} | {'yes' if r['peak'] <= limit else '**no**'} | "
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
    p.add_argument("--budgets", default="none,0.5,0.25", help="fractions of the estimate; none: untiled")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the measured one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS_memory.md"))
    args = p.parse_args(argv)
    if args.child:
        backend, name, h, w, fraction = args.child
        return child(backend, name, int(h), int(w), None if fraction == "none" else float(fraction),
                     args.repeats, args.threads)
    rows = ROWS if args.rows is None else [(n, int(h), int(w)) for n, h, w in
                                           (r.split(":") for r in args.rows.split(","))]
    budgets = [None if b == "none" else float(b) for b in args.budgets.split(",")]
    sys.path.insert(0, os.path.join(ROOT, "shared_tests"))
    results = []
    for backend in args.backends.split(","):
        for name, h, w in rows:
            for fraction in budgets:
                t0 = time.perf_counter()
                r = run_case(backend, name, h, w, fraction, args.repeats, args.threads)
                results.append(r)
                print(f"{LABELS[backend]} {name} {h}x{w} budget {mib(r['budget']) if r['budget'] else 'untiled'} "
                      f"(estimate {mib(r['estimate'])}, tile {r['tile']}): peak {mib(r['peak'])} MiB "
                      f"(ru_maxrss {mib(r['maxrss'])}), {r['time']:.2f} s ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    slack = _slack()
    command = "python bench/memory_budget.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_report(results, args.out, command, slack)
    print(f"wrote {args.out}")


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
