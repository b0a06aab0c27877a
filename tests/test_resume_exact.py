"""End to end through train.py on a tiny digits model (CPU, fixed seed, one data-loader worker):

1. SIGTERM to the whole process group (training process and its loader worker, as `scancel` or a job
   runner does), SIGTERM to `torchrun` (which forwards it), and SIGKILL at a random moment; rerunning
   the same command ends with the network, EMA and optimizer of an uninterrupted run, bit for bit.
2. A checkpoint damaged after the interruption (a truncated newer one, a temporary left by the kill)
   is skipped with a warning naming it; the rerun resumes from the good one.

The first runs go in parallel (one fixture), so the file costs about two train.py start-ups (~35 s on
2 cores: marked slow; tests/test_preemption.py covers every signal in-process in seconds).
"""
import concurrent.futures
import functools
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

from libs.checkpoint import checkpoint_problems, list_checkpoints, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS = 40
INTERRUPT_AFTER = 10  # SIGTERM once the log shows this step

# The digits demo shrunk to seconds: a 2-block width-32 U-ViT, batch 16, no real evaluation work.
TINY = ["--config=configs/digits_uvit_tiny.py", f"--config.train.n_steps={N_STEPS}", "--config.train.batch_size=16",
        "--config.train.log_interval=5", "--config.train.eval_interval=100000", "--config.train.save_interval=20",
        "--config.nnet.embed_dim=32", "--config.nnet.depth=2", "--config.nnet.num_heads=2",
        "--config.grid.n_rows=2", "--config.grid.n_cols=2", "--config.grid.steps=2", "--config.fid.n_samples=8",
        "--config.fid.steps=2", "--config.sample.n_samples=8", "--config.sample.sample_steps=2",
        "--config.sample.mini_batch_size=8", "--config.lr_scheduler.warmup_steps=5", "--config.dataloader.num_workers=1"]

def _env():
    # One thread per process: three runs share two cores, and the runs compared must use the same
    # thread count for bit-exact CPU sums.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _train(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--workdir={workdir}", *extra]


def _torchrun(workdir):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            os.path.join(ROOT, "train.py"), *TINY, f"--workdir={workdir}"]


def _signal_at(proc, text, send, delay=0.0):
    """Read proc's log until a line contains `text`, then (after `delay` seconds unless it exits) call send();
    returns the whole log."""
    log = []
    for line in proc.stderr:
        log.append(line)
        if text in line:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                send()
            break
    log.append(proc.stderr.read())
    proc.wait(timeout=600)
    return "".join(log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    dirs = {name: str(base / name) for name in ("reference", "group", "torchrun", "killed")}
    # Each in its own session (process group): a group signal reaches that run alone, not pytest.
    popen = dict(cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    ref_log = open(base / "reference.log", "w+")  # nobody reads it while it runs: a full pipe would block it
    procs = {"reference": subprocess.Popen(_train(dirs["reference"]), stderr=ref_log, **popen),
             "group": subprocess.Popen(_train(dirs["group"]), stderr=subprocess.PIPE, **popen),
             "torchrun": subprocess.Popen(_torchrun(dirs["torchrun"]), stderr=subprocess.PIPE, **popen),
             "killed": subprocess.Popen(_train(dirs["killed"], "--config.train.save_interval=5"),
                                        stderr=subprocess.PIPE, **popen)}
    rng = random.Random()
    # SIGKILL at a random moment after the first checkpoint: in a step, a save or an evaluation.
    kill_at = f"step {rng.choice(range(10, N_STEPS - 5, 5))}/{N_STEPS}"
    watch = {"group": (f"step {INTERRUPT_AFTER}/{N_STEPS}", lambda p: os.killpg(p.pid, signal.SIGTERM), 0.0),
             "torchrun": (f"step {INTERRUPT_AFTER}/{N_STEPS}", lambda p: p.send_signal(signal.SIGTERM), 0.0),
             "killed": (kill_at, lambda p: os.killpg(p.pid, signal.SIGKILL), rng.uniform(0.0, 0.5))}
    logs = {}
    try:
        # One reader per run: they all run at once, and a signal must come while its run is at that step.
        with concurrent.futures.ThreadPoolExecutor(len(watch)) as pool:
            futures = {name: pool.submit(_signal_at, procs[name], text, functools.partial(send, procs[name]), delay)
                       for name, (text, send, delay) in watch.items()}
            logs.update({name: f.result() for name, f in futures.items()})
        procs["reference"].wait(timeout=600)
        ref_log.seek(0)
        logs["reference"] = ref_log.read()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        ref_log.close()
    # torchrun itself exits with status 1 after forwarding a signal, whatever its worker did.
    for name in ("reference", "group"):
        assert procs[name].returncode == 0, logs[name][-4000:]
    assert procs["killed"].returncode == -signal.SIGKILL, logs["killed"][-4000:]

    # Whatever the kill interrupted, every <step>.ckpt left is whole; at most the steps since the last one are lost.
    root = os.path.join(dirs["killed"], "ckpts")
    left = list_checkpoints(root)
    for _, path in left:
        read_checkpoint(path)
    last_logged = max(int(l.split("ckpts/")[1].split(".ckpt")[0]) for l in logs["killed"].splitlines()
                      if "saved checkpoint" in l)
    assert left[0][0] >= last_logged

    # Damage after the interruption: a newer checkpoint truncated on disk, and the temporary a kill -9 in
    # the middle of a save leaves behind.
    (stopped_at, good), *_ = left
    damaged = os.path.join(root, f"{stopped_at + 1}.ckpt")
    shutil.copytree(good, damaged)
    victim = os.path.join(damaged, "nnet_ema.pth")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    leftover = os.path.join(root, f".{stopped_at + 2}.ckpt.tmp-12345-killed")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "nnet.pth"), "wb") as f:
        f.write(b"PK\x03\x04 partial")

    reruns = {name: subprocess.Popen(_train(dirs[name]), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for name in ("group", "torchrun", "killed")}
    resumed = {name: p.communicate(timeout=600)[1] for name, p in reruns.items()}
    for name, p in reruns.items():
        assert p.returncode == 0, resumed[name][-4000:]
    return dict(logs=logs, resumed=resumed, dirs=dirs, killed_at=stopped_at, good=good, victim=victim,
                leftover=leftover)


def _load(workdir, step, name):
    return torch.load(os.path.join(workdir, "ckpts", f"{step}.ckpt", name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["group", "torchrun"])
def test_sigterm_stops_cleanly_with_a_checkpoint_and_how_to_resume(runs, name):
    log = runs["logs"][name]
    stopped_at = int(log.split("training stopped at step ")[1].split()[0])
    path = os.path.join(runs["dirs"][name], "ckpts", f"{stopped_at}.ckpt")
    assert INTERRUPT_AFTER <= stopped_at < N_STEPS  # really mid-run
    assert "received SIGTERM" in log and f"training stopped at step {stopped_at} (SIGTERM)" in log
    assert "To resume, rerun the same command" in log
    assert "DataLoader worker" not in log  # the worker got the group's SIGTERM too, and ignored it
    assert not checkpoint_problems(path)
    assert f"resuming at step {stopped_at}" in runs["resumed"][name]


@pytest.mark.parametrize("name", ["group", "torchrun", "killed"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(runs, name):
    ref, res = runs["dirs"]["reference"], runs["dirs"][name]
    for file in ("nnet.pth", "nnet_ema.pth"):
        a, b = _load(ref, N_STEPS, file), _load(res, N_STEPS, file)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{file}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    a, b = _load(ref, N_STEPS, "optimizer.pth"), _load(res, N_STEPS, "optimizer.pth")
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    la, lb = _load(ref, N_STEPS, "lr_scheduler.pth"), _load(res, N_STEPS, "lr_scheduler.pth")
    assert la["last_epoch"] == lb["last_epoch"] == N_STEPS and la["_last_lr"] == lb["_last_lr"]
    assert _load(ref, N_STEPS, "step.pth") == _load(res, N_STEPS, "step.pth") == N_STEPS
    assert _load(ref, N_STEPS, "train_state.pth")["data"] == _load(res, N_STEPS, "train_state.pth")["data"]


def test_resume_skips_damaged_checkpoints_naming_them(runs):
    log = runs["resumed"]["killed"]
    assert f"skipping checkpoint '{os.path.dirname(runs['victim'])}'" in log
    assert f"'{runs['victim']}' is truncated" in log
    assert f"resuming at step {runs['killed_at']} from {runs['good']}" in log
    if runs["killed_at"] < N_STEPS:  # a kill after the last save leaves the rerun nothing to save
        assert not os.path.exists(runs["leftover"])  # the dead writer's temporary is cleaned by the next save
