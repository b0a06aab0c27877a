"""Experiment trackers through accelerate: `config.log_with` picks TensorBoard, wandb, both or none.

    accelerator = Accelerator(..., **accelerator_kwargs(config, workdir))
    start_trackers(accelerator, config, workdir)            # main process only (accelerate's rule)
    accelerator.log({'train/loss': 0.1}, step=step)        # scalars: accelerate's own call
    log_image(accelerator.trackers, 'samples', grid, step)  # a sample grid, to every active tracker
    accelerator.end_training()

Offline-safe: TensorBoard writes event files under <workdir>/tensorboard/<project>/; wandb runs in
`config.wandb.mode` ('offline' by default: files under <workdir>/wandb, `wandb sync` later) and
continues the same run when training resumes in the same workdir. Nothing needs an account or the
network unless the user sets the wandb mode to 'online'.
"""
import importlib.util
import logging
import os
import re

import numpy as np
import torch
from accelerate.utils import ProjectConfiguration

from libs.errors import ConfigError
from libs.logging_utils import log_once

logger = logging.getLogger(__name__)

# config.log_with -> the accelerate trackers it starts. 'all' means every tracker this project
# configures (accelerate's own 'all' would also start MLflow, Comet, ... if installed, some online).
TRACKERS = {"": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
LOG_WITH = tuple(TRACKERS)
TENSORBOARD_DIR = "tensorboard"


def trackers_for(log_with):
    """The tracker names of a `config.log_with` value (one of LOG_WITH); ConfigError for a missing package.

    'all' starts the installed ones among TensorBoard and wandb (a warning names a missing one).
    """
    log_with = "" if log_with is None else log_with
    assert log_with in TRACKERS, f"config.log_with is {log_with!r}: parse_and_validate checks it is one of {LOG_WITH}"
    names = []
    for name in TRACKERS[log_with]:
        if importlib.util.find_spec(name) is not None:  # the tracker's package has its name
            names.append(name)
        elif log_with == "all":
            logger.warning("config.log_with='all': %s is not installed, so it is skipped (pip install %s)", name, name)
        else:
            raise ConfigError(f"config.log_with={log_with!r} needs the {name} package: pip install {name}, or set "
                              f"--config.log_with=''")
    return names


def problems(log_with):
    """[('log_with', message)] when the tracker package config.log_with needs is not installed: what
    libs.config_utils.parse_and_validate reports with the config's other mistakes (a value not in LOG_WITH is its
    choice check's)."""
    if not (log_with is None or isinstance(log_with, str) and log_with in TRACKERS):
        return []
    try:
        trackers_for(log_with)
    except ConfigError as e:
        return [("log_with", str(e))]
    return []


def accelerator_kwargs(config, workdir):
    """Keyword arguments for `Accelerator(...)`: the trackers and where they write."""
    names = trackers_for(config.get("log_with", ""))
    return {"log_with": names or None,
            "project_config": ProjectConfiguration(project_dir=os.path.abspath(workdir),
                                                   logging_dir=os.path.join(os.path.abspath(workdir), TENSORBOARD_DIR))}


def flat_hparams(config, prefix=""):
    """A nested config as {'train.batch_size': 128, 'optimizer.betas': '(0.99, 0.99)', ...}.

    Numbers, strings and booleans are kept; sequences and other values become their repr; None is
    dropped (TensorBoard's hyperparameter table takes only scalars and strings).
    """
    items = config.items() if hasattr(config, "items") else []
    out = {}
    for key, value in items:
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flat_hparams(value, path + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[path] = value
        elif value is not None:
            out[path] = repr(tuple(value)) if isinstance(value, list) else repr(value)
    return out


def tracker_init_kwargs(config, workdir):
    """Per-tracker keyword arguments for `accelerator.init_trackers`; one wandb run per workdir, continued on resume."""
    wandb = config.get("wandb", {})
    return {"wandb": {"mode": wandb.get("mode", "offline"), "dir": os.path.abspath(workdir), "resume": "allow",
                      "id": re.sub(r"[^\w.-]", "_", os.path.abspath(workdir))[-64:]}}


def start_trackers(accelerator, config, workdir):
    """Start the accelerator's trackers with the run's config as hyperparameters (a no-op without trackers)."""
    if not accelerator.log_with:
        return
    try:
        accelerator.init_trackers(config.get("wandb", {}).get("project", "uvit"), config=flat_hparams(config),
                                  init_kwargs=tracker_init_kwargs(config, workdir))
    except OSError as e:  # the tracker's folder cannot be created or written
        folder = e.filename or os.path.join(os.path.abspath(workdir), TENSORBOARD_DIR)
        raise ConfigError(f"config.log_with={config.get('log_with', '')!r}: cannot write the tracker's folder "
                          f"'{folder}' ({e.strerror or e}); make it writable or remove what is in the way, or "
                          f"set --config.log_with=''") from e
    if accelerator.is_main_process:
        logger.info("logging to %s", ", ".join(t.name for t in accelerator.trackers))


def log_image(trackers, name, image, step):
    """Log one image (e.g. a sample grid) to every tracker that takes images.

    image: (3, H, W) float in [0, 1] (clamped), quantised like a PNG: round(255 x).
    trackers: `accelerator.trackers` (empty on processes other than the main one).
    """
    hwc = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, hwc, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({name: [np.ascontiguousarray(hwc)]}, step=step)  # wandb.Image takes (H, W, 3) uint8
        else:
            log_once(logger, f"tracker {tracker.name} gets no images", logging.WARNING)
