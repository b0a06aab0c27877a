"""The infinite sharded sampler and the resumable loader: data order and augmentation are functions of
(seed, stream position) only, so sharding, worker count and resuming do not change them."""
import itertools

import torch
from torch.utils.data import Dataset

from libs.data_loader import InfiniteSampler, ResumableLoader, epoch_permutation, resolve_num_workers


class Flippy(Dataset):
    """Item i: its index and one uniform draw from torch's default generator (an 'augmentation')."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {'i': torch.tensor(i), 'aug': torch.rand(())}


def stream(n, seed, length):
    """The global stream written out from its definition: concatenated epoch permutations."""
    perms = torch.cat([epoch_permutation(n, seed, e) for e in range(length // n + 1)])
    return perms[:length].tolist()


def test_epoch_permutations_are_permutations_and_differ():
    a, b = epoch_permutation(10, 3, 0), epoch_permutation(10, 3, 1)
    assert sorted(a.tolist()) == list(range(10)) and sorted(b.tolist()) == list(range(10))
    assert not torch.equal(a, b)
    assert torch.equal(a, epoch_permutation(10, 3, 0))
    assert not torch.equal(a, epoch_permutation(10, 4, 0))


def test_ranks_partition_the_global_stream():
    n, seed, world = 7, 5, 3
    per_rank = [list(itertools.islice(InfiniteSampler(n, rank=r, world_size=world, seed=seed), 10))
                for r in range(world)]
    merged = {pos: idx for rank in per_rank for idx, pos in rank}
    assert sorted(merged) == list(range(30))  # every position exactly once
    assert [merged[p] for p in range(30)] == stream(n, seed, 30)
    assert all(pos % world == r for r, rank in enumerate(per_rank) for _, pos in rank)


def batches(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def test_resume_continues_exactly_and_augmentation_is_reproducible():
    data = Flippy(9)
    straight = ResumableLoader(data, batch_size=4, seed=1)
    full = batches(straight, 5)
    assert straight.state_dict()['position'] == 20
    first = ResumableLoader(data, batch_size=4, seed=1)
    batches(first, 2)
    resumed = ResumableLoader(data, batch_size=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    rest = batches(resumed, 3)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a['i'], b['i']) and torch.equal(a['aug'], b['aug'])
    assert torch.cat([b['i'] for b in full]).tolist() == stream(9, 1, 20)


def test_workers_and_sharding_give_the_same_items():
    data = Flippy(6)
    single = torch.cat([b['aug'] for b in batches(ResumableLoader(data, batch_size=4, seed=2), 3)])
    shards = [torch.stack([b['aug'] for b in batches(ResumableLoader(data, batch_size=2, rank=r, world_size=2, seed=2,
                                                                     num_workers=1), 3)]) for r in range(2)]
    # Global batch k = rank 0's batch k then rank 1's, interleaved position by position.
    interleaved = torch.stack([shards[0], shards[1]], dim=-1).reshape(-1)
    assert torch.equal(single, interleaved)


def test_main_process_generator_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batches(ResumableLoader(Flippy(5), batch_size=2, seed=0), 2)
    assert torch.equal(torch.rand(3), expected)


def test_num_workers_auto():
    assert resolve_num_workers(3) == 3
    assert 0 <= resolve_num_workers(-1) <= 8


class Batched(Flippy):
    """A dataset that reads whole batches (like the packed latent features)."""

    calls = 0

    def __getitems__(self, indices):
        Batched.calls += 1
        return [self[i] for i in indices]


def test_batch_reading_datasets_are_read_in_batches_and_resume_exactly():
    data = Batched(10)
    full = batches(ResumableLoader(data, batch_size=3, seed=4), 4)
    assert Batched.calls == 4
    first = ResumableLoader(data, batch_size=3, seed=4)
    batches(first, 2)
    resumed = ResumableLoader(data, batch_size=3, seed=4)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(full[2:], batches(resumed, 2)):
        assert torch.equal(a['i'], b['i']) and torch.equal(a['aug'], b['aug'])
