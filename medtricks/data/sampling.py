"""Epoch-seeded sampling: each epoch's image order and every image's augmentation draws are a function of
(seed, epoch, position) only.

Why not DataLoader(shuffle=True, generator=...): the order then depends on how many epochs the generator has
served and the augmentation on the RNG state each worker carries from epoch to epoch (persistent workers), so a
run resumed after a crash, or run with another worker count, sees other images and other crops. Here the sampler
yields `(index, sample_seed)` pairs, `ImageDataset` runs its random transforms under `sample_seed`, and
`set_epoch` (as DistributedSampler's) moves to the next epoch: a resumed run replays the same epochs bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_SEED_SPACE = 2**62


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A seed for one (run seed, epoch, stream) triple: distinct streams for order, mixing and dropout."""
    return (seed * 1_000_003 + epoch * 101 + stream) % _SEED_SPACE


class SeededSampler(Sampler):
    """Yields `(dataset position, sample seed)` for one epoch; call `set_epoch(epoch)` before each epoch.

    Args:
        n: dataset length.
        seed: the run seed.
        shuffle: a new permutation each epoch (else 0..n-1).
        weights: per-image sampling weights: n draws with replacement (class-balanced sampling) instead.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, _SEED_SPACE, (self.n,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))
