"""Small helpers shared by the benchmark scripts: a median timer and the report writer."""

import statistics
import time


def median_time(fn, repeats):
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pair_rows(makers, threads, sizes, repeats):
    """Time two CIs of each maker in turns (the one that goes first alternates) on one grey image per size.

    ``makers``: functions of the thread count returning (label, first CI, second CI, image maker, run), where
    ``run(ci, image)`` returns a numpy array and ``image maker`` turns a (1, H, W, 1) float32 array into an input;
    ``sizes``: "HxW,HxW,...".  Yields one Markdown row per maker and size: label, W×H, the two medians, their
    ratio and the largest difference of the outputs (the first call of each, which is also the warm-up)."""
    import numpy as np
    rng = np.random.default_rng(0)
    for make in makers:
        label, first, second, image_of, run = make(threads)
        for size in sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            image = image_of(rng.standard_normal((1, h, w, 1)).astype(np.float32))
            diff = float(np.abs(run(first, image) - run(second, image)).max())
            times = {0: [], 1: []}
            for i in range(repeats):
                for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                    start = time.perf_counter()
                    run((first, second)[which], image)
                    times[which].append(time.perf_counter() - start)
            a, b = statistics.median(times[0]), statistics.median(times[1])
            yield f"| {label} | {w}×{h} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.3f} | {diff:.1e} |"


def report(lines, out=None):
    """Print the Markdown lines and write them to ``out`` (if given)."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def cpu_description():
    """The CPU's model name and its widest vector instructions, from /proc/cpuinfo (e.g. "AMD EPYC, AVX512 with
    avx512_bf16"): figures differ between CPU classes (TensorFlow turns its oneDNN ops and their memory pool
    on for AVX512-VNNI, AVX512-BF16 and AMX CPUs only)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extras = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {vector}" + (f" with {', '.join(extras)}" if extras else "")
