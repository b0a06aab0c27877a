"""Every bad input the table in docs/robustness.md lists, and the message the user sees for it.

Each case is a test: it must raise the documented kind of error (or log the documented warning)
with a message that says what is wrong and what to do. The table in docs/robustness.md is
rendered from these same cases and checked here, so it cannot drift; after changing a message,
regenerate it with

    python tests/test_bad_inputs.py
"""
import dataclasses
import errno
import logging
import os
import re
import subprocess
import sys
import tempfile
import types
from typing import Callable

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from libs.errors import (CheckpointError, ConfigError, DataError, MissingFileError, TrainingDivergedError,  # noqa: E402
                         WorkdirInUseError)
from libs.io_utils import SaveError  # noqa: E402

DOC = os.path.join(ROOT, "docs", "robustness.md")
START, END = "<!-- bad-inputs-table:start -->", "<!-- bad-inputs-table:end -->"
DIGITS = os.path.join(ROOT, "configs", "digits_uvit_tiny.py")
WARNING = "warning"
USAGE = "usage error, exit status 1"  # absl prints the line and exits before main runs


@dataclasses.dataclass
class Case:
    id: str
    what: str  # what the user did, as the table shows it
    trigger: Callable  # trigger(tmp) raises the error, or returns the logged warning for kind=WARNING
    kind: object  # the exception class, or WARNING
    says: tuple  # fragments the message must contain: the culprit and what to do
    shown_as: str = ""  # the table's "error" column when it is not the exception's name


# ----------------------------------------------------------------------------- triggers

def _flags(*args):
    """Parse a train.py command line; returns absl's one-line error as the user sees it."""
    from absl import flags

    from libs.config_utils import define_config_flag
    argv = ["train.py", f"--config={DIGITS}", *args] if not any(a.startswith("--config=") for a in args) \
        else ["train.py", *args]
    fv = flags.FlagValues()
    define_config_flag("config", flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        # absl.app prints exactly this line (then the usage hint) and exits with status 1.
        raise ConfigError(f"FATAL Flags parsing error: {e}") from e


def _config():
    from configs.digits_uvit_tiny import get_config
    return get_config()


def _validate(world_size=1, **changes):
    """parse_and_validate on the digits config with `changes` ({'train.n_steps': -10})."""
    import ml_collections

    from libs.config_utils import parse_and_validate
    config = _config()
    for key, value in changes.items():
        section, leaf = key.rsplit(".", 1) if "." in key else (None, key)
        if section is None:
            config = ml_collections.ConfigDict({**config.to_dict(), leaf: value})
        else:  # rebuilt: ConfigDict refuses type changes, which a config file may well contain
            config[section] = ml_collections.ConfigDict({**config[section].to_dict(), leaf: value})
    parse_and_validate(config, world_size=world_size)


def _tiny_run(width=8):
    net, ema = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
    opt = torch.optim.AdamW(net.parameters())
    return dict(nnet=net, nnet_ema=ema, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1))


def _saved_checkpoints(tmp, steps=(100, 200)):
    from libs.checkpoint import save_checkpoint
    torch.manual_seed(0)
    return [save_checkpoint(os.path.join(tmp, "ckpts"), s, **_tiny_run(), train_state={}) for s in steps]


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def nnet_path_truncated(tmp):
    from libs.export import load_weights
    _, newest = _saved_checkpoints(tmp)
    _truncate(os.path.join(newest, "nnet_ema.pth"), 500)
    load_weights(newest)


def nnet_path_truncated_file(tmp):
    from libs.export import load_weights
    path = os.path.join(tmp, "nnet_ema.pth")
    torch.save(torch.nn.Linear(8, 8).state_dict(), path)
    _truncate(path, 500)
    load_weights(path)


def nnet_path_missing(tmp):
    from libs.export import load_weights
    load_weights(os.path.join(tmp, "ckpts", "300.ckpt"))


def nnet_path_not_a_state_dict(tmp):
    from libs.export import load_weights
    path = os.path.join(tmp, "optimizer.pth")
    torch.save(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict(), path)
    load_weights(path)


def checkpoint_of_another_config(tmp):
    from libs.checkpoint import resume, save_checkpoint
    from libs.nnet import build_nnet
    cfg = dict(name="uvit", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
               num_classes=11)
    small = build_nnet(cfg)
    opt = torch.optim.AdamW(small.parameters())
    path = save_checkpoint(os.path.join(tmp, "ckpts"), 100, nnet=small, nnet_ema=small, optimizer=opt,
                           lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1), train_state={})
    resume(os.path.dirname(path), nnet=build_nnet({**cfg, "embed_dim": 64, "num_heads": 4}), nnet_ema=None,
           optimizer=None, lr_scheduler=None)


def init_from_other_network(tmp):
    from libs.finetune import init_weights
    from libs.nnet import build_nnet
    config = _config()
    other = build_nnet({**config.nnet.to_dict(), "num_classes": 21})  # 20 classes + the null label
    torch.save(other.state_dict(), os.path.join(tmp, "nnet_ema.pth"))
    init_weights(build_nnet(config.nnet), os.path.join(tmp, "nnet_ema.pth"))


def _warnings_of(fn, logger_name):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler, old_level, old_propagate = Keep(level=logging.WARNING), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # the message belongs in the table, not on the console
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return "\n".join(records)


def resume_truncated_newest(tmp):
    import libs.checkpoint as ckpt
    _, newest = _saved_checkpoints(tmp)
    _truncate(os.path.join(newest, "optimizer.pth"), 500)
    message = _warnings_of(lambda: ckpt.latest_checkpoint(os.path.join(tmp, "ckpts")), "libs.checkpoint")
    return message


def disk_full(tmp, monkeypatch):
    """A real ENOSPC from the kernel: a 1 MB tmpfs where root may mount one (the first, tiny checkpoint fits, the
    second's nnet.pth does not), else every checkpoint file opened on /dev/full."""
    import builtins

    import libs.checkpoint as ckpt
    disk = os.path.join(tmp, "disk")
    os.makedirs(disk)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", disk],
                             capture_output=True).returncode == 0
    try:
        torch.manual_seed(0)
        ckpt.save_checkpoint(os.path.join(disk, "ckpts"), 100, **_tiny_run(), train_state={})
        if not mounted:
            monkeypatch.setattr(ckpt, "open", lambda file, mode: builtins.open("/dev/full", mode), raising=False)
        big = torch.nn.Linear(600, 600)  # 1.4 MB of weights
        opt = torch.optim.AdamW(big.parameters())
        try:
            ckpt.save_checkpoint(os.path.join(disk, "ckpts"), 200, nnet=big, nnet_ema=big, optimizer=opt,
                                 lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1), train_state={})
        finally:
            monkeypatch.undo()
            ckpt.read_checkpoint(os.path.join(disk, "ckpts", "100.ckpt"))  # the earlier one is whole
            assert [n for n, _ in ckpt.list_checkpoints(os.path.join(disk, "ckpts"))] == [100]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", disk], check=False)


def corrupt_image(tmp):
    from libs.datasets.image_folder import ImageFolder
    os.makedirs(os.path.join(tmp, "pets", "cat"))
    open(os.path.join(tmp, "pets", "cat", "0001.jpg"), "wb").close()  # 0 bytes: an interrupted copy
    ImageFolder(os.path.join(tmp, "pets"), 8).train[0]


_HOLDER = "import sys, time; sys.path.insert(0, sys.argv[1]); from libs.workdir_lock import acquire; " \
          "acquire(sys.argv[2]); print('held', flush=True); time.sleep(600)"


def workdir_in_use(tmp):
    from libs.workdir_lock import acquire
    workdir = os.path.join(tmp, "workdir")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, ROOT, workdir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        try:
            acquire(workdir)
        except WorkdirInUseError as e:  # the holder's host, pid and start time vary: shown as placeholders
            raise WorkdirInUseError(re.sub(r"\(host .*?, pid \d+, started [^)]*\)",
                                           "(host <host>, pid <pid>, started <time>)", str(e))) from None
    finally:
        holder.kill()
        holder.wait()


def resume_changed_network(tmp):
    from libs import resume_policy
    old = _config()
    new = _config()
    new.nnet.depth, new.optimizer.lr = 16, 1e-4
    resume_policy.check((os.path.join(tmp, "ckpts", "300.ckpt"), old.to_dict()), new.to_dict())


def tracker_folder_blocked(tmp):
    from accelerate import Accelerator

    from libs import tracking
    config = _config()
    config.log_with = "tensorboard"
    with open(os.path.join(tmp, "tensorboard"), "w"):
        pass  # a file where the tracker's folder goes
    tracking.start_trackers(Accelerator(cpu=True, **tracking.accelerator_kwargs(config, tmp)), config, tmp)


def keep_last_zero(tmp):
    from libs.checkpoint import save_checkpoint
    save_checkpoint(os.path.join(tmp, "ckpts"), 100, **_tiny_run(), train_state={}, keep_last=0)


def nan_loss(tmp):
    from libs.trainer import check_finite
    _, damaged = _saved_checkpoints(tmp, steps=(100, 150))
    _truncate(os.path.join(damaged, "nnet.pth"), 10)  # a damaged newer one must not be named as good
    nonfinite = torch.zeros(161, dtype=torch.bool)
    nonfinite[158:] = True  # steps 158, 159, 160
    run = types.SimpleNamespace(
        config=_config(), accelerator=types.SimpleNamespace(reduce=lambda t, op: t), nonfinite=nonfinite,
        checked=150, bad_steps=set(), ckpt_root=os.path.join(tmp, "ckpts"))
    check_finite(run, 160)


def dataset_missing(tmp):
    import urllib.error
    from unittest import mock

    import torchvision

    from libs.datasets import get_dataset
    # Offline: torchvision's downloader fails as it does without a network.
    with mock.patch.object(torchvision.datasets, "CIFAR10", side_effect=urllib.error.URLError("no network")):
        get_dataset("cifar10", path=os.path.join(tmp, "assets", "datasets", "cifar10"))


def autoencoder_missing(tmp):
    from libs.autoencoder import get_model
    get_model(os.path.join(tmp, "assets", "stable-diffusion", "autoencoder_kl.pth"))


def fid_stats_missing(tmp):
    from libs.fid import load_statistics
    load_statistics(os.path.join(tmp, "assets", "fid_stats", "fid_stats_cifar10_train_pytorch.npz"))


CASES = [
    # Command line and config.
    Case("typo-override", "`--config.nnet.dpth=4` (a typo)", lambda tmp: _flags("--config.nnet.dpth=4"), ConfigError,
         ("no key 'nnet.dpth'", "did you mean --config.nnet.depth?"), shown_as=USAGE),
    Case("typo-section", "`--config.trian.batch_size=64`", lambda tmp: _flags("--config.trian.batch_size=64"),
         ConfigError, ("did you mean --config.train.batch_size?",), shown_as=USAGE),
    Case("wrong-type-int", "`--config.train.n_steps=1e5` (an integer key)",
         lambda tmp: _flags("--config.train.n_steps=1e5"), ConfigError, ("'train.n_steps' takes an integer", "'1e5'"), shown_as=USAGE),
    Case("wrong-type-bool", "`--config.dataset.cfg=yes please`", lambda tmp: _flags("--config.dataset.cfg=yes please"),
         ConfigError, ("'dataset.cfg' takes a boolean",), shown_as=USAGE),
    Case("config-file-typo", "`--config=configs/digits_uvit_tiy.py`",
         lambda tmp: _flags(f"--config={os.path.join(ROOT, 'configs', 'digits_uvit_tiy.py')}"), ConfigError,
         ("not found", "did you mean", "digits_uvit_tiny.py"), shown_as=USAGE),
    Case("negative-steps", "`train.n_steps = -10`", lambda tmp: _validate(**{"train.n_steps": -10}), ConfigError,
         ("config.train.n_steps", "must be > 0")),
    Case("zero-interval", "`train.save_interval = 0`", lambda tmp: _validate(**{"train.save_interval": 0}),
         ConfigError, ("config.train.save_interval", "must be > 0")),
    Case("float-interval", "`train.log_interval = 2.5`", lambda tmp: _validate(**{"train.log_interval": 2.5}),
         ConfigError, ("config.train.log_interval", "must be an integer")),
    Case("patch-size", "`nnet.patch_size = 3` with `nnet.img_size = 16`",
         lambda tmp: _validate(**{"nnet.img_size": 16, "nnet.patch_size": 3}), ConfigError,
         ("config.nnet.patch_size", "does not divide nnet.img_size = 16", "2 or 4")),
    Case("heads", "`nnet.num_heads = 3` with `nnet.embed_dim = 128`",
         lambda tmp: _validate(**{"nnet.embed_dim": 128, "nnet.num_heads": 3}),
         ConfigError, ("config.nnet.num_heads", "does not divide nnet.embed_dim = 128")),
    Case("batch-split", "`train.batch_size = 100` on 8 processes",
         lambda tmp: _validate(world_size=8, **{"train.batch_size": 100}), ConfigError,
         ("config.train.batch_size", "does not split over 8 process(es)", "--config.train.batch_size=96 or 104")),
    Case("grad-accum-split", "`train.batch_size = 100` with `train.grad_accum_steps = 8` on one process",
         lambda tmp: _validate(**{"train.batch_size": 100, "train.grad_accum_steps": 8}), ConfigError,
         ("config.train.batch_size", "1 process(es) x 8 micro-batch(es)", "--config.train.batch_size=96 or 104")),
    Case("log-with", "`log_with = 'tensorbaord'`", lambda tmp: _validate(log_with="tensorbaord"), ConfigError,
         ("config.log_with", "did you mean 'tensorboard'?")),
    Case("init-from-missing", "`--init_from` a path that does not exist",
         lambda tmp: _validate(**{"init.path": os.path.join(tmp, "300.ckpt")}), ConfigError,
         ("config.init.path", "300.ckpt", "does not exist", "exported folder")),
    Case("init-from-mismatch", "`--init_from` weights of another network (without `--config.init.resize=True`)",
         init_from_other_network, CheckpointError, ("--init_from", "label_emb.weight", "--config.init.resize=True")),
    Case("p-uncond", "`dataset.p_uncond = 1.5`", lambda tmp: _validate(**{"dataset.p_uncond": 1.5}), ConfigError,
         ("config.dataset.p_uncond", "must be in [0, 1]")),
    Case("lr-zero", "`optimizer.lr = 0`", lambda tmp: _validate(**{"optimizer.lr": 0.0}), ConfigError,
         ("config.optimizer.lr", "must be > 0")),
    Case("betas", "`optimizer.betas = (0.9, 1.5)`", lambda tmp: _validate(**{"optimizer.betas": (0.9, 1.5)}),
         ConfigError, ("config.optimizer.betas", "two numbers in [0, 1)")),
    Case("ema-rate", "`ema_rate = 1.0`", lambda tmp: _validate(ema_rate=1.0), ConfigError,
         ("config.ema_rate", "must be in [0, 1)")),
    Case("optimizer-name", "`optimizer.name = 'adam'`", lambda tmp: _validate(**{"optimizer.name": "adam"}),
         ConfigError, ("config.optimizer.name", "did you mean 'adamw'?")),
    Case("scheduler-name", "`lr_scheduler.name = 'cosin'`", lambda tmp: _validate(**{"lr_scheduler.name": "cosin"}),
         ConfigError, ("config.lr_scheduler.name", "did you mean 'cosine'?")),
    Case("sampler-name", "`sample.algorithm = 'dpm_solver++'`",
         lambda tmp: _validate(**{"sample.algorithm": "dpm_solver++"}), ConfigError,
         ("config.sample.algorithm", "not one of", "'dpm_solver++_2m'")),
    Case("fid-one-sample", "`fid.n_samples = 1`", lambda tmp: _validate(**{"fid.n_samples": 1}), ConfigError,
         ("config.fid.n_samples", "0 (no FID during training) or >= 2")),
    Case("inception-missing", "`fid.inception_weights` a file that does not exist",
         lambda tmp: _validate(**{"fid.inception_weights": os.path.join(tmp, "pt_inception.pth")}), ConfigError,
         ("config.fid.inception_weights", "does not exist")),
    Case("diffusion", "`diffusion = 'continous'`", lambda tmp: _validate(diffusion="continous"), ConfigError,
         ("config.diffusion", "did you mean 'continuous'?")),
    Case("type-in-file", "`train.batch_size = '128'` in a config file (a string)",
         lambda tmp: _validate(**{"train.batch_size": "128"}), ConfigError,
         ("config.train.batch_size", "must be an integer")),
    Case("bool-in-file", "`compile = 1` in a config file", lambda tmp: _validate(compile=1), ConfigError,
         ("config.compile", "must be a boolean")),
    Case("nnet-type", "`nnet.depth = 12.5`", lambda tmp: _validate(**{"nnet.depth": 12.5}), ConfigError,
         ("config.nnet.depth", "must be an integer")),
    Case("nonfinite-limit", "`train.max_nonfinite_in_a_row = 0`",
         lambda tmp: _validate(**{"train.max_nonfinite_in_a_row": 0}), ConfigError,
         ("config.train.max_nonfinite_in_a_row", "must be > 0")),
    Case("num-workers", "`dataloader.num_workers = -2`", lambda tmp: _validate(**{"dataloader.num_workers": -2}),
         ConfigError, ("config.dataloader.num_workers", "must be >= -1")),
    Case("several", "`train.n_steps = 0` and `optimizer.lr = -1`",
         lambda tmp: _validate(**{"train.n_steps": 0, "optimizer.lr": -1.0}), ConfigError,
         ("2 problems in the config", "config.train.n_steps", "config.optimizer.lr")),
    # Checkpoints.
    Case("nnet-path-truncated", "`--nnet_path` a checkpoint directory whose nnet_ema.pth was cut short",
         nnet_path_truncated, CheckpointError, ("nnet_ema.pth", "truncated", "earlier checkpoint")),
    Case("nnet-path-truncated-file", "`--nnet_path` a truncated .pth file", nnet_path_truncated_file, CheckpointError,
         ("nnet_ema.pth", "truncated or corrupt", "Copy it again")),
    Case("nnet-path-missing", "`--nnet_path` a path that does not exist", nnet_path_missing, MissingFileError,
         ("300.ckpt", "not found")),
    Case("nnet-path-optimizer", "`--nnet_path` an optimizer.pth", nnet_path_not_a_state_dict, CheckpointError,
         ("optimizer.pth", "not a network state dict", "nnet_ema.pth")),
    Case("checkpoint-mismatch", "resuming with a config whose network differs from the checkpoint's",
         checkpoint_of_another_config, CheckpointError, ("nnet.pth", "different shapes", "config.nnet")),
    Case("resume-truncated", "rerunning after the newest checkpoint was damaged (resume goes on from the previous "
         "one)", resume_truncated_newest, WARNING, ("skipping checkpoint", "200.ckpt", "optimizer.pth", "truncated")),
    Case("disk-full", "disk full while writing a checkpoint (a real ENOSPC: a full tmpfs, or /dev/full)", disk_full,
         SaveError, ("200.ckpt", "No space left on device", "previous checkpoint is intact")),
    Case("keep-last", "`keep_last=0`", keep_last_zero, CheckpointError, ("keep_last=0", "positive integer")),
    # Training.
    Case("nan-loss", "the loss stays NaN (e.g. a far too large learning rate; a single NaN step is skipped and "
         "logged)", nan_loss, TrainingDivergedError,
         ("step 160", "3 step(s) in a row", "max_nonfinite_in_a_row", "100.ckpt", "Lower config.optimizer.lr")),
    Case("resume-changed", "rerunning in a workdir with another network (`--config.nnet.depth=16`; the lr change "
         "beside it is allowed)", resume_changed_network, ConfigError,
         ("nnet.depth: 6 -> 16", "cannot change in a resumed run", "another --workdir",
          "nnet.depth changes the network's weights, so none of this run's carry over")),
    Case("workdir-in-use", "a second run on a workdir a live run holds", workdir_in_use, WorkdirInUseError,
         ("in use by another run", "host <host>, pid <pid>, started <time>", "another --workdir")),
    Case("tracker-folder", "`--config.log_with=tensorboard` where the workdir's `tensorboard` is a file",
         tracker_folder_blocked, ConfigError, ("cannot write the tracker's folder", "Not a directory",
                                               "--config.log_with=''")),
    # Data.
    Case("corrupt-image", "a 0-byte or corrupt image in an `image_folder` (with loader workers too: the run ends, "
         "saving the last finished step)", corrupt_image, DataError, ("0001.jpg", "replace or delete it")),
    # Missing files.
    Case("dataset-missing", "CIFAR10 is not in `config.dataset.path` and cannot be downloaded (offline)",
         dataset_missing, MissingFileError, ("CIFAR10", "could not be downloaded", "cifar-10-python.tar.gz")),
    Case("autoencoder-missing", "the autoencoder weights are not there", autoencoder_missing, MissingFileError,
         ("autoencoder_kl.pth", "not found")),
    Case("fid-stats-missing", "the FID reference statistics are not there", fid_stats_missing, MissingFileError,
         ("fid_stats_cifar10_train_pytorch.npz",)),
]


# ----------------------------------------------------------------------------- running and rendering

def run_case(case, tmp, monkeypatch):
    """The message the user sees for `case` (paths under `tmp` shown as <tmp>); checks its kind."""
    args = (tmp, monkeypatch) if case.trigger is disk_full else (tmp,)
    if case.kind == WARNING:
        message = case.trigger(*args)
        assert message, f"{case.id}: no warning was logged"
    else:
        with pytest.raises(case.kind) as info:
            case.trigger(*args)
        message = str(info.value)
    return normalize(message, tmp)


def normalize(message, tmp):
    message = message.replace(os.path.realpath(tmp), "<tmp>").replace(str(tmp), "<tmp>")
    return message.replace(ROOT + os.sep, "")


def render_table(messages):
    rows = ["| bad input | error | what the user sees |", "|---|---|---|"]
    for case in CASES:
        kind = case.shown_as or ("warning (logged)" if case.kind == WARNING else f"`{case.kind.__name__}`")
        text = messages[case.id].replace("|", "\\|").replace("\n", "<br>")
        rows.append(f"| {case.what} | {kind} | {text} |")
    return "\n".join(rows)


_seen = {}  # id -> message, filled by the parametrized tests so the table test need not rerun them


def all_messages():
    messages = dict(_seen)
    mp = pytest.MonkeyPatch()
    try:
        for case in CASES:
            if case.id in messages:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                messages[case.id] = run_case(case, tmp, mp)
            mp.undo()
    finally:
        mp.undo()
    return messages


def documented_table():
    with open(DOC) as f:
        text = f.read()
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_the_documented_message(case, tmp_path, monkeypatch):
    message = run_case(case, str(tmp_path), monkeypatch)
    _seen[case.id] = message
    missing = [s for s in case.says if s not in message]
    assert not missing, f"{case.id}: the message lacks {missing}:\n{message}"
    assert "Traceback" not in message


def test_table_in_docs_is_generated_from_these_cases():
    table = documented_table()
    assert table is not None, f"{DOC} lacks the {START} ... {END} section"
    assert table == render_table(all_messages()), \
        "docs/robustness.md's bad-input table is out of date: regenerate it with `python tests/test_bad_inputs.py`"


def test_scripts_show_the_message_without_a_traceback(monkeypatch):
    from libs.errors import exit_on_user_error

    def main(argv):
        _validate(**{"train.n_steps": -10})

    monkeypatch.delenv("UVIT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(main)(["train.py"])
    assert info.value.code == "ConfigError: config.train.n_steps = -10: must be > 0 (optimizer steps to train)"
    assert info.value.__cause__ is None and info.value.__suppress_context__
    monkeypatch.setenv("UVIT_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        exit_on_user_error(main)(["train.py"])


def _read_only_dir(tmp):
    """A folder this process cannot write: a read-only tmpfs where root may mount one, else mode 0o555."""
    folder = os.path.join(tmp, "readonly")
    os.makedirs(folder)
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder],
                          capture_output=True).returncode != 0:
            return None  # root ignores permissions, and may not mount here
    else:
        os.chmod(folder, 0o555)
    return folder


@pytest.mark.slow  # five script start-ups (~85 s on a shared 2-core machine)
def test_user_mistakes_end_in_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    """Each entry point with one mistake: the last stderr line names it, exit status 1, no traceback; an internal
    error (a wrong tensor shape inside the library) keeps its traceback."""
    tmp = str(tmp_path)
    readonly = _read_only_dir(tmp)
    os.makedirs(os.path.join(tmp, "tracked"))
    with open(os.path.join(tmp, "tracked", "tensorboard"), "w"):
        pass
    ckpt = os.path.join(tmp, "nnet_ema.pth")  # the digits network's shapes: only the class ids are wrong
    tiny = ["--config.nnet.embed_dim=32", "--config.nnet.depth=1", "--config.nnet.num_heads=2"]
    train = [sys.executable, "train.py", f"--config={DIGITS}", "--config.train.n_steps=1", *tiny]
    shape_bug = ("import torch; from libs.errors import exit_on_user_error; from libs.nnet import build_nnet; "
                 "net = build_nnet(dict(name='uvit', img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, "
                 "num_heads=2, num_classes=11)); exit_on_user_error(lambda: net(torch.zeros(2, 3, 8, 8), "
                 "torch.zeros(2), torch.zeros(2, dtype=torch.long)))()")
    commands = {
        "no --config": ([sys.executable, "train.py"], "ConfigError: no --config given"),
        "class id": ([sys.executable, "sample_class_cond.py", f"--config={DIGITS}", f"--nnet_path={ckpt}",
                      "--class_ids=3,12", "--device=cpu", *tiny], "ConfigError: --class_ids 12: outside 0..9"),
        "missing file": ([sys.executable, "sample_class_cond.py", f"--config={DIGITS}", "--class_ids=1",
                          f"--nnet_path={tmp}/nope.pth", "--device=cpu"], "MissingFileError: --nnet_path"),
        "tracker folder": (train + [f"--workdir={tmp}/tracked", "--config.log_with=tensorboard"],
                           "ConfigError: config.log_with='tensorboard': cannot write the tracker's folder"),
    }
    if readonly is not None:
        commands["read-only workdir"] = (train + [f"--workdir={readonly}/run"],
                                         f"ConfigError: cannot write to the workdir '{readonly}/run'")
    from libs.nnet import build_nnet
    torch.save(build_nnet(dict(name="uvit", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1,
                               num_heads=2, num_classes=11)).state_dict(), ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("UVIT_TRACEBACK", None)
    try:
        procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True) for name, (cmd, _) in commands.items()}
        bug = subprocess.Popen([sys.executable, "-c", shape_bug], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        for name, proc in procs.items():
            err = proc.communicate(timeout=300)[1]
            assert proc.returncode == 1, (name, err[-2000:])
            assert "Traceback" not in err, (name, err[-2000:])
            assert err.strip().splitlines()[-1].startswith(commands[name][1]), (name, err[-2000:])
        err = bug.communicate(timeout=300)[1]
        assert bug.returncode == 1 and "Traceback (most recent call last)" in err, err[-2000:]
    finally:
        if readonly is not None and os.geteuid() == 0:
            subprocess.run(["umount", "-l", readonly], check=False)


def test_every_case_has_a_distinct_id():
    assert len({c.id for c in CASES}) == len(CASES)


if __name__ == "__main__":
    table = render_table(all_messages())
    with open(DOC) as f:
        text = f.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    with open(DOC, "w") as f:
        f.write(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"wrote the table of {len(CASES)} bad inputs to {DOC}")
