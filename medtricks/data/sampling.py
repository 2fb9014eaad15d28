"""Epoch-seeded sampling: each epoch's image order and every image's augmentation draws are a function of
(seed, epoch, position) only.

Why not DataLoader(shuffle=True, generator=...): the order then depends on how many epochs the generator has
served and the augmentation on the RNG state each worker carries from epoch to epoch (persistent workers), so a
run resumed after a crash, or run with another worker count, sees other images and other crops. Here the sampler
yields `(index, sample_seed)` pairs, `ImageDataset` runs its random transforms under `sample_seed`, and
`set_epoch` (as DistributedSampler's) moves to the next epoch: a resumed run replays the same epochs bit for bit.

Distributed (torchrun): every rank computes the same global order, padded to a multiple of the number of processes
by repeating its first pairs (as DistributedSampler does), and rank r takes pairs r, r + world, ... So with the
global batch split evenly (each rank's batch = batch_size / world), global batch k of a run on several processes
holds exactly the images and augmentation seeds of batch k of a one-process run with the same batch_size.
(One difference: when padding completes one more global batch than the one-process epoch has, that batch is
trained on, with up to world - 1 images repeated.) Evaluation is not padded: see medtricks.distributed.shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_SEED_SPACE = 2**62


def epoch_seed(seed: int, epoch: int, stream: int = 0, rank: int = 0) -> int:
    """A seed for one (run seed, epoch, stream) triple: distinct streams for order, mixing and dropout; `rank`
    (a process of a distributed run) gives each process its own stream (rank 0 = the single-process seed)."""
    return (seed * 1_000_003 + epoch * 101 + stream + rank * 2**40) % _SEED_SPACE


class SeededSampler(Sampler):
    """Yields `(dataset position, sample seed)` for one epoch; call `set_epoch(epoch)` before each epoch.

    Args:
        n: dataset length.
        seed: the run seed.
        shuffle: a new permutation each epoch (else 0..n-1).
        weights: per-image sampling weights: n draws with replacement (class-balanced sampling) instead.
        num_replicas: processes sharing the epoch (torchrun's world size).
        rank: this process's share, in [0, num_replicas).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: torch.Tensor | None = None,
                 num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"SeededSampler: rank {rank} must lie in [0, num_replicas = {num_replicas}).")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, _SEED_SPACE, (self.n,), generator=generator)
        pairs = list(zip(order.tolist(), seeds.tolist(), strict=True))
        padded = len(self) * self.num_replicas
        pairs += (pairs * math.ceil(padded / max(self.n, 1)))[:padded - self.n]  # repeat the first pairs
        return iter(pairs[self.rank::self.num_replicas])
