"""PreemptionHandler: signals set a flag, handlers are restored, ranks agree on the stop step."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from libs.errors import ConfigError
from libs.preemption import PreemptionHandler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run while the PreemptionHandler is active")

    old = signal.signal(sig, previous)
    try:
        with PreemptionHandler() as handler:
            assert not handler.should_stop()
            os.kill(os.getpid(), sig)
            assert handler.requested and handler.should_stop()
            assert handler.signal_name == signal.Signals(sig).name
            assert handler.should_stop(step=3)  # sticky
        assert signal.getsignal(sig) is previous
    finally:
        signal.signal(sig, old)


def test_second_ctrl_c_aborts_but_repeated_sigterm_does_not():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # launchers forward SIGTERM again: still a graceful stop
        assert handler.should_stop()
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_message_says_how_to_resume():
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
    msg = handler.resume_message(120, "workdir/x/default/ckpts/120.ckpt", argv=["train.py", "--config=c.py"])
    assert "step 120" in msg and "SIGTERM" in msg and "120.ckpt" in msg
    assert "rerun the same command: train.py --config=c.py" in msg


def test_bad_sync_every():
    with pytest.raises(ConfigError, match="sync_every"):
        PreemptionHandler(sync_every=0)


_RANKS = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from libs.preemption import PreemptionHandler

    class Acc:  # the two attributes should_stop reads from an accelerate.Accelerator
        num_processes = 2
        device = torch.device("cpu")

    def run(rank):
        dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
        handler = PreemptionHandler(sync_every=4)
        stopped = None
        for step in range(1, 30):
            if rank == 1 and step == 5:
                handler.request_stop("SIGTERM")  # only rank 1 is signalled, between syncs
            if handler.should_stop(Acc(), step=step):
                stopped = step
                break
        print(f"rank {{rank}} stopped at {{stopped}} requested {{handler.requested}}", flush=True)
        dist.destroy_process_group()

    if __name__ == "__main__":
        # fork: the children inherit the imported torch instead of importing it again (seconds each)
        torch.multiprocessing.start_processes(run, nprocs=2, start_method="fork")
""")


def test_ranks_stop_together_at_the_next_sync_step(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS.format(root=ROOT, store=str(tmp_path / "store")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank"))
    # Rank 0 never got a signal, yet both stop at step 8, the first multiple of sync_every after 5.
    assert lines == ["rank 0 stopped at 8 requested False", "rank 1 stopped at 8 requested True"]
