"""Config flags and validation: every mistake in a config or an override is caught before any work.

- `define_config_flag()` is ml_collections' `DEFINE_config_file` whose overrides are checked
  when the flags are parsed: a key that does not exist (a typo) is an error suggesting the
  closest keys, a value of the wrong type an error naming the key and the expected type.
- `parse_and_validate(config, world_size=...)` checks what a config file holds: every key of
  configs/base.py has its default's type, every network argument the type of the network
  constructor's default, then ranges, names and combinations (batch split, patch size, heads,
  latent shape); one ConfigError, one line, naming each bad key.
- `workdir_for(config_path, overrides)` is the original's default run directory,
  `workdir/<config name>/<hparams from the overrides>`.
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
from libs.errors import ConfigError
from libs.nnet import NNETS
from libs.optim import SCHEDULES
from libs.sampling import ALGORITHMS
from libs.tracking import LOG_WITH, trackers_for


# ----------------------------------------------------------------------------- key lookup

def _leaf_keys(config, prefix=""):
    """Every leaf key of a (nested) config as a dotted path."""
    for k, v in config.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def suggest_keys(key, config, n=3):
    """The existing leaf keys closest to `key` (difflib), best first; only near-ties of the best."""
    leaf = key.rsplit(".", 1)[-1]

    def score(k):
        # The full path catches a misspelled section ('trian.n_steps'); the last component alone a
        # key under the wrong section ('train.lr' -> 'optimizer.lr'), slightly discounted.
        full = difflib.SequenceMatcher(None, key, k).ratio()
        last = difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio()
        prefix = 0.8 if len(leaf) >= 3 and k.rsplit(".", 1)[-1].startswith(leaf) else 0.0  # 'ema' -> 'ema_rate'
        return max(full, 0.95 * last, prefix)

    scored = sorted(((score(k), k) for k in _leaf_keys(config)), key=lambda sk: (-sk[0], sk[1]))
    if not scored or scored[0][0] < 0.7:
        return []
    best = scored[0][0]
    return [k for s, k in scored[:n] if s >= best - 0.08]


def _lookup(config, key):
    """(found, value) of a dotted key."""
    node = config
    for part in key.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _unknown_key_message(key, config, flag_name="config"):
    close = suggest_keys(key, config)
    hint = ("did you mean " + " or ".join(f"--{flag_name}.{k}" for k in close) + "?") if close else (
        f"the config has no key like it; its top-level keys are: {', '.join(sorted(config.keys()))}.")
    return f"--{flag_name}.{key}: the config has no key '{key}'; {hint}"


# ----------------------------------------------------------------------------- overrides

def _parse_bool(text):
    t = text.strip().lower()
    if t in ("true", "t", "1", "yes"):
        return True
    if t in ("false", "f", "0", "no"):
        return False
    raise ValueError(text)


def _check_value(key, current, text, flag_name="config"):
    """Raise ConfigError when `text` cannot become a value of `current`'s type."""
    if text is None or current is None:
        return  # a bare boolean flag, or a field whose type the config leaves open
    kind = None
    try:
        if isinstance(current, bool):
            kind = "a boolean (true/false)"
            _parse_bool(text)
        elif isinstance(current, int):
            kind = "an integer"
            int(text, 0)  # what absl's IntegerParser accepts: '16', '0x10'
        elif isinstance(current, float):
            kind = "a number"
            float(text)
        elif isinstance(current, (tuple, list)) and current and all(_is_num(v) for v in current):
            kind = f"a tuple of numbers like '{tuple(current)!r}'"
            # '(0.9, 0.99)' or one element per repeated flag ('--config.x=0.9 --config.x=0.99')
            value = ast.literal_eval(text)
            if not all(_is_num(v) for v in (value if isinstance(value, (tuple, list)) else (value,))):
                raise ValueError(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{flag_name}.{key}={text}: '{key}' takes {kind}; got {text!r}") from None


def check_overrides(config, overrides, flag_name="config"):
    """Check `overrides` ('--config.a.b=v', 'config.a.b=v' or 'a.b=v' strings) against `config`.

    Raises ConfigError for a key the config does not have (suggesting the closest ones) or a
    value that cannot take the key's type. Nothing is modified.
    """
    for key, text in _split_overrides(overrides, flag_name):
        found, current = _lookup(config, key)
        if not found:
            raise ConfigError(_unknown_key_message(key, config, flag_name))
        if isinstance(current, (ml_collections.ConfigDict, dict)):
            continue
        _check_value(key, current, text, flag_name)


def _split_overrides(overrides, flag_name="config"):
    pattern = re.compile(rf"^-{{0,2}}(?:no)?{re.escape(flag_name)}\.")
    out = []
    for item in overrides:
        item = str(item)
        name, sep, value = item.partition("=")
        m = pattern.match(name)
        if m:
            key = name[m.end():]
            if name.lstrip("-").startswith("no" + flag_name + ".") and not sep:
                value, sep = "false", "="  # absl's --noconfig.flag form of a boolean
        elif name.startswith("-"):
            continue  # another flag (--workdir=...), not an override
        else:
            key = name
        out.append((key, value if sep else None))
    return out


def config_overrides(argv=None, flag_name="config", config=None):
    """The `--config.*` overrides of argv (default sys.argv), in order, each as '--config.a.b=value'.

    The space-separated form `--config.a.b value` is joined, except for boolean keys of `config`
    (absl never gives a boolean flag the next argument).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pattern = re.compile(rf"^-{{1,2}}(no)?{re.escape(flag_name)}\.")
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        m = pattern.match(arg)
        if m:
            key = arg[m.end():]
            boolean = config is not None and isinstance(_lookup(config, key)[1], bool)
            if "=" not in arg and not m.group(1) and not boolean and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("-"):
                out.append(f"{arg}={argv[i + 1]}")
                i += 1
            else:
                out.append(arg)
        i += 1
    return out


class _CheckedConfigFileParser(flags.ArgumentParser):
    """Wraps ml_collections' config-file parser: loads the file, then checks the overrides against it.

    ml_collections applies overrides after this parser returns and answers a misspelled key
    with an AttributeError traceback; checking here turns it into absl's clean usage error
    ("FATAL Flags parsing error: ...") carrying our message.
    """

    def __init__(self, inner, name, argv):
        self._inner = inner
        self.name = name
        self._argv = argv

    def parse(self, path):
        file = str(path).split(":", 1)[0]
        if not os.path.isfile(file):
            raise ConfigError(_missing_config_message(file))
        config = self._inner.parse(path)
        if isinstance(config, (ml_collections.ConfigDict, dict)):
            argv = sys.argv if self._argv is None else self._argv
            check_overrides(config, config_overrides(argv[1:], self.name, config), self.name)
        return config

    def flag_type(self):
        return self._inner.flag_type()


def _missing_config_message(file):
    folder = os.path.dirname(file) or "."
    candidates = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(folder) else []
    name = os.path.basename(file)
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True)
    close = [c for r, c in scored[:3] if r >= 0.6 and r >= scored[0][0] - 0.08]
    shown = [c if folder == "." else os.path.join(folder, c) for c in close]
    hint = ("did you mean " + " or ".join(shown) + "?") if close else \
        "give a config file such as configs/digits_uvit_tiny.py."
    return f"config file '{file}' not found; {hint}"


def define_config_flag(name="config", default=None, help_string="path of the training configuration file",
                       lock_config=False, flag_values=flags.FLAGS, sys_argv=None):
    """`config_flags.DEFINE_config_file` whose overrides are checked at parse time.

    lock_config=False as the original U-ViT scripts. Returns the flag holder (`.value` is the config).
    """
    holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values,
                                             lock_config=lock_config, sys_argv=sys_argv)
    flag = flag_values[name]
    flag.parser = _CheckedConfigFileParser(flag.parser, name, sys_argv)
    return holder


# ----------------------------------------------------------------------------- workdir

def workdir_for(config_path, overrides, root="workdir"):
    """`root/<config name>/<hparams>`, the original's default run directory.

    hparams joins `leaf=value` of every override ('--config.nnet.depth=16' -> 'depth=16'),
    'default' when there are none; dataset paths are left out and other path values shortened
    to their stem, as the original did.
    """
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


class _Checker:
    """Collects every problem, each naming its key, so the user fixes them in one go."""

    def __init__(self, config):
        self.config = config
        self.problems = []

    def get(self, key):
        found, value = _lookup(self.config, key)
        return value if found else None

    def fail(self, key, msg):
        if not any(p.startswith(f"config.{key} = ") for p in self.problems):  # the first problem of a key says it
            self.problems.append(f"config.{key} = {self.get(key)!r}: {msg}")

    def types(self, reference, prefix=""):
        """Every key `reference` has must hold a value of its type (None in `reference`: checked elsewhere)."""
        for k, default in reference.items():
            key = prefix + k
            found, value = _lookup(self.config, key)
            if not found or default is None:
                continue
            if isinstance(default, (ml_collections.ConfigDict, dict)):
                if isinstance(value, (ml_collections.ConfigDict, dict)):
                    self.types(default, key + ".")
                else:
                    self.fail(key, "must be a section (ConfigDict)")
            elif isinstance(default, (tuple, list)):
                if not (isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(_is_num, value))):
                    self.fail(key, f"must be {len(default)} numbers, e.g. {tuple(default)}")
            elif not _KINDS[type(default)][1](value):
                self.fail(key, f"must be {_KINDS[type(default)][0]}")

    def range(self, key, low=None, high=None, *, low_open=False, high_open=False, meaning=""):
        value = self.get(key)
        if not _is_num(value):
            return  # absent, or a type problem already reported
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            if low is not None and high is not None:
                bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            else:
                bound = f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}"
            self.fail(key, f"must be {bound}{meaning}")

    def positive(self, *keys, meaning=""):
        for key in keys:
            self.range(key, 0, low_open=True, meaning=meaning)

    def choice(self, key, allowed, *, allow_empty=False):
        value = self.get(key)
        if value is None or (allow_empty and value == "") or value in allowed:
            return
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        self.fail(key, f"not one of {', '.join(repr(a) for a in allowed)}" + (f" (did you mean '{close[0]}'?)" if close else ""))


def _nnet_reference(config):
    """{key: default} of the network class config.nnet.name builds: what each nnet key must look like."""
    cls = NNETS.get(_lookup(config, "nnet.name")[1])
    params = inspect.signature(cls.__init__).parameters.values() if cls else ()
    return {p.name: p.default for p in params if isinstance(p.default, (bool, int, float))}


def parse_and_validate(config, *, world_size):
    """Raise one ConfigError listing every value of the wrong type, out of range or inconsistent, each naming
    its key, and every file the config names that is not there. Sections a config lacks are not checked
    (eval configs have no train section). `world_size`: the processes the global batch is split over."""
    c = _Checker(config)
    c.types(base_config())
    c.types(_nnet_reference(config), "nnet.")

    c.choice("diffusion", ("continuous", "discrete"))
    c.choice("pred", ("noise_pred",))
    c.positive("autoencoder.scale_factor")
    c.positive("train.n_steps", meaning=" (optimizer steps to train)")
    c.positive("train.log_interval", "train.eval_interval", "train.save_interval", meaning=" (steps)")
    c.range("train.keep_last_ckpts", 0, meaning=" (0 keeps every checkpoint)")
    c.positive("train.max_nonfinite_in_a_row", "train.max_nonfinite_in_window", "train.nonfinite_window",
               meaning=" (1 stops at the first NaN/inf loss)")
    c.choice("train.mode", ("cond", "uncond"))
    c.positive("train.batch_size", meaning=" (global batch size)")
    c.positive("train.grad_accum_steps", meaning=" (micro-batches per optimizer step)")
    batch, k = c.get("train.batch_size"), c.get("train.grad_accum_steps") or 1
    if _is_int(batch) and batch > 0 and _is_int(k) and k > 0 and batch % (world_size * k):
        n = world_size * k
        lower, upper = batch - batch % n, batch - batch % n + n
        c.fail("train.batch_size", f"does not split over {world_size} process(es) x {k} micro-batch(es) "
                                   f"(train.grad_accum_steps): the global batch must be a multiple of {n} (e.g. "
                                   f"--config.train.batch_size={lower or upper} or {upper}), or change the number "
                                   f"of processes or train.grad_accum_steps")
    init = c.get("init.path")
    if isinstance(init, str) and init and not os.path.exists(init):
        c.fail("init.path", "does not exist: --init_from takes a ckpts/<step>.ckpt directory, a .pth state dict or "
                            "an exported folder (tools/export.py)")
    if c.get("init.resize") is True and not init:
        c.fail("init.resize", "has no effect without --init_from (the weights to adapt)")

    c.choice("optimizer.name", ("adamw",))
    c.positive("optimizer.lr", meaning=" (peak learning rate)")
    c.range("optimizer.weight_decay", 0)
    betas = c.get("optimizer.betas")
    if isinstance(betas, (tuple, list)) and not all(_is_num(b) and 0 <= b < 1 for b in betas):
        c.fail("optimizer.betas", "must be two numbers in [0, 1), e.g. (0.99, 0.999)")
    c.choice("lr_scheduler.name", SCHEDULES)
    c.range("lr_scheduler.warmup_steps", 0, meaning=" (steps)")
    c.range("ema_rate", 0, 1, high_open=True, meaning=" (ema <- rate * ema + (1 - rate) * online)")
    c.range("grad_clip", 0, meaning=" (max gradient norm; 0 = no clipping)")

    c.choice("nnet.name", tuple(NNETS))
    c.positive(*(f"nnet.{k}" for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                       "mlp_ratio", "clip_dim", "num_clip_token")))
    c.range("nnet.num_classes", -1, meaning=" (-1 = unconditional)")
    if c.get("nnet.qk_scale") is not None and not (_is_num(c.get("nnet.qk_scale")) and c.get("nnet.qk_scale") > 0):
        c.fail("nnet.qk_scale", "must be None (head_dim ** -0.5) or a number > 0")
    img, patch, embed, heads = (c.get(f"nnet.{k}") for k in ("img_size", "patch_size", "embed_dim", "num_heads"))
    if _is_int(img) and _is_int(patch) and img > 0 and patch > 0 and img % patch:
        c.fail("nnet.patch_size", f"does not divide nnet.img_size = {img}: the image must split into whole "
                                  f"patches (use a divisor of {img}: {_divisors_near(img, patch)})")
    if _is_int(embed) and _is_int(heads) and embed > 0 and heads > 0 and embed % heads:
        c.fail("nnet.num_heads", f"does not divide nnet.embed_dim = {embed} (each head gets embed_dim / num_heads "
                                 f"channels)")
    z_shape = c.get("z_shape")
    if z_shape is not None:
        if not (isinstance(z_shape, (tuple, list)) and len(z_shape) == 3 and all(_is_int(s) and s > 0 for s in z_shape)):
            c.fail("z_shape", "must be (channels, height, width) of the autoencoder latent, e.g. (4, 32, 32)")
        else:
            if c.get("nnet.in_chans") not in (None, z_shape[0]):
                c.fail("nnet.in_chans", f"differs from z_shape[0] = {z_shape[0]} (the latent's channels)")
            if c.get("nnet.img_size") not in (None, z_shape[1]):
                c.fail("nnet.img_size", f"differs from z_shape[1] = {z_shape[1]} (the network sees latents)")

    c.range("dataset.p_uncond", 0, 1, meaning=" (probability of dropping the condition)")
    if c.get("dataset.cfg") is True and c.get("dataset.p_uncond") == 0:
        c.fail("dataset.p_uncond", "with dataset.cfg = True: guidance training needs a probability > 0 (the paper "
                                   "uses 0.1 or 0.15)")

    c.positive("sample.sample_steps", "sample.n_samples", "grid.steps", "grid.n_rows", "grid.n_cols", "fid.steps")
    # Per process: each process draws its share of the images in calls of at most this many.
    c.positive("sample.mini_batch_size", meaning=" (images per process per call)")
    c.choice("sample.algorithm", ALGORITHMS)
    c.choice("grid.algorithm", ALGORITHMS, allow_empty=True)
    n_fid = c.get("fid.n_samples")
    if _is_int(n_fid) and (n_fid < 0 or n_fid == 1):
        c.fail("fid.n_samples", "must be 0 (no FID during training) or >= 2 (a covariance needs two images)")
    weights = c.get("fid.inception_weights")
    if weights is not None and not (isinstance(weights, str) and os.path.exists(weights)):
        c.fail("fid.inception_weights", "does not exist: give the path of pt_inception-2015-12-05 weights, or None "
                                        "for the default location")
    c.choice("wandb.mode", ("online", "offline", "disabled"))
    c.choice("log_with", LOG_WITH, allow_empty=True)
    if c.get("log_with") in LOG_WITH:
        try:
            trackers_for(c.get("log_with"))  # the tracker's package is installed
        except ConfigError as e:
            c.fail("log_with", str(e))
    c.range("dataloader.num_workers", -1, meaning=" (-1 = min(8, CPU cores per process))")

    if c.problems:
        raise ConfigError(c.problems[0] if len(c.problems) == 1 else
                          f"{len(c.problems)} problems in the config: " + "; ".join(c.problems))


def _divisors_near(n, k):
    """The divisors of n just below and above k, e.g. (16, 3) -> '2 or 4'."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < k]
    above = [d for d in divisors if d > k]
    return " or ".join(str(d) for d in (below[-1:] + above[:1]))
