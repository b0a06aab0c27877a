"""Stop signals: finish the step, save a checkpoint, exit; rerunning the same command resumes.

SIGTERM (preemption, `scancel`, torchrun forwarding its own), SIGINT (Ctrl-C) and SIGUSR1 (an advance warning
such as Slurm's `--signal=USR1@120`) all mean: stop after the current step with a checkpoint of it. Work that can
be redone (evaluation, sampling, grids) runs inside `StopSignals.interruptible()`, where a signal raises
`StopRequested` at once and the work reruns on resume. Data-loader workers ignore the three
(`ignore_stop_signals`); repeats are logged and ignored; SIGQUIT (Ctrl-\\) or SIGKILL end a run at once.
"""
import contextlib
import logging
import os
import shlex
import signal
import sys

import torch

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(*_):
    """A DataLoader worker_init_fn: the worker leaves stop signals to the training process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequested(BaseException):
    """A stop signal arrived inside `StopSignals.interruptible()`. A BaseException (as KeyboardInterrupt), so the
    `except Exception` of the interrupted work does not swallow it."""


class StopSignals:
    """Context manager: a stop signal sets `received` (its name); the loop polls `should_stop`; inside
    `interruptible()` it also raises StopRequested. StopRequested leaving the block (from `interruptible` or
    raised by the loop itself to stop) ends the block quietly and sets `stopped`. Re-entering is allowed."""

    def __init__(self):
        self.received = None
        self.stopped = False
        self._interrupt = False

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, kind, error, tb):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if isinstance(error, StopRequested):  # a stop, not a failure: the caller reads `stopped` and saves
            self.stopped = True
            return True
        return False

    @contextlib.contextmanager
    def interruptible(self, what: str):
        """Run the block (`what`, e.g. 'the evaluation of step 500', for the log) so that a stop signal ends it
        within a Python bytecode (a running kernel finishes first): StopRequested leaves the block. A signal
        received before the block raises at its start."""
        if self.received is not None:
            raise StopRequested(f"{self.received} received before {what}")
        self._interrupt, self._what = True, what
        try:
            yield
        finally:
            self._interrupt = False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None and self._interrupt:
            self.received, self._interrupt = name, False
            logger.warning("received %s during %s: stopping it now; the last finished step is saved and it reruns "
                           "on resume", name, self._what)
            raise StopRequested(f"{name} received during {self._what}")
        if self.received is None:
            self.received = name
            logger.warning("received %s: saving a checkpoint after the current step (several processes: after the "
                           "next logging step), then stopping", name)
        else:
            logger.warning("received %s again: still stopping after the current step (Ctrl-\\ aborts)", name)

    def should_stop(self, accelerator, sync: bool) -> bool:
        """Whether to stop now, the same answer on every process. One process: the flag, free. Several: they
        agree by an all-reduce, done only when `sync` (every process must pass the same `sync` at each call)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if not sync:
            return False
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        if accelerator.reduce(flag, 'sum').item() > 0:
            self.received = self.received or 'a signal received by another process'
            return True
        return False


def resume_command(argv=None) -> str:
    """The command that resumes this run, ready to paste: `python train.py --config=...` (shell-quoted); under a
    multi-process launcher (WORLD_SIZE > 1), whose own arguments a process cannot see, that launcher's command."""
    argv = list(sys.argv if argv is None else argv)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        return f"the same launcher command, e.g. accelerate launch --multi_gpu ... {shlex.join(argv)}"
    return shlex.join(['python', *argv])
