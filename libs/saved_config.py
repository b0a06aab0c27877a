"""The config saved with a model's weights, read back so that the objective travels with the weights.

A training run writes its whole config to <workdir>/config.json (beside ckpts/<step>.ckpt) and an export
writes the objective into its config.json (libs/export.py). `check_objective` refuses, in one line, weights
of one objective handed to a script, sampler, export or --init_from whose config says another: an epsilon
network sampled as a velocity field gives noise, silently. `load_guide` builds the weaker network of
autoguidance (config.sample.guide_path) from its own saved config.
"""
import json
import os

from libs import export_format
from libs.checkpoint import load_nnet_weights
from libs.errors import ConfigError
from libs.nnet import build_nnet, load_nnet_state_dict
from sde import Objective


def saved_config(path):
    """The config (dict) saved with the weights at `path`: an exported folder's config.json, or the run's
    config.json two levels above a ckpts/<step>.ckpt directory; None for a bare .pth (or a run without one)."""
    path = os.path.normpath(str(path))
    if os.path.isdir(path) and export_format.is_export(path):
        return export_format.read_export_meta(path)
    run_config = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    if os.path.isdir(path) and os.path.basename(os.path.dirname(path)) == "ckpts" and os.path.isfile(run_config):
        with open(run_config) as f:
            return json.load(f)
    return None


def check_objective(config, path, what="--nnet_path"):
    """ConfigError (one line) when the weights at `path` were trained with another objective than `config`'s
    (config.objective, or config.diffusion's time kind); nothing is known of a bare .pth: it passes."""
    saved = saved_config(path)
    if saved is None:
        return
    mine, theirs = Objective.of(config), Objective.of(saved)
    diffusion = saved.get("diffusion", "continuous")
    if mine != theirs or (theirs.path == "linear" and diffusion != config.get("diffusion", "continuous")):
        raise ConfigError(f"{what} '{path}' was trained with objective {theirs.describe()} (config.diffusion="
                          f"{diffusion!r}) but this config says {mine.describe()} (config.diffusion="
                          f"{config.get('diffusion', 'continuous')!r}): use the config it was trained with")


def load_guide(config, device):
    """The autoguidance network of config.sample.guide_path in eval mode on `device`, or None when unset.

    Its architecture is its own saved config's (an exported folder or a ckpts/<step>.ckpt of a run), else
    config.nnet (a bare .pth); its objective must be `config`'s.
    """
    path = config.sample.get("guide_path", "")
    if not path:
        return None
    check_objective(config, path, "config.sample.guide_path")
    saved = saved_config(path)
    nnet = build_nnet(saved["nnet"] if saved is not None else config.nnet)
    load_nnet_state_dict(nnet, load_nnet_weights(path))
    return nnet.to(device).eval().requires_grad_(False)
