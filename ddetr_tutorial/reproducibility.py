"""Exact resumption: seeding, RNG state, and a data order that is a function of
(seed, epoch).

A run can stop anywhere and resume bit for bit: the sample order of each epoch
is a permutation drawn from (seed, epoch) (`EpochSampler`), each sample's
augmentation draws from its own generator seeded by (seed, epoch, index)
(`SeededDataset`), and the global RNGs (dropout) travel in checkpoints as plain
data (`rng_state` / `set_rng_state`).
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def seed_everything(seed: int, gpus: bool = True) -> None:
    """Seed python, numpy and torch. gpus=False seeds torch's CPU generator only:
    torch.manual_seed also queues a seed for every GPU backend, with a formatted
    stack trace each time (~1/8 of a data sample's load time)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if gpus:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global RNGs from a `rng_state` dict (CUDA only where present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block on python/numpy/torch RNGs seeded with `seed`, restoring the
    caller's RNG states afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_everything(seed, gpus=False)  # the restore below covers the CPU generator alone
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """Gives each sample's augmentation its own RNG stream, a function of
    (seed, epoch, index): the result does not depend on worker count, order
    or where a run was resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        with isolated_rng(sample_seed % 2**63):
            return self.dataset[index]


class EpochSampler(Sampler):
    """Indices of one epoch: a permutation from (seed, epoch) when shuffling,
    this rank's share of it (every world_size-th), starting after `skip` samples
    (mid-epoch resume). pad=True repeats the first indices so that every rank
    gets ceil(size / world_size), as DistributedSampler does; pad=False gives
    uneven shards that together hold each index exactly once."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            per_rank = math.ceil(self.size / self.world_size) if self.size else 0
            order += order[:per_rank * self.world_size - len(order)]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self):
        return max(len(self._indices()) - self.skip, 0)


def _seed_worker(worker_id: int) -> None:
    # Workers still get distinct global seeds (for code that ignores SeededDataset).
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size: int, shuffle: bool, collate_fn, seed: int = 0,
                num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last=None,
                pad=None):
    """A DataLoader over SeededDataset(dataset) with an EpochSampler; call
    `set_epoch(loader, epoch, skip_batches)` before each epoch. drop_last and
    pad default to `shuffle`: a training loader drops its partial batch and pads
    its shard, an evaluation loader (shuffle=False) keeps every image once."""
    # Training pads so that every rank runs the same number of steps (DDP's
    # gradient all-reduce needs all ranks at each step). Evaluation must not: a
    # padded image would be predicted twice and its detections scored twice by
    # COCOeval; uneven shards are fine there, as the forward passes there are
    # not collective and the results are gathered as lists of any length.
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size,
                           pad=shuffle if pad is None else pad)
    # Its own generator: creating an iterator then draws the workers' base seed
    # from it, not from the global RNG, whose sequence a resumed run must replay.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      collate_fn=collate_fn, num_workers=num_workers,
                      drop_last=shuffle if drop_last is None else drop_last,
                      worker_init_fn=_seed_worker, generator=generator)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point a `make_loader` loader at `epoch`, skipping its first `skip_batches` batches."""
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
