"""The examples of each optimizer step, the same whatever the number of processes or a resume."""
from __future__ import annotations

import numpy as np


class Batcher:
    """The examples of each optimizer step, split into `chunks` micro-batches (grad_accum x processes,
    accumulation-major); the order of an epoch is a fixed permutation of (seed, epoch), so a resumed
    run, or one with another number of processes, sees the same steps."""

    def __init__(self, collate, encoded: list[dict], step_size: int, seed: int, chunks: int = 1):
        self.collate, self.encoded, self.step_size, self.seed, self.chunks = collate, encoded, step_size, seed, chunks
        if len(encoded) < chunks:
            raise ValueError(f"{len(encoded)} training examples cannot fill {chunks} micro-batches: "
                             "lower --grad-accum or the number of processes")
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        full, rest = divmod(len(self.encoded), self.step_size)
        return full + (rest >= self.chunks)  # a last step too small to give every micro-batch an example is dropped

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))
        return self._order[1]

    def _step(self, epoch: int, i: int) -> np.ndarray:
        return self.order(epoch)[i * self.step_size:(i + 1) * self.step_size]

    def micro_batches(self, epoch: int, i: int, first: int = 0, stride: int = 1) -> list[dict]:
        """Micro-batches first, first + stride, ... of step i (a process takes its rank, stride = processes)."""
        parts = np.array_split(self._step(epoch, i), self.chunks)
        return [self.collate([self.encoded[j] for j in part]) for part in parts[first::stride]]

    def batch(self, epoch: int, i: int) -> dict:
        """All the examples of step i as one batch (the preliminary phase)."""
        return self.collate([self.encoded[j] for j in self._step(epoch, i)])
