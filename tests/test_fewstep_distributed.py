"""The few-step objectives under DDP (two CPU processes over gloo): MeanFlow's JVP runs on the bare network under
no_grad and its prediction through the DDP wrapper, so the gradients are all-reduced (a torch.func.jvp through
model.module alone would silently skip it). A few SGD steps end with identical weights on both ranks, equal to
one process on the concatenated batch."""
import json
import subprocess
import sys

import pytest
import torch

from tests.test_train_distributed import ROOT, as_worker, free_port

pytestmark = pytest.mark.slow

WORKER = as_worker('''
import copy, json, sys
sys.path.insert(0, {root!r})
import torch
from accelerate import Accelerator
import sde
from libs.uvit import UViT

out, objective = sys.argv[1], json.loads(sys.argv[2])
acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
torch.manual_seed(0)
net = UViT(img_size=4, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=4,
           mlp_time_embed=True, second_time=True)
alone = copy.deepcopy(net)  # one process, the whole batch
init = torch.cat([p.detach().flatten() for p in net.parameters()])
diffusion = sde.build_diffusion('continuous', sde.Objective(**objective), null=3)
g = torch.Generator().manual_seed(1)
x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
t = torch.tensor([0.9, 0.5, 0.75, 0.25, 0.8, 0.6, 1.0, 0.4])
second = torch.tensor([0.3, 0.125, 0.25, 0.0, 0.1, 0.25, 0.0, 0.0])  # MeanFlow: r; shortcut: d
y = torch.tensor([0, 1, 3, 2, 1, 3, 0, 2])
two = 2  # the leading two of each half take the two-time target

def loss(model, s):
    args = (x0[s], eps[s], second[s], t[s]) if objective['path'] == 'meanflow' else (x0[s], eps[s], t[s], second[s])
    return diffusion.loss_at(model, *args, {{'y': y[s]}}, n_two=two).mean()

ddp, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.5))
opt_alone = torch.optim.SGD(alone.parameters(), lr=0.5)
half = slice(4 * rank, 4 * rank + 4)
for _ in range(3):
    acc.backward(loss(ddp, half)); opt.step(); opt.zero_grad()
    both = (loss(alone, slice(0, 4)) + loss(alone, slice(4, 8))) / 2  # the mean over the concatenated batch
    both.backward(); opt_alone.step(); opt_alone.zero_grad()
flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
torch.save({{'rank': rank, 'world': world, 'params': flat(net), 'alone': flat(alone), 'init': init}}, f"{{out}}/rank{{rank}}.pt")
''')

OBJECTIVES = {'meanflow': {'path': 'meanflow', 'prediction': 'average_velocity', 'cfg_omega': 2.0, 'cfg_kappa': 0.3},
              'shortcut': {'path': 'shortcut', 'prediction': 'velocity'}}


@pytest.mark.parametrize('name', sorted(OBJECTIVES))
def test_two_processes_equal_one_on_the_concatenated_batch(tmp_path, name):
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER.format(root=ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
           str(free_port()), str(worker), str(tmp_path), json.dumps(OBJECTIVES[name])]
    env = {**__import__('os').environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, 'ACCELERATE_USE_CPU': 'true'}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['world'] == 2 for r in ranks)
    assert torch.equal(ranks[0]['params'], ranks[1]['params'])  # all-reduced: the ranks saw different halves
    assert (ranks[0]['params'] - ranks[0]['init']).abs().max() > 1e-3  # the steps moved the weights
    torch.testing.assert_close(ranks[0]['params'], ranks[0]['alone'], rtol=1e-5, atol=1e-6)
