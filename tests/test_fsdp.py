"""Sharded training (config.fsdp, FSDP2) on 2 CPU processes over gloo: the same weights as DDP, exact sharded
resume, re-sharding onto 1 process, the gathered nnet.pth / nnet_ema.pth, half the bytes per process, and the
meta-device build (values independent of the process count; a >= 2B-parameter U-ViT sharded without memory).

Launched with torchrun (what `accelerate launch --multi_gpu` runs, which refuses a single process): N processes
forming a gloo group on the CPU; every launch asserts the world size it claims.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from configs.digits_uvit_tiny import get_config as digits_config
from libs import fsdp, sharded_checkpoint
from libs.checkpoint import METADATA, SHARDED, checkpoint_problems, list_checkpoints, read_state_file
from libs.errors import CheckpointError, ConfigError
from libs.nnet import build_nnet, load_nnet_state_dict
from tests.test_train_distributed import as_worker, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_WORKER = as_worker('''
import json, sys
sys.path.insert(0, {root!r})
import torch
from configs.digits_uvit_tiny import get_config
from libs import fsdp
from libs.family import PIXELS_CONTINUOUS
from libs.trainer import train

workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = get_config()
config.update_from_flattened_dict(overrides)
out = train(config, workdir, PIXELS_CONTINUOUS)
r = out['run']  # the process group is gone (accelerate's end_training): this process's shards, no collective
optimizer_state = [t for s in r.optimizer.optimizer.state.values() for t in s.values() if t.dim() > 0]
torch.save({{'rank': r.accelerator.process_index, 'world': r.accelerator.num_processes, 'step': out['step'],
            'nnet': {{n: fsdp.local(p).detach().clone() for n, p in r.nnet.named_parameters()}},
            'ema': {{n: fsdp.local(p).detach().clone() for n, p in r.nnet_ema.named_parameters()}},
            'param_bytes': sum(fsdp.local(p).numel() * p.element_size() for p in r.nnet.parameters()),
            'optimizer_bytes': sum(fsdp.local(t).numel() * t.element_size() for t in optimizer_state),
            'full_param_bytes': sum(p.numel() * p.element_size() for p in r.nnet.parameters())}},
           f"{{workdir}}/rank{{r.accelerator.process_index}}.pt")
''')

# The start of the workers below: the digits config, in a process of a gloo group.
WORKER_START = '''
import sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.distributed.device_mesh import DeviceMesh
from configs.imagenet512_uvit_2b import get_config as config_2b
from configs.digits_uvit_tiny import get_config
from libs import fsdp
from libs.nnet import build_nnet

out = sys.argv[1]
state = PartialState(cpu=True)
config = get_config()
'''

BUILD_WORKER = as_worker(WORKER_START + '''
config.fsdp.update(enabled=True, meta_init=True)
nnet, ema, mesh = fsdp.build(config, state.device, state.num_processes)
full = fsdp.full_state_dict(nnet, to_all=True)
full_ema = fsdp.full_state_dict(ema, to_all=True)
# The same meta build sharded over this process alone (a one-process mesh): the one-process values.
alone = DeviceMesh.from_group(dist.new_subgroups(group_size=1)[0], 'cpu')
with torch.device('meta'):
    single = build_nnet(config.nnet)
fsdp.shard(single, alone, config.fsdp)
fsdp.materialize(single, state.device, config.seed)
single = {{n: fsdp.local(p).detach().clone() for n, p in single.named_parameters()}}


def gradients(nnet_options, fsdp_options):
    """(mesh shape, whole gradients) of the sharded digits network on a batch of this process's own."""
    config = get_config()
    config.nnet.update(nnet_options)
    config.fsdp.update(enabled=True, **fsdp_options)
    torch.manual_seed(0)
    net, _, net_mesh = fsdp.build(config, state.device, state.num_processes)
    generator = torch.Generator().manual_seed(state.process_index)
    x, t = torch.randn(4, 1, 8, 8, generator=generator), torch.rand(4, generator=generator)
    net.train()(x, t, torch.arange(4)).pow(2).mean().backward()
    return tuple(net_mesh.shape), {{n: p.grad.full_tensor() for n, p in net.named_parameters()}}


# Gradient checkpointing inside the shard units, bf16 policy: the same gradients as without it.
grads = [gradients({{'use_checkpoint': c}}, {{'mixed_precision': 'bf16'}})[1] for c in (False, True)]
# HSDP: a (replicate 2 x shard 1) mesh averages the two processes' gradients as the (shard 2) mesh does.
hsdp = [gradients({{}}, {{'mixed_precision': 'no', 'replicate': r}}) for r in (1, 2)]
# The >= 2B config: built on the meta device and sharded; nothing is allocated on any process.
big = config_2b()
with torch.device('meta'):
    net = build_nnet(big.nnet)
fsdp.shard(net, mesh, big.fsdp)
params = list(net.parameters())
torch.save({{'rank': state.process_index, 'world': state.num_processes, 'full': full, 'ema': full_ema,
            'single': single, 'grads': grads, 'hsdp': hsdp,
            'big_params': sum(p.numel() for p in params), 'big_all_meta': all(p.is_meta for p in params),
            'big_local': sum(fsdp.local(p).numel() for p in params),
            'big_rows': {{n: (tuple(p.shape), tuple(fsdp.local(p).shape)) for n, p in net.named_parameters()}}}},
           f"{{out}}/rank{{state.process_index}}.pt")
''')

COMPILE_WORKER = as_worker(WORKER_START + '''
config.fsdp.update(enabled=True, mixed_precision='no')
torch.manual_seed(0)
nnet = fsdp.build(config, state.device, state.num_processes)[0].train()
x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
runs = []
for net in (nnet, torch.compile(nnet, backend='eager')):  # dynamo traces through FSDP2's hooks
    nnet.zero_grad()
    output = net(x, t, y)
    output.pow(2).mean().backward()
    runs.append((output.detach(), {{n: p.grad.full_tensor() for n, p in nnet.named_parameters()}}))
torch.save({{'rank': state.process_index, 'world': state.num_processes, 'runs': runs}},
           f"{{out}}/rank{{state.process_index}}.pt")
''')

# The digits demo, small enough for 2 shared cores: 20 steps of a depth-2 width-32 U-ViT at batch 16.
OVERRIDES = {'nnet.embed_dim': 32, 'nnet.depth': 2, 'nnet.num_heads': 2, 'train.batch_size': 16,
             'train.n_steps': 20, 'train.save_interval': 10, 'train.log_interval': 5, 'train.eval_interval': 1000,
             'lr_scheduler.warmup_steps': 2, 'grid.n_rows': 2, 'grid.n_cols': 2, 'grid.steps': 2,
             'fid.n_samples': 0, 'sample.n_samples': 4, 'sample.sample_steps': 2, 'sample.mini_batch_size': 4}
SHARDED_RUN = {'fsdp.enabled': True, 'fsdp.mixed_precision': 'no'}


def launch(worker_text, tmp_path, out, args, processes=2):
    """Run the worker in `processes` CPU processes; returns each rank's saved dict (world size asserted)."""
    worker = tmp_path / 'worker.py'
    worker.write_text(worker_text.format(root=ROOT))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(processes), '--master_port',
           str(free_port()), str(worker), str(out), *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    ranks = [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(processes)]
    assert [r['rank'] for r in ranks] == list(range(processes)) and all(r['world'] == processes for r in ranks)
    return ranks


def train(tmp_path, name, processes=2, **overrides):
    """(each rank's saved dict, with 'nnet' and 'ema' the whole networks put together from the ranks' rows), workdir."""
    workdir = tmp_path / name
    os.makedirs(workdir, exist_ok=True)
    ranks = launch(TRAIN_WORKER, tmp_path, workdir, [json.dumps({**OVERRIDES, **overrides})], processes)
    for key in ('nnet', 'ema') if overrides.get('fsdp.enabled') else ():  # FSDP2 splits every tensor by rows
        whole = {n: torch.cat([r[key][n] for r in ranks]) for n in ranks[0][key]}  # (dim 0), in rank order
        for r in ranks:
            r[key] = whole
    return ranks, workdir


def assert_same(a, b, **tolerance):
    assert a.keys() == b.keys()
    for k in a:
        if tolerance:
            torch.testing.assert_close(a[k], b[k], **tolerance, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# -- fast: the config checks, and the meta-device build in 2 processes and 1 --------------------------------

def test_config_problems():
    config = digits_config()
    assert fsdp.problems(config, 2) == []
    config.fsdp.update(replicate=3)
    config.repa.enabled = True
    assert fsdp.problems(config, 4) == []  # off: the values are fine, their combinations do not matter
    config.fsdp.update(enabled=True)
    assert [key for key, _ in fsdp.problems(config, 4)] == ['fsdp.replicate', 'repa.enabled']  # 3 groups of 4?
    config.fsdp.update(mixed_precision='fp16', replicate=0)
    assert [key for key, _ in fsdp.problems(config, 4)] == ['fsdp.mixed_precision', 'fsdp.replicate', 'repa.enabled']
    with pytest.raises(ConfigError, match='--mixed_precision no'):
        fsdp.check_launch_precision(config, 'bf16')
    if not torch.cuda.is_available():
        config.fsdp.update(mixed_precision='bf16', replicate=1, cpu_offload=True)
        assert [key for key, _ in fsdp.problems(config, 4)] == ['fsdp.cpu_offload', 'repa.enabled']
    config.fsdp.update(replicate=2, mixed_precision='bf16', cpu_offload=False)
    config.repa.enabled = False
    assert fsdp.problems(config, 4) == []


def test_meta_build_is_the_same_for_any_process_count_and_shards_2b_without_memory(tmp_path):
    two = launch(BUILD_WORKER, tmp_path, tmp_path, [], processes=2)
    # Each process drew only its rows, yet the gathered network is the one a single process draws alone.
    assert_same(two[0]['full'], two[0]['single'])
    assert_same(two[1]['full'], two[0]['single'])
    assert_same(two[0]['ema'], two[0]['full'])  # the EMA starts equal to the network
    plain, recomputed = two[0]['grads']  # gradient checkpointing under FSDP2 (bf16): the same gradients
    assert_same(plain, recomputed)
    assert all(g.abs().sum() > 0 for n, g in plain.items() if 'weight' in n)
    (shard_mesh, sharded), (hsdp_mesh, replicated) = two[0]['hsdp']  # HSDP: replicas average like shards
    assert shard_mesh == (2,) and hsdp_mesh == (2, 1)
    assert_same(replicated, sharded, rtol=1e-5, atol=1e-7)
    assert_same(two[1]['hsdp'][1][1], replicated)
    # The original's init, in distribution: linear weights trunc_normal_(std=.02) (cut at +-2 absolute, i.e. a
    # plain N(0, .02^2): 36,864 draws put the sample std within 0.02 +- 7 standard errors of 0.00007), zero
    # biases, unit LayerNorms.
    full = two[0]['full']
    weight = full['in_blocks.0.mlp.fc1.weight']
    assert weight.numel() == 36864 and abs(weight.std() - 0.02) < 0.0005 and abs(weight.mean()) < 0.0006
    assert not full['in_blocks.0.mlp.fc1.bias'].any()
    assert torch.equal(full['norm.weight'], torch.ones_like(full['norm.weight']))
    assert not torch.equal(full['in_blocks.0.attn.qkv.weight'][:8], full['mid_block.attn.qkv.weight'][:8])
    # The 2B config: >= 2e9 parameters, sharded on the meta device: each process holds half the rows, no memory.
    for rank in two:
        assert rank['big_params'] >= 2e9 and rank['big_all_meta']
        assert abs(rank['big_local'] / rank['big_params'] - 0.5) < 0.01
        shape, local = rank['big_rows']['mid_block.mlp.fc1.weight']
        assert local == ((shape[0] + 1) // 2, shape[1])


# -- slow: 20 training steps, DDP vs FSDP, exact resume, re-sharding ------------------------------------

@pytest.mark.slow  # 5 two-process training launches: ~3 min on 2 shared cores
def test_sharded_training_matches_ddp_and_resumes_exactly(tmp_path):
    ddp, _ = train(tmp_path, 'ddp')
    full, full_dir = train(tmp_path, 'fsdp', **SHARDED_RUN)
    # The same 20 steps as DDP from the same initial weights, data and noise; only the order of the float sums
    # of the gradient reduction differs (reduce-scatter vs all-reduce): after 20 AdamW steps the weights differ
    # by float32 rounding (2.4e-7 at most, measured, for weights up to 3), well within 1e-6 + 1e-5 |w|.
    assert_same(full[0]['nnet'], ddp[0]['nnet'], rtol=1e-5, atol=1e-6)
    assert_same(full[0]['ema'], ddp[0]['ema'], rtol=1e-5, atol=1e-6)
    # Each process holds half the parameter and AdamW bytes (rows split in two; odd row counts round up).
    for rank in full:
        assert 0.48 < rank['param_bytes'] / rank['full_param_bytes'] < 0.53
        assert 0.48 < rank['optimizer_bytes'] / (2 * rank['full_param_bytes']) < 0.53
    for rank in ddp:
        assert rank['param_bytes'] == rank['full_param_bytes']
    assert_same(ddp[0]['nnet'], ddp[1]['nnet'])  # (DDP: each process its own copy: they agree)

    # The checkpoint: shards of every process, complete, and the gathered networks eval*.py read.
    ckpt = full_dir / 'ckpts' / '20.ckpt'
    assert sorted(os.listdir(full_dir / 'ckpts')) == ['10.ckpt', '20.ckpt']  # no temporaries left
    assert not checkpoint_problems(ckpt) and not os.path.exists(ckpt / 'optimizer.pth')
    assert sorted(n for n in os.listdir(ckpt / SHARDED) if n.endswith('.distcp')) == ['__0_0.distcp',
                                                                                        '__1_0.distcp']
    config = digits_config()
    config.update_from_flattened_dict(OVERRIDES)
    plain = load_nnet_state_dict(build_nnet(config.nnet), read_state_file(ckpt / 'nnet_ema.pth'))
    assert_same(plain.state_dict(), full[0]['ema'])
    assert_same(read_state_file(ckpt / 'nnet.pth'), full[0]['nnet'])

    # Stopped at 10 (a run of 10 steps), resumed to 20: bit-equal to the uninterrupted run.
    train(tmp_path, 'resumed', **SHARDED_RUN, **{'train.n_steps': 10})
    resumed, resumed_dir = train(tmp_path, 'resumed', **SHARDED_RUN)
    assert 'resuming at step 10' in (resumed_dir / 'train.log').read_text()
    assert_same(resumed[0]['nnet'], full[0]['nnet'])
    assert_same(resumed[0]['ema'], full[0]['ema'])

    # The 2-process checkpoint of step 10 in 1 process: re-sharded, the same weights, EMA and AdamW state.
    os.makedirs(tmp_path / 'one' / 'ckpts')
    os.rename(resumed_dir / 'ckpts' / '10.ckpt', tmp_path / 'one' / 'ckpts' / '10.ckpt')
    one, one_dir = train(tmp_path, 'one', processes=1, **SHARDED_RUN, **{'train.n_steps': 10})
    assert one[0]['step'] == 10 and 'resuming at step 10' in (one_dir / 'train.log').read_text()
    saved = tmp_path / 'one' / 'ckpts' / '10.ckpt'
    assert_same(one[0]['nnet'], read_state_file(saved / 'nnet.pth'))
    assert_same(one[0]['ema'], read_state_file(saved / 'nnet_ema.pth'))
    assert abs(one[0]['optimizer_bytes'] / (2 * one[0]['full_param_bytes']) - 1) < 1e-6  # all of it, here


def test_sharded_checkpoint_is_refused_by_an_unsharded_run(tmp_path):
    """A sharded checkpoint (sharded/ instead of optimizer.pth) is complete, and an unsharded resume names the fix."""
    from libs.checkpoint import resume

    ckpt = tmp_path / 'ckpts' / '10.ckpt'
    (ckpt / SHARDED).mkdir(parents=True)
    net = torch.nn.Linear(2, 2)
    for name, obj in (('nnet.pth', net.state_dict()), ('nnet_ema.pth', net.state_dict()), ('step.pth', 10),
                      ('lr_scheduler.pth', {})):
        torch.save(obj, ckpt / name)
    assert checkpoint_problems(ckpt) == [f"'{ckpt / SHARDED / METADATA}' is missing"]  # shards not all written
    (ckpt / SHARDED / METADATA).write_bytes(b'x')
    assert checkpoint_problems(ckpt) == []
    assert [s for s, _ in list_checkpoints(tmp_path / 'ckpts')] == [10]
    with pytest.raises(CheckpointError, match='fsdp.enabled=True'):
        resume(tmp_path / 'ckpts', nnet=net, nnet_ema=net, optimizer=torch.optim.SGD(net.parameters(), lr=1),
               lr_scheduler=None)
    assert sharded_checkpoint.latest(tmp_path / 'ckpts') == str(ckpt)
    # ... and an unsharded run's checkpoint (optimizer.pth, no sharded/) is refused by a sharded run.
    unsharded = tmp_path / 'ckpts' / '20.ckpt'
    unsharded.mkdir()
    for name in ('nnet.pth', 'nnet_ema.pth', 'step.pth', 'lr_scheduler.pth', 'optimizer.pth'):
        torch.save({}, unsharded / name)
    with pytest.raises(CheckpointError, match='fsdp.enabled=False'):
        sharded_checkpoint.latest(tmp_path / 'ckpts')


@pytest.mark.slow  # torch.compile's tracing in 2 processes: ~40 s on 2 shared cores
def test_torch_compile_over_the_sharded_network(tmp_path):
    (eager_out, eager_grads), (compiled_out, compiled_grads) = launch(COMPILE_WORKER, tmp_path, tmp_path, [])[0]['runs']
    torch.testing.assert_close(compiled_out, eager_out)
    assert_same(compiled_grads, eager_grads, rtol=1e-5, atol=1e-6)
