"""Samplers of the data loaders: the training order as a function of ``(seed, epoch)`` and evaluation
sharding without padding, both DDP-aware, and putting sharded per-sample results back in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from trustcnn.callbacks import epoch_seed


class EpochShuffleSampler(DistributedSampler):
    """A random order of ``n`` indices that is a function of ``(seed, epoch)``, optionally sharded.

    Lightning calls ``set_epoch`` before every training epoch. A ``DataLoader`` generator would instead
    restart from its seed whenever the loader is rebuilt, so a run resumed from a checkpoint would replay
    epoch 0's order; with this sampler epoch ``e`` has the same order in a resumed and an uninterrupted run.

    Under DDP (``world_size > 1``) every rank draws the same global order and takes every
    ``world_size``-th index from position ``rank``: with a per-rank batch of ``B``, the ranks' batches
    ``k`` together are exactly the one-process batch ``k`` of ``world_size * B`` samples, so DDP's averaged
    gradient is the one-process gradient. The order is padded with its own first indices to a multiple of
    ``world_size`` (as ``DistributedSampler`` does) so that every rank runs the same number of steps; only
    the last batch of an epoch can differ from one process, and only when ``n`` is not a multiple of
    ``world_size``.

    It is a ``DistributedSampler`` only so that Lightning (``use_distributed_sampler=True``) leaves it
    alone instead of sharding it a second time; none of the parent's sampling is used.

    ``resume_at=(epoch, k)``: a run resumed from a checkpoint written ``k`` indices (of this rank) into
    ``epoch`` (a preempted job's mid-epoch checkpoint) gets the rest of that epoch's order, once; ``__len__``
    stays the full epoch's, as Lightning counts the batches already done itself.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1,
                 resume_at: tuple[int, int] | None = None) -> None:
        _check_shard(rank, world_size)
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.shuffle, self.drop_last = True, False
        self.num_samples = -(-self.n // self.num_replicas)  # per rank, after padding
        self.total_size = self.num_samples * self.num_replicas
        self.resume_at = resume_at

    def global_order(self) -> list[int]:
        """The order of one process (``world_size = 1``) for the current epoch, before sharding."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        order = self.global_order()
        if self.num_replicas > 1:
            padding = self.total_size - self.n
            order += (order * (padding // max(self.n, 1) + 1))[:padding]
            order = order[self.rank :: self.num_replicas]
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            order = order[self.resume_at[1]:]
        self.resume_at = None  # only the epoch the run resumed in
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(DistributedSampler):
    """Evaluation sharding without padding: rank ``r`` of ``world_size`` reads indices ``r, r + world_size, ...``
    of ``range(n)`` in order, so every image is evaluated exactly once (``DistributedSampler`` would repeat
    some to even out the ranks, and count them twice in the metrics). Ranks may get one image (and so one
    batch) more than others; :func:`interleave_shards` puts their per-sample results back in loader order.
    A ``DistributedSampler`` only so that Lightning does not wrap it (see :class:`EpochShuffleSampler`).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        _check_shard(rank, world_size)
        if n < world_size:
            raise ValueError(f"{n} evaluation samples cannot be shared by {world_size} processes: each rank needs "
                             "at least one (a rank without batches would wait forever for the others' metrics)")
        self.n, self.rank, self.num_replicas = int(n), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0
        self.num_samples = len(range(self.rank, self.n, self.num_replicas))
        self.total_size = self.n

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _check_shard(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")


def interleave_shards(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample results of the ranks of a :class:`ShardSampler` loader (``parts[r]``: rank ``r``'s, in its
    order) back in the one-process loader order: position ``j * world_size + r`` holds ``parts[r][j]``.

    Any first-``k``-batches limit leaves each rank a prefix of its shard, and their union is then a prefix
    of the loader order, which is what this returns."""
    world_size = len(parts)
    total = sum(len(p) for p in parts)
    if world_size == 1:
        return parts[0]
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        expected = len(range(rank, total, world_size))
        if len(part) != expected:
            raise ValueError(f"rank {rank} holds {len(part)} results, but a prefix of {total} samples sharded over "
                             f"{world_size} ranks gives it {expected}: the shards are not a ShardSampler's")
        out[rank::world_size] = part
    return out
