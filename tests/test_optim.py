"""AdamW groups and LR schedules against their closed forms."""
import math

import ml_collections
import pytest
import torch
from torch import nn

from libs.optim import build_lr_scheduler, build_optimizer, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def no_weight_decay(self):
        return {'pos_embed'}


def opt_cfg(**kw):
    base = dict(name='adamw', lr=0.1, weight_decay=0.03, betas=(0.9, 0.999), no_decay_for_embeddings_norms_biases=False)
    return ml_collections.ConfigDict({**base, **kw})


def test_default_is_one_group_as_original():
    net = Tiny()
    groups = param_groups(net, 0.03, False)
    assert len(groups) == 1 and groups[0]['weight_decay'] == 0.03
    assert len(groups[0]['params']) == len(list(net.parameters()))


def test_no_decay_groups():
    net = Tiny()
    decay, no_decay = param_groups(net, 0.03, True)
    assert decay['weight_decay'] == 0.03 and no_decay['weight_decay'] == 0.0
    assert {id(p) for p in decay['params']} == {id(net.lin.weight)}
    assert {id(p) for p in no_decay['params']} == {id(net.pos_embed), id(net.lin.bias), id(net.norm.weight),
                                                    id(net.norm.bias)}


def test_first_adamw_step_closed_form():
    # After one step m_hat = g and v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps).
    torch.manual_seed(0)
    net = Tiny()
    p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(net, opt_cfg())
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    lr, wd, eps = 0.1, 0.03, 1e-8
    for n, p in net.named_parameters():
        expected = p0[n] * (1 - lr * wd) - lr * grads[n] / (grads[n].abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def lrs(name, warmup, n_steps, k):
    net = Tiny()
    opt = build_optimizer(net, opt_cfg(lr=2.0))
    sched = build_lr_scheduler(opt, ml_collections.ConfigDict(dict(name=name, warmup_steps=warmup)), n_steps)
    out = []
    for _ in range(k):
        out.append(opt.param_groups[0]['lr'])  # the lr the next optimizer step uses
        opt.step()
        sched.step()
    return out


def test_customized_schedule_closed_form():
    # The original: LambdaLR(min(step / warmup, 1)): step 0 at lr 0, linear, then constant.
    got = lrs('customized', 4, 100, 8)
    assert got == pytest.approx([2.0 * min(s / 4, 1.0) for s in range(8)])
    assert got[0] == 0.0


def test_cosine_schedule_closed_form():
    warmup, n = 3, 11
    got = lrs('cosine', warmup, n, n + 2)
    expected = [2.0 * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * min((s - warmup) / (n - warmup), 1))))
                for s in range(n + 2)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[n] == pytest.approx(0.0, abs=1e-12)


def test_zero_warmup():
    assert lr_factor(0, 'customized', 0, 10) == lr_factor(0, 'cosine', 0, 10) == 1.0


def test_scheduler_state_round_trip():
    net = Tiny()
    opt = build_optimizer(net, opt_cfg(lr=1.0))
    cfg = ml_collections.ConfigDict(dict(name='customized', warmup_steps=10))
    sched = build_lr_scheduler(opt, cfg, 100)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(Tiny(), opt_cfg(lr=1.0))
    sched2 = build_lr_scheduler(opt2, cfg, 100)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.4]
