"""Fatal ends of a training run: their cause goes to train.log, and an emergency checkpoint saves the work.

`log_fatal_errors(log_file, rank)`: whatever ends `train()` with an exception, in any process, is written to the
log file (train.log) as one line for a user's mistake (a UViTError, which the script prints on stderr as that
line) or with its traceback for a bug; the console shows the exception once, as the script prints it.

`EmergencyCheckpoint(run, write, step)`: around the training loop. An I/O or data error after training
started (an unreadable image met deep in the data, a full disk, a vanished file) leaves the weights of the
last finished step good, so they are saved before the run ends and rerunning after the fix loses nothing.
Not after a divergence (TrainingDivergedError: the last good checkpoint is the point) nor after a bug
(anything else: the state may be half-updated). The process that failed writes it alone, with no
collective, so it works whatever the other ranks are doing (they are blocked in the next all-reduce, or
being stopped by the launcher).
"""
import contextlib
import logging
import os
import time
import traceback

from libs.checkpoint import checkpoint_path, checkpoint_problems
from libs.errors import DataError, UViTError

logger = logging.getLogger(__name__)

SAVED_AFTER = (DataError, OSError)  # SaveError and MissingFileError are OSErrors


@contextlib.contextmanager
def log_fatal_errors(log_file: str, rank: int = 0):
    """Log an exception leaving the block to the log file only (see the module docstring), then re-raise.

    log_file: the run's train.log. The main process (rank 0) logs through its file handler; another rank has
    none and appends its line to the file itself (one write in append mode: lines of processes do not mix)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, UViTError):
            message = f"the run stopped: {type(e).__name__}: {e}"
        elif isinstance(e, BrokenPipeError):  # e.g. `train.py 2>&1 | head`: the user closed the output
            message = ("the run stopped: its console output was closed (BrokenPipeError: the program reading it, "
                       "e.g. `| head`, ended); rerun the same command to resume from its last checkpoint")
        else:
            message = "the run stopped on an internal error (a bug; please report it with this traceback):"
        quiet = isinstance(e, (UViTError, BrokenPipeError))  # one line; a bug keeps its traceback
        if rank == 0:
            logger.error(message, exc_info=not quiet, extra={'file_only': True})
        else:
            detail = '' if quiet else '\n' + ''.join(traceback.format_exception(e))
            stamp = time.strftime('%Y-%m-%d %H:%M:%S')
            with contextlib.suppress(OSError), open(log_file, 'a') as f:
                f.write(f"[{stamp} ERROR {__name__}] rank {rank}: {message}{detail}\n")
        raise


class EmergencyCheckpoint:
    """Context manager around the loop; the loop sets `.step` to each finished step.

    run: the trainer's Run (its ckpt_root, loader and config.train.batch_size are read).
    write: write(step) -> path, writes ckpts/<step>.ckpt from this process without collectives.
    """

    def __init__(self, run, write, step: int):
        self.run, self.write, self.step = run, write, step
        self._start = (step, run.loader.position)  # data position = start + (step - start step) * global batch

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, SAVED_AFTER) or self.step == self._start[0]:
            return False
        path = checkpoint_path(self.run.ckpt_root, self.step)
        if os.path.isdir(path) and not checkpoint_problems(path):
            logger.info("the last finished step %d is already saved in '%s'", self.step, path)
            return False
        start_step, start_position = self._start
        # A data error in the 2nd of k micro-batches has moved the loader past the step: back to its end.
        self.run.loader.position = start_position + (self.step - start_step) * self.run.config.train.batch_size
        try:
            self.write(self.step)
        except Exception as again:  # a full disk fails again: the earlier checkpoints are intact
            logger.error("no emergency checkpoint of step %d: %s", self.step, again)
            return False
        logger.warning("emergency checkpoint of step %d (the last finished one) saved to '%s' before stopping on "
                       "%s; fix the cause and rerun the same command to resume from it", self.step, path,
                       type(error).__name__)
        return False
