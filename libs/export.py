"""Export a trained network as a self-describing folder (libs/export_format.py), and push it to the Hub.

    export_model('workdir/cifar10_uvit_small/default/ckpts/500000.ckpt', 'exports/cifar10', config)

writes the EMA weights as model.safetensors, config.json (the network's kwargs, the diffusion kind, the
training objective (config.objective: the sampler reads it from here), the autoencoder scale factor, the null class, the training step, the sampling settings of the config)
and README.md, a short model card. The weights are checked against `config.nnet` before anything is
written, so an export always loads into the network its config.json describes.
"""
import dataclasses
import json
import logging
import os

import ml_collections
import torch

from libs import export_format
from libs.checkpoint import load_nnet_weights
from libs.errors import ConfigError, UViTError
from libs.nnet import build_nnet, load_nnet_state_dict
from libs.saved_config import check_objective
from sde import Objective

logger = logging.getLogger(__name__)

PAPER = "Bao et al., All are Worth Words: A ViT Backbone for Diffusion Models, CVPR 2023 (arXiv 2209.12152)"


class PushError(UViTError, OSError):
    """Uploading an export to the Hugging Face Hub failed (no network, no token, no permission)."""


def _as_config(config):
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if isinstance(config, dict):
        return ml_collections.ConfigDict(config)
    raise ConfigError(f"export needs the training config (a ConfigDict or dict), got {type(config).__name__}")


def _jsonable(value):
    """Config values as JSON keeps them (tuples become lists)."""
    return json.loads(json.dumps(value))


def export_meta(config, step=None, source=None):
    """The config.json entries of an export of a network trained with `config` (a ConfigDict or dict).

    null_class: the label guidance substitutes (num_classes - 1) for class-conditional networks
    trained with guidance dropout (config.dataset.cfg), else None. autoencoder_scale_factor: the
    latent scale (latent configs, config.z_shape set), else None.
    """
    config = _as_config(config)
    nnet = config.nnet.to_dict()
    diffusion = config.get("diffusion", "continuous")
    if diffusion not in export_format.DIFFUSION_KINDS:
        raise ConfigError(f"config.diffusion is {diffusion!r}; it must be one of {export_format.DIFFUSION_KINDS}")
    num_classes = int(nnet.get("num_classes", -1) or -1) if nnet.get("name") == "uvit" else -1
    cfg = bool(config.get("dataset", {}).get("cfg", False))
    latents = config.get("z_shape") is not None
    sample = config.get("sample", ml_collections.ConfigDict())
    return _jsonable({
        "nnet": nnet,
        "diffusion": diffusion,
        "objective": dataclasses.asdict(Objective.of(config)),
        "z_shape": list(config.z_shape) if latents else None,
        "autoencoder_scale_factor": float(config.autoencoder.scale_factor) if latents else None,
        "null_class": num_classes - 1 if (cfg and num_classes > 0) else None,
        "step": None if step is None else int(step),
        "dataset": config.get("dataset", {}).get("name", ""),
        "sample": {k: sample[k] for k in ("algorithm", "sample_steps", "cfg", "scale") if k in sample},
        "source": os.path.basename(os.path.normpath(str(source))) if source else None,
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
    space = (f"autoencoder latents {tuple(meta['z_shape'])} (scale factor {meta['autoencoder_scale_factor']})"
             if meta["z_shape"] else f"pixels ({nnet.get('in_chans', 3)} x {nnet['img_size']} x {nnet['img_size']})")
    guidance = (f"Classifier-free guidance: null class {meta['null_class']}; eps = eps_c + s (eps_c - eps_u)."
                if meta["null_class"] is not None else "")
    lines = [
        "---",
        "tags: [diffusion, u-vit, image-generation]",
        "---",
        f"# U-ViT ({kind}, {meta['dataset'] or 'custom data'})",
        "",
        f"A U-ViT network ({PAPER}), exported with EMA weights.",
        "",
        f"- network: `{nnet['name']}`, img_size {nnet['img_size']}, patch_size {nnet.get('patch_size')}, "
        f"embed_dim {nnet.get('embed_dim')}, depth {nnet.get('depth')}, {n_params / 1e6:.1f}M parameters",
        f"- data: {space}",
        f"- objective: {Objective.of(meta).describe()} (path/prediction; see config.json \"objective\")",
        f"- diffusion: {meta['diffusion']} time; trained {meta['step'] if meta['step'] is not None else 'an unknown number of'} steps",
        f"- sampling settings of its config: {meta['sample']}",
    ]
    if guidance:
        lines.append(f"- {guidance}")
    lines += [
        "",
        "## Files",
        "",
        "`model.safetensors` (the weights), `config.json` (everything needed to rebuild the network).",
        "",
        "## Use",
        "",
        "```python",
        "from libs.export_format import build_from_export",
        "nnet, meta = build_from_export('<this folder>')",
        "```",
        "",
        "The sampling and evaluation scripts take this folder as `--nnet_path`, and training takes it as "
        "`--init_from` to fine-tune.",
        "",
    ]
    return "\n".join(lines)


def export_model(checkpoint_or_pth, out_dir, config, step=None, overwrite=False):
    """Export the EMA network of a checkpoint as a folder; returns the folder's absolute path.

    checkpoint_or_pth: a `ckpts/<step>.ckpt` directory (its nnet_ema.pth) or a `.pth` state dict.
    config: the training config (ConfigDict or dict); its `nnet` must fit the weights.
    step: the training step; default: from the checkpoint directory, None for a bare .pth.
    """
    config = _as_config(config)
    check_objective(config, checkpoint_or_pth, "checkpoint")  # the run's own config says what it trained
    state_dict = load_nnet_weights(checkpoint_or_pth)
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, state_dict)  # a weights / config mismatch fails here, before anything is written
    if step is None:
        step = _step_of(str(checkpoint_or_pth))
    meta = export_meta(config, step=step, source=checkpoint_or_pth)
    weights = nnet.state_dict()
    n_params = sum(v.numel() for v in weights.values())
    folder = export_format.write_export(out_dir, weights, meta, model_card(meta, n_params), overwrite=overwrite)
    logger.info("exported '%s' (step %s, %.1fM parameters) to '%s'", checkpoint_or_pth, step, n_params / 1e6, folder)
    return folder


def push_to_hub(folder, repo_id, private=False, token=None):
    """Upload an exported folder to the Hugging Face Hub repository `repo_id` (created if needed).

    Only when the user asks: nothing else in the project touches the network. The token comes from
    `token`, HF_TOKEN or `huggingface-cli login`. Returns the repository URL.
    """
    import huggingface_hub  # optional
    from huggingface_hub.errors import HfHubHTTPError  # optional

    export_format.read_export_meta(folder)  # upload only complete exports
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
