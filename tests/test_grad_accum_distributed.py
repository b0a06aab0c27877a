"""Gradient accumulation under DDP (two CPU processes over gloo): the first micro-batch's backward skips the
all-reduce (no_sync), the last one all-reduces the summed gradients, so the replicas stay identical."""
import torch

from libs.checkpoint import checkpoint_problems
from tests.test_train_distributed import ROOT, WORKER, launch


def test_two_processes_two_micro_batches_stay_in_sync(tmp_path):
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER.format(root=ROOT))
    workdir = tmp_path / 'run'
    ranks = launch(worker, workdir, **{'train.n_steps': 3, 'train.save_interval': 3, 'train.grad_accum_steps': 2})
    assert all(r['local_batch'] == 4 for r in ranks)  # global batch 16 = 2 processes x 2 micro-batches x 4
    assert all(r['step'] == 3 and r['position'] == 3 * 16 for r in ranks)  # the stream counts optimizer steps
    # Each rank saw its own micro-batches: equal weights mean the summed gradients were all-reduced.
    assert torch.equal(ranks[0]['params'], ranks[1]['params']) and torch.equal(ranks[0]['ema'], ranks[1]['ema'])
    assert not checkpoint_problems(workdir / 'ckpts' / '3.ckpt')
    log = (workdir / 'train.log').read_text()
    assert 'global batch 16 (4 per process x 2 micro-batch(es))' in log
