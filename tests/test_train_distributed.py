"""Two CPU processes on the digits config: DDP over gloo, the global batch split, identical replicas,
one checkpoint written by rank 0, and a second launch resuming from it.

Launched as `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true: with
accelerate 1.x, `--cpu --num_processes 2` starts ONE process unless MPI is configured, while the
torchrun launcher behind --multi_gpu starts two, which form a gloo group on the CPU.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from libs.checkpoint import checkpoint_problems
from libs.errors import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def as_worker(body):
    """The script of a worker process: `body` (a module's code, formatted later with {root}), then an exit that
    skips the interpreter's finalization once the work is saved. torch keeps some process groups alive in its own
    globals (a device mesh's, a first DDP model's), and gloo's threads torn down during finalization can abort a
    worker whose work succeeded (SIGABRT, "terminate called without an active exception"). The scripts release
    their group before they return (libs.errors.release_process_group, tested below)."""
    return body + """
import os, sys
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


WORKER = as_worker('''
import json, sys
sys.path.insert(0, {root!r})
import torch
from configs.digits_uvit_tiny import get_config
from libs.family import PIXELS_CONTINUOUS
from libs.trainer import train

workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = get_config()
config.update_from_flattened_dict(overrides)
out = train(config, workdir, PIXELS_CONTINUOUS)
r = out['run']
torch.save({{'rank': r.accelerator.process_index, 'world': r.accelerator.num_processes, 'step': out['step'],
            'local_batch': r.loader.batch_size, 'position': r.loader.state_dict()['position'],
            'params': torch.cat([p.detach().flatten() for p in r.nnet.parameters()]),
            'ema': torch.cat([p.detach().flatten() for p in r.nnet_ema.parameters()])}},
           f"{{workdir}}/rank{{r.accelerator.process_index}}.pt")
''')

OVERRIDES = {'nnet.embed_dim': 32, 'nnet.depth': 2, 'nnet.num_heads': 2, 'train.batch_size': 16,
             'train.log_interval': 1, 'train.eval_interval': 1000, 'lr_scheduler.warmup_steps': 1,
             'grid.n_rows': 2, 'grid.n_cols': 2, 'grid.steps': 2, 'fid.n_samples': 4, 'fid.steps': 2,
             'sample.n_samples': 4, 'sample.sample_steps': 2, 'sample.mini_batch_size': 4}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(worker, workdir, **overrides):
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(free_port()),
           str(worker), str(workdir), json.dumps({**OVERRIDES, **overrides})]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, 'ACCELERATE_USE_CPU': 'true'}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(workdir / f'rank{r}.pt') for r in range(2)]


def test_two_process_training_and_resume(tmp_path):
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER.format(root=ROOT))
    workdir = tmp_path / 'run'

    ranks = launch(worker, workdir, **{'train.n_steps': 2, 'train.save_interval': 2})
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['world'] == 2 for r in ranks)
    assert all(r['local_batch'] == 8 for r in ranks)  # global batch 16 split over 2 processes
    assert all(r['position'] == 2 * 16 for r in ranks)  # the global stream advanced by 2 global batches
    # The ranks saw different samples and noise, so equal weights mean the gradients were all-reduced.
    assert torch.equal(ranks[0]['params'], ranks[1]['params'])
    assert torch.equal(ranks[0]['ema'], ranks[1]['ema'])
    assert sorted(os.listdir(workdir / 'ckpts')) == ['2.ckpt']  # one directory, no leftover temporaries
    assert not checkpoint_problems(workdir / 'ckpts' / '2.ckpt')

    ranks = launch(worker, workdir, **{'train.n_steps': 4, 'train.save_interval': 2})
    assert all(r['step'] == 4 and r['position'] == 4 * 16 for r in ranks)
    assert torch.equal(ranks[0]['params'], ranks[1]['params'])
    assert sorted(os.listdir(workdir / 'ckpts')) == ['2.ckpt', '4.ckpt']
    log = (workdir / 'train.log').read_text()
    assert 'resuming at step 2' in log
    assert log.count('saved checkpoint') == 2  # rank 0 alone logs and writes


def gloo_threads():
    """The names of this process's gloo threads (Linux: /proc names every thread)."""
    tasks = '/proc/self/task'
    return [name for name in (open(f'{tasks}/{t}/comm').read().strip() for t in os.listdir(tasks)) if 'gloo' in name]


def within_seconds(condition, seconds=10):
    """Whether condition() holds within `seconds`: threads name themselves once they run, and leave /proc just
    after they are joined."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='thread names are read from /proc (Linux)')
def test_a_script_that_ends_well_releases_its_process_group_and_gloo_threads():
    before = len(gloo_threads())  # an earlier test's group that torch keeps in its own globals

    def main():
        dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
        held = {'group': dist.group.WORLD}  # what a training run's objects do (a DDP reducer holds the group)
        held['self'] = held  # in a reference cycle: only the collector frees it
        assert within_seconds(lambda: len(gloo_threads()) > before), 'the gloo group started no thread'
        return 'done'

    try:
        assert exit_on_user_error(main)() == 'done'
        assert not dist.is_initialized()
        assert within_seconds(lambda: len(gloo_threads()) == before), gloo_threads()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
