"""Exponential moving average of a network's weights.

ema <- rate * ema + (1 - rate) * online, applied after every optimizer step with one fused
`torch._foreach_lerp_` over all parameters instead of a Python loop (lerp(a, b, w) = a + w (b - a),
so w = 1 - rate). The EMA copy starts equal to the online network, as in the original.
"""
import copy

import torch
from torch import nn


def make_ema(nnet: nn.Module) -> nn.Module:
    """A frozen copy of `nnet` in eval mode (same values, dtypes and device)."""
    ema = copy.deepcopy(nnet)
    ema.requires_grad_(False)
    ema.eval()
    return ema


class EMAUpdater:
    """Updates `ema`'s parameters towards `online`'s; buffers are copied.

    Parameter lists are collected once; both networks must have identical structure.
    """

    def __init__(self, ema: nn.Module, online: nn.Module):
        ema_params = dict(ema.named_parameters())
        online_params = dict(online.named_parameters())
        assert ema_params.keys() == online_params.keys(), "the EMA network is a copy of the online one"
        self.ema_params = [ema_params[k] for k in online_params]
        self.online_params = [online_params[k] for k in online_params]
        self.ema_buffers = list(ema.buffers())
        self.online_buffers = list(online.buffers())

    @torch.no_grad()
    def update(self, rate: float, applied=None):
        """One EMA step with decay `rate` in [0, 1] (0 copies the online weights). applied: an optional
        0-dim bool device tensor, False for a skipped optimizer step: the EMA stays as it is (no host sync)."""
        if self.ema_params:
            src = [p.detach() for p in self.online_params]
            weight = 1.0 - rate if applied is None else applied.to(src[0].dtype) * (1.0 - rate)
            torch._foreach_lerp_(self.ema_params, src, weight)
        for e, o in zip(self.ema_buffers, self.online_buffers):
            e.copy_(o)
