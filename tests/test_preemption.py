"""Stop signals: the handler, data-loader workers that ignore them, ranks that agree, and in-process
training runs stopped by each signal mid-step and mid-save that resume to exactly the uninterrupted run.

The dataset is an image folder the test writes, read through one DataLoader worker; a "process group"
signal is sent to the training process and every child of it (its workers), as `kill -TERM -- -PGID` does.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import libs.checkpoint
import libs.trainer as trainer
from configs.digits_uvit_tiny import get_config
from libs.checkpoint import checkpoint_problems, list_checkpoints
from libs.data_loader import ResumableLoader
from libs.family import PIXELS_CONTINUOUS
from libs.preemption import SIGNALS, StopSignals, resume_command
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_sets_the_flag_repeats_are_ignored_and_handlers_restored(sig):
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run while StopSignals is active")

    old = signal.signal(sig, previous)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding another one: still the first
            assert stop.received == signal.Signals(sig).name
        assert signal.getsignal(sig) is previous
    finally:
        signal.signal(sig, old)


class Flags(torch.utils.data.Dataset):
    """Item i: whether the process reading it ignores every stop signal."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS])


def test_loader_workers_ignore_stop_signals():
    with StopSignals():
        batch = next(iter(ResumableLoader(Flags(), batch_size=2, num_workers=1)))
        assert batch.all()
        main = next(iter(ResumableLoader(Flags(), batch_size=2, num_workers=0)))
        assert not main.any()  # the training process itself keeps its handlers


_RANKS = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from libs.preemption import StopSignals

    class Acc:  # what should_stop reads from an accelerate.Accelerator
        num_processes, device = 2, torch.device("cpu")
        def reduce(self, t, op):
            dist.all_reduce(t)
            return t

    def run(rank):
        dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
        stop, stopped = StopSignals(), None
        for step in range(1, 30):
            if rank == 1 and step == 5:
                stop.received = "SIGTERM"  # only rank 1 is signalled, between sync steps
            if stop.should_stop(Acc(), sync=step % 4 == 0):
                stopped = step
                break
        # One write(2) per line: two processes share the pipe, and print may split a line in two writes.
        os.write(1, f"rank {{rank}} stopped at {{stopped}}: {{stop.received}}\\n".encode())
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.start_processes(run, nprocs=2, start_method="fork")
""")


def test_ranks_stop_together_at_the_next_sync_step(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS.format(root=ROOT, store=str(tmp_path / "store")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank"))
    # Rank 0 never got a signal, yet both stop at step 8, the first sync step after 5.
    assert lines == ["rank 0 stopped at 8: a signal received by another process", "rank 1 stopped at 8: SIGTERM"]


# -- training runs stopped by signals ------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8x8 RGB PNGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) // (1 if c == "a" else 2)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return str(root)


def config_for(images, **train):
    config = get_config()
    config.dataset = ml_collections.ConfigDict(dict(name="image_folder", path=images, resolution=8, cfg=True,
                                                    p_uncond=0.1, random_flip=True))  # resume must replay flips
    config.nnet.update(in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    config.train.update({"n_steps": N_STEPS, "batch_size": 8, "log_interval": 2, "eval_interval": 1000,
                         "save_interval": 1000, **train})
    config.lr_scheduler.warmup_steps = 2
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.update(n_samples=4, steps=2)  # no FID statistics: skipped
    config.sample.update(n_samples=4, sample_steps=2, mini_batch_size=4)
    config.dataloader.update(num_workers=1, persistent_workers=True)
    return config


def _children():
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as f:
        return [int(p) for p in f.read().split()]


def _send(sig, group):
    """To this process, and with group=True to its children too (the loader's worker), as a group kill does."""
    for pid in ([os.getpid()] + (_children() if group else [])):
        os.kill(pid, sig)


def _weights(path):
    return {name: torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            for name in ("nnet.pth", "nnet_ema.pth", "optimizer.pth", "train_state.pth")}


def _assert_same(a, b):
    for name in ("nnet.pth", "nnet_ema.pth"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    sa, sb = a["optimizer.pth"]["state"], b["optimizer.pth"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert a["train_state.pth"]["data"] == b["train_state.pth"]["data"]


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    trainer.train(config_for(image_folder), str(workdir), PIXELS_CONTINUOUS)
    return _weights(workdir / "ckpts" / f"{N_STEPS}.ckpt")


@pytest.mark.parametrize("sig,group,when", [
    (signal.SIGTERM, False, "step"), (signal.SIGTERM, True, "step"), (signal.SIGINT, True, "step"),
    (signal.SIGUSR1, False, "step"), (signal.SIGTERM, True, "save"), (signal.SIGINT, False, "save")])
def test_signal_saves_the_last_step_and_the_rerun_resumes_exactly(sig, group, when, image_folder, reference,
                                                                  tmp_path, monkeypatch):
    at = 3  # mid-step: inside train_step of step 3; mid-save: while writing the first file of the step-2 save
    real_step, real_write = trainer.train_step, libs.checkpoint._write

    def step_with_signal(r, batch, step):
        if step + 1 == at:
            _send(sig, group)  # handled at once (Python runs handlers between bytecodes): mid-step
        return real_step(r, batch, step)

    def write_with_signal(obj, file, final):
        if os.path.basename(file) == "nnet.pth":
            _send(sig, group)
        return real_write(obj, file, final)

    config = config_for(image_folder)
    if when == "step":
        monkeypatch.setattr(trainer, "train_step", step_with_signal)
    else:
        config.train.save_interval = 2
        monkeypatch.setattr(libs.checkpoint, "_write", write_with_signal)
    first = trainer.train(config, str(tmp_path), PIXELS_CONTINUOUS)
    stopped = at if when == "step" else 2
    assert first["preempted"] and first["step"] == stopped
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpts")] == [stopped]
    assert not checkpoint_problems(first["checkpoint"])
    log = (tmp_path / "train.log").read_text()
    assert f"received {signal.Signals(sig).name}" in log
    assert f"training stopped at step {stopped} ({signal.Signals(sig).name}); checkpoint saved to" in log
    monkeypatch.undo()

    second = trainer.train(config_for(image_folder), str(tmp_path), PIXELS_CONTINUOUS)
    assert not second["preempted"] and second["step"] == N_STEPS
    _assert_same(_weights(tmp_path / "ckpts" / f"{N_STEPS}.ckpt"), reference)


# -- stops during grids and evaluations ------------------------------------------------------------

EVAL_STEPS = 8  # grids and evaluations (the digits score) at steps 4 and 8, then the final evaluation


def digits_eval_config():
    config = tiny_config(n_steps=EVAL_STEPS, batch_size=8, log_interval=2, eval_interval=4, save_interval=4)
    config.fid.n_samples = 12
    config.sample.update(n_samples=12, mini_batch_size=6)
    return config


def _outputs(workdir):
    """What a finished run leaves beside its weights: the grids, the scores, the final evaluation."""
    return {name: (workdir / name).read_bytes() for name in ("samples/4.png", "samples/8.png", "score.json",
                                                            "final_eval.json")}


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval_reference")
    trainer.train(digits_eval_config(), str(workdir), PIXELS_CONTINUOUS)
    return _weights(workdir / "ckpts" / f"{EVAL_STEPS}.ckpt"), _outputs(workdir)


GENERATION_S = 60  # how long the hooked sampling would run if the stop were not honoured


@pytest.mark.parametrize("use,stopped,during", [("grid", 4, "the sample grid of step 4"),
                                                ("fid", 4, "the evaluation of step 4"),
                                                ("sample", EVAL_STEPS, "the final evaluation")])
def test_stop_during_grid_or_evaluation_saves_the_step_at_once_and_the_rerun_redoes_it(
        use, stopped, during, eval_reference, tmp_path, monkeypatch):
    real_generate_fn, signalled = trainer.Run.generate_fn, []

    def generate_fn(r, protocol, labels, contexts):
        generate = real_generate_fn(r, protocol, labels, contexts)
        if protocol != use or signalled:
            return generate

        def sampling_for_a_minute(indices):  # real sampling work, signalled at its start
            signalled.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() < signalled[0] + GENERATION_S:
                images = generate(indices)
            return images
        return sampling_for_a_minute

    monkeypatch.setattr(trainer.Run, "generate_fn", generate_fn)
    first = trainer.train(digits_eval_config(), str(tmp_path), PIXELS_CONTINUOUS)
    assert signalled and time.monotonic() - signalled[0] < 15, "the stop waited for the sampling to end"
    assert first["preempted"] and first["step"] == stopped
    assert first["checkpoint"] == str(tmp_path / "ckpts" / f"{stopped}.ckpt")
    assert max(s for s, _ in list_checkpoints(tmp_path / "ckpts")) == stopped
    assert not checkpoint_problems(first["checkpoint"])
    log = (tmp_path / "train.log").read_text()
    assert f"received SIGTERM during {during}: stopping it now" in log
    assert f"training stopped at step {stopped} (SIGTERM); checkpoint saved to" in log
    assert not (tmp_path / "final_eval.json").exists()
    monkeypatch.undo()

    second = trainer.train(digits_eval_config(), str(tmp_path), PIXELS_CONTINUOUS)
    assert not second["preempted"] and second["step"] == EVAL_STEPS
    weights, outputs = eval_reference
    _assert_same(_weights(tmp_path / "ckpts" / f"{EVAL_STEPS}.ckpt"), weights)
    assert _outputs(tmp_path) == outputs  # the interrupted grid / evaluation was redone, identically


def test_resume_hint_is_a_command_that_runs(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_command(["train.py", "--config=configs/digits_uvit_tiny.py", "--workdir=my runs/a"]) == \
        "python train.py --config=configs/digits_uvit_tiny.py '--workdir=my runs/a'"
