"""The trainer's one seam for training aids: what trains beside the diffusion loss without being an objective.

A training aid is a class with a config section of its own: the built-in ones in `AIDS` (by that section),
any other named in `config.training_aids` as 'package.module:ClassName' (imported when the config is checked).
The trainer (libs/trainer.py) knows aids only through this interface:

- `section` (class attribute): its config section, `state_key`: its key in the checkpoint's train_state.pth,
  `fresh`: what happens when a checkpoint lacks that key (logged as a warning).
- `problems(section) -> [(key in the section, message)]` (static): its own checks of its section, called by
  libs.config_utils.parse_and_validate before any work (types and ranges of base keys are checked there).
- `enabled(section) -> bool` (static): whether the section switches the aid on.
- `__init__(section, nnet, data, device)`: built once the network and the dataset exist.
- `wrap(module) -> module`: what the trainer trains in place of `module`; forward must be module's. Extra
  trainable parameters live in the returned module (clipped and stepped with the network); a forward hook
  here lets `losses` see the forward's tensors.
- `losses(batch) -> {metric name: (weight, 0-dim loss)}`: terms of the same forward, added as weight * loss to
  the diffusion loss; each is averaged over the applied steps into the log line and the trackers.
- `after_step(run, step, applied)`: after optimizer step number `step` (1-based); `applied` is the 0-dim bool
  device tensor, False for a skipped (non-finite) step. No host sync here: the hot loop has none.
- `state_dict()` / `load_state_dict(state)`: its part of train_state.pth, for exact resume.

Its public attributes are reachable on the trainer's Run (e.g. `run.aligner` of REPA), for notebooks and tests.
"""
import functools
import importlib
import logging

import ml_collections

from libs.posthoc_ema import PostHocEMA
from libs.repa import Alignment

logger = logging.getLogger(__name__)

AIDS = {aid.section: aid for aid in (PostHocEMA, Alignment)}  # section -> class; the order they are built in
INTERFACE = ('section', 'state_key', 'fresh', 'problems', 'enabled', 'wrap', 'losses', 'after_step', 'state_dict',
             'load_state_dict')
_NAME = "name each aid as 'package.module:ClassName', importable from where the run starts (docs/DESIGN.md)"


def _load(name):
    module, _, cls = name.partition(':')
    return getattr(importlib.import_module(module), cls)


def _name_problem(name):
    """Why config.training_aids cannot hold `name`, or None."""
    if not (isinstance(name, str) and name.count(':') == 1):
        return f"{name!r} is not a class name: {_NAME}"
    try:
        cls = _load(name)
    except (ImportError, AttributeError) as e:
        return f"cannot import {name!r} ({e}): {_NAME}"
    missing = [a for a in INTERFACE if not hasattr(cls, a)]
    return f"{name!r} lacks {', '.join(missing)} of the training-aid interface (docs/DESIGN.md)" if missing else None


def classes(config) -> dict:
    """section -> class of every aid: the built-in `AIDS`, then those config.training_aids names (checked by
    `problems`), in the order they are built in."""
    return {**AIDS, **{aid.section: aid for aid in map(_load, config.get('training_aids', ()))}}


def problems(config):
    """(dotted key, message) of what the aids refuse: a name in config.training_aids that is not an importable
    aid, then each aid's own checks of its section."""
    names = config.get('training_aids', ())
    if not isinstance(names, (tuple, list)):
        return [('training_aids', f"must be a tuple of class names: {_NAME}")]
    bad = [('training_aids', msg) for msg in map(_name_problem, names) if msg]
    return bad or [(f"{name}.{key}", msg) for name, aid in classes(config).items()
                   if isinstance(config.get(name), (ml_collections.ConfigDict, dict))
                   for key, msg in aid.problems(config[name])]


def build(config, nnet, data, device) -> list:
    """The aids `config` switches on (configs without a section leave its aid off)."""
    return [aid(config[name], nnet, data, device) for name, aid in classes(config).items()
            if config.get(name) and aid.enabled(config[name])]


def wrap(aids, nnet):
    """The module the trainer trains: nnet wrapped by each aid in turn."""
    return functools.reduce(lambda module, aid: aid.wrap(module), aids, nnet)


def state_dict(aids) -> dict:
    """{state_key: state} of the aids, for train_state.pth."""
    return {aid.state_key: aid.state_dict() for aid in aids}


def load_state_dict(aids, state: dict, path: str):
    """Resume each aid from train_state.pth; a checkpoint written with an aid off starts it afresh, with a
    warning; keys of aids the config turned off are ignored."""
    for aid in aids:
        if aid.state_key in state:
            aid.load_state_dict(state[aid.state_key])
        else:
            logger.warning("'%s' has no %s: %s", path, aid.state_key, aid.fresh)
