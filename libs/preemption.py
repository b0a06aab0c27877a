"""Stop signals: finish the step, save a checkpoint, exit; rerunning the same command resumes.

SIGTERM (cluster preemption, `scancel`, torchrun forwarding its own), SIGINT (Ctrl-C) and SIGUSR1 (an
advance warning such as Slurm's `--signal=USR1@120`) all mean the same: stop after the current step
with a checkpoint of it. Data-loader workers ignore the three (`ignore_stop_signals`), so a signal to
the whole process group reaches the training loop only. Repeats are logged and ignored (launchers
forward what the terminal already sent); SIGQUIT (Ctrl-\\) or SIGKILL end a run at once.
"""
import logging
import signal

import torch

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(*_):
    """A DataLoader worker_init_fn: the worker leaves stop signals to the training process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Context manager: a stop signal sets `received` (its name); the loop polls `should_stop`."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
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
