"""AdamW with optional no-decay parameter groups, and the learning-rate schedules.

The original passes `nnet.parameters()` as one group (weight decay also hits biases, LayerNorms and
`pos_embed`): the default. The fused implementation honours `optimizer.found_inf`, with which the trainer skips
a step with non-finite gradients without a host sync.
"""
import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

SCHEDULES = ('customized', 'cosine')  # the names lr_factor knows


def param_groups(nnet: nn.Module, weight_decay: float, no_decay_for_embeddings_norms_biases: bool):
    """One group with `weight_decay` (the original), or two: decayed matrices and undecayed
    embeddings, norms and biases (every tensor with fewer than 2 dims plus `nnet.no_weight_decay()`)."""
    params = [(n, p) for n, p in nnet.named_parameters() if p.requires_grad]
    if not no_decay_for_embeddings_norms_biases:
        return [{'params': [p for _, p in params], 'weight_decay': weight_decay}]
    named_no_decay = set(nnet.no_weight_decay()) if hasattr(nnet, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for n, p in params:
        (no_decay if p.ndim < 2 or n in named_no_decay else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(nnet: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW from config.optimizer {name, lr, weight_decay, betas, no_decay_for_embeddings_norms_biases}."""
    betas = tuple(float(b) for b in cfg.betas)
    groups = param_groups(nnet, cfg.weight_decay, cfg.get('no_decay_for_embeddings_norms_biases', False))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, fused=True)
    logger.info("AdamW (fused): lr %g, betas %s, weight decay %g on %d group(s) of sizes %s", cfg.lr, betas,
                cfg.weight_decay, len(groups), [sum(p.numel() for p in g['params']) for g in groups])
    return optimizer


def lr_factor(step: int, name: str, warmup_steps: int, n_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step number `step` (0-based).

    'customized': min(step / warmup, 1) (step 0 runs at lr 0, as the original's LambdaLR);
    'cosine': the same warm-up, then 0.5 (1 + cos(pi (step - warmup) / (n_steps - warmup))).
    """
    warm = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    if name == 'customized' or step < warmup_steps:
        return warm
    progress = min((step - warmup_steps) / max(n_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, n_steps: int):
    """LambdaLR from config.lr_scheduler {name, warmup_steps}; stepped once per optimizer step."""
    name, warmup = cfg.name, int(cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, name, warmup, n_steps))
