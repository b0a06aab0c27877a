"""The exported-model folder: EMA weights as safetensors plus the JSON that says which network they are.

    <folder>/
        model.safetensors   # the network's state dict (EMA weights), float tensors, no pickle
        config.json         # FORMAT below: network kwargs, diffusion kind, autoencoder scale, null class, step
        README.md           # a short model card (written by libs/export.py)

`config.json` alone rebuilds the network (`build_from_export`), so a folder can be sampled from,
evaluated or fine-tuned without the training config. This module reads and writes the folder and
depends on nothing that reads training checkpoints, so `libs.checkpoint` may use it.
"""
import hashlib
import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from libs.errors import CheckpointError, MissingFileError
from libs.io_utils import atomic_path, fsync_dir
from libs.nnet import build_nnet, load_nnet_state_dict

FORMAT = "uvit-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)
DIFFUSION_KINDS = ("continuous", "discrete")
_HASH_CHUNK = 1 << 22
_AGAIN = "export it again with `python tools/export.py <checkpoint> <out_dir>`"


def is_export(path):
    """True when `path` is a folder whose config.json is an exported model's (its weights may be missing)."""
    file = os.path.join(str(path), CONFIG_FILE)
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_export(out_dir, state_dict, meta, card, overwrite=False):
    """Write the folder atomically: it either appears whole or not at all (an old one stays intact).

    state_dict: name -> tensor (made contiguous, moved to the CPU); meta: the config.json entries
    (`format`, `format_version` and `weights_sha256` are added here); card: README.md text.
    An existing non-empty `out_dir` is replaced only with `overwrite`, and only when it is an export.
    """
    out_dir = os.path.abspath(str(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not overwrite:
            raise CheckpointError(f"'{out_dir}' already exists and is not empty; choose a new folder, or pass "
                                  f"--overwrite to replace an earlier export there")
        if not is_export(out_dir):
            raise CheckpointError(f"'{out_dir}' exists and is not an exported model; refusing to replace it: "
                                  f"choose a new folder")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        weights = os.path.join(tmp, WEIGHTS_FILE)
        save_file(tensors, weights, metadata={"format": "pt"})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights_sha256": sha256_of(weights)}
        for name, text in ((CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n"), (CARD_FILE, card)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
    return out_dir


def read_export_meta(folder):
    """config.json of an exported folder, checked for the format; MissingFileError / CheckpointError otherwise."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise MissingFileError(f"exported model folder '{folder}' not found; {_AGAIN}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise MissingFileError(f"'{folder}' is not a complete exported model: {' and '.join(missing)} missing; "
                               f"copy the whole folder, or {_AGAIN}")
    file = os.path.join(folder, CONFIG_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{file}' is not readable JSON ({e}); {_AGAIN}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{file}' is not the config of an exported U-ViT (no \"format\": \"{FORMAT}\"); "
                              f"{_AGAIN}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"'{file}' has format_version {version!r}; this code reads up to {FORMAT_VERSION}: "
                              f"update the code or {_AGAIN}")
    problems = []
    if not isinstance(meta.get("nnet"), dict) or "name" not in meta["nnet"]:
        problems.append("no \"nnet\" entry with the network's name and kwargs")
    if meta.get("diffusion") not in DIFFUSION_KINDS:
        problems.append(f"\"diffusion\" is {meta.get('diffusion')!r}, not one of {DIFFUSION_KINDS}")
    if problems:
        raise CheckpointError(f"'{file}' is incomplete: {'; '.join(problems)}; {_AGAIN}")
    return meta


def load_export(folder):
    """(state_dict on the CPU, meta) of an exported folder.

    The weights must be the file the export wrote (sha256 recorded in config.json): a truncated,
    corrupt or swapped model.safetensors is a CheckpointError naming it.
    """
    meta = read_export_meta(folder)
    weights = os.path.join(str(folder), WEIGHTS_FILE)
    recorded = meta.get("weights_sha256")
    if recorded is not None and sha256_of(weights) != recorded:
        raise CheckpointError(f"'{weights}' is not the file this export wrote (its sha256 differs from the one in "
                              f"{CONFIG_FILE}): it is truncated, corrupt or was replaced; copy the folder again or "
                              f"{_AGAIN}")
    try:
        state_dict = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{weights}' cannot be read as safetensors ({str(e).splitlines()[0]}); "
                              f"copy the folder again or {_AGAIN}") from e
    return state_dict, meta


def build_from_export(folder, **overrides):
    """The network of an exported folder, built from its config.json alone, weights loaded strictly, eval mode.

    overrides: network kwargs to change that do not alter the weights (e.g. use_checkpoint=False).
    A config.json whose network does not fit model.safetensors is a one-line CheckpointError.
    """
    state_dict, meta = load_export(folder)
    nnet = build_nnet({**meta["nnet"], **overrides})
    try:
        load_nnet_state_dict(nnet, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"exported folder '{folder}': {WEIGHTS_FILE} does not fit the network in "
                              f"{CONFIG_FILE} ({str(e).split('. Check that')[0]}); {_AGAIN}") from e
    return nnet.eval(), meta
