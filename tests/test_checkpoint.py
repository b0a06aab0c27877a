"""Checkpoints: layout, exact round trip, and survival of crashes, kills, full disks and truncation."""
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import libs.checkpoint as ckpt
from libs.checkpoint import (capture_rng_state, checkpoint_problems, latest_checkpoint, load_checkpoint, load_nnet_weights,
                             restore_rng_state, save_checkpoint)
from libs.errors import CheckpointError, MissingFileError
from libs.io_utils import SaveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.register_buffer("count", torch.zeros(()))


def make_run(width=4, seed=0):
    """A network, its EMA, AdamW and a LambdaLR that have taken one step (so they have state)."""
    torch.manual_seed(seed)
    nnet, ema = Tiny(width), Tiny(width)
    opt = torch.optim.AdamW(nnet.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 10, 1))
    nnet.lin(torch.randn(2, width)).square().sum().backward()
    opt.step()
    sched.step()
    return dict(nnet=nnet, nnet_ema=ema, optimizer=opt, lr_scheduler=sched)


def save(root, step, run=None, **kw):
    run = run or make_run()
    return save_checkpoint(root, step, **run, train_state={"position": 10 * step}, **kw)


@pytest.fixture(autouse=True)
def _forget_verified():
    # Each test must verify files itself, not trust what an earlier test verified.
    ckpt._verified.clear()
    yield
    ckpt._verified.clear()


def test_layout_is_the_originals_plus_train_state_and_marker(tmp_path):
    path = save(str(tmp_path), 7)
    assert os.path.basename(path) == "7.ckpt"
    assert sorted(os.listdir(path)) == sorted(["nnet.pth", "nnet_ema.pth", "optimizer.pth", "lr_scheduler.pth",
                                               "step.pth", "train_state.pth", "COMPLETE"])
    assert torch.load(os.path.join(path, "step.pth")) == 7
    marker = json.load(open(os.path.join(path, "COMPLETE")))
    for name, rec in marker["files"].items():
        assert os.path.getsize(os.path.join(path, name)) == rec["size"]
        assert ckpt._file_sha256(os.path.join(path, name)) == rec["sha256"]
    # Everything loads without arbitrary unpickling (safe for files from elsewhere).
    for name in marker["files"]:
        torch.load(os.path.join(path, name), weights_only=True)
    # No temporary left behind.
    assert os.listdir(tmp_path) == ["7.ckpt"]


def test_round_trip_restores_every_piece(tmp_path):
    run = make_run(seed=1)
    path = save_checkpoint(str(tmp_path), 3, **run, train_state={"position": 30, "best_fid": 1.5})
    fresh = make_run(seed=2)
    assert not torch.equal(fresh["nnet"].lin.weight, run["nnet"].lin.weight)
    state = load_checkpoint(path, **fresh)
    assert state == {"position": 30, "best_fid": 1.5, "step": 3}
    for key in ("nnet", "nnet_ema"):
        for a, b in zip(run[key].state_dict().values(), fresh[key].state_dict().values()):
            assert torch.equal(a, b)
    sa, sb = run["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert torch.equal(sa["state"][0]["exp_avg_sq"], sb["state"][0]["exp_avg_sq"])
    assert fresh["lr_scheduler"].last_epoch == run["lr_scheduler"].last_epoch
    assert fresh["optimizer"].param_groups[0]["lr"] == run["optimizer"].param_groups[0]["lr"]


def test_wrapped_modules_are_saved_without_prefix(tmp_path):
    run = make_run()
    wrapped = torch.nn.Module()
    wrapped.module = run["nnet"]  # what DDP / accelerate look like
    run["nnet"] = wrapped
    path = save_checkpoint(str(tmp_path), 1, **run, train_state={})
    assert set(torch.load(os.path.join(path, "nnet.pth"))) == {"lin.weight", "lin.bias", "count"}


def test_rng_round_trip_python_numpy_torch():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])
    # A list (one entry per rank) restores this process's entry (rank 0 here).
    restore_rng_state([state])
    assert random.random() == expected[0]


def test_crash_after_first_file_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save(root, 10)
    real_save = torch.save
    calls = []

    def crash_on_second(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the middle of a checkpoint")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save(root, 20)
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["10.ckpt"]  # no half-written 20.ckpt, no temporary
    assert latest_checkpoint(root) == good
    assert load_checkpoint(good, **make_run())["step"] == 10


def test_disk_full_mid_write_is_a_save_error_naming_the_path(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save(root, 10, make_run(width=64))
    real_write = ckpt._HashingWriter.write

    def fill_disk(self, data):
        if self.size > 1000:
            # What a real full disk does to the write; torch.save hides it in a RuntimeError.
            e = OSError(errno.ENOSPC, "No space left on device")
            self.error = e
            raise e
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", fill_disk)
    with pytest.raises(SaveError) as info:
        save(root, 20, make_run(width=64))
    monkeypatch.undo()
    msg = str(info.value)
    assert f"'{os.path.join(root, '20.ckpt')}' (file nnet.pth)" in msg
    assert "disk is full" in msg and "previous checkpoint is intact" in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert sorted(os.listdir(root)) == ["10.ckpt"]
    assert latest_checkpoint(root) == good


def test_not_enough_free_space_refuses_before_writing(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save(root, 10)

    class Usage:
        free = 10

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(SaveError, match=r"not enough disk space to write checkpoint '.*20\.ckpt'"):
        save(root, 20)
    monkeypatch.undo()
    assert latest_checkpoint(root) == good and sorted(os.listdir(root)) == ["10.ckpt"]


def test_truncated_newest_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    root = str(tmp_path)
    good = save(root, 10)
    bad = save(root, 20)
    victim = os.path.join(bad, "nnet_ema.pth")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    ckpt._verified.clear()
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        assert latest_checkpoint(root) == good
    assert any(victim in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="truncated"):
        load_nnet_weights(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_nnet_weights(victim)  # the bare file, without the marker to compare with
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_checkpoint(bad, **make_run())


def test_flipped_byte_is_caught_by_the_checksum(tmp_path, caplog):
    root = str(tmp_path)
    good = save(root, 10)
    bad = save(root, 20)
    victim = os.path.join(bad, "optimizer.pth")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ckpt._verified.clear()
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        assert latest_checkpoint(root) == good
    assert any(victim in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


def test_no_checkpoint_at_all(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    assert latest_checkpoint(str(tmp_path)) is None


def test_keep_last_never_deletes_protected(tmp_path):
    root = str(tmp_path)
    for step in (10, 20, 30, 40):
        save(root, step, keep_last=2, protect=(20,))
    assert sorted(os.listdir(root)) == ["20.ckpt", "30.ckpt", "40.ckpt"]
    save(root, 50, keep_last=1, protect=[os.path.join(root, "20.ckpt")])
    assert sorted(os.listdir(root)) == ["20.ckpt", "50.ckpt"]
    with pytest.raises(CheckpointError, match="keep_last"):
        save(root, 60, keep_last=0)
    assert sorted(os.listdir(root)) == ["20.ckpt", "50.ckpt"]  # refused before writing anything


def test_checkpoint_of_another_network_names_the_keys(tmp_path):
    from libs.nnet import build_nnet
    cfg = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2,
               num_classes=-1)
    small = build_nnet(cfg)
    big = build_nnet({**cfg, "embed_dim": 32})
    run = dict(nnet=small, nnet_ema=build_nnet(cfg), optimizer=torch.optim.AdamW(small.parameters()),
               lr_scheduler=None)
    run["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(run["optimizer"], lambda s: 1.0)
    path = save_checkpoint(str(tmp_path), 1, **run, train_state={})
    other = dict(nnet=big, nnet_ema=None, optimizer=None, lr_scheduler=None)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **other)
    assert "nnet.pth" in str(info.value) and "different shapes" in str(info.value)


def test_checkpoint_of_the_original_code_loads_with_a_warning(tmp_path, caplog):
    run = make_run()
    path = tmp_path / "500.ckpt"
    path.mkdir()
    for name in ("nnet", "nnet_ema", "optimizer", "lr_scheduler"):
        obj = run[name]
        torch.save(obj.state_dict(), path / f"{name}.pth")
    torch.save(500, path / "step.pth")
    assert latest_checkpoint(str(tmp_path)) == str(path)
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        state = load_checkpoint(str(path), **make_run(seed=3))
    assert state == {"step": 500}
    assert any("approximate" in r.getMessage() for r in caplog.records)


def test_nnet_path_errors(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        load_nnet_weights(str(tmp_path / "nope.pth"))
    torch.save({"a": [1, 2]}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not a network state dict"):
        load_nnet_weights(str(tmp_path / "junk.pth"))
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "good.pth")
    assert torch.equal(load_nnet_weights(str(tmp_path / "good.pth"))["w"], sd["w"])


def test_stale_temporary_of_a_dead_process_is_removed_on_next_save(tmp_path):
    root = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is certainly dead now
    stale = tmp_path / f".20.ckpt.tmp-{proc.pid}-abc"
    stale.mkdir()
    (stale / "nnet.pth").write_bytes(b"partial")
    assert latest_checkpoint(root) is None
    save(root, 30)
    assert sorted(os.listdir(root)) == ["30.ckpt"]


def test_old_copy_moved_aside_by_an_interrupted_resave_is_put_back(tmp_path):
    root = str(tmp_path)
    good = save(root, 20)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    # What io_utils.atomic_path leaves when killed between its two renames while replacing 20.ckpt.
    aside = os.path.join(root, f".20.ckpt.tmp-{proc.pid}-xyz.old")
    os.rename(good, aside)
    save(root, 30)
    assert sorted(os.listdir(root)) == ["20.ckpt", "30.ckpt"]
    assert not checkpoint_problems(good)


_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from tests.test_checkpoint import make_run
    from libs.checkpoint import save_checkpoint
    out = {out!r}
    save_checkpoint(out, 1, **make_run(width=256), train_state={{}})
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.flush()
        print("wrote one file", flush=True)
        time.sleep(60)  # a slow disk: the parent kills us here
    torch.save = slow_save
    print("ready", flush=True)
    save_checkpoint(out, 2, **make_run(width=256), train_state={{}})
""")


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    root = str(tmp_path / "ckpts")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=ROOT, out=root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert proc.stdout.readline().strip() == "wrote one file"
        temps = [n for n in os.listdir(root) if n.startswith(".2.ckpt.tmp-")]
        assert temps, os.listdir(root)  # the write is really in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(root, "2.ckpt"))
    assert latest_checkpoint(root) == os.path.join(root, "1.ckpt")
    state = load_checkpoint(os.path.join(root, "1.ckpt"), **make_run(width=256))
    assert state["step"] == 1
    # The next save cleans up the dead process's temporary.
    save(root, 3, make_run(width=256))
    assert sorted(os.listdir(root)) == ["1.ckpt", "3.ckpt"]
