"""End to end through train.py on a tiny digits model (CPU, fixed seed), issue 8's "done when":

1. SIGTERM mid-run, rerun the same command: the final network, EMA and optimizer equal an
   uninterrupted run's bit for bit.
2. A checkpoint damaged after the interruption (a truncated newer one, a temporary left by a
   kill -9) is skipped with a warning naming it; the rerun resumes from the good one.
3. A NaN loss stops training naming the step and the last good checkpoint; nothing after it is saved.

The three first runs go in parallel (one fixture), so the file costs about two train.py start-ups.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from libs.checkpoint import checkpoint_problems, list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS = 40
INTERRUPT_AFTER = 10  # SIGTERM once the log shows this step

# The digits demo shrunk to seconds: a 2-block width-32 U-ViT, batch 16, no real evaluation work.
TINY = ["--config=configs/digits_uvit_tiny.py", f"--config.train.n_steps={N_STEPS}", "--config.train.batch_size=16",
        "--config.train.log_interval=5", "--config.train.eval_interval=100000", "--config.train.save_interval=20",
        "--config.nnet.embed_dim=32", "--config.nnet.depth=2", "--config.nnet.num_heads=2",
        "--config.grid.n_rows=2", "--config.grid.n_cols=2", "--config.grid.steps=2", "--config.fid.n_samples=8",
        "--config.fid.steps=2", "--config.sample.n_samples=8", "--config.sample.sample_steps=2",
        "--config.sample.mini_batch_size=8", "--config.lr_scheduler.warmup_steps=5"]

# Runs train.py with the continuous-time loss returning NaN from the NAN_FROM-th call on.
_NAN_WRAPPER = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, {root!r})
    import sde
    real_loss, calls = sde.ContinuousVP.loss, [0]
    def nan_loss(self, *args, **kwargs):
        calls[0] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls[0] >= {nan_from} else loss
    sde.ContinuousVP.loss = nan_loss
    sys.argv = ["train.py"] + {args!r}
    runpy.run_path({train!r}, run_name="__main__")
""")


def _env():
    # One thread per process: three runs share two cores, and the runs compared must use the same
    # thread count for bit-exact CPU sums.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _train(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--workdir={workdir}", *extra]


def _finish(proc, log, timeout=600):
    proc.wait(timeout=timeout)
    log.seek(0)
    text = log.read()
    log.close()
    return proc.returncode, text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    ref_dir, int_dir, nan_dir = str(base / "reference"), str(base / "interrupted"), str(base / "nan")
    nan_script = base / "nan_train.py"
    nan_script.write_text(_NAN_WRAPPER.format(root=ROOT, nan_from=8, train=os.path.join(ROOT, "train.py"),
                                              args=TINY[:1] + [a.replace("save_interval=20", "save_interval=5")
                                                               for a in TINY[1:]] + [f"--workdir={nan_dir}"]))
    popen = dict(cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, text=True)
    # Logs of the runs nobody reads while they run go to files: a full pipe would block them.
    ref_log, nan_log = open(base / "reference.log", "w+"), open(base / "nan.log", "w+")
    reference = subprocess.Popen(_train(ref_dir), stderr=ref_log, **popen)
    nan_run = subprocess.Popen([sys.executable, str(nan_script)], stderr=nan_log, **popen)
    interrupted = subprocess.Popen(_train(int_dir), stderr=subprocess.PIPE, **popen)
    try:
        # 1. SIGTERM once the interrupted run is training.
        log = []
        for line in interrupted.stderr:
            log.append(line)
            if f"step {INTERRUPT_AFTER}/{N_STEPS}" in line:
                interrupted.send_signal(signal.SIGTERM)
                break
        rest = interrupted.stderr.read()
        interrupted.wait(timeout=600)
        first_log = "".join(log) + rest
        results = {"interrupted": (interrupted.returncode, first_log),
                   "reference": _finish(reference, ref_log), "nan": _finish(nan_run, nan_log)}
    finally:
        for p in (reference, nan_run, interrupted):
            if p.poll() is None:
                p.kill()
    assert results["interrupted"][0] == 0, first_log[-4000:]
    assert results["reference"][0] == 0, results["reference"][1][-4000:]

    # 2. Damage after the interruption: a newer checkpoint truncated on disk, and the temporary a
    # kill -9 in the middle of a save leaves behind.
    root = os.path.join(int_dir, "ckpts")
    (stopped_at, good), = list_checkpoints(root)
    damaged = os.path.join(root, f"{stopped_at + 1}.ckpt")
    shutil.copytree(good, damaged)
    victim = os.path.join(damaged, "nnet_ema.pth")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = os.path.join(root, f".{stopped_at + 2}.ckpt.tmp-{dead.pid}-killed")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "nnet.pth"), "wb") as f:
        f.write(b"PK\x03\x04 partial")

    resumed = subprocess.run(_train(int_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    results.update(resumed=(resumed.returncode, resumed.stderr), stopped_at=stopped_at, good=good, victim=victim,
                   leftover=leftover, dirs=dict(reference=ref_dir, interrupted=int_dir, nan=nan_dir))
    return results


def _load(workdir, step, name):
    return torch.load(os.path.join(workdir, "ckpts", f"{step}.ckpt", name), map_location="cpu", weights_only=True)


def test_sigterm_stops_cleanly_with_a_checkpoint_and_how_to_resume(runs):
    log = runs["interrupted"][1]
    stopped_at = runs["stopped_at"]
    assert INTERRUPT_AFTER <= stopped_at < N_STEPS  # really mid-run
    assert f"training stopped at step {stopped_at} (SIGTERM)" in log
    assert "To resume, rerun the same command" in log
    assert not checkpoint_problems(runs["good"])


def _loader_draws_from_global_rng():
    """Whether starting the training loader's iterator consumes torch's global CPU generator.

    torch's DataLoader draws its workers' base seed from the global generator unless it is given
    its own `generator=`. The trainer restores the RNG states and then starts the loader, so
    that draw shifts every later noise/timestep draw: the resumed run is then not the
    uninterrupted one.
    """
    from libs.data_loader import ResumableLoader

    loader = ResumableLoader(torch.utils.data.TensorDataset(torch.arange(8.0)), batch_size=2, seed=0)
    before = torch.get_rng_state()
    next(iter(loader))
    return not torch.equal(before, torch.get_rng_state())


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(runs):
    # The likeliest cause of a mismatch, named precisely (it was once the case).
    assert not _loader_draws_from_global_rng(), (
        "libs/data_loader.py: starting the loader's iterator draws from torch's global CPU generator after the RNG "
        "states were restored; give the DataLoader its own generator=")
    ref, res = runs["dirs"]["reference"], runs["dirs"]["interrupted"]
    assert f"resuming at step {runs['stopped_at']}" in runs["resumed"][1]
    for name in ("nnet.pth", "nnet_ema.pth"):
        a, b = _load(ref, N_STEPS, name), _load(res, N_STEPS, name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    a, b = _load(ref, N_STEPS, "optimizer.pth"), _load(res, N_STEPS, "optimizer.pth")
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    la, lb = _load(ref, N_STEPS, "lr_scheduler.pth"), _load(res, N_STEPS, "lr_scheduler.pth")
    assert la["last_epoch"] == lb["last_epoch"] == N_STEPS and la["_last_lr"] == lb["_last_lr"]
    sa, sb = _load(ref, N_STEPS, "train_state.pth"), _load(res, N_STEPS, "train_state.pth")
    assert sa["step"] == sb["step"] == N_STEPS
    assert sa["data"] == sb["data"]


def test_resume_skips_damaged_checkpoints_naming_them(runs):
    log = runs["resumed"][1]
    assert f"skipping checkpoint '{os.path.dirname(runs['victim'])}'" in log
    assert f"'{runs['victim']}' is " in log and "truncated" in log
    assert f"resuming at step {runs['stopped_at']} from {runs['good']}" in log
    assert not os.path.exists(runs["leftover"])  # the dead writer's temporary is cleaned by the next save


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(runs):
    code, log = runs["nan"]
    root = os.path.join(runs["dirs"]["nan"], "ckpts")
    assert code != 0
    # NaN from the 8th loss on, checked every log_interval = 5 steps: caught at step 10.
    assert "the loss became NaN or infinite (3 time(s)) by step 10; nothing was saved after it" in log
    assert f"The last good checkpoint is {os.path.join(root, '5.ckpt')}" in log
    assert [step for step, _ in list_checkpoints(root)] == [5]
    assert not checkpoint_problems(os.path.join(root, "5.ckpt"))
    for name in ("nnet.pth", "nnet_ema.pth"):
        assert all(torch.isfinite(v).all() for v in _load(runs["dirs"]["nan"], 5, name).values())
