"""Gradient accumulation: k micro-batches of b give the loss, gradients and step of one batch of k*b."""

import pytest
import torch
import torch.nn.functional as F

from libs.accumulation import accumulate_gradients, micro_batch_size
from libs.errors import ConfigError
from libs.nnet import build_nnet

TINY = dict(name='uvit', img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
            mlp_time_embed=True, num_classes=3, conv=True)


@pytest.fixture(scope='module')
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {'x': torch.randn(n, 3, 8, 8, generator=g), 't': torch.rand(n, generator=g) * 999,
            'y': torch.randint(0, 3, (n,), generator=g), 'eps': torch.randn(n, 3, 8, 8, generator=g)}


def split(b, k):
    n = len(b['x']) // k
    return [{key: v[i * n:(i + 1) * n] for key, v in b.items()} for i in range(k)]


def one_step(accelerator, micro_batches, k):
    torch.manual_seed(0)
    nnet = build_nnet(TINY)  # the same init in every run
    opt = torch.optim.AdamW(nnet.parameters(), lr=1e-3, weight_decay=0.03)

    def loss_fn(b):  # the mean over the micro-batch of the per-sample mean squared noise error
        return F.mse_loss(nnet(b['x'], b['t'], y=b['y']), b['eps'], reduction='none').mean(dim=(1, 2, 3)).mean()

    calls = []
    real = accelerator.no_sync

    def spy(model):
        calls.append(model)
        return real(model)

    accelerator.no_sync = spy
    try:
        loss = accumulate_gradients(accelerator, nnet, iter(micro_batches), loss_fn, k)
    finally:
        del accelerator.no_sync
    grads = [p.grad.clone() for p in nnet.parameters()]
    opt.step()
    return loss, grads, [p.detach().clone() for p in nnet.parameters()], len(calls)


@pytest.mark.parametrize('k', [2, 4])
def test_k_micro_batches_equal_one_batch(accelerator, k):
    full = batch(8, seed=1)
    loss1, grads1, params1, skipped1 = one_step(accelerator, [full], 1)
    loss_k, grads_k, params_k, skipped_k = one_step(accelerator, split(full, k), k)
    assert skipped1 == 0 and skipped_k == k - 1  # the all-reduce runs once, on the last micro-batch
    assert torch.allclose(loss1, loss_k, rtol=1e-6, atol=0)
    for a, b in zip(grads1, grads_k):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(params1, params_k):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the comparison can fail: a different batch gives different gradients
    _, other, _, _ = one_step(accelerator, split(batch(8, seed=2), k), k)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads1, other))


def test_micro_batch_size():
    assert micro_batch_size(1024, 2, 4) == 128
    assert micro_batch_size(128, 1, 1) == 128
    with pytest.raises(ConfigError, match='multiple of 24'):
        micro_batch_size(1000, 8, 3)
    with pytest.raises(ConfigError, match='>= 1'):
        micro_batch_size(128, 1, 0)
