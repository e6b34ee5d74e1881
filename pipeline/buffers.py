"""WorkBuffers: [rows, cols] work tensors kept from one chunk to the next, for the chunked passes of the cache
(cache.TeacherRunner) and of the loss (losses.chunked).

On a CPU a fresh [chunk, V] tensor per pass costs more than the pass itself (its pages are faulted in anew), so a
chunked pass takes its work tensors from here, by key: the same storage every chunk, reallocated only when a
chunk needs more elements or another dtype or device.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


class WorkBuffers:
    """Uninitialised work tensors by key. A tensor taken under a key lives until the next take of that key: the
    caller consumes it (or copies it out) before taking the key again."""

    def __init__(self):
        self._held: dict[Hashable, torch.Tensor] = {}

    def take(self, key: Hashable, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous uninitialised [rows, cols] tensor of dtype on device: a view of the key's storage."""
        rows, cols = shape
        flat = self._held.get(key)
        if flat is None or flat.numel() < rows * cols or flat.dtype != dtype or not _same_device(flat, device):
            flat = torch.empty(rows * cols, dtype=dtype, device=device)
            self._held[key] = flat
        return flat[: rows * cols].view(rows, cols)


def _same_device(t: torch.Tensor, device) -> bool:
    device = torch.device(device)  # "cuda" (no index) means the current one: any index matches it
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)
