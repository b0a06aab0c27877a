"""Precomputed autoencoder moments (and CLIP contexts) on disk: the packed format and the original layout.

Packed format (what scripts/extract_*.py write), one folder per split:

    manifest.json                       written last by the main process: shard list, shapes, dtypes
    shard_00000.json                    per-shard record, written after the shard's arrays (its presence
                                        means the shard is complete; extraction resumes by skipping these)
    shard_00000.moments.npy             (n, 2*C_z, h, w) moments (mean, logvar), memory-mappable
    shard_00000.labels.npy              (n,) int64 class labels              [class-labelled sets]
    shard_00000.repa.npy                (n, N, E) frozen-encoder patch features of each image, for
                                        representation alignment (libs/repa.py)  [--repa_encoder]
    shard_00000.contexts.npy            (m, 77, D) CLIP contexts of all captions of the shard [text sets]
    shard_00000.context_offsets.npy     (n + 1,) int64: sample i's captions are rows
                                        offsets[i]:offsets[i+1] of contexts.npy               [text sets]

Each array is written to a temporary file and renamed into place (libs/io_utils.atomic_path), so an interrupted
extraction leaves either a complete shard or no shard record at all.

Precision: float32 by default, bit-identical to the original's per-file extraction. `--dtype float16` halves disk
and page cache (ImageNet 256: 84 GB -> 42 GB for 2 x 1.28M entries); its rounding error (relative 2^-11) is below
KL-f8's posterior noise, but it is not the original's data, hence not the default. Readers always return float32.

Original one-file-per-sample layout (read, never written):
- ImageNet: `{i}.npy`, i = 0..N-1, a pickled object array (moments (8, h, w) float32, label int); an image and its
  flip are two files, not necessarily consecutive.
- MS-COCO: `{i}.npy` moments (8, h, w) float32 and `{i}_{k}.npy` the CLIP context (77, 768) of caption k < K_i.

Readers open their memory maps lazily, once per process (DataLoader workers re-open after fork).
"""
import bisect
import json
import logging
import os
import re

import numpy as np

from libs.errors import CheckpointError, ConfigError, InputError, MissingFileError
from libs.io_utils import atomic_path, atomic_write_bytes

logger = logging.getLogger(__name__)

FORMAT_NAME = "uvit-packed-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("float32", "float16")


def shard_name(index):
    return f"shard_{index:05d}"


def plan_shards(num_items, shard_size):
    """Split items 0..num_items-1 into consecutive shards: list of (shard_index, start, stop)."""
    assert shard_size >= 1, shard_size  # the extraction scripts' --shard_size flag has lower_bound=1
    return [(k, s, min(s + shard_size, num_items)) for k, s in enumerate(range(0, num_items, shard_size))]


def remove_stale_temporaries(folder, index):
    """Delete temporaries of shard `index` left by a killed run (they can be gigabytes). Safe because a shard
    belongs to one process of a run (plan[rank::world]); never run two extractions into one folder at once."""
    prefix = f".{shard_name(index)}."
    for name in os.listdir(folder):
        if name.startswith(prefix) and ".tmp-" in name:
            logger.info("removing %s left by an interrupted extraction", name)
            os.remove(os.path.join(folder, name))


def shard_is_complete(folder, index):
    """True when the shard's record exists (it is written after all of the shard's arrays)."""
    return os.path.isfile(os.path.join(folder, shard_name(index) + ".json"))


class ShardWriter:
    """Writes one shard: arrays are filled in temporary memory-mapped .npy files, renamed into place by `commit()`,
    which writes the shard record last. Use as a context manager: an exception discards everything written.

    n: samples in the shard. moments_shape: (2*C_z, h, w). dtype: storage dtype. with_labels: store (n,) int64
    labels. num_contexts, context_shape: store contexts (text sets).
    """

    def __init__(self, folder, index, n, moments_shape, dtype="float32", with_labels=False,
                 num_contexts=None, context_shape=None, repa_shape=None, repa_dtype="float16"):
        assert dtype in STORAGE_DTYPES, f"{dtype!r}: the extraction scripts' --dtype flag takes {STORAGE_DTYPES}"
        os.makedirs(folder, exist_ok=True)
        self.folder, self.index, self.n, self.dtype = folder, index, int(n), dtype
        remove_stale_temporaries(folder, index)
        self.moments_shape = tuple(int(s) for s in moments_shape)
        self._contexts = []
        self._stack = []  # open atomic_path contexts, committed together
        self.moments = self._open("moments", (self.n, *self.moments_shape), dtype)
        self.labels = self._open("labels", (self.n,), "int64") if with_labels else None
        # (N, E) encoder features per sample: stored at repa_dtype (float16 halves ImageNet's ~1 TB at DINOv2-B)
        self.repa_shape = None if repa_shape is None else tuple(int(v) for v in repa_shape)
        self.repa = None if repa_shape is None else self._open("repa", (self.n, *self.repa_shape), repa_dtype)
        if num_contexts is not None:
            self.contexts = self._open("contexts", (int(num_contexts), *context_shape), dtype)
            self.context_offsets = self._open("context_offsets", (self.n + 1,), "int64")
        else:
            self.contexts = self.context_offsets = None
        self.filled = np.zeros(self.n, dtype=bool)

    def _open(self, part, shape, dtype):
        ctx = atomic_path(os.path.join(self.folder, f"{shard_name(self.index)}.{part}.npy"))
        tmp = ctx.__enter__()
        self._stack.append(ctx)
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close(exc_type, exc, tb)
        return False

    def _close(self, *exc_info):
        arrays = [self.moments, self.labels, self.contexts, self.context_offsets, self.repa]
        for a in arrays:
            if a is not None:
                a.flush()
        self.moments = self.labels = self.contexts = self.context_offsets = self.repa = None
        del arrays
        for ctx in self._stack:
            ctx.__exit__(*exc_info)
        self._stack = []

    def write(self, start, moments, labels=None, repa=None):
        """Store samples start..start+len(moments)-1 (shard-local positions); repa: their (b, N, E) encoder
        features when the shard stores them."""
        moments = np.asarray(moments)
        stop = start + len(moments)
        # The shapes are the extractor's own (its autoencoder's moments, its encoder's features): asserted. A NaN
        # comes from the data.
        assert moments.shape[1:] == self.moments_shape, (moments.shape, self.moments_shape)
        assert (labels is not None) == (self.labels is not None), "labels= exactly when the shard stores labels"
        repa = None if repa is None else np.asarray(repa)
        want = None if self.repa is None else (stop - start, *self.repa_shape)
        assert want == getattr(repa, "shape", None), f"this shard stores encoder features of shape {want}"
        nonfinite = [name for name, a in (("moments", moments), ("encoder features", repa))
                     if a is not None and not np.isfinite(a).all()]
        if nonfinite:
            raise InputError(f"{' and '.join(nonfinite)} of shard {self.index} positions {start}..{stop - 1} hold "
                             "NaN/inf; check the images and the autoencoder (and encoder) weights.")
        self.moments[start:stop] = moments
        if self.labels is not None:
            self.labels[start:stop] = np.asarray(labels, dtype=np.int64)
        if self.repa is not None:
            self.repa[start:stop] = repa
        self.filled[start:stop] = True

    def set_caption_counts(self, counts):
        """counts: number of captions of each of the shard's n samples (sums to the contexts' rows)."""
        offsets = np.zeros(self.n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)
        assert len(counts) == self.n and offsets[-1] == len(self.contexts), (len(counts), offsets[-1], self.n)
        self.context_offsets[:] = offsets
        return offsets

    def write_context_rows(self, row, contexts):
        """Store contexts (m, 77, D) as rows row..row+m-1 (captions of all samples, in sample order)."""
        contexts = np.asarray(contexts)
        if not np.isfinite(contexts).all():
            raise InputError(f"contexts of shard {self.index} rows {row}..{row + len(contexts) - 1} hold NaN/inf; "
                             "check the CLIP weights.")
        self.contexts[row:row + len(contexts)] = contexts

    def commit(self, record=None):
        """Rename the arrays into place, then write the shard record (the completion marker). record: JSON-able
        facts kept with the shard ('source_range' and 'settings', which pending_shards checks on resume)."""
        assert self.filled.all(), f"shard {self.index}: {int((~self.filled).sum())} samples were never written"
        self._close(None, None, None)
        record = dict(record or {})
        record.update(index=self.index, n=self.n, moments_shape=list(self.moments_shape), dtype=self.dtype)
        if self.repa_shape is not None:
            record.update(repa_shape=list(self.repa_shape))
        atomic_write_bytes(json.dumps(record, indent=1).encode(), os.path.join(self.folder, shard_name(self.index) + ".json"))


def _normalise(obj):
    return json.loads(json.dumps(obj))


def pending_shards(folder, plan, rank=0, world=1, settings=None):
    """This process's shards, plan[rank::world], that are not complete yet. Complete ones must come from the same
    source range and `settings` (JSON-able: resolution, autoencoder, dtype...), else ConfigError: the folder
    would mix two extractions."""
    settings = _normalise(settings or {})
    todo = []
    for k, start, stop in plan[rank::world]:
        if not shard_is_complete(folder, k):
            todo.append((k, start, stop))
            continue
        with open(os.path.join(folder, shard_name(k) + ".json")) as f:
            record = json.load(f)
        if record.get("source_range") != [start, stop] or record.get("settings", {}) != settings:
            raise ConfigError(f"'{folder}' already holds {shard_name(k)} from an extraction with other settings "
                             f"(range {record.get('source_range')} vs {[start, stop]}, settings "
                             f"{record.get('settings')} vs {settings}); use the same flags to resume, or a new "
                             "output folder.")
    return todo


def write_manifest(folder, num_shards, info=None):
    """Check that shards 0..num_shards-1 are complete and write manifest.json; returns the manifest. info: extra
    JSON-able facts recorded for provenance (resolution, autoencoder path, ...)."""
    missing = [k for k in range(num_shards) if not shard_is_complete(folder, k)]
    if missing:
        raise MissingFileError(f"{len(missing)} of {num_shards} shards in '{folder}' are not finished "
                               f"(e.g. {shard_name(missing[0])}); run the extraction again to complete them.")
    shards = []
    for k in range(num_shards):
        with open(os.path.join(folder, shard_name(k) + ".json")) as f:
            shards.append(json.load(f))
    first = shards[0]
    # pending_shards refused every finished shard of other settings (resolution, autoencoder, dtype) on resume
    assert all(s["moments_shape"] == first["moments_shape"] and s["dtype"] == first["dtype"] for s in shards)
    manifest = dict(format=FORMAT_NAME, version=FORMAT_VERSION, num_samples=sum(s["n"] for s in shards),
                    moments_shape=first["moments_shape"], dtype=first["dtype"],
                    has_labels=os.path.isfile(os.path.join(folder, shard_name(0) + ".labels.npy")),
                    has_contexts=os.path.isfile(os.path.join(folder, shard_name(0) + ".contexts.npy")),
                    repa_shape=first.get("repa_shape"),
                    shards=[{"name": shard_name(s["index"]), "n": s["n"]} for s in shards], info=info or {})
    atomic_write_bytes(json.dumps(manifest, indent=1).encode(), os.path.join(folder, MANIFEST))
    return manifest


# Readers. All return numpy arrays: moments (2*C_z, h, w) float32, labels int, contexts (77, D) float32.


class PackedFeatures:
    """Random access to a packed feature folder; memory maps opened lazily, once per process."""

    layout = "packed"

    def __init__(self, folder):
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the feature manifest '{path}': {e}. Run the extraction again "
                                  "(it resumes) to rewrite it.") from e
        if m.get("format") != FORMAT_NAME or m.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"'{path}' is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest. Run the extraction "
                                  "again (it resumes) to rewrite it.")
        self.folder = folder
        self.manifest = m
        self.moments_shape = tuple(m["moments_shape"])
        self.has_labels, self.has_contexts = bool(m["has_labels"]), bool(m["has_contexts"])
        self.repa_shape = tuple(m["repa_shape"]) if m.get("repa_shape") else None  # (N, E) or None
        self._names = [s["name"] for s in m["shards"]]
        self._starts = list(np.cumsum([0] + [s["n"] for s in m["shards"]]))
        self._pid, self._maps = None, {}

    def __len__(self):
        return int(self._starts[-1])

    def __getstate__(self):  # memory maps are re-opened in each worker, never pickled
        state = dict(self.__dict__)
        state["_pid"], state["_maps"] = None, {}
        return state

    def _map(self, shard, part):
        if self._pid != os.getpid():
            self._pid, self._maps = os.getpid(), {}
        key = (shard, part)
        if key not in self._maps:
            path = os.path.join(self.folder, f"{self._names[shard]}.{part}.npy")
            try:
                self._maps[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot open feature array '{path}' ({e}); the extraction is damaged, "
                                      f"delete {self._names[shard]}.json and run it again.") from e
        return self._maps[key]

    def _locate(self, i):
        assert 0 <= i < len(self), f"feature index {i} out of range [0, {len(self)})"  # the datasets' own indices
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - int(self._starts[k])

    def moments(self, i):
        k, j = self._locate(i)
        return np.array(self._map(k, "moments")[j], dtype=np.float32)

    def label(self, i):
        k, j = self._locate(i)
        return int(self._map(k, "labels")[j])

    def _gather(self, indices, part, dtype):
        """Rows `indices` of array `part` across shards, one fancy-indexing read per shard touched."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        assert not len(idx) or 0 <= idx.min() <= idx.max() < len(self), f"feature indices outside [0, {len(self)})"
        shard = np.searchsorted(np.asarray(self._starts[1:]), idx, side="right")
        first = self._map(int(shard[0]), part) if len(idx) else None
        out = np.empty((len(idx), *(first.shape[1:] if first is not None else ())), dtype=dtype)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._map(int(k), part)[idx[sel] - int(self._starts[k])]
        return out

    def moments_many(self, indices):
        """(b, 2*C_z, h, w) float32 moments of `indices` (faster than b calls of moments())."""
        return self._gather(indices, "moments", np.float32)

    def labels_many(self, indices):
        return self._gather(indices, "labels", np.int64)

    def repa_many(self, indices):
        """(b, N, E) float32 encoder features of `indices` (extracted with --repa_encoder)."""
        return self._gather(indices, "repa", np.float32)

    def labels(self):
        """(N,) int64 labels of all samples."""
        return np.concatenate([np.asarray(self._map(k, "labels")) for k in range(len(self._names))])

    def num_contexts(self, i):
        k, j = self._locate(i)
        off = self._map(k, "context_offsets")
        return int(off[j + 1] - off[j])

    def context(self, i, c):
        k, j = self._locate(i)
        off = self._map(k, "context_offsets")
        assert 0 <= c < off[j + 1] - off[j], f"sample {i} has {int(off[j + 1] - off[j])} captions, asked for {c}"
        return np.array(self._map(k, "contexts")[off[j] + c], dtype=np.float32)

    def caption(self, i, c):
        """The text of caption c of sample i (kept in the shard record by the extraction), or None when the
        shard records no captions; read once per shard and process."""
        k, j = self._locate(i)
        key = (k, "captions")
        if key not in self._maps:
            with open(os.path.join(self.folder, self._names[k] + ".json")) as f:
                self._maps[key] = json.load(f).get("captions")
        captions = self._maps[key]
        return None if captions is None else captions[j][c]


_SAMPLE_FILE = re.compile(r"^(\d+)\.npy$")
_CONTEXT_FILE = re.compile(r"^(\d+)_(\d+)\.npy$")


class PerFileFeatures:
    """The original layout: `{i}.npy` per sample (+ `{i}_{k}.npy` contexts for MS-COCO). ImageNet files hold a
    pickled (moments, label) pair (has_labels), MS-COCO files bare moments (has_contexts). Pickled files load with
    allow_pickle=True: only point this at extractions you trust."""

    layout = "per-file"
    repa_shape = None  # the original extraction stores no encoder features

    def __init__(self, folder):
        self.folder = folder
        count, captions = 0, {}
        with os.scandir(folder) as it:
            for entry in it:
                if _SAMPLE_FILE.match(entry.name):
                    count += 1
                else:
                    m = _CONTEXT_FILE.match(entry.name)
                    if m:
                        i = int(m.group(1))
                        captions[i] = captions.get(i, 0) + 1
        assert count > 0, folder  # open_features found its 0.npy
        self._n = count
        self.has_contexts = bool(captions)
        # Caption counts only for text sets: 2.5M ImageNet entries would carry a useless 20 MB array.
        self._captions = np.zeros(count if captions else 0, dtype=np.int64)
        for i, c in captions.items():
            if i < count:
                self._captions[i] = c
        first = self._load(0)
        self.has_labels = isinstance(first, tuple)
        self.moments_shape = tuple((first[0] if self.has_labels else first).shape)
        if self.has_contexts and (self._captions == 0).any():
            bad = int(np.flatnonzero(self._captions == 0)[0])
            raise MissingFileError(f"sample {bad} in '{folder}' has no caption context file ('{bad}_0.npy').")

    def __len__(self):
        return self._n

    def _load(self, i):
        path = os.path.join(self.folder, f"{i}.npy")
        try:
            obj = np.load(path, allow_pickle=True)
        except (OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"cannot read feature file '{path}' ({e}); extract it again.") from e
        if obj.dtype == object:  # (moments, label) pair of the original ImageNet extraction
            return np.asarray(obj[0], dtype=np.float32), int(obj[1])
        return obj

    def moments(self, i):
        assert 0 <= i < self._n, f"feature index {i} out of range [0, {self._n})"
        obj = self._load(i)
        return obj[0] if isinstance(obj, tuple) else np.asarray(obj, dtype=np.float32)

    def label(self, i):
        return self._load(i)[1]

    def moments_many(self, indices):
        return np.stack([self.moments(int(i)) for i in indices]).astype(np.float32, copy=False)

    def labels_many(self, indices):
        return np.array([self.label(int(i)) for i in indices], dtype=np.int64)

    def labels(self):
        return np.array([self.label(i) for i in range(self._n)], dtype=np.int64)

    def num_contexts(self, i):
        return int(self._captions[i])

    def context(self, i, c):
        return np.asarray(np.load(os.path.join(self.folder, f"{i}_{c}.npy")), dtype=np.float32)


def open_features(folder, how="run the feature extraction script first"):
    """The reader of `folder`: packed when it has manifest.json, else the original per-file layout."""
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return PackedFeatures(folder)
    if os.path.isfile(os.path.join(folder, "0.npy")):
        return PerFileFeatures(folder)
    if not os.path.isdir(folder):
        why = "does not exist"
    elif any(n.startswith("shard_") for n in os.listdir(folder)):
        why = f"holds shards but no {MANIFEST}: the extraction did not finish; finished shards are kept"
    else:
        why = f"holds no features ({MANIFEST} or 0.npy)"
    raise MissingFileError(f"feature folder '{folder}' {why}; {how}.")
