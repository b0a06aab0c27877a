"""Exceptions raised at the project's boundaries.

Every user-facing validation error is one of these, so scripts can print the message
without a traceback and tests can check the exact kind of failure. Messages say what is
wrong *and* what to do about it.
"""
import os


class UViTError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(UViTError, ValueError):
    """A config value is missing, misspelled, of the wrong type or out of range."""


class InputError(UViTError, ValueError):
    """A tensor given to a model or sampler has the wrong shape, dtype or range."""


class CheckpointError(UViTError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the config."""


class MissingFileError(UViTError, FileNotFoundError):
    """A required file or folder (dataset, weights, statistics) is not where it should be."""


class TrainingDivergedError(UViTError, RuntimeError):
    """The loss became NaN or infinite."""


def require_path(path, what, how):
    """Return `path` if it exists, else raise MissingFileError.

    what: a noun phrase naming the thing ("CIFAR10 python batches").
    how: what the user should do to put it there ("download ... and extract it to ...").
    """
    if path is None or not os.path.exists(path):
        raise MissingFileError(f"{what} not found at '{path}'. {how}")
    return path


def exit_on_user_error(main):
    """Wrap a script's main(argv): a UViTError ends the program with its message and status 1.

    The message already says what is wrong and what to do, so the user gets that one line, not
    a traceback. Set UVIT_TRACEBACK=1 to get the traceback (for bug reports).
    """
    import functools

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UViTError as e:
            if os.environ.get("UVIT_TRACEBACK"):
                raise
            raise SystemExit(f"{type(e).__name__}: {e}") from None

    return wrapped
