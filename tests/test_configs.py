"""Every paper config against the original release's facts (an independent source), kept in tests/data:
the network dicts of uvit_checkpoints.json and the config tables of release_configs.json."""
import ast
import importlib
import json
import os
import re

import pytest

import libs.family
from libs.config_utils import parse_and_validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_CONFIGS = ['cifar10_uvit_small', 'celeba64_uvit_small', 'imagenet64_uvit_mid', 'imagenet64_uvit_large',
                 'imagenet256_uvit_large', 'imagenet256_uvit_huge', 'imagenet512_uvit_large', 'imagenet512_uvit_huge',
                 'mscoco_uvit_small']
ALL_CONFIGS = PAPER_CONFIGS + ['digits_uvit_tiny', 'imagenet512_uvit_2b']


def load_config(name, overrides=None):
    config = importlib.import_module(f'configs.{name}').get_config()
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope='module')
def summary(reference_dir):
    """(the notes' text, {table: [row dicts of verbatim cells]})."""
    with open(os.path.join(reference_dir, 'release_configs.json')) as f:
        facts = json.load(f)
    return '\n'.join(facts['notes']), {k: facts[k] for k in ('training', 'data', 'sampling')}


@pytest.fixture(scope='module')
def reference_nnets(reference_dir):
    with open(os.path.join(reference_dir, 'uvit_checkpoints.json')) as f:
        return json.load(f)['configs']


def row_config(row_name):
    """'mscoco_uvit_small (deep)' -> ('mscoco_uvit_small', {'nnet.depth': 16}) (the README's override)."""
    if row_name.endswith('(deep)'):
        return row_name.split()[0], {'nnet.depth': 16}
    return row_name, {}


def number(cell):
    return ast.literal_eval(cell.split()[0].replace(',', ''))


def unset(cell):
    return cell.startswith('—')


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_nnet_equals_release(name, reference_nnets):
    expected = reference_nnets[name]['nnet_kwargs']
    assert load_config(name).nnet.to_dict() == expected


def test_deep_mscoco_override_equals_release(reference_nnets):
    ref = reference_nnets['mscoco_uvit_small_deep']
    overrides = {k: v for k, v in ref['config_overrides'].items()}
    assert load_config('mscoco_uvit_small', overrides).nnet.to_dict() == ref['nnet_kwargs']


def test_training_table(summary):
    text, tables = summary
    rows = tables['training']
    assert len(rows) == 10
    for row in rows:
        config = load_config(*row_config(row['config']))
        assert config.seed == number(row['seed'])
        assert config.train.n_steps == number(row['steps'])
        assert config.train.batch_size == number(row['batch (global)'])
        if not unset(row['mode']):
            assert config.train.mode == row['mode']
        assert config.optimizer.name == row['optimizer']
        assert config.optimizer.lr == pytest.approx(number(row['lr']), rel=0, abs=0)
        assert config.optimizer.weight_decay == number(row['weight decay'])
        assert tuple(config.optimizer.betas) == ast.literal_eval(row['betas'])
        schedule, warmup = re.match(r'(\w+), warmup (\d+)', row['lr schedule']).groups()
        assert (config.lr_scheduler.name, config.lr_scheduler.warmup_steps) == (schedule, int(warmup))
        assert config.pred == ('noise_pred' if unset(row['pred']) else row['pred'])
        # The training script of the row trains the config's time kind.
        script, time_kind = re.match(r'(\S+) \((\w+)', row['train script (time)']).groups()
        with open(os.path.join(ROOT, script)) as f:
            family = getattr(libs.family, re.search(r'main_for\((\w+)\)', f.read()).group(1))
        assert family.time == time_kind
        assert family.data == ('pixels' if script == 'train.py' else 'latents')
        assert family.condition == ('text' if 't2i' in script else 'label')
    # "All configs: log_interval 10, eval_interval 5000 (...), save_interval 50000 (... 10k-sample FID with 50-step DPM-Solver)"
    intervals = {k: int(v) for k, v in re.findall(r'(log_interval|eval_interval|save_interval) (\d+)', text)}
    assert len(intervals) == 3
    ema = float(re.search(r'default (0\.\d+)', text).group(1))
    for name in PAPER_CONFIGS:
        config = load_config(name)
        assert {k: config.train[k] for k in intervals} == intervals
        assert config.ema_rate == ema
        assert config.grad_clip == 0  # "No config sets grad_clip"
        assert (config.fid.n_samples, config.fid.steps) == (10000, 50)


def test_data_table(summary):
    _, tables = summary
    rows = tables['data']
    assert len(rows) == 10
    for row in rows:
        config = load_config(*row_config(row['config']))
        assert config.dataset.name == row['dataset name']
        for item in row['dataset params'].split('; '):
            key, value = item.split('=')
            value = {'yes': True, 'no': False}.get(value, value)
            value = int(value) if isinstance(value, str) and value.isdigit() else value
            assert config.dataset[key] == value, (row['config'], key)
        assert config.dataset.cfg == (row['cfg (label/context dropout)'] == 'yes')
        if config.dataset.cfg:
            assert config.dataset.p_uncond == number(row['p_uncond'])
        if unset(row['z_shape']):
            assert config.z_shape is None
        else:
            assert tuple(config.z_shape) == ast.literal_eval(row['z_shape'])
            assert config.autoencoder.pretrained_path == row['autoencoder']
            assert config.autoencoder.scale_factor == number(row['scale_factor'])


def test_sampling_table(summary):
    _, tables = summary
    rows = tables['sampling']
    assert len(rows) == 10
    for row in rows:
        config = load_config(*row_config(row['config']))
        s = config.sample
        assert s.sample_steps == number(row['sample_steps'])
        # "— (script always uses DPM-Solver)": eval_t2i_discrete.py's fixed solver.
        assert s.algorithm == ('dpm_solver' if unset(row['algorithm']) else row['algorithm'])
        assert s.cfg == (row['cfg'] == 'yes')
        assert s.scale == (0.0 if unset(row['guidance scale']) else number(row['guidance scale']))
        assert s.n_samples == number(row['n_samples'])
        assert s.mini_batch_size == number(row['mini_batch_size (per process)'])


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_configs_validate(name):
    config = load_config(name)
    # The README's launches: 8 GPUs for the paper configs.
    parse_and_validate(config, world_size=1 if name.startswith('digits') else 8)


def test_digits_config_fits_its_dataset():
    from libs.datasets import get_dataset
    from libs.trainer import dataset_kwargs

    config = load_config('digits_uvit_tiny')
    data = get_dataset(config.dataset.name, **dataset_kwargs(config))
    libs.family.PIXELS_CONTINUOUS.for_config(config).check(config, data)
    assert config.nnet.num_classes == data.num_classes + 1  # + the null label of guidance training
