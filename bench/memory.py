"""Peak memory of a call: CUDA's allocator statistics on GPUs, sampled resident set size on CPUs."""

import os
import threading
import time


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager: ``peak`` is the largest increase of memory in use while the block ran.

    On CUDA it reads torch.cuda.max_memory_allocated (exact); on the CPU a thread samples the
    process' resident set every 0.5 ms (peaks shorter than that can be missed)."""

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        peak = 0
        while not self.stop.is_set():
            peak = max(peak, _rss_bytes() - self.base)
            time.sleep(0.0005)
        self.peak = max(peak, _rss_bytes() - self.base)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
        return False
