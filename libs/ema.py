"""Exponential moving average of a network's weights: ema <- rate * ema + (1 - rate) * online after every
optimizer step, one fused `torch._foreach_lerp_` (w = 1 - rate) over all parameters; it starts at the online
network, as the original's.
"""
import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def make_ema(nnet: nn.Module) -> nn.Module:
    """A frozen copy of `nnet` in eval mode (same values, dtypes and device)."""
    ema = copy.deepcopy(nnet)
    ema.requires_grad_(False)
    ema.eval()
    return ema


class EMAUpdater:
    """Updates `ema`'s parameters towards `online`'s; buffers are copied.

    Parameter lists are collected once; both networks must have identical structure. Sharded networks
    (libs/fsdp.py, both sharded alike) are updated shard by shard: each process lerps its own rows.
    """

    def __init__(self, ema: nn.Module, online: nn.Module):
        ema_params = dict(ema.named_parameters())
        online_params = dict(online.named_parameters())
        assert ema_params.keys() == online_params.keys(), "the EMA network is a copy of the online one"
        self.ema_params = [ema_params[k] for k in online_params]
        self.online_params = [online_params[k] for k in online_params]
        self.ema_buffers = list(ema.buffers())
        self.online_buffers = list(online.buffers())
        self.sharded = any(isinstance(p, DTensor) for p in self.online_params)

    @torch.no_grad()
    def update(self, rate: float, applied=None):
        """One EMA step with decay `rate` in [0, 1] (0 copies the online weights). applied: an optional
        0-dim bool device tensor, False for a skipped optimizer step: the EMA stays as it is (no host sync)."""
        if self.ema_params:
            ema_params, src = self.ema_params, [p.detach() for p in self.online_params]
            if self.sharded:  # the local shards, taken anew: FSDP may swap them on its first forward
                ema_params, src = [p.to_local() for p in ema_params], [p.to_local() for p in src]
            weight = 1.0 - rate if applied is None else applied.to(src[0].dtype) * (1.0 - rate)
            torch._foreach_lerp_(ema_params, src, weight)
        for e, o in zip(self.ema_buffers, self.online_buffers):
            e.copy_(o)
