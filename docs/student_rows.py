"""Is a student head of 50,304 rows (GPT-2's 50,257 tokens rounded up to a multiple of 64) faster to train on this
machine? Times the vocabulary-sized part of a training step, the head matmul [2048, 256] x [256, V] and the pipeline's
loss (losses.distillation_loss, CE), forward + backward, interleaved over 8 repeats after one warm-up; medians.

    .venv/bin/python docs/student_rows.py THREADS      (docs/history.md, "2026-11-29: student rows")
"""

import statistics
import sys
import time

import torch

from pipeline.losses import distillation_loss

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
positions, width = 2048, 256
generator = torch.Generator().manual_seed(0)
hidden = torch.randn(positions, width, generator=generator)
labels = torch.randint(0, 50257, (positions,), generator=generator)
heads = {rows: (torch.randn(rows, width, generator=generator) * 0.02).requires_grad_(True) for rows in (50257, 50304)}
times = {rows: [] for rows in heads}
for repeat in range(9):
    for rows, head in heads.items():
        inputs = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = distillation_loss(inputs @ head.T, labels, alpha=1.0, temperature=1.0).total
        loss.backward()
        if repeat:
            times[rows].append(time.perf_counter() - start)
        head.grad = None
for rows, seconds in times.items():
    print(f"{rows} rows: median {1000 * statistics.median(seconds):.1f} ms over {len(seconds)} repeats")
print(f"50,304 / 50,257 time: {statistics.median(times[50304]) / statistics.median(times[50257]):.3f}")
