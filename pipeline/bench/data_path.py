"""The bench's data path: rows/s of CacheRows + StepBatches + collate_rows through a DataLoader (with workers, and in
process), against the rows/s a training step eats."""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

from pipeline.batches import CacheRows, StepBatches, collate_rows
from pipeline.config import BenchConfig


def run_data_path(readers: dict, batch_size: int, config: BenchConfig, step_rows_per_s: dict, device) -> dict:
    """Rows/s of CacheRows + StepBatches + collate_rows through a DataLoader (with workers, and in-process)."""
    out = {}
    for mode, reader in readers.items():
        rows = CacheRows(reader)
        result = {"batch_size": batch_size, "num_workers": config.num_workers}
        for label, workers in (("workers", config.num_workers), ("in_process", 0)):
            sampler = StepBatches(len(rows), batch_size, 1, config.seed, 0, config.data_batches + 1)
            loader = DataLoader(
                rows,
                batch_sampler=sampler,
                collate_fn=collate_rows,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            iterator = iter(loader)
            next(iterator)  # worker start-up is not part of the steady state
            start, count = time.perf_counter(), 0
            for batch in iterator:
                count += batch["tokens"].shape[0]
            result[f"rows_per_s_{label}"] = count / (time.perf_counter() - start)
            del iterator, loader
        result["step_rows_per_s"] = step_rows_per_s[mode]
        result["headroom"] = result["rows_per_s_workers"] / step_rows_per_s[mode]
        out[mode] = result
    return out
