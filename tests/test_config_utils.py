"""Config flags and validation: typos, wrong types, out-of-range values, workdir naming."""
import glob
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from libs.config_utils import (check_overrides, config_overrides, define_config_flag, parse_and_validate,
                               suggest_keys, workdir_for)
from libs.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base():
    from configs.base import get_config
    config = get_config()
    config.nnet = ml_collections.ConfigDict(dict(name="uvit", img_size=32, patch_size=2, in_chans=3, embed_dim=64,
                                                 depth=2, num_heads=2, mlp_ratio=4, num_classes=-1))
    return config


def paper_configs():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    return [os.path.splitext(os.path.basename(f))[0] for f in files if not os.path.basename(f).startswith(("_", "base"))]


@pytest.mark.parametrize("name", paper_configs())
def test_every_shipped_config_is_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    # The README's launch: 8 processes (or 1 for the CPU demo); every global batch must split over them.
    world = 1 if config.train.batch_size % 8 else 8
    parse_and_validate(config, world_size=world)


def test_config_without_optional_sections_is_fine():
    parse_and_validate(ml_collections.ConfigDict({"nnet": {"name": "uvit", "img_size": 8, "patch_size": 2}}),
                       world_size=3)
    parse_and_validate(ml_collections.ConfigDict(), world_size=1)


@pytest.mark.parametrize("key, value, expected", [
    ("train.n_steps", -5, "config.train.n_steps = -5: must be > 0"),
    ("train.n_steps", 0, "config.train.n_steps = 0: must be > 0"),
    ("train.save_interval", 0, "config.train.save_interval = 0: must be > 0"),
    ("train.log_interval", 2.5, "config.train.log_interval = 2.5: must be an integer"),
    ("optimizer.lr", 0.0, "config.optimizer.lr = 0.0: must be > 0"),
    ("optimizer.lr", float("nan"), "config.optimizer.lr = nan: must be a number"),
    ("optimizer.name", "adam_w", "config.optimizer.name = 'adam_w': not one of 'adamw' (did you mean 'adamw'?)"),
    ("lr_scheduler.name", "cosin", "config.lr_scheduler.name = 'cosin': not one of"),
    ("ema_rate", 1.0, "config.ema_rate = 1.0: must be in [0, 1)"),
    ("dataset.p_uncond", 1.5, "config.dataset.p_uncond = 1.5: must be in [0, 1]"),
    ("sample.algorithm", "ddim", "config.sample.algorithm = 'ddim': not one of"),
    ("optimizer.betas", (0.9, 1.2), "config.optimizer.betas = (0.9, 1.2): must be two numbers in [0, 1)"),
    ("nnet.patch_size", 3, "config.nnet.patch_size = 3: does not divide nnet.img_size = 32"),
    ("nnet.num_heads", 3, "config.nnet.num_heads = 3: does not divide nnet.embed_dim = 64"),
    ("grad_clip", -1.0, "config.grad_clip = -1.0: must be >= 0"),
])
def test_out_of_range_values_name_the_key(key, value, expected):
    config = base()
    parent, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if parent:  # rebuilt, because ConfigDict refuses to turn an int field into a float
        config[parent] = ml_collections.ConfigDict({**config[parent].to_dict(), leaf: value})
    else:
        config[leaf] = value
    with pytest.raises(ConfigError) as info:
        parse_and_validate(config, world_size=1)
    assert str(info.value).startswith(expected), str(info.value)


def _leaves(config, prefix=""):
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _with(config, key, value):
    """config with key set to value, whatever its type (ConfigDict refuses type changes; a config file need not)."""
    d = config.to_dict()
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


def _wrong_type(default):
    """A value of another type than `default`, as a slip in a config file gives."""
    if isinstance(default, bool):
        return "yes"
    if isinstance(default, (int, float)):
        return "1"
    if isinstance(default, str):
        return 7
    if isinstance(default, tuple):
        return (0.5,)
    return "seven"  # a None default: a shape, a scale or a path, none of which this is


def _every_key():
    from configs.base import get_config
    from libs.uvit import UViT
    nnet = {k: p.default for k, p in __import__("inspect").signature(UViT.__init__).parameters.items()
            if k not in ("self", "norm_layer")}
    return [*_leaves(get_config()), *((f"nnet.{k}", v) for k, v in nnet.items())]


# Every number with a range, and every name with a list of choices: a value outside it.
OUT_OF_RANGE = {
    "autoencoder.scale_factor": 0.0, "train.n_steps": 0, "train.batch_size": -8, "train.log_interval": 0,
    "train.eval_interval": -1, "train.save_interval": 0, "train.keep_last_ckpts": -1,
    "train.max_nonfinite_in_a_row": 0, "train.max_nonfinite_in_window": 0, "train.nonfinite_window": 0,
    "optimizer.lr": -1e-4, "optimizer.weight_decay": -0.1, "optimizer.betas": (0.9, 1.0),
    "lr_scheduler.warmup_steps": -1, "ema_rate": 1.5, "grad_clip": -1.0, "dataset.p_uncond": 2.0,
    "sample.sample_steps": 0, "sample.n_samples": 0, "sample.mini_batch_size": 0, "grid.n_rows": 0,
    "grid.n_cols": 0, "grid.steps": 0, "fid.n_samples": 1, "fid.steps": 0, "dataloader.num_workers": -2,
    "pred": "x0_pred", "train.mode": "both", "optimizer.name": "sgd", "lr_scheduler.name": "linear",
    "sample.algorithm": "ddim", "grid.algorithm": "ddim", "wandb.mode": "on", "nnet.name": "dit",
    "nnet.img_size": 0, "nnet.patch_size": 0, "nnet.in_chans": 0, "nnet.embed_dim": -64, "nnet.depth": 0,
    "nnet.num_heads": 0, "nnet.mlp_ratio": 0.0, "nnet.qk_scale": -1.0, "nnet.num_classes": -2,
    "fid.inception_weights": "/no/such/inception.pth", "z_shape": (4, 32), "diffusion": "ddpm",
    "train.grad_accum_steps": 0, "init.path": "/no/such/weights.pth", "log_with": "mlflow",
    "metrics.names": "fid,fdd", "metrics.labels": "even", "metrics.seeds": "1,x", "metrics.npz": "s.tar",
    "metrics.reference": "/no/such/ref.npz", "metrics.resize": "tf", "metrics.kid_subsets": 0,
    "metrics.kid_subset_size": 0, "metrics.prc_k": 0, "metrics.prc_arithmetic": "float16",
    "metrics.dinov2_weights": "/no/such/dinov2.pth", "sample.guidance_interval_rule": "per_sample",
    "objective.path": "edm", "objective.prediction": "eps", "objective.time_dist": "beta",
    "objective.logit_std": 0.0, "objective.shift": 0.0, "sample.guidance_sigma_min": -1.0,
    "sample.guidance_sigma_max": -1.0, "sample.guide_path": "/no/such/guide.pth",
    "posthoc_ema.sigma_rels": (0.05, 0.3), "posthoc_ema.snapshot_interval": -1, "repa.resolution": 0,
    "repa.projector_dim": 0, "repa.weight": 0.0, "training_aids": ("no.such.module:Aid",),
    "fsdp.replicate": 0, "fsdp.mixed_precision": "fp16",
    "autoencoder.latent_scaling": "auto", "objective.shift_base_dim": -1.0,
    "objective.two_time_fraction": 1.5, "objective.weight_power": -1.0, "objective.weight_eps": 0.0,
    "objective.cfg_omega": 2.0, "objective.cfg_kappa": 1.0, "objective.cfg_t_min": -0.5, "objective.cfg_t_max": 1.5,
    "objective.second_time": "s", "objective.shortcut_steps": 100, "nnet.second_time": True}
# Free values: any number (seeds, guidance scales) or any string the dataset / loader checks where it reads it.
NO_RANGE = {"seed", "sample.scale", "grid.scale", "autoencoder.pretrained_path", "dataset.name", "sample.path",
            "wandb.project", "compile", "tf32", "optimizer.no_decay_for_embeddings_norms_biases", "dataset.cfg",
            "sample.cfg", "init.resize", "dataloader.pin_memory", "dataloader.persistent_workers", "nnet.qkv_bias",
            "nnet.mlp_time_embed", "nnet.use_checkpoint", "nnet.conv", "nnet.skip",
            "objective.logit_mean", "metrics.json", "metrics.dinov2_repo", "metrics.clip",  # checked where the file is written / loaded
            "fid.stat",  # missing statistics only turn training-time FID off (logged); eval checks them
            "repa.enabled", "repa.block",  # the block is checked against the network when it is built
            "repa.encoder", "repa.weights",  # checked when repa.enabled (test_repa_keys_are_checked_when_on)
            "fsdp.enabled", "fsdp.reshard_after_forward", "fsdp.cpu_offload", "fsdp.meta_init",
            "autoencoder.latent_stats"}  # read (one line when missing) where the autoencoder is built


@pytest.mark.parametrize("key, default", _every_key(), ids=[k for k, _ in _every_key()])
def test_every_key_with_a_wrong_type_or_out_of_range_stops_naming_it(key, default):
    """What train() and --dry_run call before any work: one line naming the key, for each bad value."""
    config = _with(base(), "nnet.qk_scale", None)
    assert key in OUT_OF_RANGE or key in NO_RANGE, f"{key}: new key: say what is out of range for it"
    bad = [_wrong_type(default)] + ([OUT_OF_RANGE[key]] if key in OUT_OF_RANGE else [])
    for value in bad:
        with pytest.raises(ConfigError) as info:
            parse_and_validate(_with(config, key, value), world_size=1)
        message = str(info.value)
        assert message.startswith(f"config.{key} = {value!r}: ") and "\n" not in message, (value, message)


def test_batch_that_does_not_split_over_processes():
    config = base()
    config.train.batch_size = 100
    with pytest.raises(ConfigError) as info:
        parse_and_validate(config, world_size=8)
    msg = str(info.value)
    assert msg.startswith("config.train.batch_size = 100: does not split over 8 process(es) x 1 micro-batch(es)")
    assert "--config.train.batch_size=96 or 104" in msg
    parse_and_validate(config, world_size=4)  # 100 = 4 x 25 is fine
    config.train.grad_accum_steps = 2  # 100 = 4 x 2 x 12.5 is not: each micro-batch must be whole
    with pytest.raises(ConfigError, match=r"over 4 process\(es\) x 2 micro-batch\(es\).*=96 or 104"):
        parse_and_validate(config, world_size=4)
    config.train.grad_accum_steps = 5
    parse_and_validate(config, world_size=4)  # 100 = 4 x 5 x 5


def test_init_resize_needs_weights_to_adapt():
    config = base()
    config.init.resize = True
    with pytest.raises(ConfigError, match="config.init.resize = True: has no effect without --init_from"):
        parse_and_validate(config, world_size=1)


def test_every_problem_is_reported_at_once():
    config = base()
    config.train.n_steps = -1
    config.optimizer.lr = -1.0
    with pytest.raises(ConfigError) as info:
        parse_and_validate(config, world_size=1)
    msg = str(info.value)
    assert msg.startswith("2 problems in the config: config.train.n_steps") and "; config.optimizer.lr" in msg
    assert "\n" not in msg


def test_latent_shape_must_match_the_network():
    config = base()
    config.z_shape = (4, 32, 32)
    with pytest.raises(ConfigError, match=r"config.nnet.in_chans = 3: differs from z_shape\[0\] = 4"):
        parse_and_validate(config, world_size=1)


def test_typo_override_suggests_the_closest_keys():
    config = base()
    with pytest.raises(ConfigError) as info:
        check_overrides(config, ["--config.nnet.dpth=4"])
    assert str(info.value) == "--config.nnet.dpth: the config has no key 'nnet.dpth'; did you mean --config.nnet.depth?"
    with pytest.raises(ConfigError, match=r"did you mean --config\.train\.batch_size\?"):
        check_overrides(config, ["--config.trian.batch_size=4"])
    assert suggest_keys("optimizer.weight_decy", config)[0] == "optimizer.weight_decay"
    check_overrides(config, ["--config.nnet.depth=4", "--workdir=x", "train.n_steps=3"])  # all fine


@pytest.mark.parametrize("override, expected", [
    ("--config.nnet.depth=abc", "--config.nnet.depth=abc: 'nnet.depth' takes an integer"),
    ("--config.train.n_steps=1.5", "--config.train.n_steps=1.5: 'train.n_steps' takes an integer"),
    ("--config.optimizer.lr=fast", "--config.optimizer.lr=fast: 'optimizer.lr' takes a number"),
    ("--config.dataset.cfg=maybe", "--config.dataset.cfg=maybe: 'dataset.cfg' takes a boolean"),
    ("--config.optimizer.betas=high", "--config.optimizer.betas=high: 'optimizer.betas' takes a tuple of numbers"),
])
def test_wrong_type_names_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        check_overrides(base(), [override])
    assert str(info.value).startswith(expected)


def test_right_types_pass():
    check_overrides(base(), ["--config.optimizer.lr=1e-3", "--config.optimizer.lr=1", "--config.dataset.cfg=true",
                             "--config.optimizer.betas=(0.9, 0.99)", "--config.seed=0x10"])


def _flag_values(argv):
    fv = flags.FlagValues()
    holder = define_config_flag("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return holder


def test_config_flag_parses_and_applies_overrides():
    cfg = os.path.join(ROOT, "configs", "cifar10_uvit_small.py")
    holder = _flag_values(["train.py", f"--config={cfg}", "--config.nnet.depth=4", "--config.optimizer.lr=1e-3"])
    assert holder.value.nnet.depth == 4 and holder.value.optimizer.lr == 1e-3


def test_config_flag_typo_is_a_clean_flags_error():
    cfg = os.path.join(ROOT, "configs", "cifar10_uvit_small.py")
    with pytest.raises(flags.IllegalFlagValueError, match=r"did you mean --config\.nnet\.depth\?"):
        _flag_values(["train.py", f"--config={cfg}", "--config.nnet.dpth=4"])
    with pytest.raises(flags.IllegalFlagValueError, match="config file '.*cifar_uvit_small.py' not found; did you mean"):
        _flag_values(["train.py", f"--config={os.path.join(ROOT, 'configs', 'cifar_uvit_small.py')}"])


def test_user_sees_one_line_not_a_traceback(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom absl import app\n"
        "from libs.config_utils import define_config_flag\nC = define_config_flag()\n"
        "app.run(lambda argv: None)\n")
    out = subprocess.run([sys.executable, str(script), f"--config={ROOT}/configs/cifar10_uvit_small.py",
                          "--config.train.batch_sise=64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "--config.train.batch_sise: the config has no key 'train.batch_sise'; did you mean " \
           "--config.train.batch_size?" in out.stderr


@pytest.mark.parametrize("config_path, overrides, expected", [
    ("configs/cifar10_uvit_small.py", [], "workdir/cifar10_uvit_small/default"),
    ("configs/mscoco_uvit_small.py", ["--config.nnet.depth=16"], "workdir/mscoco_uvit_small/depth=16"),
    ("configs/x.py", ["--config.nnet.depth=16", "--config.train.batch_size=64", "--workdir=y"],
     "workdir/x/depth=16-batch_size=64"),
    ("configs/x.py", ["--config.dataset.path=/data/in", "--config.autoencoder.pretrained_path=/a/b/kl.pth"],
     "workdir/x/pretrained_path=kl"),
])
def test_workdir_is_the_originals(config_path, overrides, expected):
    assert workdir_for(config_path, overrides) == expected


def test_config_overrides_picks_only_config_flags():
    argv = ["--config=c.py", "--config.a=1", "--workdir=w", "--noconfig.b", "--configx=2", "--config.c", "3",
            "--config.flag", "extra"]
    config = ml_collections.ConfigDict({"a": 0, "b": True, "c": 0, "flag": False})
    assert config_overrides(argv, config=config) == ["--config.a=1", "--noconfig.b", "--config.c=3", "--config.flag"]


def test_space_separated_override_is_checked():
    cfg = os.path.join(ROOT, "configs", "cifar10_uvit_small.py")
    with pytest.raises(flags.IllegalFlagValueError, match="'nnet.depth' takes an integer; got 'deep'"):
        _flag_values(["train.py", f"--config={cfg}", "--config.nnet.depth", "deep"])


def test_repa_keys_are_checked_when_on(tmp_path):
    config = base()
    config.repa.update(encoder="dino", weights=str(tmp_path / "none.pt"))
    parse_and_validate(config, world_size=1)  # off: not read
    config.repa.enabled = True
    with pytest.raises(ConfigError) as info:
        parse_and_validate(config, world_size=1)
    assert "config.repa.encoder = 'dino': not one of dinov2_vits14" in str(info.value)
    assert f"config.repa.weights = '{tmp_path / 'none.pt'}': does not exist" in str(info.value)
    config.repa.update(encoder="timm:vit_base_patch14_dinov2", weights="")
    parse_and_validate(config, world_size=1)
    config.posthoc_ema.sigma_rels = (0.05, 0.10, 0.2)  # any number of widths
    parse_and_validate(config, world_size=1)
