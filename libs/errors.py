"""Exceptions: a user's mistake ends as one line, a programming error keeps its traceback.

`UViTError` and its subclasses are the user's mistakes (a config value, a flag, a missing or damaged
file): their messages say what is wrong and what to do, and scripts print them as one line
(`exit_on_user_error`). `InputError` is a tensor of the wrong shape or range handed to a model or
sampler: inside the library that is a bug, so it is not a UViTError and keeps its traceback.
"""
import functools
import os


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


class DataError(UViTError, InputError):
    """A data file (an image of the training set) cannot be read or decoded; the message names it. A user's
    file, so one line; also an InputError, which image readers raised for it before."""


def require_path(path, what, how):
    """Return `path` if it exists, else raise MissingFileError.

    what: a noun phrase naming the thing ("CIFAR10 python batches").
    how: what the user should do to put it there ("download ... and extract it to ...").
    """
    if path is None or not os.path.exists(path):
        raise MissingFileError(f"{what} not found at '{path}'. {how}")
    return path


def exit_on_user_error(main):
    """Wrap a script's main(argv): a UViTError ends the program with its one-line message and status 1
    (UVIT_TRACEBACK=1 shows the traceback, for bug reports); anything else keeps its traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UViTError as e:
            if os.environ.get("UVIT_TRACEBACK"):
                raise
            raise SystemExit(f"{type(e).__name__}: {e}") from None

    return wrapped
