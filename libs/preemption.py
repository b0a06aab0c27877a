"""Graceful stop on SIGTERM / SIGINT: finish the step, save a checkpoint, exit, resume later.

Cluster schedulers announce preemption with SIGTERM and follow with SIGKILL after a grace
period; Ctrl-C sends SIGINT. The handler only sets a flag; the training loop polls
`should_stop()` between steps, saves and returns.

Multi-process runs: a signal may reach only some ranks, or reach them at different steps,
and a rank that stops alone deadlocks the others in their next collective. So the ranks
agree by all-reducing (max) the flag, but only every `sync_every` steps: an all-reduce
every step would add a host-device synchronisation to every step. The price is that a
stop is acted on up to `sync_every - 1` steps after the signal; the scheduler's grace
period must cover those steps plus writing a checkpoint.
"""
import logging
import signal
import sys
import threading

import torch

from libs.errors import ConfigError

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Context manager turning SIGTERM / SIGINT into a stop request polled with `should_stop()`.

    A second SIGINT (Ctrl-C pressed twice) aborts immediately with KeyboardInterrupt; repeated
    SIGTERMs are only logged, because launchers forward SIGTERM after the terminal's SIGINT.
    The previous handlers are restored on exit.
    """

    def __init__(self, sync_every=10):
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ConfigError(f"sync_every={sync_every!r} must be a positive integer (steps between stop checks)")
        self.sync_every = sync_every
        self.signal_name = None  # name of the first signal received, for the exit message
        self._requested = False
        self._agreed = False
        self._calls = 0
        self._previous = {}

    # -- signal handling

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHandler entered outside the main thread: signals cannot be caught there, "
                           "so SIGTERM/SIGINT will kill training without a checkpoint.")
            return self
        for sig in _SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._requested and signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt(f"second {name}: aborting without saving a checkpoint")
        if self._requested:
            logger.warning("received %s again; still stopping after the current step (press Ctrl-C twice to "
                           "abort without saving)", name)
            return
        self._requested = True
        self.signal_name = name
        logger.warning("received %s: training will save a checkpoint and stop after the current step "
                       "(Ctrl-C again aborts without saving)", name)

    def request_stop(self, reason="requested"):
        """Ask for a stop as if a signal had arrived (for tests and programmatic stops)."""
        if not self._requested:
            self._requested = True
            self.signal_name = reason

    @property
    def requested(self):
        """Whether this process received a stop signal (without consulting the other ranks)."""
        return self._requested

    # -- polling

    def should_stop(self, accelerator=None, step=None):
        """Whether training should stop now; all ranks get the same answer at the same step.

        Single process: the local flag, at no cost. Several processes: every rank must call
        this at the same steps; the flag is all-reduced (max) when `step` (or, if step is
        None, the call count) is a multiple of `sync_every`, and False is returned in between.
        Once the ranks agree to stop, every later call returns True.
        """
        if self._agreed:
            return True
        world_size = _world_size(accelerator)
        if world_size <= 1:
            self._agreed = self._requested
            return self._agreed
        counter = self._calls if step is None else int(step)
        self._calls += 1
        if counter % self.sync_every != 0:
            return False
        flag = torch.tensor([1.0 if self._requested else 0.0], device=_device(accelerator))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._agreed = bool(flag.item() > 0)
        if self._agreed and not self._requested:
            self.signal_name = self.signal_name or "a signal received by another process"
        return self._agreed

    def resume_message(self, step, checkpoint, argv=None):
        """What to tell the user on exit: why training stopped, where it was saved, how to resume."""
        command = " ".join(sys.argv if argv is None else argv)
        return (f"training stopped at step {step} ({self.signal_name or 'stop requested'}); checkpoint saved to "
                f"'{checkpoint}'. To resume, rerun the same command: {command}")


def _world_size(accelerator):
    if accelerator is not None:
        return int(getattr(accelerator, "num_processes", 1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _device(accelerator):
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        return accelerator.device
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
