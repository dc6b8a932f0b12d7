"""Benchmark: CI with the last strided layer's shifts left in place against the same CI stacking them.

Where only per-pixel layers follow the last pooling or strided convolution (Simo-Serra: max pooling
4x4, then tanh), convert() runs that layer at stride 1 and leaves its shifts in place instead of
stacking them on the batch axis and unwarping them again.  Here two CIs of the same net, one of them
switched back to the stacked form, are timed in turns in one process (the one that goes first
alternates), and their outputs compared.

    python bench/shifts_in_place.py [--sizes 240x360,480x720,720x1080] [--threads 2] [--repeats 11]
                                    [--out bench/RESULTS_shifts_in_place.md]
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as bench.py, before torch is imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import sys  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # appended: never ahead of site-packages

import architectures  # noqa: E402
from backends import load_backend  # noqa: E402
from timing import pair_rows, report  # noqa: E402


def torch_pair(threads):
    """(label, in place, stacked, image maker, to numpy) for PyTorch."""
    import torch
    torch.set_num_threads(threads)
    fdfe = load_backend("pytorch", "torch").FDFE
    net = architectures.build_torch("simo_serra").eval()
    in_place, stacked = fdfe.convert(net, 64, check=False), fdfe.convert(net, 64, check=False)
    for step in stacked.steps:
        step.dense_tail = False

    def run(ci, image):
        with torch.inference_mode():
            return ci(image).numpy()
    return f"PyTorch {torch.__version__}", in_place, stacked, lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2)), run


def keras_pair(threads):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    fdfe = load_backend("tensorflow", "tf").FDFE
    net = architectures.build_keras("simo_serra", architectures.build_torch("simo_serra"), fdfe)
    in_place, stacked = fdfe.convert(net, 64, check=False), fdfe.convert(net, 64, check=False)
    stacked.shifts_in_place = False  # before its first call, which traces it
    fdfe._strided_layers(stacked.core)[-1].shifts_in_place = False

    def run(ci, image):
        return ci(image).numpy().transpose(0, 3, 1, 2)
    return f"TensorFlow {tf.__version__}", in_place, stacked, tf.constant, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="240x360,480x720,720x1080", help="comma-separated HxW")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    command = "python bench/shifts_in_place.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Simo-Serra CI, its last max pooling's shifts left in place against stacked and unwarped, timed in "
             f"turns in one process: median of {args.repeats} calls each after a warm-up, float32, "
             f"{args.threads} CPU threads, one grey image. Command: `{command.strip()}`", "",
             "| backend | image (W×H) | shifts in place | stacked | ratio | outputs differ by (max abs) |",
             "|---|---|---|---|---|---|"]
    for line in pair_rows((torch_pair, keras_pair), args.threads, args.sizes, args.repeats):
        lines.append(line)
        print(line, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
