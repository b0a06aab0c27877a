"""Gradient accumulation: one optimizer step from k micro-batches, all-reduced once.

The global batch B (config.train.batch_size) is split evenly over P processes and k micro-batches:
each forward sees B / (P k) samples. With equal micro-batches, the mean of the k per-micro-batch mean
losses is the mean over the B samples, so scaling each micro-batch's loss by 1 / k gives the gradient
of the full batch's loss. On the first k - 1 micro-batches DDP's all-reduce is skipped
(`accelerator.no_sync`); the k-th backward all-reduces the summed gradients once.
"""
import contextlib

from libs.errors import ConfigError


def micro_batch_size(batch_size, world_size, grad_accum_steps):
    """Samples per process per forward: batch_size / (world_size * grad_accum_steps), which must be whole."""
    k = int(grad_accum_steps)
    if k < 1:
        raise ConfigError(f"config.train.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if batch_size % (world_size * k):
        raise ConfigError(f"config.train.batch_size={batch_size} (the global batch) does not split evenly over "
                          f"{world_size} process(es) x {k} accumulation steps; make it a multiple of {world_size * k}")
    return batch_size // (world_size * k)


def accumulate_gradients(accelerator, model, micro_batches, loss_fn, grad_accum_steps):
    """Backward `grad_accum_steps` micro-batches into `model`'s .grad; returns their mean loss (detached).

    micro_batches: an iterator; `grad_accum_steps` items are taken from it.
    loss_fn(batch) -> scalar mean loss of the micro-batch (run under the accelerator's autocast).
    The caller steps the optimizer afterwards, once (clipping, EMA and the LR schedule count optimizer
    steps). `accelerator` must be built with gradient_accumulation_steps=1: the 1 / k scaling is done here.
    """
    k = int(grad_accum_steps)
    total = None
    for i in range(k):
        batch = next(micro_batches)
        sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = loss_fn(batch)
            accelerator.backward(loss / k)
        total = loss.detach() if total is None else total + loss.detach()
    return total / k
