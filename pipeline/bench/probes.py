"""The bench's probes: what machine it ran on, how busy it was, and the peak memory, saved tensors and phase times of
a block of work. Every section of the bench measures with these."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.machine import cpu_features, cpu_model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def machine_info(device) -> dict:
    import accelerate
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_start": cpu_busy_fraction(),
    }


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all cores busy during `seconds` (Linux /proc/stat), measured before the bench starts working:
    what other processes use now, unlike the load average, which still remembers a job that just ended."""

    def sample():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block, isolated from what ran before it.

    GPU: torch.cuda.reset_peak_memory_stats, then max_memory_allocated. CPU: Linux keeps the process's
    peak RSS (VmHWM) and lets a process reset it to the current RSS by writing 5 to /proc/self/clear_refs,
    so each block gets a fresh peak (ru_maxrss cannot be reset). Where that fails, a thread samples RSS
    every millisecond. Results in MB: peak, before (at entry) and increase = peak - before. Freed pages
    the allocator keeps (small blocks) are in `before` and can be reused unseen, so the increase is a
    lower bound; tensors over glibc's mmap threshold (every [tokens, vocab] tensor) are always seen."""

    def __init__(self, device):
        self.device, self.method, self.result = device, None, {}

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
            return self
        self.before = (_rss_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS: VmHWM reset via /proc/self/clear_refs before each variant"
            self._sampler = None
        except OSError:
            self._start_sampler()
        return self

    def _start_sampler(self):
        import threading

        import psutil

        process, self._peak, self._stop = psutil.Process(), self.before, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(0.001)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        self.method = "peak RSS: psutil sampled every 1 ms"

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is None:
            peak = (_rss_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.result = {
            "peak_mb": peak / 2**20,
            "before_mb": self.before / 2**20,
            "increase_mb": max(0, peak - self.before) / 2**20,
        }
        return False


class SavedTensorCounter:
    """Counts what autograd saves for backward inside the block (torch.autograd.graph.saved_tensors_hooks,
    which also sees custom Functions' save_for_backward). A tensor is "full-vocab" when numel >= tokens * vocab.
    Storages are counted once (views of one buffer are one buffer)."""

    def __init__(self, big_numel: int):
        self.big_numel, self.storages, self.big = big_numel, {}, {}

    def pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        self.storages[key] = tensor.untyped_storage().nbytes()
        if tensor.numel() >= self.big_numel and tensor.is_floating_point():
            self.big[key] = str(tensor.dtype).replace("torch.", "")
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def summary(self) -> dict:
        dtypes = sorted(self.big.values())
        return {
            "full_vocab_saved": len(dtypes),
            "full_vocab_float32_saved": dtypes.count("float32"),
            "full_vocab_dtypes": dtypes,
            "saved_mb": sum(self.storages.values()) / 2**20,
        }


class Laps:
    """Seconds per named phase: `lap(name)` adds the time since the previous lap (or `start()`) to `name`,
    synchronising a GPU first so that each phase's kernels count in it. Passed as the `lap` callback of
    TeacherRunner and training_step."""

    def __init__(self, device):
        self.device, self.seconds, self._last = device, {}, 0.0

    def start(self) -> None:
        sync(self.device)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def busy_machine(machine: dict) -> bool:
    """CPU runs only: did other processes hold more than half the cores at the start (measured busy share over
    one second, else the load average), or at the end (1-minute load average less this run's own threads)?
    The load average lags, so the end check is a hint, not proof."""
    if machine["gpu"]:
        return False
    half = 0.5 * (machine["cpu_cores"] or 1)
    busy_start = machine.get("cpu_busy_start")
    if busy_start is not None:
        busy = busy_start > 0.5
    else:
        busy = bool(machine.get("load_average_start")) and machine["load_average_start"][0] > half
    end = machine.get("load_average_end")
    return busy or bool(end) and end[0] - machine["torch_threads"] > half
