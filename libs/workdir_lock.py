"""One run per workdir: the main process holds a POSIX record lock on `<workdir>/.lock` while it trains.

A second run on the same workdir (a resubmitted job, a second terminal) stops at once with one line naming
the holder (host, pid and start time, which the holder writes into the file). The kernel drops the lock
when its process ends in any way (exit, crash, SIGKILL), so a dead holder never blocks the next run; the
file itself stays and is simply locked again.

Shared filesystems: `fcntl.lockf` is a POSIX (fcntl) lock, which NFSv4 keeps on the server (NFSv3 through
lockd), and which Lustre (mounted with `-o flock`), GPFS, BeeGFS and CephFS honour across nodes. When a
node is lost, the server frees its locks once the client's lease expires (NFSv4: 90 s by default), so the
rerun of a job whose node died may wait that long: it is told who holds the lock. A filesystem mounted
with `-o nolock` (or Lustre without `flock`) gives every node its own locks: one job per workdir is then
up to the user. POSIX locks belong to a process, and closing any descriptor of the file releases them,
so this module opens the file once per process and counts the holders of each path.
"""
import datetime
import errno
import fcntl
import logging
import os
import socket

from libs.errors import ConfigError, WorkdirInUseError

logger = logging.getLogger(__name__)

LOCK_NAME = '.lock'
_held = {}  # realpath of the lock file -> [file descriptor, holders in this process]


def _holder(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors='replace').strip()
    return text or 'a process that has not written its name yet'


def acquire(workdir: str) -> str:
    """Create `workdir` if needed and lock it for this process; returns the lock file's path.

    WorkdirInUseError when another live process holds it; ConfigError when the workdir cannot be written."""
    path = os.path.realpath(os.path.join(workdir, LOCK_NAME))
    if path in _held:  # this process already holds it (a notebook calling train twice): POSIX locks nest
        _held[path][1] += 1
        return path
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write to the workdir '{workdir}' ({e.strerror or e}): give a --workdir where "
                          f"you may create files, or fix its permissions.") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise WorkdirInUseError(
                f"the workdir '{workdir}' is in use by another run ({holder}). Wait for it to end or stop it, or "
                f"give this run another --workdir.") from e
        raise ConfigError(f"cannot lock the workdir '{workdir}' ({e.strerror or e}): its filesystem does not "
                          f"support POSIX locks (NFS mounted with -o nolock?); see docs/robustness.md.") from e
    started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
    _held[path] = [fd, 1]
    return path


def release(path: str):
    """Undo one `acquire` of this process; the last one unlocks (the file stays)."""
    held = _held.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[path]
        os.close(held[0])  # drops the lock


class WorkdirLock:
    """Context manager: the main process of a (possibly multi-process) run holds the workdir's lock; every
    process learns whether it got it (one all-reduce), so all stop together when another run holds it."""

    def __init__(self, accelerator, workdir: str):
        self.accelerator, self.workdir, self.path = accelerator, workdir, None

    def __enter__(self):
        error = None
        if self.accelerator.is_main_process:
            try:
                self.path = acquire(self.workdir)
            except (WorkdirInUseError, ConfigError) as e:
                error = e
        if self.accelerator.num_processes > 1:
            import torch  # heavy: only several processes need it, and a lock holder need not load it
            failed = torch.tensor(float(error is not None), device=self.accelerator.device)
            if self.accelerator.reduce(failed, 'sum').item() > 0 and error is None:
                error = WorkdirInUseError(f"the main process could not take the workdir '{self.workdir}' "
                                          f"(its message says why)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            release(self.path)
            self.path = None
