"""EMA: the closed form rate^k geometric average, buffers copied, start equal to the online net."""
import torch
from torch import nn

from libs.ema import EMAUpdater, make_ema


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer('count', torch.zeros(()))


def test_ema_starts_equal_and_frozen():
    net = Net()
    ema = make_ema(net)
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), ema.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
        assert not p2.requires_grad
    assert not ema.training


def test_ema_update_equals_closed_form():
    torch.manual_seed(0)
    net = Net()
    ema = make_ema(net)
    e0 = [p.detach().clone() for p in ema.parameters()]
    updater = EMAUpdater(ema, net)
    rate = 0.9
    targets = []
    for k in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
            net.count.fill_(k + 1)
        targets.append([p.detach().clone() for p in net.parameters()])
        updater.update(rate)
    # e_5 = rate^5 e_0 + sum_k (1 - rate) rate^(4 - k) theta_k
    for i, p in enumerate(ema.parameters()):
        expected = rate ** 5 * e0[i].double()
        for k in range(5):
            expected += (1 - rate) * rate ** (4 - k) * targets[k][i].double()
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.count.item() == 5  # buffers are copied, not averaged


def test_rate_zero_copies_and_rate_one_freezes():
    net = Net()
    ema = make_ema(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    updater = EMAUpdater(ema, net)
    updater.update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    updater.update(0.0)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ema.parameters()))


def test_skipped_step_leaves_the_ema_and_an_applied_one_equals_the_plain_update():
    torch.manual_seed(0)
    net = Net()
    ema, plain = make_ema(net), make_ema(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    updater, reference = EMAUpdater(ema, net), EMAUpdater(plain, net)
    before = [p.clone() for p in ema.parameters()]
    updater.update(0.9, torch.tensor(False))  # a skipped optimizer step (non-finite gradients)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    updater.update(0.9, torch.tensor(True))
    reference.update(0.9)
    for a, b in zip(ema.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
