"""Infinite, resumable, rank-sharded data loading.

The global sample stream concatenates per-epoch permutations, epoch e seeded with (seed, e); its position counts
the samples all processes consumed, rank r of W taking entries r, r + W, ... of each global batch, so saving the
position resumes the exact order whatever the number of workers. Augmentation draws from torch's CPU generator
seeded per item from (seed, stream position).
"""
import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from libs.errors import ConfigError, UViTError
from libs.preemption import ignore_stop_signals

logger = logging.getLogger(__name__)

_MIX = 1_000_003  # a prime: (seed, k) -> seed * _MIX + k keeps nearby seeds' streams apart
_MOD = 2 ** 63 - 1


def mix_seed(seed: int, k: int) -> int:
    """A torch seed for the pair (seed, k)."""
    return (int(seed) * _MIX + int(k)) % _MOD


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64: the order of epoch `epoch`, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


class InfiniteSampler(Sampler):
    """Yields (dataset index, stream position) pairs of one rank forever, from global position `start` on."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        if n <= 0:
            raise ConfigError("the training set is empty: check config.dataset.path")
        self.n, self.rank, self.world_size, self.seed, self.start = n, rank, world_size, seed, int(start)

    def __iter__(self):
        pos, epoch, perm = self.start + self.rank, None, None
        while True:
            e, offset = divmod(pos, self.n)
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.n, self.seed, e)
            yield int(perm[offset]), pos
            pos += self.world_size


class PositionSeeded(Dataset):
    """Makes item (index, position) with torch's CPU generator seeded from (seed, position); in the main
    process the caller's generator state is put back."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def _seeded(self, position, fn, *args):
        in_worker = get_worker_info() is not None
        saved = None if in_worker else torch.get_rng_state()
        # The CPU generator only (torch.manual_seed would also reseed every CUDA device: ~100x slower).
        torch.default_generator.manual_seed(mix_seed(self.seed, position))
        try:
            return fn(*args)
        except UViTError as e:
            if not in_worker:
                raise
            # Handed to the training process as an item: DataLoader would re-raise it wrapped in the
            # worker's traceback, and the user's one-line message (a bad file) would be lost in it.
            return WorkerFailure(e)
        finally:
            if saved is not None:
                torch.set_rng_state(saved)

    def __getitem__(self, key):
        index, position = key
        return self._seeded(position, self.dataset.__getitem__, index)

    def __getitems__(self, keys):
        """A whole batch: datasets that read batches at once (packed latent features) keep doing so, seeded from
        the batch's first position (a resume restarts at a batch boundary, so the draws are the same)."""
        if not hasattr(self.dataset, '__getitems__'):
            return [self[k] for k in keys]
        return self._seeded(keys[0][1], self.dataset.__getitems__, [index for index, _ in keys])


class WorkerFailure:
    """A user's error (UViTError) raised in a loader worker, carried to the training process to raise there."""

    def __init__(self, error):
        self.error = error


def collate(items):
    """default_collate, except that a batch holding a WorkerFailure (or being one: __getitems__) is that failure."""
    if isinstance(items, WorkerFailure):
        return items
    failed = next((item for item in items if isinstance(item, WorkerFailure)), None)
    return failed if failed is not None else default_collate(items)


def shut_down(iterator):
    """End a DataLoader iterator's worker processes now. Left to garbage collection, the workers outlive an
    exception that still references the iterator, and at exit multiprocessing joins them forever: they ignore
    the SIGTERM it sends (libs.preemption). So: the iterator's own shutdown, then SIGKILL to any worker left."""
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, '_workers', ()):
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=5)


def resolve_num_workers(num_workers: int, local_world_size: int = 1) -> int:
    """-1 -> min(8, CPU cores per process); otherwise the value itself."""
    if num_workers < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        return max(0, min(8, cores // max(local_world_size, 1) - 1))
    return int(num_workers)


class ResumableLoader:
    """An endless iterator of per-rank batches (batch_size each, batch_size * world_size globally) whose
    position can be saved: `state_dict()` = {'position': samples consumed by all ranks, 'seed', 'dataset_len'}."""

    def __init__(self, dataset: Dataset, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.persistent_workers, self.position = persistent_workers, 0

    def state_dict(self) -> dict:
        return {'position': self.position, 'seed': self.seed, 'dataset_len': len(self.dataset)}

    def load_state_dict(self, state: dict):
        if state.get('dataset_len') not in (None, len(self.dataset)):
            logger.warning("the training set had %s items when the checkpoint was written and has %d now: the "
                           "data order after resuming differs from the interrupted run's", state['dataset_len'],
                           len(self.dataset))
        if state.get('seed') not in (None, self.seed):
            logger.warning("data seed changed from %s to %s since the checkpoint", state['seed'], self.seed)
        self.position = int(state['position'])

    def __iter__(self):
        sampler = InfiniteSampler(len(self.dataset), rank=self.rank, world_size=self.world_size, seed=self.seed,
                                  start=self.position)
        workers = self.num_workers > 0
        loader = DataLoader(
            PositionSeeded(self.dataset, self.seed), batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers,
            # Stop signals are left to the training process: one sent to the process group must not kill
            # the workers under it. (Datasets draw from torch only, seeded per item: no python/numpy seeding.)
            worker_init_fn=ignore_stop_signals if workers else None,
            # Its own generator: DataLoader draws a base seed per iterator, which would otherwise come from
            # (and move) torch's default generator, so a resumed run's noise would differ.
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank)), collate_fn=collate)
        iterator = iter(loader)
        try:
            for batch in iterator:
                if isinstance(batch, WorkerFailure):
                    raise batch.error
                # Counted when handed to the training loop, not when prefetched.
                self.position += self.batch_size * self.world_size
                yield batch
        finally:  # an error, or the caller closing this generator (contextlib.closing in the trainer)
            shut_down(iterator)
