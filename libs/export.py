"""The exported-model folder: write it from a checkpoint, read it back, and load weights of any kind.

    <folder>/
        model.safetensors   # the network's state dict (EMA weights), float tensors, no pickle
        config.json         # the network's kwargs, diffusion kind, autoencoder scale, null class, step,
                            # the config's sampling settings and the whole resolved training config
        README.md           # a short model card

    export_model('workdir/cifar10_uvit_small/default/ckpts/500000.ckpt', 'exports/cifar10', config)
    state_dict, meta = load_weights(path)   # .pth, ckpts/<step>.ckpt or an exported folder
    nnet, meta = build_from_export(folder)  # config.json alone rebuilds the network

The weights are checked against `config.nnet` before anything is written, so an export always loads
into the network its config.json describes. `load_weights` is what every `--nnet_path` and
`--init_from` goes through. `check_objective` refuses, in one line, weights of one objective (config.objective)
handed to a script, sampler, export or --init_from whose config says another: an epsilon network sampled as a
velocity field gives noise, silently. `load_guide` builds the weaker network of autoguidance.
"""
import dataclasses
import json
import logging
import os
import pickle

import ml_collections
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from libs.checkpoint import read_state_file
from libs.errors import CheckpointError, ConfigError, MissingFileError, UViTError, require_path
from libs.io_utils import atomic_path, fsync_dir, sha256_of
from libs.nnet import build_nnet, load_nnet_state_dict
from sde import DIFFUSIONS, Objective

logger = logging.getLogger(__name__)

FORMAT = "uvit-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)
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
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        what = (f"is not a complete exported model: {' and '.join(missing)} missing; copy the whole folder, or"
                if os.path.isdir(folder) else "not found;")
        raise MissingFileError(f"exported model folder '{folder}' {what} {_AGAIN}")
    file = os.path.join(folder, CONFIG_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{file}' is not readable JSON ({e}); {_AGAIN}") from e
    # Each thing a reader needs, named at once when wrong: the format, its version, the network and the time kind.
    problems = []
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        problems.append(f"not the config of an exported U-ViT (no \"format\": \"{FORMAT}\")")
    else:
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            problems.append(f"format_version {version!r}: this code reads up to {FORMAT_VERSION} (update the code)")
        if not isinstance(meta.get("nnet"), dict) or "name" not in meta["nnet"]:
            problems.append("no \"nnet\" entry with the network's name and kwargs")
        if meta.get("diffusion") not in DIFFUSIONS:
            problems.append(f"\"diffusion\" is {meta.get('diffusion')!r}, not one of {DIFFUSIONS}")
    if problems:
        raise CheckpointError(f"'{file}': {'; '.join(problems)}; {_AGAIN}")
    return meta


def _load_export(folder):
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


def load_weights(path_or_dir, what="--nnet_path"):
    """(network state dict on the CPU, export meta or None) of what `--nnet_path` / `--init_from` names:
    a .pth state dict, a `ckpts/<step>.ckpt` directory (its nnet_ema.pth) or an exported folder. `what`: the
    flag or key the path came from, for the messages."""
    path = str(path_or_dir)
    if os.path.isdir(path) and is_export(path):
        return _load_export(path)
    file = os.path.join(path, "nnet_ema.pth") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise MissingFileError(
            f"{what} '{path}' {'is a directory without nnet_ema.pth' if os.path.isdir(path) else 'not found'}. "
            f"Give a .pth state dict (e.g. a released U-ViT checkpoint), "
            f"a training checkpoint directory workdir/<config>/<hparams>/ckpts/<step>.ckpt or an exported folder.")
    try:
        state = read_state_file(file)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and containers
        raise CheckpointError(f"'{file}' is not a plain state dict of tensors ({str(e).splitlines()[0]}); "
                              f"--nnet_path takes a network state dict such as nnet_ema.pth.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{file}' holds a {type(state).__name__}, not a network state dict (name -> tensor); "
                              f"--nnet_path takes nnet_ema.pth or a ckpts/<step>.ckpt directory.")
    return state, None


def build_from_export(folder, **overrides):
    """The network of an exported folder, built from its config.json alone, weights loaded strictly, eval mode.

    overrides: network kwargs to change that do not alter the weights (e.g. use_checkpoint=False).
    A config.json whose network does not fit model.safetensors is a one-line CheckpointError.
    """
    state_dict, meta = _load_export(folder)
    nnet = build_nnet({**meta["nnet"], **overrides})
    try:
        load_nnet_state_dict(nnet, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"exported folder '{folder}': {WEIGHTS_FILE} does not fit the network in "
                              f"{CONFIG_FILE} ({str(e).split('. Check that')[0]}); {_AGAIN}") from e
    return nnet.eval(), meta

SIDECAR_SUFFIX = ".config.json"  # beside a .pth the tools write: <stem>.config.json, export_meta's entries


def sidecar_path(pth):
    """Where the config of a .pth written by the tools lives: `x.pth` -> `x.config.json`."""
    return os.path.splitext(str(pth))[0] + SIDECAR_SUFFIX


def write_sidecar(pth, config, step=None, source=None):
    """Write the config a .pth was trained with beside it (export_meta's entries, whole config included),
    atomically; `saved_config` reads it back, so the .pth carries its objective and network."""
    meta = export_meta(config, step=step, source=source)
    with atomic_path(sidecar_path(pth)) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
    return sidecar_path(pth)


def _checkpoint_config(ckpt):
    """The config saved in a ckpts/<step>.ckpt's train_state.pth (what that step trained with), or None."""
    file = os.path.join(ckpt, "train_state.pth")
    if not os.path.isfile(file):
        return None
    try:
        state = read_state_file(file, weights_only=False)  # the run's own file: history and loader state
    except UViTError:
        return None  # a damaged one is reported when its weights are read
    return state.get("config") if isinstance(state, dict) else None


def saved_config(path):
    """The config (dict) saved with the weights at `path`, or None when nothing says (a bare .pth, e.g. a
    released checkpoint): an exported folder's config.json; a ckpts/<step>.ckpt directory's own train_state.pth
    config (emergency checkpoints included), else its run's config.json two levels up; a .pth's
    <stem>.config.json (tools/posthoc_ema.py writes one)."""
    path = os.path.normpath(str(path))
    if os.path.isdir(path) and is_export(path):
        return read_export_meta(path)
    if os.path.isdir(path):
        own = _checkpoint_config(path)
        if own is not None:
            return own
        run_config = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
        if os.path.basename(os.path.dirname(path)) == "ckpts" and os.path.isfile(run_config):
            with open(run_config) as f:
                return json.load(f)
        return None
    if os.path.isfile(sidecar_path(path)):
        try:
            with open(sidecar_path(path)) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"'{sidecar_path(path)}' (the config of '{path}') is not readable JSON ({e}); "
                                  f"delete it to use the weights with a --config of your own") from e
    return None


def config_of_weights(path, what="--nnet_path"):
    """The whole training config (ConfigDict) the weights at `path` carry, for scripts given no --config;
    ConfigError in one line when they carry none."""
    require_path(str(path), what, "Give a ckpts/<step>.ckpt directory, an exported folder or a .pth state dict.")
    saved = saved_config(path)
    # An export's config.json and a sidecar hold the whole config under "config"; a checkpoint's is the config.
    whole = saved["config"] if isinstance(saved, dict) and isinstance(saved.get("config"), dict) else saved
    if not whole or "nnet" not in whole:
        raise ConfigError(f"no --config given and {what} '{path}' carries no training config (a bare .pth): pass "
                          f"the config it was trained with, --config=configs/<name>.py")
    logger.info("config: the one saved with %s '%s'", what, path)
    return ml_collections.ConfigDict(whole)


# Network entries that change the weights' shapes: a --config disagreeing with the weights' own is refused.
_SHAPE_KEYS = ("name", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_classes", "clip_dim",
               "num_clip_token")


def check_objective(config, path, what="--nnet_path", network=False):
    """ConfigError (one line) when the weights at `path` were trained with another objective than `config`'s
    (config.objective, or config.diffusion's time kind), or, with `network`, another network shape (config.nnet;
    not for an autoguidance network or --init_from, which differ by design); a bare .pth passes."""
    saved = saved_config(path)
    if saved is None:
        return
    mine, theirs = Objective.of(config), Objective.of(saved)
    diffusion = saved.get("diffusion", "continuous")
    if mine != theirs or (theirs.path != "vp" and diffusion != config.get("diffusion", "continuous")):
        raise ConfigError(f"{what} '{path}' was trained with objective {theirs.describe()} (config.diffusion="
                          f"{diffusion!r}) but this config says {mine.describe()} (config.diffusion="
                          f"{config.get('diffusion', 'continuous')!r}): use the config it was trained with")
    nnet, theirs_nnet = dict(config.get("nnet", {})), dict(saved.get("nnet", {}))
    differ = [k for k in _SHAPE_KEYS if network and k in nnet and k in theirs_nnet and nnet[k] != theirs_nnet[k]]
    if differ:
        raise ConfigError(f"{what} '{path}' was trained with network " + ", ".join(
            f"nnet.{k}={theirs_nnet[k]!r}" for k in differ) + " but this config says " + ", ".join(
            f"nnet.{k}={nnet[k]!r}" for k in differ) + ": use the config it was trained with (or leave --config out "
            "to use the one saved with it)")


def weights_problems(config):
    """(key, message) of each weights path of `config` (config.init.path of --init_from, config.sample.guide_path)
    that is not there or whose model was trained with another objective: what
    libs.config_utils.parse_and_validate reports before any work."""
    out = []
    for section, key, what in (("init", "path", "--init_from"), ("sample", "guide_path", "config.sample.guide_path")):
        path = (config.get(section) or {}).get(key)
        if not (isinstance(path, str) and path):
            continue
        if not os.path.exists(path):
            out.append((f"{section}.{key}", f"does not exist: {what} takes a ckpts/<step>.ckpt directory, a .pth state "
                                            "dict or an exported folder (tools/export.py)"))
            continue
        try:
            check_objective(config, path, what)
        except ConfigError as e:
            out.append((f"{section}.{key}", str(e)))
    return out


def load_guide(config, device):
    """The autoguidance network of config.sample.guide_path in eval mode on `device`, or None when unset.

    Its architecture is its own saved config's (an exported folder or a ckpts/<step>.ckpt of a run), else
    config.nnet (a bare .pth); its objective must be `config`'s.
    """
    path = config.sample.get("guide_path", "")
    if not path:
        return None
    check_objective(config, path, "config.sample.guide_path")
    state = load_weights(path, "config.sample.guide_path")[0]  # a missing file: said before building anything
    saved = saved_config(path)
    nnet = build_nnet(saved["nnet"] if saved is not None else config.nnet)
    load_nnet_state_dict(nnet, state)
    logger.info("autoguidance: guide network from config.sample.guide_path '%s' (%.2fM parameters)", path,
                sum(p.numel() for p in nnet.parameters()) / 1e6)
    return nnet.to(device).eval().requires_grad_(False)


PAPER = "Bao et al., All are Worth Words: A ViT Backbone for Diffusion Models, CVPR 2023 (arXiv 2209.12152)"


class PushError(UViTError, OSError):
    """Uploading an export to the Hugging Face Hub failed (no network, no token, no permission)."""


def _as_config(config):
    """A ConfigDict of the training config (a ConfigDict or dict)."""
    return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(config)


def _jsonable(value):
    """Config values as JSON keeps them (tuples become lists)."""
    return json.loads(json.dumps(value))


def export_meta(config, step=None, source=None):
    """The config.json entries of an export of a network trained with `config` (a ConfigDict or dict).

    null_class: the label guidance substitutes (num_classes - 1) for class-conditional networks
    trained with guidance dropout (config.dataset.cfg), else None. autoencoder_scale_factor: the
    latent scale (latent configs, config.z_shape set, with the fixed scaling of SD), else None; autoencoder_scaling:
    config.autoencoder.latent_scaling of latent configs ('fixed', 'model', 'data'), else None.
    """
    config = _as_config(config)
    nnet = config.nnet.to_dict()
    diffusion = config.get("diffusion", "continuous")
    assert diffusion in DIFFUSIONS, diffusion  # checked where the config entered (parse_and_validate)
    num_classes = int(nnet.get("num_classes", -1) or -1) if nnet.get("name") == "uvit" else -1
    cfg = bool(config.get("dataset", {}).get("cfg", False))
    latents = config.get("z_shape") is not None
    scaling = config.get("autoencoder", {}).get("latent_scaling", "fixed")
    sample = config.get("sample", ml_collections.ConfigDict())
    return _jsonable({
        "nnet": nnet,
        "diffusion": diffusion,
        "objective": dataclasses.asdict(Objective.of(config)),
        "z_shape": list(config.z_shape) if latents else None,
        "autoencoder_scale_factor": float(config.autoencoder.scale_factor) if latents and scaling == "fixed" else None,
        "autoencoder_scaling": scaling if latents else None,
        "null_class": num_classes - 1 if (cfg and num_classes > 0) else None,
        "step": None if step is None else int(step),
        "dataset": config.get("dataset", {}).get("name", ""),
        "sample": {k: sample[k] for k in ("algorithm", "sample_steps", "cfg", "scale") if k in sample},
        "source": os.path.basename(os.path.normpath(str(source))) if source else None,
        "config": config.to_dict(),  # the whole resolved training config, for whatever a reader needs later
    })


def _step_of(path):
    """The training step of a checkpoint directory (its step.pth), or None for a bare .pth."""
    file = os.path.join(path, "step.pth")
    return int(torch.load(file, map_location="cpu", weights_only=True)) if os.path.isfile(file) else None


def model_card(meta, n_params):
    """README.md of an export: what the network is, how it was trained, how to use it."""
    nnet = meta["nnet"]
    kind = ("text-to-image" if nnet["name"] == "uvit_t2i" else
            "class-conditional" if int(nnet.get("num_classes", -1) or -1) > 0 else "unconditional")
    scaling = (f"scale factor {meta['autoencoder_scale_factor']}" if meta.get("autoencoder_scale_factor") is not None
               else f"latent scaling '{meta.get('autoencoder_scaling')}'")
    space = (f"autoencoder latents {tuple(meta['z_shape'])} ({scaling})"
             if meta["z_shape"] else f"pixels ({nnet.get('in_chans', 3)} x {nnet['img_size']} x {nnet['img_size']})")
    guidance = (f"- Classifier-free guidance: null class {meta['null_class']}; eps = eps_c + s (eps_c - eps_u).\n"
                if meta["null_class"] is not None else "")
    steps = meta['step'] if meta['step'] is not None else 'an unknown number of'
    return f"""---
tags: [diffusion, u-vit, image-generation]
---
# U-ViT ({kind}, {meta['dataset'] or 'custom data'})

A U-ViT network ({PAPER}), exported with EMA weights.

- network: `{nnet['name']}`, img_size {nnet['img_size']}, patch_size {nnet.get('patch_size')}, \
embed_dim {nnet.get('embed_dim')}, depth {nnet.get('depth')}, {n_params / 1e6:.1f}M parameters
- data: {space}
- objective: {Objective.of(meta).describe()} (path/prediction; see config.json "objective")
- diffusion: {meta['diffusion']} time; trained {steps} steps
- sampling settings of its config: {meta['sample']}
{guidance}
## Files

`model.safetensors` (the weights), `config.json` (everything needed to rebuild the network).

## Use

```python
from libs.export import build_from_export
nnet, meta = build_from_export('<this folder>')
```

The sampling and evaluation scripts take this folder as `--nnet_path`, and training takes it as \
`--init_from` to fine-tune.
"""


def export_model(checkpoint_or_pth, out_dir, config, step=None, overwrite=False):
    """Export the EMA network of a checkpoint as a folder; returns the folder's absolute path.

    checkpoint_or_pth: a `ckpts/<step>.ckpt` directory (its nnet_ema.pth) or a `.pth` state dict.
    config: the training config (ConfigDict or dict); its `nnet` must fit the weights.
    step: the training step; default: from the checkpoint directory, None for a bare .pth.
    """
    config = _as_config(config)
    check_objective(config, checkpoint_or_pth, "checkpoint", network=True)  # what the weights say they are
    state_dict = load_weights(checkpoint_or_pth)[0]
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, state_dict)  # a weights / config mismatch fails here, before anything is written
    if step is None:
        step = _step_of(str(checkpoint_or_pth))
    meta = export_meta(config, step=step, source=checkpoint_or_pth)
    weights = nnet.state_dict()
    n_params = sum(v.numel() for v in weights.values())
    folder = write_export(out_dir, weights, meta, model_card(meta, n_params), overwrite=overwrite)
    logger.info("exported '%s' (step %s, %.1fM parameters) to '%s'", checkpoint_or_pth, step, n_params / 1e6, folder)
    return folder


def push_to_hub(folder, repo_id, private=False, token=None):
    """Upload an exported folder to the Hugging Face Hub repository `repo_id` (created if needed).

    Only when the user asks: nothing else in the project touches the network. The token comes from
    `token`, HF_TOKEN or `huggingface-cli login`. Returns the repository URL.
    """
    import huggingface_hub  # optional
    from huggingface_hub.errors import HfHubHTTPError  # optional

    read_export_meta(folder)  # upload only complete exports
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload U-ViT export")
    except (HfHubHTTPError, OSError) as e:
        raise PushError(f"could not push '{folder}' to the Hub repository '{repo_id}' "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); check the network, "
                        f"log in with `huggingface-cli login` or set HF_TOKEN, and check the repository name") from e
    logger.info("pushed '%s' to %s", folder, url)
    return str(url)
