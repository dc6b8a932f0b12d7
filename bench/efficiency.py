"""Benchmark: CI's efficiency (speedup over Cp on all patches / FLOP ratio), Cp and CI timed in turns.

bench.py times Cp on its sample of patches, then CI, minutes apart; on a shared machine whose speed
drifts by tens of percent within minutes, their ratio carries that drift.  Here, in one process per
backend, each round times one CI call on the image and then Cp on batches of 256 random patches of the
same image for about as long, so that the two figures of a round come from the same minute.  A
round's efficiency is

    (Cp time per patch x H x W / CI time) / (Cp's multiply-adds on all patches / CI's)

and the figure is the median over the rounds (after a warm-up of both), with its range: at least
``--rounds`` rounds, and more on fast rows, until CI has run about ``--seconds`` (at most 51 rounds).

    python bench/efficiency.py [--rows simo_serra,zagoruyko_siam_l2] [--backends torch,tf] [--threads 2]
                               [--rounds 5] [--seconds 10] [--out bench/RESULTS_efficiency.md]

Same nets, weights, image and FLOP counts as bench.py; `convert`'s defaults.
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

import bench  # noqa: E402  (its rows, runners and FLOP counts)
from timing import report  # noqa: E402

BATCH = 256


def rounds(runner, name, height, width, n_rounds, seconds):
    """Efficiency of each round, and the medians of CI's time and Cp's time per patch."""
    patch = bench.architectures.PATCH[name]
    rng = np.random.default_rng(0)
    net = runner.net(name, "float32")
    image = runner.image(rng.standard_normal((1, height, width, 1)).astype(np.float32), "float32")
    flat = rng.choice(height * width, size=min(height * width, 16 * BATCH), replace=False)
    positions = np.stack([np.zeros_like(flat), flat // width, flat % width], 1)
    patches = runner.patches(image, patch, positions)
    batches = [patches[i:i + BATCH] for i in range(0, len(flat) - BATCH + 1, BATCH)] or [patches]
    ci = runner.convert(net, patch)
    if runner.name == "PyTorch":
        torch = runner.torch

        def cp(batch):
            with torch.inference_mode():
                net(batch)
    else:
        function = runner.tf.function(lambda x: net(x, training=False))

        def cp(batch):
            function(batch).numpy()
    runner.run(ci, image)  # warm-ups
    cp(batches[0])
    flop_ratio = (bench.architectures.macs_per_patch(bench.architectures.build_torch(name), patch) * height * width
                  / bench.ci_macs(name, height, width))
    out = []
    while len(out) < n_rounds or (len(out) < 51 and sum(r[1] for r in out) < seconds):
        start = time.perf_counter()
        runner.run(ci, image)
        t_ci = time.perf_counter() - start
        cp_time, cp_patches, i = 0.0, 0, 0
        while cp_time < t_ci or cp_patches < 2 * BATCH:  # Cp for about as long as CI took
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            cp(batch)
            cp_time += time.perf_counter() - start
            cp_patches += int(batch.shape[0])
            i += 1
        per_patch = cp_time / cp_patches
        out.append((per_patch * height * width / t_ci / flop_ratio, t_ci, per_patch))
    return out, flop_ratio


def child(backend, name, height, width, threads, n_rounds, seconds):
    cls = bench.TorchRunner if backend == "torch" else bench.KerasRunner
    runner = cls("cpu", threads)
    result, flop_ratio = rounds(runner, name, height, width, n_rounds, seconds)
    print(json.dumps({"backend": runner.name, "flop_ratio": flop_ratio, "rounds": result}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="simo_serra,zagoruyko_siam_l2", help="comma-separated net names")
    p.add_argument("--backends", default="torch,tf")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5, help="at least this many rounds")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="more rounds on fast rows, until CI has run this long (at most 51 rounds)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        backend, name, height, width = args.child
        return child(backend, name, int(height), int(width), args.threads, args.rounds, args.seconds)
    wanted = set(args.rows.split(","))
    command = "python bench/efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"CI's efficiency (speedup over Cp on all patches / FLOP ratio), Cp and CI timed in turns: "
             f"rounds of one CI call and then Cp on batches of {BATCH} patches for as long (at least "
             f"{args.rounds}, more on fast rows until CI ran about {args.seconds:g} s, at most 51), "
             f"float32, {args.threads} CPU threads, one grey image, `convert`'s defaults. Command: "
             f"`{command.strip()}`", "",
             "| net | image (W×H) | backend | FLOP ratio | rounds | CI (median) | Cp per patch (median) | "
             "efficiency (median) | range over rounds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, height, width, _ in [r for r in bench.ROWS if r[0] in wanted]:
        for backend in args.backends.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, name, str(height), str(width),
                   "--threads", str(args.threads), "--rounds", str(args.rounds), "--seconds", str(args.seconds)]
            text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result = json.loads(text)
            flop_ratio, values = result["flop_ratio"], np.array(result["rounds"])
            eff, ci_t, cp_t = np.median(values[:, 0]), np.median(values[:, 1]), np.median(values[:, 2])
            line = (f"| {name} | {width}×{height} | {result['backend']} | {flop_ratio:.1f} | {len(values)} | "
                    f"{bench.fmt_time(ci_t)} | {cp_t * 1e6:.1f} µs | {eff:.2f} | "
                    f"{values[:, 0].min():.2f}–{values[:, 0].max():.2f} |")
            lines.append(line)
            print(line, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
