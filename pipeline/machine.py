"""What machine a figure was measured on (CPU model and features, GPU name, thread count), and what its hardware
computes fast."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags (Linux /proc/cpuinfo) that decide how fast the matmuls of a model run: AVX2 and AVX-512 float32, and
# native bfloat16 dot products (AVX512-BF16 instructions, AMX tiles).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")


def cpu_features() -> list[str]:
    """The CPU_FEATURES this CPU has (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [feature for feature in CPU_FEATURES if feature in flags]


def fast_bf16(device) -> bool:
    """Does `device` multiply bfloat16 matrices natively: a CUDA GPU with bf16 support, or a CPU with bf16 dot-product
    instructions (AVX512-BF16 or AMX-BF16) that torch's oneDNN kernels use."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_features())
    return bool(native) and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_name(device) -> str:
    """'NVIDIA H200' on a GPU; 'AMD EPYC (2 torch threads)' on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads)"
