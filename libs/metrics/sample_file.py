"""ADM-suite sample files: `.npz` with 'arr_0' uint8 (N, H, W, 3) and, for class models, 'arr_1' int64 (N,) labels.

The ADM evaluator (guided-diffusion's evaluations/evaluator.py) and every table built with it (ADM, DiT,
SiT, REPA, LightningDiT, MDT, MaskDiT) read this layout. `ShardedSampleWriter` writes it without holding
the images: each process streams its own images (indices rank::world) into a memory-mapped `.npy` part,
then the main process joins the parts in index order into one uncompressed `.npz`, chunk by chunk,
under a temporary name renamed into place (an interrupted run leaves no half-written file).
`read_rows` streams an array of an `.npz` back the same way.
"""
import logging
import os
import shutil
import zipfile

import numpy as np
import torch

from libs.errors import ConfigError, DataError
from libs.io_utils import atomic_path

logger = logging.getLogger(__name__)

_CHUNK = 1024  # images per copy when joining / reading


def to_uint8_hwc(images):
    """(b, 3, H, W) float in [0, 1], already PNG-quantised -> uint8 numpy (b, H, W, 3), exactly round(255 x)."""
    return images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ShardedSampleWriter:
    """Writes the images of one evaluation into `path` (.npz); every process must create and use one.

    n: images in the evaluation; rank, world: this process and the number of processes. Call
    `write(uint8 (b, H, W, 3), indices)` for this process's indices (rank::world, any batches) and, after
    every process has written (a barrier), `join(labels)` on the main process.
    """

    def __init__(self, path, n, rank, world):
        assert path.endswith(".npz"), path  # config.metrics.npz is checked where the config enters
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path, self.n, self.rank, self.world = path, n, rank, world
        self.parts = path + ".parts"
        os.makedirs(self.parts, exist_ok=True)
        self.part = None

    def _part_path(self, rank):
        return os.path.join(self.parts, f"rank{rank}_of{self.world}.npy")

    def write(self, pixels, indices):
        idx = torch.as_tensor(indices).cpu().numpy()
        assert not np.any(idx % self.world != self.rank), f"rank {self.rank} of {self.world} got {idx[:5]}"
        if self.part is None:  # sized once the image shape is known
            self.part = np.lib.format.open_memmap(self._part_path(self.rank), mode="w+", dtype=np.uint8,
                                                  shape=(len(range(self.rank, self.n, self.world)), *pixels.shape[1:]))
        self.part[idx // self.world] = pixels

    def close(self):
        if self.part is not None:
            self.part.flush()
            self.part = None

    def join(self, labels=None):
        """Main process: the parts -> `path` ('arr_0' in index order, 'arr_1' = labels if given); parts removed."""
        parts = [np.load(self._part_path(r), mmap_mode="r") for r in range(min(self.world, self.n))]
        shape = (self.n, *parts[0].shape[1:])
        with atomic_path(self.path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for start in range(0, self.n, _CHUNK):
                    idx = np.arange(start, min(start + _CHUNK, self.n))
                    chunk = np.empty((len(idx), *shape[1:]), np.uint8)
                    for r, part in enumerate(parts):
                        chunk[idx % self.world == r] = part[idx[idx % self.world == r] // self.world]
                    f.write(chunk.tobytes())
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64)[:self.n])
        del parts
        shutil.rmtree(self.parts, ignore_errors=True)
        logger.info("wrote the %d samples %s to %s", self.n, shape[1:], self.path)


def npz_keys(path):
    """The array names of an .npz file (without reading them)."""
    assert os.path.isfile(path), path  # its callers said a missing file first (check_reference, tools/evaluator.py)
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise ConfigError(f"'{path}' is not an .npz file ({e}); write it with np.savez") from e


def read_rows(path, key="arr_0", chunk=_CHUNK):
    """Yield the rows of array `key` of the .npz `path` in chunks of `chunk` (numpy), never all at once."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, fortran, dtype = _header(f)
        if fortran:
            raise ConfigError(f"'{path}' {key} is stored in Fortran order; save it with np.savez from a C array")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            m = min(chunk, shape[0] - start)
            yield np.frombuffer(f.read(m * row), dtype=dtype).reshape(m, *shape[1:])


def _header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, positioned at its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def array_shape(path, key="arr_0"):
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        return _header(f)[0]


def images_of_rows(rows):
    """uint8 (b, H, W, 3) (or (b, H, W) grey) -> float (b, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.array(rows))  # a writable copy
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != torch.uint8:
        raise DataError(f"images must be uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1).contiguous()
