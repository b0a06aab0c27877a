"""Training checkpoints: written whole or not at all; damaged ones are skipped on resume.

Layout (the original U-ViT's, plus train_state.pth: data position, FID history, grad-scaler state)::

    ckpt_root/<step>.ckpt/  nnet.pth  nnet_ema.pth  optimizer.pth  lr_scheduler.pth  step.pth  train_state.pth

Written into a hidden temporary directory, every file fsynced, then renamed into place (EDM2's write-then-rename);
a killed writer's temporary is removed by the next save. Damage found on reading: truncation by the zip
directory, flipped bytes by each record's CRC-32. No RNG state: the trainer reseeds from (seed, rank, step).
A sharded run's checkpoint (libs/sharded_checkpoint.py) keeps its optimizer state in `sharded/` (one file per
process plus `.metadata`) instead of optimizer.pth; its nnet.pth and nnet_ema.pth are the gathered networks.
"""
import logging
import os
import re
import shutil
import zipfile

import torch

from libs.errors import CheckpointError, MissingFileError
from libs.io_utils import SaveError, atomic_path, fsync_dir
from libs.nnet import load_nnet_state_dict, unwrap_model

logger = logging.getLogger(__name__)

STATES = ("nnet.pth", "nnet_ema.pth", "optimizer.pth", "lr_scheduler.pth")
FILES = STATES + ("step.pth", "train_state.pth")  # train_state.pth: absent in the original's checkpoints
SHARDED = "sharded"  # a sharded run's torch.distributed.checkpoint folder (it replaces optimizer.pth)
METADATA = ".metadata"  # written by torch.distributed.checkpoint once every process's shards are
_NAME = re.compile(r"^(\d+)\.ckpt$")
_TEMPORARY = re.compile(r"^\.\d+\.ckpt\.tmp-")  # libs.io_utils.atomic_path's names for a <step>.ckpt


def checkpoint_path(ckpt_root, step):
    return os.path.join(ckpt_root, f"{int(step)}.ckpt")


def list_checkpoints(ckpt_root):
    """(step, path) of every `<step>.ckpt` directory under ckpt_root, newest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    found = [(int(n.split(".")[0]), os.path.join(ckpt_root, n)) for n in names if _NAME.match(n)]
    return sorted(found, reverse=True)


def checkpoint_problems(path):
    """What is visibly wrong with a checkpoint directory ([] = nothing): missing or truncated files.
    Cheap (reads each file's zip directory only); flipped bytes are caught when the files are read."""
    problems = []
    sharded = os.path.isdir(os.path.join(path, SHARDED))
    if sharded and not os.path.isfile(os.path.join(path, SHARDED, METADATA)):
        problems.append(f"'{os.path.join(path, SHARDED, METADATA)}' is missing")
    for name in FILES:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            if name != "train_state.pth" and not (sharded and name == "optimizer.pth"):
                problems.append(f"'{file}' is missing")
        elif not zipfile.is_zipfile(file):
            problems.append(f"'{file}' is truncated or corrupt")
    return problems


def latest_checkpoint(ckpt_root):
    """The newest checkpoint without visible damage, or None; damaged ones are skipped with a warning."""
    for _, path in list_checkpoints(ckpt_root):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint '%s': %s", path, "; ".join(problems))
    return None


def _os_error_in(error):
    """The OSError behind `error`: itself, or one in its chain (torch.save reports a failed write of a file object
    as RuntimeError('... unexpected pos ...') raised while handling the OSError, e.g. ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write(obj, file, final):
    """torch.save `obj` to `file`, fsynced; a failure is a SaveError naming `final` (where it was going)."""
    try:
        with open(file, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:  # a RuntimeError of torch itself, not of the write: a bug
            raise
        raise SaveError(f"could not write checkpoint file '{final}': {cause.strerror or cause}. Nothing was "
                        f"replaced: the previous checkpoint is intact. Free disk space (or lower "
                        f"config.train.keep_last_ckpts, or point --workdir at a larger disk) and rerun the same "
                        f"command to resume.") from e


def save_checkpoint(ckpt_root, step, *, nnet, nnet_ema, optimizer, lr_scheduler, train_state,
                    keep_last=None, protect=(), shards=None):
    """Write `ckpt_root/<step>.ckpt/` atomically (main process only) and return its path.

    nnet, nnet_ema: modules (wrappers are unwrapped) or state dicts; optimizer, lr_scheduler: anything with
    `state_dict()`, optimizer None when `shards` holds its state; train_state: a dict saved as is. shards: a
    finished torch.distributed.checkpoint folder, moved in as `sharded/` (a sharded run's). keep_last=K then
    deletes all but the newest K checkpoints, never those whose step is in `protect` (e.g. the best FID's). A
    failed write is a SaveError naming the file; the previous checkpoints are untouched.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r} must be a positive integer (or None to keep every checkpoint)")
    os.makedirs(ckpt_root, exist_ok=True)
    for name in os.listdir(ckpt_root):  # a killed writer's leftovers (one writer per workdir)
        if _TEMPORARY.match(name):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    def weights(net):
        return net if isinstance(net, dict) else unwrap_model(net).state_dict()

    contents = {"nnet.pth": weights(nnet), "nnet_ema.pth": weights(nnet_ema),
                "optimizer.pth": optimizer.state_dict() if optimizer is not None else None,
                "lr_scheduler.pth": lr_scheduler.state_dict(), "step.pth": int(step),
                "train_state.pth": dict(train_state)}
    path = checkpoint_path(ckpt_root, step)
    with atomic_path(path) as tmp:
        os.makedirs(tmp)
        for name, obj in contents.items():
            if obj is not None:
                _write(obj, os.path.join(tmp, name), os.path.join(path, name))
        if shards is not None:
            os.rename(shards, os.path.join(tmp, SHARDED))
        fsync_dir(tmp)
    logger.info("saved checkpoint '%s'", path)
    for i, (old_step, old) in enumerate(list_checkpoints(ckpt_root)):
        if keep_last is not None and i >= keep_last and old_step not in {int(p) for p in protect}:
            shutil.rmtree(old)
            logger.info("deleted old checkpoint '%s' (keep_last=%d)", old, keep_last)
    return path


def read_state_file(file, weights_only=True):
    """torch.load on the CPU (tensors and containers only), after checking every zip record's CRC-32
    (torch.load does not; files of torch < 1.6 are not zips and go to torch.load directly)."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as z:
                bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"record {bad} fails its CRC check")
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError as e:
        raise MissingFileError(f"checkpoint file '{file}' not found.") from e
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file '{file}' ({os.path.getsize(file)} bytes) is truncated or corrupt "
                              f"({first}). Copy it again from its source, or use an earlier checkpoint directory "
                              f"(ckpts/<step>.ckpt).") from e


def read_checkpoint(path):
    """Every file of a checkpoint directory, read and checked: {file name: state}. CheckpointError when damaged."""
    if not os.path.isdir(path):
        raise MissingFileError(f"checkpoint directory '{path}' not found. Give a ckpts/<step>.ckpt directory.")
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"'{path}' is damaged: " + "; ".join(problems))
    # train_state.pth is ours alone and may hold plain Python objects beyond weights_only's list.
    return {name: read_state_file(os.path.join(path, name), weights_only=name != "train_state.pth")
            for name in FILES if os.path.exists(os.path.join(path, name))}


def _apply(states, path, *, nnet, nnet_ema, optimizer, lr_scheduler):
    """Load what `read_checkpoint(path)` returned into the given objects (None = skip); returns the
    train_state with 'step'. A checkpoint that does not fit them is a CheckpointError naming what differs."""
    if optimizer is not None and "optimizer.pth" not in states:
        raise CheckpointError(f"'{path}' is a sharded run's checkpoint (its optimizer state is in {SHARDED}/): resume "
                              f"it with --config.fsdp.enabled=True (any number of processes), or start a new run "
                              f"from its weights with --init_from {path}")
    for name, target in zip(STATES, (nnet, nnet_ema, optimizer, lr_scheduler)):
        if target is None:
            continue
        try:
            if name.startswith("nnet"):
                load_nnet_state_dict(unwrap_model(target), states[name])
            else:
                target.load_state_dict(states[name])
        except (CheckpointError, ValueError, KeyError, RuntimeError) as e:  # CheckpointError: it already says why
            why = "" if isinstance(e, CheckpointError) else (f" does not fit this {type(target).__name__} (different "
                                                             "parameters or settings than the run that wrote it)")
            raise CheckpointError(f"{name} from '{path}'{why}: {e}") from e
    if "train_state.pth" not in states:
        logger.warning("'%s' has no train_state.pth (written by the original code?): the data position is "
                       "estimated from the step.", path)
    return {**states.get("train_state.pth", {}), "step": int(states["step.pth"])}


def resume(ckpt_root, **targets):
    """Load the newest undamaged checkpoint under ckpt_root into `targets` (nnet, nnet_ema, optimizer,
    lr_scheduler; None skips one).
    Returns (path, train_state), or (None, None) when there is none. Damaged ones are skipped with a
    warning naming the file; one that does not fit the config is an error (an older one would not fit either)."""
    for _, path in list_checkpoints(ckpt_root):
        try:
            states = read_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint '%s': %s", path, e)
            continue
        return path, _apply(states, path, **targets)
    return None, None
