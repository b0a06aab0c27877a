"""Checkpoints of a sharded run (config.fsdp): every process writes its own shards in parallel with
torch.distributed.checkpoint (DCP), and the checkpoint appears whole or not at all, as libs/checkpoint.py's.

Layout: libs/checkpoint.py's `<step>.ckpt/` with `sharded/` in place of optimizer.pth::

    <step>.ckpt/  nnet.pth  nnet_ema.pth  lr_scheduler.pth  step.pth  train_state.pth
                  sharded/  .metadata  __0_0.distcp  __1_0.distcp ...   (network, EMA and AdamW state, by name)

nnet.pth and nnet_ema.pth are the full networks, gathered to process 0: eval*.py, sample*.py, tools/export.py
and --init_from read them as any checkpoint's. `sharded/` holds the exact training state; DCP stores each
tensor by its parameter name and global shape, so it loads into any number of processes (re-sharding).

Writing: every process writes its shards into `ckpt_root/.<step>.shards.tmp/` (each file fsynced); DCP's
coordinator writes `.metadata` only after every process reported its files written. Then process 0 writes the
gathered networks and the small files into a temporary `<step>.ckpt`, moves the shards folder in and renames the
whole into place (libs/checkpoint.save_checkpoint: keep-last and best-FID protection as for any run). A process
killed at any point leaves a hidden temporary, removed by the next save, and the previous checkpoint in place.
All processes must see one filesystem under the workdir (a shared one across nodes).
"""
import logging
import os
import re
import shutil

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from libs.checkpoint import (SHARDED, checkpoint_path, checkpoint_problems, list_checkpoints, read_state_file,
                             save_checkpoint)
from libs.errors import CheckpointError
from libs.fsdp import full_state_dict

logger = logging.getLogger(__name__)

_STAGING = re.compile(r"^\.\d+\.shards\.tmp$")


def _state(nnet, nnet_ema, optimizer):
    """What DCP saves and loads, by parameter name (sharded tensors: each process its own rows). optimizer: a
    torch optimizer or accelerate's wrapper of one."""
    return {'nnet': get_model_state_dict(nnet), 'nnet_ema': get_model_state_dict(nnet_ema),
            'optimizer': get_optimizer_state_dict(nnet, getattr(optimizer, 'optimizer', optimizer))}


def save(accelerator, ckpt_root, step, *, nnet, nnet_ema, optimizer, lr_scheduler, train_state, keep_last=None,
         protect=()):
    """Write `ckpt_root/<step>.ckpt/` of a sharded run (every process calls it) and return its path; the keywords
    are libs.checkpoint.save_checkpoint's, optimizer that of the sharded `nnet`."""
    staging = os.path.join(ckpt_root, f".{int(step)}.shards.tmp")
    if accelerator.is_main_process:
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):  # a killed save's shards (one run per workdir: libs/workdir_lock.py)
            if _STAGING.match(name):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    dcp.save(_state(nnet, nnet_ema, optimizer), storage_writer=dcp.FileSystemWriter(staging, sync_files=True))
    nets = full_state_dict(nnet), full_state_dict(nnet_ema)  # collectives: every process
    path = checkpoint_path(ckpt_root, step)
    if accelerator.is_main_process:
        save_checkpoint(ckpt_root, step, nnet=nets[0], nnet_ema=nets[1], optimizer=None, lr_scheduler=lr_scheduler,
                        train_state=train_state, keep_last=keep_last, protect=protect, shards=staging)
    accelerator.wait_for_everyone()
    return path


def latest(ckpt_root):
    """The newest checkpoint without visible damage, or None (damaged ones skipped with a warning). A checkpoint
    without sharded/ (written by an unsharded run) is a CheckpointError: its optimizer state does not load here."""
    for _, path in list_checkpoints(ckpt_root):
        problems = checkpoint_problems(path)
        if problems:
            logger.warning("skipping checkpoint '%s': %s", path, "; ".join(problems))
            continue
        if not os.path.isdir(os.path.join(path, SHARDED)):
            raise CheckpointError(f"'{path}' was written by an unsharded run (config.fsdp.enabled=False): resume it "
                                  f"with --config.fsdp.enabled=False, or start a new sharded run from its weights "
                                  f"in another --workdir with --init_from {path}")
        return path
    return None


def resume(ckpt_root, *, nnet, nnet_ema, optimizer, lr_scheduler):
    """Load the newest undamaged sharded checkpoint under ckpt_root into the sharded nnet, nnet_ema and optimizer
    (every process calls it; any number of processes), and lr_scheduler: libs.checkpoint.resume for sharded runs.
    Returns (path, train_state with 'step'), or (None, None) when there is none."""
    path = latest(ckpt_root)
    if path is None:
        return None, None
    state = _state(nnet, nnet_ema, optimizer)
    try:
        dcp.load(state, checkpoint_id=os.path.join(path, SHARDED))
    except Exception as e:  # DCP wraps what failed on any process in one CheckpointException
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{os.path.join(path, SHARDED)}' does not load into this run's network and "
                              f"optimizer ({first}): check config.nnet, or that every process's shard file is "
                              f"there.") from e
    set_model_state_dict(nnet, state['nnet'])
    set_model_state_dict(nnet_ema, state['nnet_ema'])
    set_optimizer_state_dict(nnet, getattr(optimizer, 'optimizer', optimizer), state['optimizer'])
    lr_scheduler.load_state_dict(read_state_file(os.path.join(path, 'lr_scheduler.pth')))
    train_state = (read_state_file(os.path.join(path, 'train_state.pth'), weights_only=False)
                   if os.path.exists(os.path.join(path, 'train_state.pth')) else {})
    return path, {**train_state, 'step': int(read_state_file(os.path.join(path, 'step.pth')))}


def emergency_write(step):
    """libs.fatal's emergency checkpoint of a sharded run: not possible (see docs/distributed.md)."""
    raise CheckpointError(f"no emergency checkpoint of step {step} in a sharded run: the failing process holds "
                          f"only its shards, and the others are blocked in a collective. Rerunning resumes from the "
                          f"last periodic checkpoint (config.train.save_interval)")
