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
