"""Training checkpoints that survive kills, full disks and truncation, and resume exactly.

Layout (the original U-ViT's, plus what an exact resume needs)::

    ckpt_root/<step>.ckpt/
        nnet.pth  nnet_ema.pth  optimizer.pth  lr_scheduler.pth  step.pth   # the original's files
        train_state.pth     # RNG states, data position, anything else the trainer needs
        COMPLETE            # JSON: size and sha256 of every file above, written last

A checkpoint directory is built under a temporary name and renamed into place only after
COMPLETE is written and everything is fsynced, so `<step>.ckpt/` either does not exist or is
whole. A kill -9 mid-save leaves a hidden temporary directory that resume ignores and the
next save removes. Truncation or bit rot after the fact is caught by the checksums.

`nnet_ema.pth` is what `eval*.py --nnet_path` takes, as in the original; `load_nnet_weights`
also accepts the `.ckpt` directory itself.
"""
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch

from libs.errors import CheckpointError, MissingFileError
from libs.io_utils import SaveError, atomic_path, fsync_dir

logger = logging.getLogger(__name__)

MODULE_FILES = ("nnet.pth", "nnet_ema.pth", "optimizer.pth", "lr_scheduler.pth")
STEP_FILE = "step.pth"
TRAIN_STATE_FILE = "train_state.pth"
MARKER = "COMPLETE"
FORMAT_VERSION = 1

_CKPT_NAME = re.compile(r"^(\d+)\.ckpt$")
# Temporary directories made by libs.io_utils.atomic_path: ".<name>.tmp-<pid>-<random>[.old]".
_TMP_NAME = re.compile(r"^\.(\d+)\.ckpt\.tmp-(\d+)-")
_HASH_CHUNK = 1 << 22

# Checkpoints whose checksums were verified in this process (path -> marker mtime), so
# `latest_checkpoint` followed by `load_checkpoint` reads the files once, not twice.
_verified = {}


# ----------------------------------------------------------------------------- helpers

def checkpoint_path(ckpt_root, step):
    """The directory a checkpoint of `step` lives in."""
    return os.path.join(ckpt_root, f"{int(step)}.ckpt")


def checkpoint_step(path):
    """The step encoded in a `<step>.ckpt` directory name, or None."""
    m = _CKPT_NAME.match(os.path.basename(os.path.normpath(str(path))))
    return int(m.group(1)) if m else None


def _unwrap(module):
    """The bare nn.Module under DDP / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        else:
            return module


def _state_dict(obj):
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj).state_dict()
    return obj.state_dict()


class _HashingWriter:
    """File-like object that hashes and counts what torch.save writes through it.

    torch.save swallows exceptions raised by `write` into an uninformative RuntimeError,
    so the original OSError (e.g. ENOSPC) is kept here and re-raised by the caller.
    """

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error = None

    def write(self, data):
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.size += len(data)
        return n

    def flush(self):
        self._f.flush()


def _save_file(obj, path, final_path):
    """torch.save `obj` to `path`, fsynced; returns {'size', 'sha256'}; SaveError on I/O failure."""
    try:
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SaveError(_io_message(final_path, os.path.basename(path), e)) from e
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def _io_message(final_path, name, e):
    what = "the disk is full" if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return (f"could not write checkpoint '{final_path}' (file {name}): {what}. Nothing was replaced: the previous "
            f"checkpoint is intact. Free space (or lower config.train.keep_last_ckpts / point --workdir at a "
            f"larger disk) and rerun the same command to resume.")


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def _torch_load(path, weights_only=True):
    """torch.load on the CPU, turning every kind of truncation/corruption into CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError as e:
        raise MissingFileError(f"checkpoint file '{path}' not found.") from e
    except pickle.UnpicklingError as e:
        if weights_only:
            raise  # the caller decides whether to retry without weights_only
        raise CheckpointError(_corrupt_message(path, e)) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(_corrupt_message(path, e)) from e


def _corrupt_message(path, e):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    # torch's own text goes on about how files get corrupted: its first sentence is what matters.
    first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
    return (f"checkpoint file '{path}' ({size} bytes) is truncated or corrupt and cannot be loaded "
            f"({first}). Copy it again from its source, or use an earlier checkpoint directory "
            f"(ckpts/<step>.ckpt).")


def _load_trusted(path):
    """Load one of our own checkpoint files: weights_only where possible, full pickle otherwise."""
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        # train_state may hold objects outside the weights_only allow-list (e.g. numpy scalars
        # a trainer put there); the file is one this code wrote itself.
        return _torch_load(path, weights_only=False)


# ----------------------------------------------------------------------------- verification

def _read_marker(path):
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        return None
    try:
        with open(marker) as f:
            data = json.load(f)
        if not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' entry")
        return data
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{marker}' is unreadable ({e})") from e


def checkpoint_problems(path, *, checksums=True):
    """Everything wrong with the checkpoint directory `path`, as a list of messages (empty = good).

    With a COMPLETE marker every recorded file must exist with its recorded size (and sha256
    when `checksums`). Without one (a checkpoint written by the original code) every file must
    at least load.
    """
    if not os.path.isdir(path):
        return [f"'{path}' is not a directory"]
    try:
        marker = _read_marker(path)
    except CheckpointError as e:
        return [str(e)]
    if marker is None:
        problems = []
        for name in MODULE_FILES + (STEP_FILE,):
            fp = os.path.join(path, name)
            if not os.path.exists(fp):
                problems.append(f"no COMPLETE marker and '{fp}' is missing (an interrupted save by another tool?)")
                continue
            try:
                _load_trusted(fp)
            except (CheckpointError, MissingFileError) as e:
                problems.append(str(e))
        return problems
    problems = []
    for name, rec in marker["files"].items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            problems.append(f"'{fp}' is missing")
            continue
        size = os.path.getsize(fp)
        if size != rec["size"]:
            problems.append(f"'{fp}' is {size} bytes but was written with {rec['size']} bytes (truncated or overwritten)")
        elif checksums and _file_sha256(fp) != rec["sha256"]:
            problems.append(f"'{fp}' does not match the checksum recorded when it was written (corrupt)")
    return problems


def _is_verified(path):
    marker = os.path.join(path, MARKER)
    try:
        return _verified.get(os.path.abspath(path)) == os.path.getmtime(marker)
    except OSError:
        return False


def _mark_verified(path):
    try:
        _verified[os.path.abspath(path)] = os.path.getmtime(os.path.join(path, MARKER))
    except OSError:
        pass


def list_checkpoints(ckpt_root):
    """(step, path) of every `<step>.ckpt` directory under ckpt_root, newest first (unverified)."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(os.path.join(ckpt_root, name)):
            found.append((step, os.path.join(ckpt_root, name)))
    return sorted(found, reverse=True)


def latest_checkpoint(ckpt_root):
    """Path of the newest complete, loadable checkpoint under ckpt_root, or None.

    Incomplete, truncated or corrupt ones are skipped with a warning naming them (they are
    left on disk: the user may want to look at them).
    """
    for _, path in list_checkpoints(ckpt_root):
        if _is_verified(path):
            return path
        problems = checkpoint_problems(path)
        if not problems:
            _mark_verified(path)
            return path
        logger.warning("skipping checkpoint '%s': %s. Resuming from an earlier one if there is one.",
                       path, "; ".join(problems))
    return None


# ----------------------------------------------------------------------------- save

def _remove_stale_temporaries(ckpt_root):
    """Remove half-written checkpoint directories left by processes that were killed."""
    for name in os.listdir(ckpt_root):
        m = _TMP_NAME.match(name)
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another live process on this host may be writing it
        path = os.path.join(ckpt_root, name)
        final = checkpoint_path(ckpt_root, int(m.group(1)))
        if name.endswith(".old") and not os.path.exists(final) and not checkpoint_problems(path):
            # Re-saving an existing step moves the old copy aside before renaming the new one in;
            # a kill between the two renames leaves the old, complete copy here: put it back.
            os.rename(path, final)
            logger.warning("restored '%s' from '%s', left by a save interrupted while replacing it", final, name)
            continue
        logger.info("removing '%s', left by an interrupted checkpoint save", name)
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_checkpoint(path):
    # Renamed first so a crash mid-delete never leaves a half-deleted `<step>.ckpt` behind.
    doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-deleting")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _protected_steps(protect):
    steps = set()
    for p in protect or ():
        if p is None:
            continue
        if isinstance(p, (int, np.integer)):
            steps.add(int(p))
        else:
            step = checkpoint_step(p)
            if step is None:
                raise CheckpointError(f"protect={p!r}: expected a step number or a '<step>.ckpt' path")
            steps.add(step)
    return steps


def _check_keep_last(keep_last):
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, (int, np.integer))
                                  or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r} must be a positive integer (or None to keep every checkpoint)")


def prune_checkpoints(ckpt_root, keep_last, protect=()):
    """Delete all but the newest `keep_last` checkpoints, never those whose step is in `protect`."""
    _check_keep_last(keep_last)
    if keep_last is None:
        return []
    protected = _protected_steps(protect)
    deleted = []
    for i, (step, path) in enumerate(list_checkpoints(ckpt_root)):
        if i < keep_last or step in protected:
            continue
        _delete_checkpoint(path)
        deleted.append(path)
        logger.info("deleted old checkpoint '%s' (keep_last=%d)", path, keep_last)
    return deleted


def _estimated_bytes(objs):
    total = 0

    def visit(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    for o in objs:
        visit(o)
    return total


def _check_free_space(ckpt_root, needed, final_path):
    try:
        free = shutil.disk_usage(ckpt_root).free
    except OSError:
        return
    if free < needed:
        raise SaveError(
            f"not enough disk space to write checkpoint '{final_path}': it needs about "
            f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free. Nothing was written: the previous "
            f"checkpoint is intact. Free space (or lower config.train.keep_last_ckpts / point --workdir at a larger "
            f"disk) and rerun the same command to resume.")


def save_checkpoint(ckpt_root, step, *, nnet, nnet_ema, optimizer, lr_scheduler, train_state,
                    keep_last=None, protect=()):
    """Write `ckpt_root/<step>.ckpt/` atomically and return its path. Call on the main process only.

    nnet / nnet_ema: modules (DDP, accelerate and torch.compile wrappers are unwrapped) or state
    dicts; optimizer / lr_scheduler: anything with `state_dict()`. train_state: a dict saved as
    is (its 'step' is set to `step`). keep_last=K then deletes all but the newest K
    checkpoints, never those in `protect` (steps or `<step>.ckpt` paths, e.g. the best-FID one).

    Raises SaveError (naming the path) when the disk is full or a write fails; the previous
    checkpoints are then untouched.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"step={step!r} must be a non-negative integer")
    step = int(step)
    _check_keep_last(keep_last)  # before writing: a bad argument must not leave a half-done job
    _protected_steps(protect)
    os.makedirs(ckpt_root, exist_ok=True)
    _remove_stale_temporaries(ckpt_root)
    final_path = checkpoint_path(ckpt_root, step)

    contents = {
        "nnet.pth": _state_dict(nnet),
        "nnet_ema.pth": _state_dict(nnet_ema),
        "optimizer.pth": _state_dict(optimizer),
        "lr_scheduler.pth": _state_dict(lr_scheduler),
        STEP_FILE: step,
        TRAIN_STATE_FILE: {**dict(train_state or {}), "step": step},
    }
    # A cheap early refusal; a full disk mid-write is still caught below.
    _check_free_space(ckpt_root, _estimated_bytes(contents.values()), final_path)

    with atomic_path(final_path) as tmp:
        os.makedirs(tmp)
        records = {}
        for name, obj in contents.items():
            records[name] = _save_file(obj, os.path.join(tmp, name), final_path)
        marker = json.dumps({"format": FORMAT_VERSION, "step": step, "files": records}, indent=1)
        try:
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write(marker)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise SaveError(_io_message(final_path, MARKER, e)) from e
        fsync_dir(tmp)  # the files' names, before the directory is renamed into place
    _mark_verified(final_path)
    logger.info("saved checkpoint '%s'", final_path)
    prune_checkpoints(ckpt_root, keep_last, protect)
    return final_path


# ----------------------------------------------------------------------------- load

def _load_module_state(module, state_dict, what, path):
    """Load `state_dict` into `module` strictly; a mismatch is a CheckpointError naming keys/shapes."""
    module = _unwrap(module)
    try:
        from libs.nnet import load_nnet_state_dict
    except ImportError:
        load_nnet_state_dict = None
    if load_nnet_state_dict is not None:
        try:
            load_nnet_state_dict(module, state_dict)
        except CheckpointError as e:
            raise CheckpointError(f"{what} from '{path}': {e}") from e
        return
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} from '{path}' does not match the network built from the config: "
                              f"{str(e).splitlines()[0]}") from e


def load_checkpoint(path, *, nnet, nnet_ema, optimizer, lr_scheduler):
    """Load a checkpoint directory into the given objects and return its train_state (with 'step').

    The files are verified against the COMPLETE marker first (unless `latest_checkpoint` just
    did). A checkpoint written by the original code (no train_state.pth) loads with a warning:
    its RNG states and data position are unknown, so that resume is only approximate.
    Restoring RNG states and the data position from the returned dict is the caller's job.
    """
    if not os.path.isdir(path):
        raise MissingFileError(f"checkpoint directory '{path}' not found. Give a ckpts/<step>.ckpt directory.")
    if not _is_verified(path):
        problems = checkpoint_problems(path)
        if problems:
            raise CheckpointError(f"cannot resume from '{path}': " + "; ".join(problems)
                                  + ". Delete or move this directory to resume from the previous checkpoint.")
        _mark_verified(path)

    for name, target in (("nnet.pth", nnet), ("nnet_ema.pth", nnet_ema)):
        if target is not None:
            _load_module_state(target, _load_trusted(os.path.join(path, name)), name, path)
    for name, target in (("optimizer.pth", optimizer), ("lr_scheduler.pth", lr_scheduler)):
        if target is None:
            continue
        state = _load_trusted(os.path.join(path, name))
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{name} from '{path}' does not fit this {type(target).__name__} "
                                  f"(different parameters or settings than the run that wrote it): {e}") from e

    step = _load_trusted(os.path.join(path, STEP_FILE))
    state_file = os.path.join(path, TRAIN_STATE_FILE)
    if os.path.exists(state_file):
        train_state = _load_trusted(state_file)
        if not isinstance(train_state, dict):
            raise CheckpointError(f"'{state_file}' holds a {type(train_state).__name__}, expected a dict")
    else:
        logger.warning("'%s' has no %s (written by the original code?): RNG states and data position are "
                       "not restored, so this resume is approximate.", path, TRAIN_STATE_FILE)
        train_state = {}
    train_state["step"] = int(step)
    logger.info("resumed from '%s' (step %d)", path, train_state["step"])
    return train_state


def load_nnet_weights(path_or_dir):
    """The network state dict for `--nnet_path`: a .pth file, or a `.ckpt` directory (its nnet_ema.pth).

    A missing path is a MissingFileError; a truncated or corrupt file a CheckpointError naming
    it and saying what to do.
    """
    path = str(path_or_dir)
    if not os.path.exists(path):
        raise MissingFileError(
            f"--nnet_path '{path}' not found. Give a .pth state dict (e.g. a released U-ViT checkpoint) "
            f"or a training checkpoint directory workdir/<config>/<hparams>/ckpts/<step>.ckpt.")
    if os.path.isdir(path):
        file = os.path.join(path, "nnet_ema.pth")
        if not os.path.exists(file):
            raise MissingFileError(f"'{path}' is a directory without nnet_ema.pth; give a ckpts/<step>.ckpt "
                                   f"directory or a .pth file.")
        marker = _read_marker(path)
        if marker is not None and "nnet_ema.pth" in marker["files"]:
            rec = marker["files"]["nnet_ema.pth"]
            size = os.path.getsize(file)
            if size != rec["size"]:
                raise CheckpointError(
                    f"checkpoint file '{file}' is {size} bytes but was written with {rec['size']} bytes: it is "
                    f"truncated. Copy it again from its source, or use an earlier checkpoint directory.")
            if _file_sha256(file) != rec["sha256"]:
                raise CheckpointError(
                    f"checkpoint file '{file}' does not match the checksum recorded when it was written: it is "
                    f"corrupt. Copy it again from its source, or use an earlier checkpoint directory.")
        path = file
    try:
        state = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"'{path}' is not a plain state dict of tensors ({str(e).splitlines()[0]}); "
                              f"--nnet_path takes a network state dict such as nnet_ema.pth.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a network state dict (name -> tensor); "
                              f"--nnet_path takes nnet_ema.pth or a ckpts/<step>.ckpt directory.")
    return state


# ----------------------------------------------------------------------------- RNG states

def capture_rng_state():
    """This process's RNG states: Python `random`, NumPy's global generator, torch CPU, every CUDA device.

    Stored as tensors and plain Python types so it loads with torch.load(weights_only=True).
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng_states_all_ranks():
    """Every rank's `capture_rng_state()`, as a list indexed by rank (collective: call on all ranks).

    Ranks draw different noise (each is seeded differently), so an exact multi-process resume
    needs all of them; the main process saves the list in train_state.
    """
    local = capture_rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def restore_rng_state(state):
    """Restore what `capture_rng_state` (a dict) or `capture_rng_states_all_ranks` (a list) returned.

    Given a list, this process takes its own rank's entry; a different number of processes
    than when saving makes an exact resume impossible, which is logged.
    """
    if isinstance(state, (list, tuple)):
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if len(state) != world:
            logger.warning("the checkpoint holds RNG states of %d processes but %d are running: the resumed run "
                           "draws different noise than the interrupted one would have.", len(state), world)
        state = state[rank % len(state)]
    if not isinstance(state, dict) or "torch" not in state:
        raise CheckpointError("the RNG state in this checkpoint is not one written by capture_rng_state()")
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["bit_generator"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            logger.warning("the checkpoint holds RNG states of %d CUDA devices but %d are visible; restoring the "
                           "first %d.", len(cuda), n, min(n, len(cuda)))
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s, i)
