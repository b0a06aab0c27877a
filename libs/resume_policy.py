"""What may change between a stop and a resume, and the record of every start's config.

A checkpoint stores the resolved config it was trained with (train_state.pth 'config'; checkpoints of
older code: the workdir's config.json is used). Before the first resumed step the new config is compared
key by key with it:

- REFUSED (the checkpoint would be meaningless or fail to load): the network (`nnet.*`), the diffusion
  (`diffusion`, `pred`, `z_shape`), the dataset's identity (`dataset.name`, `.path`, `.resolution`,
  `.kind`), the autoencoder (`autoencoder.*`), the optimizer's parameter grouping
  (`optimizer.no_decay_for_embeddings_norms_biases`) and whether the run is sharded (`fsdp.enabled`,
  `fsdp.meta_init`). Also any key this list does not name as safe: a key added by a later change is
  refused until someone decides it is safe. One ConfigError naming every refused key with old -> new.
- APPLIED (safe or intended): `train.*` (n_steps, batch size, intervals, limits, accumulation),
  `optimizer.*` (lr, betas, weight decay), `lr_scheduler.*`, `ema_rate`, `grad_clip`, `seed`, `compile`,
  `tf32`, `log_with`, `wandb.*`, `sample.*`, `grid.*`, `fid.*`, `dataloader.*`, the dataset's
  augmentation and guidance keys (`dataset.cfg`, `.p_uncond`, `.random_flip`, `.random_crop`), the
  sharding's layout (`fsdp.replicate`, `.reshard_after_forward`, `.mixed_precision`, `.cpu_offload`: a
  sharded checkpoint loads into any number of processes). Each is logged in one line with old -> new,
  and applied for real: the optimizer's hyperparameters and the scheduler's base rates come from the new
  config, not from the checkpoint. A batch-size change keeps the data position in samples, so the stream
  continues with the next unseen sample.
- `init.*` is not compared (--init_from is ignored once a run has started, and said so).

Every start writes its resolved config: `config.json` at the first, `config.resume-at-<step>.json` at
each resume (a `.2`, `.3` ... suffix when the same step is resumed again), so a run's history stays readable.
"""
import json
import logging
import os

import torch

from libs.checkpoint import latest_checkpoint
from libs.errors import ConfigError

logger = logging.getLogger(__name__)

REFUSED = ('nnet.', 'diffusion', 'pred', 'z_shape', 'dataset.name', 'dataset.path', 'dataset.resolution',
           'dataset.kind', 'autoencoder.', 'optimizer.no_decay_for_embeddings_norms_biases', 'fsdp.enabled',
           'fsdp.meta_init')
APPLIED = ('train.', 'optimizer.', 'lr_scheduler.', 'ema_rate', 'grad_clip', 'seed', 'compile', 'tf32',
           'log_with', 'wandb.', 'sample.', 'grid.', 'fid.', 'dataloader.', 'dataset.cfg', 'dataset.p_uncond',
           'dataset.random_flip', 'dataset.random_crop', 'fsdp.')
IGNORED = ('init.',)
OPTIMIZER_KEYS = ('optimizer.', 'lr_scheduler.', 'train.n_steps')  # changes that reset optimizer hyperparameters


def _matches(key, prefixes):
    return any(key == p or (p.endswith('.') and key.startswith(p)) for p in prefixes)


def flatten(tree, prefix=''):
    """{'train.batch_size': 128, ...} of a nested dict, values as JSON has them (tuples become lists)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.loads(json.dumps(v, default=str))
    return out


def saved_config(ckpt_root, workdir):
    """(checkpoint path, the config dict it was trained with), or (None, None) without a checkpoint; the config
    is None when none was recorded."""
    path = latest_checkpoint(ckpt_root)
    if path is None:
        return None, None
    state_file = os.path.join(path, 'train_state.pth')
    try:
        state = torch.load(state_file, map_location='cpu', weights_only=False) if os.path.exists(state_file) else None
    except Exception:  # damaged beyond its zip directory: resume() skips it with a warning naming the file
        state = None
    if isinstance(state, dict) and 'config' in state:
        return path, state['config']
    history = config_history(workdir)
    if history:  # older checkpoints: the config the workdir last recorded
        with open(history[-1]) as f:
            return path, json.load(f)
    return path, None


def compare(old: dict, new: dict):
    """(refused, applied): lists of (key, old value, new value) between two config dicts. Keys present on one
    side only (added or removed by a code change) are not compared."""
    a, b = flatten(old), flatten(new)
    refused, applied = [], []
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key] or _matches(key, IGNORED):
            continue
        (applied if _matches(key, APPLIED) and not _matches(key, REFUSED) else refused).append((key, a[key], b[key]))
    return refused, applied


def check(saved, new):
    """The changes to apply on resume from `saved` = saved_config(...); ConfigError naming every refused key
    (before anything is loaded)."""
    path, old = saved
    if old is None:
        return []
    refused, applied = compare(old, new)
    if refused:
        listed = '; '.join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        raise ConfigError(
            f"the workdir's checkpoint {path} was trained with other values of keys that cannot change in a resumed "
            f"run: {listed}. Put them back, or start a new run in another --workdir (--init_from <checkpoint> "
            f"starts one from these weights); see docs/robustness.md.")
    return applied


def apply(changes, optimizer, fresh_groups, fresh_base_lrs, lr_scheduler, loader_position, batch_size):
    """Log each change (old -> new) and make the optimizer and scheduler use the new config.

    fresh_groups: the hyperparameters (no 'params') of the optimizer as the new config built it, taken before the
    checkpoint's state was loaded; fresh_base_lrs: the scheduler's base_lrs then."""
    for key, old, new in changes:
        note = ''
        if key == 'train.batch_size':
            note = f" (the data stream continues at sample {loader_position}, as if trained with {new} throughout)"
        logger.info("resume: %s %r -> %r%s", key, old, new, note)
    if not any(_matches(k, OPTIMIZER_KEYS) for k, _, _ in changes):
        return  # nothing to redo: the checkpoint's optimizer and scheduler are exact
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k not in ('initial_lr', 'lr')})
    lr_scheduler.base_lrs = list(fresh_base_lrs)
    for group, base, fn in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group['initial_lr'] = base
        group['lr'] = base * fn(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group['lr'] for group in optimizer.param_groups]


def merged_history(history, workdir, step):
    """The checkpoint's FID/score history plus the entries score.json has up to `step`: a checkpoint is written
    before its own evaluation, so its history lacks the score of its step (score.json, written after it, has it)."""
    merged = {name: dict(history.get(name, {})) for name in ('fid', 'score')}
    try:
        with open(os.path.join(workdir, 'score.json')) as f:
            scores = json.load(f)
    except (OSError, ValueError):
        return merged
    for name in ('fid', 'score'):
        for key, value in scores.get(name, {}).items():
            if str(key).isdigit() and int(key) <= step:
                merged[name].setdefault(int(key), value)
    return merged


def config_history(workdir):
    """The recorded configs of a workdir, oldest first."""
    names = [n for n in os.listdir(workdir) if n == 'config.json' or (n.startswith('config.resume-at-')
                                                                      and n.endswith('.json'))]

    def order(name):
        if name == 'config.json':
            return (-1, 0)
        stem = name[len('config.resume-at-'):-len('.json')]
        step, _, again = stem.partition('.')
        return (int(step), int(again or 1)) if step.isdigit() and (again or '1').isdigit() else (10 ** 18, 0)
    return [os.path.join(workdir, n) for n in sorted(names, key=order)]


def config_record_path(workdir, step):
    """Where this start's resolved config goes (see the module docstring)."""
    if not os.path.exists(os.path.join(workdir, 'config.json')):
        return os.path.join(workdir, 'config.json')
    path, again = os.path.join(workdir, f"config.resume-at-{step}.json"), 1
    while os.path.exists(path):
        again += 1
        path = os.path.join(workdir, f"config.resume-at-{step}.{again}.json")
    return path
