"""A run that ends on any error, saves what it can, refuses or applies config changes on resume, and holds
its workdir alone; on a real image folder read by two loader workers, a real full disk (tmpfs) and real
processes (a second holder, SIGKILL).

- A corrupt image deep in the data: train.py ends within a bounded time, non-zero, with one line, no process
  left behind, the cause in train.log and an emergency checkpoint of the last finished step; after the image
  is fixed, the rerun ends where an uninterrupted run on the fixed data does, bit for bit.
- The resume policy key by key, the changes applied for real (the lr each step used), the config history.
- One run per workdir: a live holder stops a run at once naming it; a SIGKILLed holder does not.
- A disk filling up during a checkpoint: one SaveError line, the earlier checkpoint intact.
- score.json's history across a resume.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import importlib.util
import numpy as np
import pytest
import torch
from PIL import Image

import libs.trainer as trainer
from libs import resume_policy, workdir_lock
from libs.checkpoint import checkpoint_problems, list_checkpoints, read_checkpoint
from libs.data_loader import epoch_permutation
from libs.errors import CheckpointError, ConfigError, DataError, WorkdirInUseError
from libs.family import PIXELS_CONTINUOUS
from libs.io_utils import SaveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS, BATCH, N_IMAGES, SEED = 10, 4, 48, 1234
BAD_STEP = 7  # the corrupt image is in the batch of step 7: steps 1..6 finish

pytestmark = pytest.mark.usefixtures("one_thread")

# The config both train.py (a config file) and the in-process runs use: the digits demo on an image folder.
CONFIG = """
import ml_collections
from configs.digits_uvit_tiny import get_config as digits


def get_config():
    config = digits()
    config.dataset = ml_collections.ConfigDict(dict(name='image_folder', path={path!r}, resolution=8, cfg=True,
                                                    p_uncond=0.1))
    config.nnet.update(in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    config.train.update(n_steps={n_steps}, batch_size={batch}, log_interval=2, eval_interval=1000, save_interval=4)
    config.lr_scheduler.warmup_steps = 2
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.update(n_samples=0)
    config.sample.update(n_samples=4, sample_steps=2, mini_batch_size=4)
    config.dataloader.update(num_workers=2, persistent_workers=False)
    config.log_with = ''
    config.seed = {seed}
    return config
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of 24 8x8 RGB PNGs, and a config file training on them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(N_IMAGES // 2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    config_file = root.parent / f"{root.name}_config.py"
    config_file.write_text(CONFIG.format(path=str(root), n_steps=N_STEPS, batch=BATCH, seed=SEED))
    return str(root), str(config_file)


def load_config(config_file, **train):
    spec = importlib.util.spec_from_file_location("robust_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.update(train)
    return config


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _weights(ckpt):
    states = read_checkpoint(ckpt)
    return {k: states[k] for k in ("nnet.pth", "nnet_ema.pth", "optimizer.pth")}, states["train_state.pth"]["data"]


def _assert_same(a, b):
    (wa, da), (wb, db) = a, b
    for name in ("nnet.pth", "nnet_ema.pth"):
        assert all(torch.equal(wa[name][k], wb[name][k]) for k in wa[name]), name
    sa, sb = wa["optimizer.pth"]["state"], wb["optimizer.pth"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert da == db


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The uninterrupted run on the good images."""
    workdir = tmp_path_factory.mktemp("reference")
    trainer.train(load_config(images[1]), str(workdir), PIXELS_CONTINUOUS)
    return _weights(workdir / "ckpts" / f"{N_STEPS}.ckpt")


def _file_at(folder, position):
    """The image file the data stream reads at `position` (epoch 0)."""
    from libs.datasets.image_folder import ImageFolder
    data = ImageFolder(folder, 8)
    return data.train.path(int(epoch_permutation(len(data.train), SEED, 0)[position]))


def _alive_in_group(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _run_with_empty_file(bad, argv, timeout, merge_output):
    """Run argv in its own process group while `bad` is a 0-byte file (as an interrupted copy leaves), then put
    its bytes back; kills whatever of the group is left. Returns (process, stderr or stdout+stderr, seconds)."""
    good_bytes = open(bad, "rb").read()
    try:
        with open(bad, "wb"):
            pass
        start = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE if merge_output else
                                subprocess.DEVNULL, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out = proc.communicate(timeout=timeout)[0 if merge_output else 1]
        finally:
            if _alive_in_group(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        return proc, out, time.time() - start
    finally:
        with open(bad, "wb") as f:
            f.write(good_bytes)


def test_corrupt_image_deep_in_the_data_ends_the_run_saves_and_resumes_exactly(images, reference, tmp_path):
    folder, config_file = images
    bad = _file_at(folder, (BAD_STEP - 1) * BATCH + 1)
    workdir = tmp_path / "run"
    proc, err, elapsed = _run_with_empty_file(
        bad, [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_file}", f"--workdir={workdir}"],
        timeout=120, merge_output=False)
    # Before the fix the process printed the error and then waited on its loader workers forever.
    assert proc.returncode == 1, err[-3000:]
    assert elapsed < 90
    assert not _alive_in_group(proc.pid), "a loader worker outlived the run"
    line = f"DataError: cannot read image '{bad}'"
    assert err.strip().splitlines()[-1].startswith(line) and "replace or delete it" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    # The last finished step is saved, beside the periodic checkpoint of step 4.
    assert [s for s, _ in list_checkpoints(workdir / "ckpts")] == [BAD_STEP - 1, 4]
    assert f"emergency checkpoint of step {BAD_STEP - 1}" in err
    assert read_checkpoint(workdir / "ckpts" / f"{BAD_STEP - 1}.ckpt")["train_state.pth"]["data"]["position"] == \
        (BAD_STEP - 1) * BATCH
    log = (workdir / "train.log").read_text().strip().splitlines()
    assert log[-1].endswith(f"the run stopped: {err.strip().splitlines()[-1]}")

    resumed = trainer.train(load_config(config_file), str(workdir), PIXELS_CONTINUOUS)
    assert resumed["step"] == N_STEPS
    _assert_same(_weights(workdir / "ckpts" / f"{N_STEPS}.ckpt"), reference)


def test_init_from_mismatch_is_written_to_train_log(images, tmp_path):
    from libs.nnet import build_nnet
    config = load_config(images[1], n_steps=2)
    other = build_nnet({**config.nnet.to_dict(), "embed_dim": 64, "num_heads": 4})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    config.init.path = str(tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as info:
        trainer.train(config, str(tmp_path / "run"), PIXELS_CONTINUOUS)
    last = (tmp_path / "run" / "train.log").read_text().strip().splitlines()[-1]
    assert last.endswith(f"the run stopped: CheckpointError: {info.value}")


# -- the resume policy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,refused", [
    ("nnet.depth", 3, True), ("nnet.embed_dim", 64, True), ("nnet.num_classes", 5, True), ("diffusion", "discrete", True),
    ("pred", "v", True), ("dataset.name", "digits", True), ("dataset.path", "/elsewhere", True),
    ("dataset.resolution", 16, True), ("autoencoder.scale_factor", 0.2, True),
    ("optimizer.no_decay_for_embeddings_norms_biases", True, True), ("unlisted_new_key", 2, True),
    ("train.n_steps", 99, False), ("train.batch_size", 16, False), ("train.log_interval", 1, False),
    ("train.save_interval", 9, False), ("train.eval_interval", 9, False), ("train.grad_accum_steps", 2, False),
    ("train.keep_last_ckpts", 2, False), ("optimizer.lr", 0.01, False), ("optimizer.weight_decay", 0.0, False),
    ("optimizer.betas", [0.9, 0.999], False), ("lr_scheduler.name", "cosine", False),
    ("lr_scheduler.warmup_steps", 7, False), ("ema_rate", 0.123, False), ("grad_clip", 2.5, False),
    ("seed", 7, False), ("sample.sample_steps", 9, False), ("fid.n_samples", 100, False), ("grid.n_rows", 3, False),
    ("log_with", "tensorboard", False), ("dataloader.num_workers", 0, False), ("dataset.p_uncond", 0.2, False),
    ("dataset.cfg", False, False), ("dataset.random_flip", False, False), ("compile", True, False)])
def test_resume_policy_key_by_key(images, key, value, refused):
    old = load_config(images[1]).to_dict()
    old["unlisted_new_key"], old["dataset"]["random_flip"] = 1, True
    new = resume_policy.flatten(old)
    new[key] = value
    nested = {}
    for k, v in new.items():
        node = nested
        *parts, leaf = k.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[leaf] = v
    refused_, applied = resume_policy.compare(old, nested)
    assert [k for k, _, _ in (refused_ if refused else applied)] == [key]
    assert not (applied if refused else refused_)


def test_init_path_is_not_compared(images):
    old = load_config(images[1]).to_dict()
    new = load_config(images[1]).to_dict()
    new["init"]["path"] = "/some/weights.pth"
    assert resume_policy.compare(old, new) == ([], [])


def test_resume_refuses_a_changed_network_or_dataset_before_any_step(images, tmp_path, monkeypatch):
    folder, config_file = images
    trainer.train(load_config(config_file, n_steps=2, save_interval=2), str(tmp_path), PIXELS_CONTINUOUS)
    calls = []
    monkeypatch.setattr(trainer, "train_step", lambda *a: calls.append(a))
    config = load_config(config_file, n_steps=4)
    config.nnet.depth = 4
    config.dataset.path = folder + "_copy"
    shutil.copytree(folder, config.dataset.path)
    with pytest.raises(ConfigError) as info:
        trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    message = str(info.value)
    assert "2.ckpt" in message and "cannot change in a resumed run" in message
    assert f"dataset.path: {folder!r} -> {config.dataset.path!r}" in message and "nnet.depth: 2 -> 4" in message
    assert calls == [] and sorted(os.listdir(tmp_path / "ckpts")) == ["2.ckpt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("config.resume-at-")]


def test_resume_applies_lr_schedule_and_batch_size_for_real(images, tmp_path, monkeypatch):
    _, config_file = images
    first = load_config(config_file, n_steps=4, save_interval=4)
    trainer.train(first, str(tmp_path), PIXELS_CONTINUOUS)
    used, real = {}, trainer.train_step

    def recording(r, batch, step):
        used[step + 1] = (r.optimizer.param_groups[0]["lr"], sum(len(b["x"]) for b in batch))
        return real(r, batch, step)

    monkeypatch.setattr(trainer, "train_step", recording)
    config = load_config(config_file, n_steps=8, save_interval=4, batch_size=8, log_interval=1)
    config.optimizer.lr = 1e-2
    config.lr_scheduler.warmup_steps = 6
    out = trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    # The new peak lr with the new warm-up from step 4 on (the old run: 2e-3 after 2 warm-up steps), batches of 8.
    assert used == {s: (pytest.approx(1e-2 * min((s - 1) / 6, 1.0), rel=1e-12), 8) for s in range(5, 9)}
    assert out["run"].lr_scheduler.base_lrs == [1e-2]
    assert read_checkpoint(tmp_path / "ckpts" / "8.ckpt")["train_state.pth"]["data"]["position"] == 4 * BATCH + 4 * 8
    log = (tmp_path / "train.log").read_text()
    for line in ("resume: optimizer.lr 0.002 -> 0.01", "resume: lr_scheduler.warmup_steps 2 -> 6",
                 "resume: train.n_steps 4 -> 8", "resume: train.log_interval 2 -> 1",
                 f"resume: train.batch_size {BATCH} -> 8 (the data stream continues at sample {4 * BATCH}"):
        assert line in log, line
    # Every start's resolved config is kept.
    import json
    history = [json.load(open(p)) for p in resume_policy.config_history(str(tmp_path))]
    assert [h["optimizer"]["lr"] for h in history] == [2e-3, 1e-2]
    assert os.path.basename(resume_policy.config_history(str(tmp_path))[1]) == "config.resume-at-4.json"


# -- one run per workdir -------------------------------------------------------------------------------------

_HOLDER = ("import sys, time; sys.path.insert(0, {root!r}); from libs.workdir_lock import acquire; "
           "acquire({workdir!r}); print('held', flush=True); time.sleep(600)")


def test_a_live_holder_stops_a_second_run_and_a_killed_one_does_not(images, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, workdir=workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        calls = []
        monkeypatch.setattr(trainer, "train_step", lambda *a: calls.append(a))
        with pytest.raises(WorkdirInUseError) as info:
            trainer.train(load_config(images[1], n_steps=2), workdir, PIXELS_CONTINUOUS)
        message = str(info.value)
        assert f"the workdir '{workdir}' is in use by another run (host " in message
        assert f"pid {holder.pid}, started " in message and "another --workdir" in message
        assert calls == [] and not os.path.exists(os.path.join(workdir, "ckpts"))
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait(timeout=30)
        monkeypatch.undo()
        out = trainer.train(load_config(images[1], n_steps=2), workdir, PIXELS_CONTINUOUS)
        assert out["step"] == 2
        assert f"pid {os.getpid()}," in open(os.path.join(workdir, ".lock")).read()
    finally:
        holder.kill()
        holder.wait()


class _Rank:
    """What WorkdirLock reads from an accelerate.Accelerator, for rank `index` of 2 whose main failed or not."""

    def __init__(self, index, main_failed):
        self.is_main_process, self.num_processes, self.device = index == 0, 2, torch.device("cpu")
        self.main_failed = main_failed

    def reduce(self, t, op):
        return t + float(self.main_failed)


def test_several_processes_hold_the_lock_once(tmp_path):
    with workdir_lock.WorkdirLock(_Rank(1, main_failed=False), str(tmp_path)) as lock:
        assert lock.path is None and not os.path.exists(tmp_path / ".lock")  # only the main process locks
    with pytest.raises(WorkdirInUseError, match="the main process could not take"):
        workdir_lock.WorkdirLock(_Rank(1, main_failed=True), str(tmp_path)).__enter__()


# -- a full disk ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (one tiny checkpoint fits, not two), where root may mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(images, small_disk):
    workdir = small_disk / "run"
    config = load_config(images[1], n_steps=8, save_interval=2)
    with pytest.raises(SaveError) as info:
        trainer.train(config, str(workdir), PIXELS_CONTINUOUS)
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint file '{workdir}/ckpts/4.ckpt/")
    assert "No space left on device" in message and "previous checkpoint is intact" in message
    assert "\n" not in message
    assert [s for s, _ in list_checkpoints(workdir / "ckpts")] == [2]
    read_checkpoint(workdir / "ckpts" / "2.ckpt")  # whole, CRCs included
    assert [n for n in os.listdir(workdir / "ckpts") if n.startswith(".")] == []  # no half-written temporary
    log = (workdir / "train.log").read_text()
    assert "no emergency checkpoint of step 4" in log  # tried, the disk was still full
    assert log.strip().splitlines()[-1].endswith(f"the run stopped: SaveError: {message}")


# -- the score history across a resume -----------------------------------------------------------------------

def test_score_history_survives_a_resume(tmp_path):
    import json

    from configs.digits_uvit_tiny import get_config
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update(n_steps=2, batch_size=16, log_interval=1, eval_interval=1000, save_interval=2)
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.update(n_samples=8, steps=2)
    config.sample.update(n_samples=8, sample_steps=2, mini_batch_size=8)
    config.log_with = ''
    first = trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    # The checkpoint is written before its evaluation: its own history lacks step 2.
    assert 2 not in read_checkpoint(tmp_path / "ckpts" / "2.ckpt")["train_state.pth"]["history"]["score"]
    config.train.n_steps = 4
    second = trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    scores = json.loads((tmp_path / "score.json").read_text())["score"]
    assert sorted(scores) == ["2", "4"]
    assert scores["2"] == pytest.approx(first["score"])
    assert second["run"].history["score"][2] == pytest.approx(first["score"])
    assert 2 in read_checkpoint(tmp_path / "ckpts" / "4.ckpt")["train_state.pth"]["history"]["score"]


@pytest.mark.slow  # two training processes under torchrun: ~40 s on 2 shared cores
def test_a_bad_image_on_another_rank_ends_the_whole_job(images, tmp_path):
    """Rank 1 of 2 meets the corrupt image: it saves the last finished step and exits; rank 0, blocked in the
    gradient all-reduce, fails at once (gloo: connection closed) and torchrun ends the job non-zero."""
    folder, config_file = images
    position = (BAD_STEP - 1) * BATCH + 1  # odd: rank 1's (rank r reads r, r + 2, ...)
    bad = _file_at(folder, position)
    workdir = tmp_path / "run"
    proc, out, elapsed = _run_with_empty_file(
        bad, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "train.py"), f"--config={config_file}", f"--workdir={workdir}"],
        timeout=300, merge_output=True)
    assert proc.returncode != 0 and elapsed < 200, out[-3000:]
    assert not _alive_in_group(proc.pid)
    assert f"DataError: cannot read image '{bad}'" in out
    assert [s for s, _ in list_checkpoints(workdir / "ckpts")] == [BAD_STEP - 1, 4]
    assert read_checkpoint(workdir / "ckpts" / f"{BAD_STEP - 1}.ckpt")["train_state.pth"]["data"]["position"] == \
        (BAD_STEP - 1) * BATCH
    log = (workdir / "train.log").read_text()
    assert "2 process(es) on cpu" in log  # the world size this test claims
    assert f"rank 1: the run stopped: DataError: cannot read image '{bad}'" in log  # the cause, from rank 1
