"""Training batches: rows from the cache's memory maps (distill) or from the token files (baseline),
in a deterministic order that depends only on the seed and the step, so that distill and baseline see
the same sequences in the same order and a resumed run continues exactly where it stopped.

A student with another tokenizer than the teacher's reads its own token rows; distilling, AlignedCacheRows adds the
teacher's cached targets carried to its positions and vocabulary (alignment.py), and `teacher_mask` marking them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.alignment import (
    ZERO_MASS_LOGPROB,
    align_positions,
    map_sampled,
    map_topk,
    merge_sampled,
    merge_topk,
    positions_inside,
)
from pipeline.cache_format import CacheReader
from pipeline.rows import load_ends, load_tokens, num_rows, row_tokens, text_path


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


class AlignedCacheRows(Dataset):
    """Row i of a cross-tokenizer student's own rows (TokenRows of its data folder, the reader's split), with the
    teacher's cached targets carried to its positions and vocabulary (`maps`: alignment.TokenizerMaps):

      - aligned: position j's text ends at the same byte as a teacher position's (align_positions): the teacher's
        target there, its ids sent to student ids by the vocabulary map (map_topk / map_sampled);
      - inside a teacher token: position j ends c bytes into the teacher token after the last teacher boundary g
        (positions_inside): the target at g conditioned on those bytes (Continuations: the teacher tokens that
        start with them, each sent to the student token that begins the rest; the others' mass left out, top-k
        entries rescaled so that the tail keeps its share, sampled counts rescaled to num_samples draws).

    `teacher_mask` [L] marks the positions with a target (elsewhere the hard loss only), `aligned_mask` [L] the
    aligned ones. Streaming: a row reads its L student byte ends, binary-searches the teacher's (memory-mapped) and
    reads the few cache rows and text bytes they need; nothing is computed for the whole corpus."""

    def __init__(self, student_dir: str, teacher_data_dir: str, reader: CacheReader, maps, max_rows=None):
        self.token_rows = TokenRows(student_dir, reader.split, reader.seq_len, max_rows)
        self.student_dir, self.teacher_data_dir = student_dir, teacher_data_dir
        self.reader, self.maps, self.seq_len = reader, maps, reader.seq_len
        self.teacher_positions = len(reader) * reader.seq_len  # teacher positions with a cached target
        self._files = None  # (student ends, teacher ends, text), opened lazily in each DataLoader worker

    def __len__(self) -> int:
        return len(self.token_rows)

    def __getstate__(self):
        return {**self.__dict__, "_files": None}

    def _opened(self):
        if self._files is None:
            split = self.reader.split
            text = np.memmap(text_path(self.teacher_data_dir, split), dtype=np.uint8, mode="r")
            self._files = (load_ends(self.student_dir, split), load_ends(self.teacher_data_dir, split), text)
        return self._files

    def rows_within(self, teacher_rows: int) -> int:
        """How many of the first rows lie in the text the teacher's first `teacher_rows` rows cover (their labels end
        where the teacher's last label does, or before): at least 1."""
        student_ends, teacher_ends, _ = self._opened()
        text_end = int(teacher_ends[teacher_rows * self.seq_len])
        last_label = int(np.searchsorted(student_ends, np.asarray(text_end, student_ends.dtype), side="right")) - 1
        return max(1, min(len(self), last_label // self.seq_len))

    def label_text_bytes(self, rows: int) -> int:
        """UTF-8 bytes of the text the first `rows` rows' labels spell (tokens 1 .. rows*L, from their byte ends)."""
        student_ends = self._opened()[0]
        return int(student_ends[rows * self.seq_len]) - int(student_ends[0])

    def teacher_positions_of(self, index: int) -> np.ndarray:
        """[L] the teacher position aligned with each position of row `index`, -1 where none."""
        student_ends, teacher_ends, _ = self._opened()
        start = index * self.seq_len
        return align_positions(student_ends, start, self.seq_len, teacher_ends, self.teacher_positions)

    def teacher_targets_at(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The cached targets at teacher positions [n] ({name: [n, ...]}, teacher ids), one cache row at a time."""
        cache_rows, columns = np.divmod(positions, self.seq_len)
        targets = {}
        for cache_row in np.unique(cache_rows) if len(positions) else [0]:  # no positions: row 0 gives the shapes
            row = self.reader.row(int(cache_row))
            take = cache_rows == cache_row
            for name, values in row.items():
                if name != "tokens":
                    targets.setdefault(name, np.zeros((len(positions), *values.shape[1:]), values.dtype))
                    targets[name][take] = values[columns[take]]
        return targets

    def _conditioned(self, targets: dict[str, np.ndarray], read: list[bytes]) -> tuple[dict, np.ndarray]:
        """Cached targets at teacher boundaries conditioned on the bytes read past each (Continuations), in student
        ids; and which rows keep any mass (a row no cached id continues has no target)."""
        continuations = self.maps.continuations
        if self.reader.mode == "topk":
            ids = continuations.continuation_ids(targets["topk_ids"], read)
            logprobs = targets["topk_logprobs"].astype(np.float64)
            with np.errstate(under="ignore", divide="ignore"):
                mass = np.where(logprobs > ZERO_MASS_LOGPROB, np.exp(logprobs), 0.0)
                kept = np.where(ids >= 0, mass, 0.0)
                # conditioned: the kept top-k mass scaled up to the top-k's whole share, the tail's share as it was
                kept_mass = kept.sum(1, keepdims=True)
                scale = np.divide(
                    mass.sum(1, keepdims=True), kept_mass, out=np.zeros_like(kept_mass), where=kept_mass > 0
                )
                logprobs = np.log(kept * scale).astype(np.float32)
            merged = merge_topk(ids, logprobs, targets["tail_logprob"])
            targets = dict(targets, topk_ids=merged[0], topk_logprobs=merged[1], tail_logprob=merged[2])
            return targets, kept_mass[:, 0] > 0
        ids = continuations.continuation_ids(targets["sample_ids"], read)
        counts = np.where(ids >= 0, targets["sample_counts"].astype(np.float64), 0.0)
        draws = counts.sum(1, keepdims=True)
        scale = np.divide(self.reader.num_samples, draws, out=np.zeros_like(draws), where=draws > 0)
        merged = merge_sampled(ids, (counts * scale).astype(np.float32))  # as if every draw continued the bytes
        entropy = draws_entropy(merged[1], self.reader.num_samples)  # conditioned: no longer the cached distribution
        return dict(targets, sample_ids=merged[0], sample_counts=merged[1], teacher_entropy=entropy), draws[:, 0] > 0

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        out = self.token_rows[index]
        student_ends, teacher_ends, text = self._opened()
        start = index * self.seq_len
        positions = self.teacher_positions_of(index)
        aligned = positions >= 0
        boundary, spans = positions_inside(
            student_ends, start, self.seq_len, teacher_ends, self.teacher_positions, self.maps.continuations.within
        )
        inside = (boundary >= 0) & ~aligned
        n_aligned = int(aligned.sum())
        both = self.teacher_targets_at(np.concatenate([positions[aligned], boundary[inside]]))  # each row read once
        targets = {name: values[:n_aligned] for name, values in both.items()}
        if self.reader.mode == "topk":
            ids, logprobs, tail = map_topk(
                targets["topk_ids"], targets["topk_logprobs"], targets["tail_logprob"], self.maps.id_map
            )
            targets.update(topk_ids=ids, topk_logprobs=logprobs, tail_logprob=tail)
        else:
            cached_counts = targets["sample_counts"]
            ids, counts = map_sampled(targets["sample_ids"], cached_counts, self.maps.id_map)
            # The cached entropy (the constant in the reported KD, not in its gradient) is the teacher's over its own
            # vocabulary: it stays where the draws reach the student one to one (the same entries and draws), else
            # the carried draws' own entropy takes its place, so the reported KD is the KL to them (>= 0).
            one_to_one = ((cached_counts > 0).sum(1) == (counts > 0).sum(1)) & (cached_counts.sum(1) == counts.sum(1))
            entropy = np.where(one_to_one, targets["teacher_entropy"], draws_entropy(counts, self.reader.num_samples))
            targets.update(sample_ids=ids, sample_counts=counts, teacher_entropy=entropy.astype(np.float32))
        read = [bytes(text[begin:end]) for begin, end in spans[inside].tolist()]
        inside_targets, kept = self._conditioned({name: values[n_aligned:] for name, values in both.items()}, read)
        inside[np.flatnonzero(inside)[~kept]] = False  # no cached teacher token continues what the student read
        for name, values in targets.items():  # positions without a teacher target: zeros, never read (teacher_mask)
            out[name] = np.zeros((self.seq_len, *values.shape[1:]), values.dtype)
            out[name][aligned] = values
            out[name][inside] = inside_targets[name][kept].astype(values.dtype)
        out["teacher_mask"] = aligned | inside
        out["aligned_mask"] = aligned
        return out


def draws_entropy(counts: np.ndarray, num_samples: int) -> np.ndarray:
    """-sum p log p of the draws' frequencies p = counts / num_samples, per position: counts [..., S] -> float32
    [...]."""
    p = counts.astype(np.float64) / num_samples
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return (-terms.sum(-1)).astype(np.float32)


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
