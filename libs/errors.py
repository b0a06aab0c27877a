"""Exceptions: which is which. A user's mistake ends as one line, a programming error keeps its traceback.

(a) A user's mistake (a config value, a flag, a file or folder, the data in it) raises a `UViTError`
    subclass: ConfigError, MissingFileError, DataError, CheckpointError, ... Its message names the value
    and says the fix; scripts print it as one line (`exit_on_user_error`). It is raised once, where the
    value enters: config parsing (libs.config_utils.parse_and_validate), flag parsing (libs.sampling_cli,
    the scripts' main), the reader of the file. A reader checks what it read in one place and names every
    problem in one message (not one raise per key, shape or dtype).
(b) A wrong argument handed by a researcher's own code to a public API (a tensor of the wrong shape, dtype or
    range) raises `InputError`: not a UViTError, so it keeps its traceback. The public APIs are the networks'
    forward, the autoencoders' encode/decode, libs.sampling.sample and the metric functions.
(c) What the code itself guarantees (a value checked at its boundary, a shape the library built) is an
    `assert`: the internals trust the boundary checks and do not repeat them. So are the arguments of
    functions only the library calls, with values it built or validated (the feature-shard writer and
    readers, the Inception network's dims, quantize_like_png, ...): a wrong one is a bug in the caller.
"""
import functools
import gc
import os
import sys


class UViTError(Exception):
    """A user's mistake, reported as one line."""


class ConfigError(UViTError, ValueError):
    """A config value or flag is missing, misspelled, of the wrong type or out of range."""


class CheckpointError(UViTError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the config."""


class MissingFileError(UViTError, FileNotFoundError):
    """A required file or folder (dataset, weights, statistics) is not where it should be."""


class TrainingDivergedError(UViTError, RuntimeError):
    """The loss became NaN or infinite more often than config.train.max_nonfinite_* allow."""


class WorkdirInUseError(UViTError, RuntimeError):
    """Another live run holds the workdir (libs/workdir_lock.py); the message names its host, pid and start."""


class InputError(ValueError):
    """A tensor given to a model or sampler has the wrong shape, dtype or range (a bug: keeps its traceback)."""


class DataError(UViTError, ValueError):
    """A user's data file (an image, a dataset batch, an annotation or prompts file) cannot be read or holds
    the wrong thing; the message names it. Not an InputError: the file is the user's, not the caller's code."""


def require_path(path, what, how, kind=None):
    """Return `path` if it exists (as a file for kind='file', a folder for kind='folder'), else raise
    MissingFileError naming it.

    what: a noun phrase naming the thing ("CIFAR10 python batches").
    how: what the user should do to put it there ("download ... and extract it to ...").
    """
    if path is None or not os.path.exists(path):
        raise MissingFileError(f"{what} not found at '{path}'. {how}")
    if not {None: os.path.exists, 'file': os.path.isfile, 'folder': os.path.isdir}[kind](path):
        raise MissingFileError(f"{what} at '{path}' is not a {kind}. {how}")
    return path


def exit_on_user_error(main):
    """Wrap a script's main(argv): a UViTError ends the program with its one-line message and status 1
    (UVIT_TRACEBACK=1 shows the traceback, for bug reports); anything else keeps its traceback. A main that
    returns releases the process group it formed (`release_process_group`)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
        except UViTError as e:
            if os.environ.get("UVIT_TRACEBACK"):
                raise
            raise SystemExit(f"{type(e).__name__}: {e}") from None
        except BrokenPipeError:  # the reader of the output went away (`| head`): the user's choice, not a bug
            end_quietly_on_closed_output()
        release_process_group()
        return result

    return wrapped


def release_process_group():
    """After a script's work ended well: destroy the process group it formed (if any) and collect what still
    holds it (a DDP model's reducer keeps it past `destroy_process_group`, and a reference cycle can keep the
    model), so gloo's worker threads are joined while the interpreter is whole. Torn down during interpreter
    finalization instead, they can abort a process whose work succeeded (SIGABRT, "terminate called without an
    active exception": a known hazard of gloo in PyTorch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # nothing distributed was imported: no group to release
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def end_quietly_on_closed_output():
    """Exit with status 141 (128 + SIGPIPE, what a shell reports for a pipeline stage its reader left) and no
    message: the console streams go to /dev/null first, so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # a stream without a file descriptor: nothing to redirect
            pass
    raise SystemExit(141)
