"""Config flags and validation: every mistake in a config or an override is caught before any work, in one line
naming every bad key (`define_config_flag` at flag parsing, `parse_and_validate` before training); `workdir_for`:
the original's default run directory.
"""
import ast
import difflib
import inspect
import math
import numbers
import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs.base import get_config as base_config
from libs import fsdp, training_aids
from libs.diffusers_autoencoder import SCALINGS
from libs.errors import ConfigError
from libs.export import weights_problems
from libs.metrics.inception import problems as inception_problems
from libs.metrics.precision_recall import ARITHMETICS
from libs.metrics.suite import RESIZES, MetricOptions
from libs.nnet import NNETS, problems as nnet_problems
from libs.optim import SCHEDULES
from libs.sampling import ALGORITHMS, INTERVAL_RULES, algorithm_problem
from libs.tracking import LOG_WITH, problems as tracking_problems
from sde import PATHS, SECOND_TIMES, TIME_DISTRIBUTIONS, TWO_TIME_PATHS, Objective

_SECTION = (ml_collections.ConfigDict, dict)


def _lookup(config, key):
    """(found, value) of a dotted key."""
    node = config
    for part in key.split("."):
        if not isinstance(node, _SECTION) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _leaf_keys(config, prefix=""):
    for k, v in config.items():
        if isinstance(v, _SECTION):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def _closest(candidates, score, cutoff):
    """The (at most 3) candidates scoring within 0.08 of the best, best first; none when the best is below cutoff."""
    scored = sorted(((score(c), c) for c in candidates), key=lambda sc: (-sc[0], sc[1]))
    return [c for s, c in scored[:3] if s >= max(cutoff, scored[0][0] - 0.08)] if scored else []


def suggest_keys(key, config):
    """The existing leaf keys closest to `key`, best first."""
    leaf = key.rsplit(".", 1)[-1]

    def score(k):
        # The full path catches a misspelled section ('trian.n_steps'); the last component alone a key
        # under the wrong section ('train.lr' -> 'optimizer.lr'), slightly discounted.
        last = k.rsplit(".", 1)[-1]
        return max(difflib.SequenceMatcher(None, key, k).ratio(),
                   0.95 * difflib.SequenceMatcher(None, leaf, last).ratio(),
                   0.8 if len(leaf) >= 3 and last.startswith(leaf) else 0.0)  # 'ema' -> 'ema_rate'

    return _closest(_leaf_keys(config), score, 0.7)


# ----------------------------------------------------------------------------- overrides

def check_overrides(config, overrides, flag_name="config"):
    """Raise ConfigError for an override ('--config.a.b=v', 'config.a.b=v' or 'a.b=v') whose key `config` lacks
    (suggesting the closest ones) or whose value cannot take the key's type. Nothing is modified."""
    for key, text in _split_overrides(overrides, flag_name):
        found, current = _lookup(config, key)
        if not found:
            close = suggest_keys(key, config)
            hint = ("did you mean " + " or ".join(f"--{flag_name}.{k}" for k in close) + "?") if close else (
                f"the config has no key like it; its top-level keys are: {', '.join(sorted(config.keys()))}.")
            raise ConfigError(f"--{flag_name}.{key}: the config has no key '{key}'; {hint}")
        if text is None or current is None:
            continue  # a bare boolean flag, or a field whose type the config leaves open
        try:
            # absl's parsers, which ml_collections applies the override with
            if isinstance(current, bool):
                kind = "a boolean (true/false)"
                flags.BooleanParser().parse(text)
            elif isinstance(current, int):
                kind = "an integer"
                flags.IntegerParser().parse(text)  # '16', '0x10'
            elif isinstance(current, float):
                kind = "a number"
                flags.FloatParser().parse(text)
            elif isinstance(current, (tuple, list)) and current and all(map(_is_num, current)):
                kind = f"a tuple of numbers like '{tuple(current)!r}'"
                value = ast.literal_eval(text)  # '(0.9, 0.99)', or one element per repeated flag
                if not all(map(_is_num, value if isinstance(value, (tuple, list)) else (value,))):
                    raise ValueError(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{flag_name}.{key}={text}: '{key}' takes {kind}; got {text!r}") from None


def _split_overrides(overrides, flag_name="config"):
    """(key, value text or None) of each override; other flags ('--workdir=w') are left out."""
    out = []
    for name, sep, value in (str(item).partition("=") for item in overrides):
        m = re.match(rf"-{{0,2}}(no)?{re.escape(flag_name)}\.", name)
        if m:
            name = name[m.end():]
            if m.group(1) and not sep:
                value, sep = "false", "="  # absl's --noconfig.flag form of a boolean
        elif name.startswith("-"):
            continue
        out.append((name, value if sep else None))
    return out


def config_overrides(argv=None, flag_name="config", config=None):
    """The `--config.*` overrides of argv (default sys.argv), in order, each as '--config.a.b=value'. The form
    `--config.a.b value` is joined, except for boolean keys of `config` (absl never gives them the next argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    for arg, following in zip(argv, argv[1:] + ["-"]):  # a joined value does not start with '-': never matched
        m = re.match(rf"-{{1,2}}(no)?{re.escape(flag_name)}\.", arg)
        if m:
            boolean = isinstance(_lookup(config, arg[m.end():])[1], bool)
            joined = "=" not in arg and not m.group(1) and not boolean and not following.startswith("-")
            out.append(f"{arg}={following}" if joined else arg)
    return out


class _CheckedConfigFileParser(flags.ArgumentParser):
    """ml_collections' config-file parser, then the overrides checked against the loaded config: ml_collections
    applies them after this returns and answers a typo with an AttributeError traceback, whereas a ConfigError
    here becomes absl's one-line usage error."""

    def __init__(self, inner, name, argv):
        self._inner, self.name, self._argv = inner, name, argv

    def parse(self, path):
        file = str(path).split(":", 1)[0]
        if not os.path.isfile(file):
            folder, name = os.path.dirname(file) or ".", os.path.basename(file)
            names = [f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")] \
                if os.path.isdir(folder) else []
            close = [c if folder == "." else os.path.join(folder, c)
                     for c in _closest(names, lambda c: difflib.SequenceMatcher(None, name, c).ratio(), 0.6)]
            hint = f"did you mean {' or '.join(close)}?" if close else \
                "give a config file such as configs/digits_uvit_tiny.py."
            raise ConfigError(f"config file '{file}' not found; {hint}")
        config = self._inner.parse(path)
        if isinstance(config, _SECTION):
            argv = sys.argv if self._argv is None else self._argv
            check_overrides(config, config_overrides(argv[1:], self.name, config), self.name)
        return config

    def flag_type(self):
        return self._inner.flag_type()


def define_config_flag(name="config", default=None, help_string="path of the training configuration file",
                       lock_config=False, flag_values=flags.FLAGS, sys_argv=None):
    """`config_flags.DEFINE_config_file` (unlocked, as the original scripts) whose overrides are checked at parse
    time. Returns the flag holder (`.value` is the config)."""
    holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values,
                                             lock_config=lock_config, sys_argv=sys_argv)
    flag_values[name].parser = _CheckedConfigFileParser(flag_values[name].parser, name, sys_argv)
    return holder


# The paper's (ImageNet-scale, GPU) hyperparameters that a config built on configs/base.py carries unless it says
# otherwise, with why each matters on other data.
PAPER_HYPERPARAMETERS = (
    ("optimizer.betas", "beta1 0.99 averages ~100 steps of gradients: slow to start on a short run"),
    ("lr_scheduler.warmup_steps", "no real learning rate before it"),
    ("ema_rate", "0.9999 still holds the random initialisation after 10,000 steps"),
    ("fid.n_samples", "images sampled at every checkpoint"),
    ("sample.n_samples", "images sampled by the final evaluation"),
)


def paper_hyperparameters(config):
    """['optimizer.betas=(0.99, 0.99) (why)', ...]: the PAPER_HYPERPARAMETERS `config` leaves at the paper's value."""
    base, out = base_config(), []
    for key, why in PAPER_HYPERPARAMETERS:
        mine, paper = _lookup(config, key)[1], _lookup(base, key)[1]
        if mine is not None and mine == paper:
            out.append(f"{key}={mine!r} ({why})")
    return out


def workdir_for(config_path, overrides, root="workdir"):
    """`root/<config name>/<hparams>`, the original's default run directory: hparams joins `leaf=value` of every
    override ('--config.nnet.depth=16' -> 'depth=16'), 'default' when none; dataset paths are left out and other
    paths shortened to their stem, as the original did."""
    config_name = os.path.splitext(os.path.basename(str(config_path).split(":", 1)[0]))[0]
    parts = []
    for key, value in _split_overrides(overrides):
        if key.startswith("dataset.path") or value is None:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf.endswith("path"):
            value = os.path.splitext(os.path.basename(value.rstrip("/")))[0]
        value = re.sub(r"[^\w.,()+=-]", "_", value)  # no '/' or spaces in a directory name
        parts.append(f"{leaf}={value}")
    return os.path.join(root, config_name, "-".join(parts) or "default")


# ----------------------------------------------------------------------------- validation

def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# What a value of the same type as a default takes (int for a float default is fine).
_KINDS = {bool: ("a boolean", lambda v: isinstance(v, bool)), int: ("an integer", _is_int),
          float: ("a number", _is_num), str: ("a string", lambda v: isinstance(v, str))}

_BOUNDS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= -1": lambda v: v >= -1,
           "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1,
           "0 (no FID during training) or >= 2": lambda v: v == 0 or v >= 2}
# (bound, what the value means, the keys it bounds): the range of every number with one.
_RANGES = [
    ("> 0", "", "autoencoder.scale_factor"),
    ("> 0", " (optimizer steps to train)", "train.n_steps"),
    ("> 0", " (steps)", "train.log_interval", "train.eval_interval", "train.save_interval"),
    (">= 0", " (0 keeps every checkpoint)", "train.keep_last_ckpts"),
    ("> 0", " (1 stops at the first NaN/inf loss)", "train.max_nonfinite_in_a_row", "train.max_nonfinite_in_window",
     "train.nonfinite_window"),
    ("> 0", " (global batch size)", "train.batch_size"),
    ("> 0", " (micro-batches per optimizer step)", "train.grad_accum_steps"),
    ("> 0", " (peak learning rate)", "optimizer.lr"),
    (">= 0", "", "optimizer.weight_decay"),
    (">= 0", " (steps)", "lr_scheduler.warmup_steps"),
    ("in [0, 1)", " (ema <- rate * ema + (1 - rate) * online)", "ema_rate"),
    (">= 0", " (max gradient norm; 0 = no clipping)", "grad_clip"),
    ("> 0", "", *(f"nnet.{k}" for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                        "mlp_ratio", "clip_dim", "num_clip_token"))),
    (">= -1", " (-1 = unconditional)", "nnet.num_classes"),
    ("in [0, 1]", " (probability of dropping the condition)", "dataset.p_uncond"),
    ("> 0", "", "sample.sample_steps", "sample.n_samples", "grid.steps", "grid.n_rows", "grid.n_cols", "fid.steps"),
    # Per process: each process draws its share of the images in calls of at most this many.
    ("> 0", " (images per process per call)", "sample.mini_batch_size"),
    ("0 (no FID during training) or >= 2", " (a covariance needs two images)", "fid.n_samples"),
    ("> 0", "", "metrics.kid_subsets", "metrics.kid_subset_size", "metrics.prc_k"),
    (">= 0", " (EDM noise level sigma; 0 = no limit)", "sample.guidance_sigma_min", "sample.guidance_sigma_max"),
    ("> 0", "", "objective.logit_std", "objective.shift"),
    (">= 0", " (0 = the given shift)", "objective.shift_base_dim"),
    (">= -1", " (-1 = min(8, CPU cores per process))", "dataloader.num_workers"),
    (">= 0", " (steps between post-hoc EMA snapshots; 0 = off)", "posthoc_ema.snapshot_interval"),
    ("> 0", "", "repa.resolution", "repa.projector_dim"),
    ("> 0", " (weight of the alignment loss)", "repa.weight"),
]
_OWNED = {"training_aids"}  # keys whose type their module checks (libs.training_aids.problems)
_ANY_LENGTH = {"posthoc_ema.sigma_rels"}  # tuples of any length (the others have their default's)
_CHOICES = {"diffusion": ("continuous", "discrete"), "pred": ("noise_pred",), "train.mode": ("cond", "uncond"),
            "optimizer.name": ("adamw",), "lr_scheduler.name": SCHEDULES, "nnet.name": tuple(NNETS),
            "sample.algorithm": ALGORITHMS, "sample.guidance_interval_rule": INTERVAL_RULES,
            "grid.algorithm": ("",) + ALGORITHMS,
            "wandb.mode": ("online", "offline", "disabled"), "log_with": LOG_WITH,
            "metrics.labels": ("uniform", "balanced"), "metrics.resize": RESIZES,
            "metrics.prc_arithmetic": ARITHMETICS,
            "objective.path": PATHS, "objective.time_dist": TIME_DISTRIBUTIONS,
            "autoencoder.latent_scaling": SCALINGS, "objective.second_time": SECOND_TIMES}


def _type_problems(config, reference, prefix=""):
    """(key, problem) of each key of `reference` whose value in `config` lacks the reference's type (keys the
    config lacks and None references are left to parse_and_validate)."""
    for k, default in reference.items():
        key = prefix + k
        found, value = _lookup(config, key)
        if not found or default is None or key in _OWNED:
            continue
        if isinstance(default, _SECTION):
            if isinstance(value, _SECTION):
                yield from _type_problems(config, default, key + ".")
            else:
                yield key, "must be a section (ConfigDict)"
        elif isinstance(default, (tuple, list)):
            n = len(value) if key in _ANY_LENGTH and isinstance(value, (tuple, list)) and value else len(default)
            if not (isinstance(value, (tuple, list)) and len(value) == n and all(map(_is_num, value))):
                yield key, f"must be {'one or more' if key in _ANY_LENGTH else len(default)} numbers, e.g. {tuple(default)}"
        elif not _KINDS[type(default)][1](value):
            yield key, f"must be {_KINDS[type(default)][0]}"


def _nnet_reference(config):
    """{argument: default} of the network class config.nnet.name builds: what each nnet key must look like."""
    cls = NNETS.get(_lookup(config, "nnet.name")[1])
    params = inspect.signature(cls.__init__).parameters.values() if cls else ()
    return {p.name: p.default for p in params if isinstance(p.default, (bool, int, float))}


def parse_and_validate(config, *, world_size):
    """Raise one ConfigError listing every value of the wrong type, out of range or inconsistent, each naming its
    key, and every file the config names that is not there. Sections a config lacks are not checked (eval
    configs have no train section). `world_size`: the processes the global batch is split over."""
    problems = {}  # key -> its first problem: the one the user is told

    def get(key):
        return _lookup(config, key)[1]

    def fail(key, msg):
        problems.setdefault(key, f"config.{key} = {get(key)!r}: {msg}")

    for key, msg in [*_type_problems(config, base_config()), *_type_problems(config, _nnet_reference(config), "nnet.")]:
        fail(key, msg)
    for bound, meaning, *keys in _RANGES:
        for key in keys:
            if _is_num(get(key)) and not _BOUNDS[bound](get(key)):  # not a number: a type problem, said above
                fail(key, f"must be {bound}{meaning}")
    for key, allowed in _CHOICES.items():
        if get(key) is not None and get(key) not in allowed:
            close = difflib.get_close_matches(str(get(key)), [str(a) for a in allowed], n=1)
            fail(key, f"not one of {', '.join(map(repr, allowed))}"
                      + (f" (did you mean '{close[0]}'?)" if close else ""))

    batch, k = get("train.batch_size"), get("train.grad_accum_steps") or 1
    if _is_int(batch) and batch > 0 and _is_int(k) and k > 0 and batch % (world_size * k):
        n = world_size * k
        lower, upper = batch - batch % n, batch - batch % n + n
        fail("train.batch_size", f"does not split over {world_size} process(es) x {k} micro-batch(es) "
                                 f"(train.grad_accum_steps): the global batch must be a multiple of {n} (e.g. "
                                 f"--config.train.batch_size={lower or upper} or {upper}), or change the number "
                                 f"of processes or train.grad_accum_steps")
    if get("init.resize") is True and not get("init.path"):
        fail("init.resize", "has no effect without --init_from (the weights to adapt)")
    betas = get("optimizer.betas")
    if isinstance(betas, (tuple, list)) and not all(_is_num(b) and 0 <= b < 1 for b in betas):
        fail("optimizer.betas", "must be two numbers in [0, 1), e.g. (0.99, 0.999)")

    if isinstance(get("nnet"), _SECTION):  # the networks check their own section
        for key, msg in nnet_problems(get("nnet")):
            fail(f"nnet.{key}", msg)
    z_shape = get("z_shape")
    if z_shape is not None:
        if not (isinstance(z_shape, (tuple, list)) and len(z_shape) == 3
                and all(_is_int(s) and s > 0 for s in z_shape)):
            fail("z_shape", "must be (channels, height, width) of the autoencoder latent, e.g. (4, 32, 32)")
        else:
            if get("nnet.in_chans") not in (None, z_shape[0]):
                fail("nnet.in_chans", f"differs from z_shape[0] = {z_shape[0]} (the latent's channels)")
            if get("nnet.img_size") not in (None, z_shape[1]):
                fail("nnet.img_size", f"differs from z_shape[1] = {z_shape[1]} (the network sees latents)")
    if get("dataset.cfg") is True and get("dataset.p_uncond") == 0:
        fail("dataset.p_uncond", "with dataset.cfg = True: guidance training needs a probability > 0 (the paper "
                                 "uses 0.1 or 0.15)")

    if not problems and isinstance(get("objective"), _SECTION):  # the combinations (sde.Objective.problems)
        objective = Objective.of(config)
        for msg in objective.problems(get("diffusion")):
            fail(msg.split(" ", 1)[0].removeprefix("config."), msg.split(": ", 1)[-1])
        for key in ("sample.algorithm", "grid.algorithm"):
            if get(key):
                msg = algorithm_problem(get(key), objective.path, get("diffusion"))
                if msg:
                    fail(key, msg)
        two_times = objective.path in TWO_TIME_PATHS
        if get("nnet.name") is not None and bool(get("nnet.second_time")) != two_times:
            fail("nnet.second_time", f"must be {two_times} for config.objective.path = {objective.path!r} (the "
                                     "second time token is the few-step objectives' input: 'meanflow', 'shortcut')")
        if objective.guided and not get("dataset.cfg"):
            fail(f"objective.{objective.guidance_key()[0]}", "guidance inside the target needs the null condition of "
                 "guidance training: set config.dataset.cfg=True (and p_uncond > 0), or cfg_omega=1, cfg_kappa=0")
    lo, hi = get("sample.guidance_sigma_min"), get("sample.guidance_sigma_max")
    if _is_num(lo) and _is_num(hi) and hi > 0 and lo >= hi:
        fail("sample.guidance_sigma_max", f"must be above sample.guidance_sigma_min = {lo} (or 0: no upper limit)")
    # Each module checks the values it owns: files the config names, the aids' sections, the trackers' packages.
    owned = [*weights_problems(config), *training_aids.problems(config)]
    for section, owner in (("fid", inception_problems), ("metrics", MetricOptions.problems)):
        if isinstance(get(section), _SECTION):
            owned += [(f"{section}.{key}", msg) for key, msg in owner(get(section))]
    for key, msg in owned + tracking_problems(get("log_with")):
        fail(key, msg)
    for key, msg in fsdp.problems(config, world_size):  # sharded training checks its own
        fail(key, msg)

    if problems:
        raise ConfigError(next(iter(problems.values())) if len(problems) == 1 else
                          f"{len(problems)} problems in the config: " + "; ".join(problems.values()))
