"""Checkpoints: layout, exact round trip, and survival of crashes, kills, full disks and damage."""
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from libs.checkpoint import latest_checkpoint, read_checkpoint, resume, save_checkpoint
from libs.export import load_weights
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


def test_layout_is_the_originals_plus_train_state(tmp_path):
    path = save(str(tmp_path), 7)
    assert os.path.basename(path) == "7.ckpt"
    assert sorted(os.listdir(path)) == sorted(["nnet.pth", "nnet_ema.pth", "optimizer.pth", "lr_scheduler.pth",
                                               "step.pth", "train_state.pth"])
    assert torch.load(os.path.join(path, "step.pth")) == 7
    # Everything loads without arbitrary unpickling (safe for files from elsewhere).
    for name in os.listdir(path):
        torch.load(os.path.join(path, name), weights_only=True)
    assert os.listdir(tmp_path) == ["7.ckpt"]  # no temporary left behind


def test_round_trip_restores_every_piece(tmp_path):
    run = make_run(seed=1)
    path = save_checkpoint(str(tmp_path), 3, **run, train_state={"position": 30, "best_fid": 1.5})
    fresh = make_run(seed=2)
    assert not torch.equal(fresh["nnet"].lin.weight, run["nnet"].lin.weight)
    resumed, state = resume(str(tmp_path), **fresh)
    assert resumed == path and state == {"position": 30, "best_fid": 1.5, "step": 3}
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
    assert resume(root, **make_run())[1]["step"] == 10


def test_disk_full_mid_write_is_a_save_error_naming_the_file(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = save(root, 10)

    def no_space(obj, f, *a, **k):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk does to the write

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SaveError) as info:
        save(root, 20)
    monkeypatch.undo()
    msg = str(info.value)
    assert "20.ckpt" in msg and "nnet.pth" in msg and "No space left on device" in msg
    assert "previous checkpoint is intact" in msg
    assert sorted(os.listdir(root)) == ["10.ckpt"]
    assert latest_checkpoint(root) == good


def _damage(path, flip=False):
    with open(path, "r+b") as f:
        if flip:  # one byte in the middle of the tensor data: the zip directory stays intact
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:
            f.truncate(os.path.getsize(path) // 2)


def test_truncated_newest_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    root = str(tmp_path)
    good = save(root, 10)
    bad = save(root, 20)
    victim = os.path.join(bad, "nnet_ema.pth")
    _damage(victim)
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        assert latest_checkpoint(root) == good
        path, state = resume(root, **make_run(seed=3))
    assert path == good and state == {"position": 100, "step": 10}
    assert any(victim in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(bad)
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(bad)


def test_flipped_byte_is_caught_by_the_zip_crc_on_resume(tmp_path, caplog):
    root = str(tmp_path)
    good = save(root, 10, make_run(width=64))
    bad = save(root, 20, make_run(width=64))
    victim = os.path.join(bad, "optimizer.pth")
    _damage(victim, flip=True)
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        path, state = resume(root, **make_run(width=64))
    assert path == good and state["step"] == 10
    assert any(victim in r.getMessage() and "CRC" in r.getMessage() for r in caplog.records)


def test_no_checkpoint_at_all(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    assert resume(str(tmp_path), **make_run()) == (None, None)


def test_keep_last_never_deletes_protected(tmp_path):
    root = str(tmp_path)
    for step in (10, 20, 30, 40):
        save(root, step, keep_last=2, protect=(20,))
    assert sorted(os.listdir(root)) == ["20.ckpt", "30.ckpt", "40.ckpt"]
    save(root, 50, keep_last=1, protect=(20,))
    assert sorted(os.listdir(root)) == ["20.ckpt", "50.ckpt"]
    with pytest.raises(CheckpointError, match="keep_last"):
        save(root, 60, keep_last=0)
    assert sorted(os.listdir(root)) == ["20.ckpt", "50.ckpt"]  # refused before writing anything


def test_checkpoint_of_another_network_is_an_error_not_skipped(tmp_path):
    from libs.nnet import build_nnet
    cfg = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2,
               num_classes=-1)
    small = build_nnet(cfg)
    run = dict(nnet=small, nnet_ema=build_nnet(cfg), optimizer=torch.optim.AdamW(small.parameters()),
               lr_scheduler=None)
    run["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(run["optimizer"], lambda s: 1.0)
    save_checkpoint(str(tmp_path), 1, **run, train_state={})
    other = dict(nnet=build_nnet({**cfg, "embed_dim": 32}), nnet_ema=None, optimizer=None, lr_scheduler=None)
    with pytest.raises(CheckpointError) as info:
        resume(str(tmp_path), **other)  # an older checkpoint would not fit either: say so, do not start over
    assert "nnet.pth" in str(info.value) and "different shapes" in str(info.value)


def test_checkpoint_of_the_original_code_loads_with_a_warning(tmp_path, caplog):
    run = make_run()
    path = tmp_path / "500.ckpt"
    path.mkdir()
    for name in ("nnet", "nnet_ema", "optimizer", "lr_scheduler"):
        torch.save(run[name].state_dict(), path / f"{name}.pth")
    torch.save(500, path / "step.pth")
    assert latest_checkpoint(str(tmp_path)) == str(path)
    with caplog.at_level(logging.WARNING, logger="libs.checkpoint"):
        assert resume(str(tmp_path), **make_run(seed=3)) == (str(path), {"step": 500})
    assert any("no train_state.pth" in r.getMessage() for r in caplog.records)


def test_nnet_path_errors(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        load_weights(str(tmp_path / "nope.pth"))
    torch.save({"a": [1, 2]}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not a network state dict"):
        load_weights(str(tmp_path / "junk.pth"))
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "good.pth")
    assert torch.equal(load_weights(str(tmp_path / "good.pth"))[0]["w"], sd["w"])


def test_killed_writers_temporary_is_removed_on_next_save(tmp_path):
    root = str(tmp_path)
    stale = tmp_path / ".20.ckpt.tmp-12345-abc"
    stale.mkdir()
    (stale / "nnet.pth").write_bytes(b"partial")
    assert latest_checkpoint(root) is None
    save(root, 30)
    assert sorted(os.listdir(root)) == ["30.ckpt"]


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
    assert resume(root, **make_run(width=256)) == (os.path.join(root, "1.ckpt"), {"step": 1})
    # The next save cleans up the dead process's temporary.
    save(root, 3, make_run(width=256))
    assert sorted(os.listdir(root)) == ["1.ckpt", "3.ckpt"]
