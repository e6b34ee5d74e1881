"""Training batches: rows from the cache's memory maps (distill) or from the token files (baseline),
in a deterministic order that depends only on the seed and the step, so that distill and baseline see
the same sequences in the same order and a resumed run continues exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.cache_format import CacheReader
from pipeline.rows import load_tokens, num_rows, row_tokens


class TokenRows(Dataset):
    """Row i = tokens[i*seq_len : i*seq_len + seq_len + 1] of a split: the cache's `tokens` rows, without the cache."""

    def __init__(self, data_dir: str, split: str, seq_len: int, max_rows: int | None = None):
        self.data_dir, self.split, self.seq_len = data_dir, split, seq_len
        self.rows = num_rows(len(load_tokens(data_dir, split)), seq_len, max_rows)
        self._tokens = None  # opened lazily in each DataLoader worker

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._tokens is None:
            self._tokens = load_tokens(self.data_dir, self.split)
        return {"tokens": row_tokens(self._tokens, index, self.seq_len)}

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


class CacheRows(Dataset):
    """Row i of a cache split: tokens plus the teacher's sparse targets (numpy arrays from memory maps)."""

    def __init__(self, reader: CacheReader, max_rows: int | None = None):
        self.reader = reader
        self.rows = min(len(reader), max_rows) if max_rows else len(reader)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.reader.row(index)


class StepBatches(Sampler):
    """Yields the row indices of each micro-batch from `start_step` on.

    The global order is a fresh permutation of all rows per epoch (seeded by (seed, epoch)); optimizer
    step s consumes the next batch_size * grad_accum * world_size indices, and this process takes its
    interleaved share. Nothing depends on anything but (seed, step), so resume is exact."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        start_step: int,
        max_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_rows, self.batch_size, self.grad_accum = num_rows, batch_size, grad_accum
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.rank, self.world_size = rank, world_size

    def _global_indices(self, start: int, count: int) -> np.ndarray:
        out, position = [], start
        while count > 0:
            epoch, offset = divmod(position, self.num_rows)
            order = np.random.default_rng((self.seed, epoch)).permutation(
                self.num_rows
            )  # not seed + epoch: seed 1 would replay seed 0's epoch 1
            take = order[offset : offset + count]
            out.append(take)
            position += len(take)
            count -= len(take)
        return np.concatenate(out)

    def __iter__(self) -> Iterator[list[int]]:
        per_micro = self.batch_size * self.world_size
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.grad_accum):
                start = (step * self.grad_accum + micro) * per_micro
                indices = self._global_indices(start, per_micro)
                yield indices[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.grad_accum


def collate_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}
