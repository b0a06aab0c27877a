"""The probes of benchmarks/mnist_plateau.py on a tiny U-ViT, against direct computations."""
import json
import os

import pytest
import torch
from torch import nn

from benchmarks import mnist_plateau as plateau
from benchmarks import mnist_reference as bench
from libs import uvit_layers

TINY = dict(bench.NET, embed_dim=16, depth=2, num_heads=2)


def batch(n=16):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 14, 14, generator=g) * 2 - 1, torch.arange(n) % 10, torch.rand(n, generator=g),
            torch.randn(n, 3, 14, 14, generator=g))


def test_attention_mass_is_the_softmax_weight_on_the_two_condition_tokens(monkeypatch):
    torch.manual_seed(0)
    nnet = bench.UViT(**TINY).eval()
    seen = []

    def explicit(q, k, v, scale=None):  # the attention weights written out, recorded per block
        w = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        seen.append(w[:, :, 2:, :2].mean(dim=(0, 1, 2)))
        return w @ v

    monkeypatch.setattr(uvit_layers, 'attention', explicit)
    mass = plateau.AttentionMass(nnet)
    x0, y, t, _ = batch()
    nnet(x0, 999 * t, y=y)
    label, time = mass.largest()
    per_block = torch.stack(seen)
    assert len(seen) == len(mass.hooks) == TINY['depth'] + 1  # depth // 2 in-blocks, the mid block, depth // 2 out-blocks
    assert label == pytest.approx(per_block[:, 0].max().item(), rel=1e-5)
    assert time == pytest.approx(per_block[:, 1].max().item(), rel=1e-5)


class TimeBlind(nn.Module):
    """The tiny U-ViT with its time input replaced by 0: the network ignores t."""

    def __init__(self):
        super().__init__()
        self.inner = bench.UViT(**TINY).eval()

    def forward(self, x, t, y):
        return self.inner(x, torch.zeros_like(t), y=y)


def test_probe_shuffles_reveal_what_the_network_reads():
    torch.manual_seed(1)
    blind = TimeBlind()
    r = plateau.probe(blind, *batch())
    assert r['t_shuffled'] == 0.0  # the time input is never read
    assert r['y_shuffled'] != 0.0  # the labels are
    x0, y, t, noise = batch()
    log_alpha = -0.25 * t ** 2 * (bench.BETA_1 - bench.BETA_0) - 0.5 * t * bench.BETA_0
    a = log_alpha.exp()[:, None, None, None]
    with torch.no_grad():
        direct = (blind(a * x0 + (1 - a ** 2).sqrt() * noise, 999 * t, y) - noise).pow(2).mean().item()
    assert r['loss'] == pytest.approx(direct, rel=1e-5)
    small = (t < plateau.SMALL_T).float().mean().item()  # the two t ranges' means weigh into the loss
    assert 0 < small < 1
    assert small * r['loss_small_t'] + (1 - small) * r['loss_large_t'] == pytest.approx(r['loss'], rel=1e-5)


def test_kept_weights_of_both_sides_and_the_plateau_end(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, 'NET', TINY)
    monkeypatch.setattr(bench, 'BATCH', 4)
    x = torch.randint(0, 256, (8, 3, 14, 14), dtype=torch.uint8)
    ref = tmp_path / 'reference'
    (ref / 'probe').mkdir(parents=True)
    _, losses, _ = bench.reference_train(x, torch.arange(8) % 10, seed=0, steps=4, save_every=2,
                                         save_dir=str(ref / 'probe'))
    assert len(losses) == 1  # a run shorter than the 50-step log window logs its mean once, as train.py
    assert [s for s, _ in plateau.kept_weights(str(ref))] == [2, 4]
    for step in (10, 5):  # train.py's layout: ckpts/<step>.ckpt/nnet.pth
        (tmp_path / 'project' / 'train' / 'ckpts' / f'{step}.ckpt').mkdir(parents=True)
    assert plateau.kept_weights(str(tmp_path / 'project')) == [
        (s, str(tmp_path / 'project' / 'train' / 'ckpts' / f'{s}.ckpt' / 'nnet.pth')) for s in (5, 10)]
    assert bench.plateau_end([0.4, 0.16, 0.15, 0.09, 0.05]) == 200
    assert bench.plateau_end([0.4, 0.16]) is None


def test_a_finished_run_is_read_back_not_run_again(tmp_path, monkeypatch):
    class A:
        cache, steps, embed_dim, depth, project_flips, reference_flips = str(tmp_path), 10, 16, 2, '', False
        objective, n_per_digit = 'vp', bench.SAMPLES_PER_DIGIT  # a result without a count was scored with 30
    run_dir = tmp_path / 'runs' / f"project_{bench.run_tag(A)}_seed3"
    run_dir.mkdir(parents=True)
    (run_dir / 'result.json').write_text(json.dumps({'seed': 3, 'accuracy': 0.5}))
    monkeypatch.setattr(bench, 'project_train', lambda *a, **k: pytest.fail('a finished run was trained again'))
    assert bench.run_one(A, 'project', 3, None, None, None, os.environ) == {'seed': 3, 'accuracy': 0.5}


def test_position_probe_leaves_the_network_as_it_was():
    torch.manual_seed(2)
    nnet = bench.UViT(**TINY).eval()
    before = {k: v.clone() for k, v in nnet.state_dict().items()}
    assert plateau.probe(nnet, *batch())['pos_shuffled'] != 0.0
    for k, v in nnet.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # patch tokens all at one position embedding: nothing to permute
        nnet.pos_embed[:, 2:] = nnet.pos_embed[:, 2:3]
    assert plateau.probe(nnet, *batch())['pos_shuffled'] == 0.0


def test_patches_alone_cuts_what_one_patch_reads_of_another():
    torch.manual_seed(3)
    nnet = bench.UViT(**TINY).eval()
    x0, y, t, _ = batch(2)
    moved = x0.clone()
    moved[:, :, :2, :2] += 1.0  # the top-left patch changes
    with torch.no_grad():
        far = lambda x: nnet(x, 999 * t, y=y)[:, :, 10:, 10:]  # beyond the final 3 x 3 conv's reach of it
        assert not torch.allclose(far(x0), far(moved))  # full attention: the far patches read it
        with plateau.patches_alone():
            torch.testing.assert_close(far(x0), far(moved), rtol=0, atol=1e-6)
            alone = nnet(x0, 999 * t, y=y)
        assert not torch.allclose(alone, nnet(x0, 999 * t, y=y))  # and the kernel is restored
    T = 2 + 49
    q, k, v = torch.randn(3, 1, 2, T, 8).unbind(0)
    out = plateau.alone_attention(q, k, v, scale=8 ** -0.5)
    w = (q @ k.transpose(-1, -2) * 8 ** -0.5)
    i = 20  # a patch query: softmax over keys {label, time, itself} only
    keys = torch.tensor([0, 1, i])
    torch.testing.assert_close(out[..., i, :], (w[..., i, keys].softmax(-1)[..., None] * v[..., keys, :]).sum(-2))
