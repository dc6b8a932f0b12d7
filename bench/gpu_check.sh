#!/usr/bin/env bash
# One run on a machine with a CUDA GPU and PyTorch (no TensorFlow): the test suite on CPU and CUDA
# (TensorFlow tests skip; the golden file stands in for TensorFlow's results), then the benchmark on
# the GPU in float32 (strict and TF32) and float16.  Writes into $OUT (default: outputs/gpu).
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest shared_tests -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import sys, time, torch
sys.path[:0] = ["pytorch", "shared_tests"]
import FDFE, architectures
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.benchmark = True
net = architectures.build_torch("simo_serra").cuda()
x = torch.randn(1, 1, 720, 1080, device="cuda")
for fmt in (torch.channels_last, None):
    ci = FDFE.convert(net, 64, memory_format=fmt)
    with torch.inference_mode():
        for _ in range(3):
            ci(x)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(10):
            ci(x)
        torch.cuda.synchronize()
    print(f"Simo-Serra 1080x720 strict float32, memory_format={fmt}: {(time.perf_counter() - t) / 10 * 1e3:.1f} ms")
PY
timeout 400 python3 bench/bench.py --device cuda --backends torch --dtypes float32,float16 --tf32 \
    --threads "$(nproc)" --json "$OUT/results_cuda.json" --out "$OUT/RESULTS_cuda.md" 2>&1 | tail -40
