"""Atomic file and directory writes.

A crash, `kill -9` or full disk in the middle of a save must never destroy the previous
good copy, so everything is written under a temporary name in the same directory and
then renamed (rename is atomic on POSIX within one file system).
"""
import contextlib
import hashlib
import io
import os
import shutil
import tempfile

import numpy as np

from libs.errors import UViTError


class SaveError(UViTError, OSError):
    """Writing a file failed (typically: disk full); the previous file is intact."""


def fsync_dir(path):
    """Flush a directory's entries (new or renamed names) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    Works for files and for directories. On any exception the temporary is removed and
    `path` is left exactly as it was.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{next(tempfile._get_candidate_names())}")
    try:
        yield tmp
        if os.path.isdir(path) and os.path.isdir(tmp):
            # Directories cannot be renamed over a non-empty target: move the old one aside first.
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        _remove(tmp)
        # An OSError becomes a SaveError naming the file; a SaveError raised inside the block already does.
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(f"could not write '{path}': {e.strerror or e}. The previous version, if any, is "
                            "unchanged.") from e
        raise


def _remove(p):
    if os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.exists(p):
        os.remove(p)


def atomic_write_bytes(data: bytes, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_savez(path, **arrays):
    """numpy.savez to `path` atomically (the name is kept exactly, no '.npz' appended)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), path)


def sha256_of(path, chunk=1 << 22):
    """Hex sha256 of a file, read `chunk` bytes at a time (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
