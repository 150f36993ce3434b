"""Samplers of a folder's training order: shuffled epochs that depend only on (seed, epoch), and
their endless chain for a single DataLoader pass. Both resume at any batch of any epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from kl_ae.data.images import sample_generator


class EpochSampler(Sampler[int]):
    """Shuffled indices whose order depends only on (seed, epoch), for exact resumption.

    Epoch e yields a permutation of range(n), repeated with a fresh order when ``num_samples`` > n
    (a folder smaller than the batch), and each sample's index is unique over the whole run: the
    r-th repetition of file i in epoch e is ``(e * R + r) * n + i`` with R = ceil(num_samples / n)
    repetitions per epoch. The dataset reads file ``index % n`` and seeds the sample's crop and
    flip by the index, so every repetition and every epoch crops anew. Iterating it is one epoch:
    call :meth:`set_epoch` before each (:class:`EndlessEpochs` chains them for the training
    loader); :meth:`resume_at` skips the samples of an epoch already consumed before a checkpoint.
    """

    def __init__(self, n: int, num_samples: int, seed: int = 0):
        self.n, self.num_samples, self.seed = n, num_samples, seed
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip_samples: int) -> None:
        """The next pass is epoch ``epoch`` without its first ``skip_samples`` samples."""
        self.epoch, self._skip = epoch, skip_samples

    def __len__(self) -> int:
        return self.num_samples - self._skip

    def __iter__(self) -> Iterator[int]:
        g = sample_generator(self.seed, self.epoch, 7)
        repetitions = -(-self.num_samples // self.n)
        offset = self.epoch * repetitions * self.n
        order = torch.cat([torch.randperm(self.n, generator=g) + r * self.n
                           for r in range(repetitions)])[:self.num_samples]
        skip, self._skip = self._skip, 0
        return iter([offset + int(i) for i in order[skip:]])


class EndlessEpochs(Sampler[int]):
    """The epochs of an :class:`EpochSampler` one after another without end, each cut to its first
    ``per_epoch`` samples (a multiple of the batch size times the processes, so no batch spans two
    epochs; what ``drop_last`` left out of an epoch before).

    Written here because a DataLoader pass ends with its sampler: a pass per epoch leaves the
    workers idle at each epoch's end until the step has taken the last batch, and then the step
    waits for a whole batch to be decoded. On a folder of a few batches an epoch that is a large
    share of a fast step's time (bench/epoch_stall.py). One pass over this sampler lets the
    workers run ahead across epochs.

    :meth:`resume_at` (epoch, samples of it to skip) sets where the next pass starts.
    """

    def __init__(self, epochs: EpochSampler, per_epoch: int):
        self.epochs, self.per_epoch = epochs, per_epoch
        self.epoch, self._skip = 0, 0

    def resume_at(self, epoch: int, skip_samples: int) -> None:
        self.epoch, self._skip = epoch, skip_samples

    def set_epoch(self, epoch: int) -> None:
        """Accelerate's prepared loader calls this at every pass; :meth:`resume_at` says where it starts."""
        self.epoch = epoch

    def __len__(self) -> int:
        """One epoch's samples (the iteration goes on past it)."""
        return self.per_epoch

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self._skip
        while True:
            self.epochs.set_epoch(epoch)
            yield from list(self.epochs)[skip:self.per_epoch]
            epoch, skip = epoch + 1, 0
