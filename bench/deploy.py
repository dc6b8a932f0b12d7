"""Benchmark: CI's exported artifacts against eager CI of the same framework.

The Simo-Serra net (64x64 patches) at 360x240, one grey image, the same CPU threads for every
artifact.  PyTorch: eager CI, torch.compile(ci), the torch.export program, ONNX Runtime (the
dynamo=True export).  Keras: eager CI, CI in a tf.function, the reloaded SavedModel (ci.export) and
TFLite (built-in ops; the interpreter's default XNNPACK delegate).  Every artifact is exported for
dynamic N, H, W and checked against eager CI on the benchmark image before it is timed.

    python bench/deploy.py [--threads 2] [--size 240x360] [--repeats 5] [--out bench/RESULTS_deploy.md]

Prints a Markdown table (and writes it to --out).
"""

import argparse
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # appended: never ahead of site-packages
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import architectures  # noqa: E402
from backends import load_backend  # noqa: E402
from timing import median_time, report  # noqa: E402

NET = "simo_serra"


def _check(name, got, want):
    diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    scale = float(np.max(np.abs(np.asarray(want))))
    if not diff <= 1e-4 * max(scale, 1.0):
        raise AssertionError(f"{name} differs from eager CI by {diff}")
    return diff


def torch_rows(image, threads, repeats, workdir):
    import onnxruntime
    import torch
    from torch.export import Dim
    torch.set_num_threads(threads)
    tb = load_backend("pytorch", "torch")
    net = architectures.build_torch(NET)
    ci = tb.FDFE.convert(net, architectures.PATCH[NET])
    x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want = ci(x).numpy()
    dims = {0: Dim("N", min=1, max=64), 2: Dim("H", min=1, max=8192), 3: Dim("W", min=1, max=8192)}
    example = (torch.cat([x, x]),)  # torch.export specialises example sizes of 1: export with 2 images
    program = torch.export.export(ci, example, dynamic_shapes={"images": dims}).module()
    compiled = torch.compile(ci, dynamic=True)
    path = os.path.join(workdir, "ci.onnx")
    torch.onnx.export(ci, example, path, dynamo=True, input_names=["images"], output_names=["features"],
                      dynamic_shapes={"images": dims})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    artifacts = [("eager CI", lambda: ci(x)), ("torch.compile(ci, dynamic=True)", lambda: compiled(x)),
                 ("torch.export program", lambda: program(x)),
                 ("ONNX Runtime (dynamo=True export)", lambda: session.run(None, {"images": x.numpy()})[0])]
    rows = []
    with torch.no_grad():
        for name, fn in artifacts:
            diff = _check(name, torch.as_tensor(np.asarray(fn())).numpy(), want)
            rows.append((f"PyTorch {torch.__version__}", name, median_time(fn, repeats), diff))
    return rows


def tf_rows(image, threads, repeats, workdir):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    kb = load_backend("tensorflow", "tf")
    net = architectures.build_keras(NET, architectures.build_torch(NET), kb.FDFE)
    ci = kb.FDFE.convert(net, architectures.PATCH[NET])
    x = tf.constant(image)
    want = ci(x).numpy()
    spec = tf.TensorSpec([None, None, None, image.shape[3]], tf.float32)
    graph = tf.function(lambda images: ci(images), input_signature=[spec])
    saved_path = os.path.join(workdir, "ci_saved")
    ci.export(saved_path, verbose=False)
    loaded = tf.saved_model.load(saved_path)  # kept: its functions need its variables alive
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_path)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=threads)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(image.shape))
    interpreter.allocate_tensors()

    def tflite():
        interpreter.set_tensor(index, image)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    artifacts = [("eager CI", lambda: ci(x).numpy()), ("tf.function", lambda: graph(x).numpy()),
                 ("SavedModel (ci.export, reloaded)", lambda: loaded.serve(x).numpy()),
                 ("TFLite, built-in ops (XNNPACK)", tflite)]
    rows = []
    for name, fn in artifacts:
        diff = _check(name, fn(), want)
        rows.append((f"TensorFlow {tf.__version__}", name, median_time(fn, repeats), diff))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="240x360", help="H x W")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="torch,tf")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).random((1, height, width, 1), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        if "torch" in args.backends:
            rows += torch_rows(image, args.threads, args.repeats, workdir)
        if "tf" in args.backends:
            rows += tf_rows(image, args.threads, args.repeats, workdir)
    lines = [f"Deployed CI, {NET} net, one {width}x{height} grey image, {args.threads} CPU threads "
             f"({platform.processor() or platform.machine()}); median of {args.repeats} calls after a warm-up; "
             f"`python bench/deploy.py --threads {args.threads} --size {args.size}`.", "",
             "| framework | artifact | time | vs eager CI | max abs diff to eager CI |", "|---|---|---|---|---|"]
    eager = {}
    for framework, name, seconds, diff in rows:
        eager.setdefault(framework, seconds)
        lines.append(f"| {framework} | {name} | {seconds * 1e3:.1f} ms | {seconds / eager[framework]:.2f}× | "
                     f"{diff:.1e} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
