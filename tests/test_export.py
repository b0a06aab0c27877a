"""Exported folders: round trip, config.json alone rebuilds the network, the folder format, clear errors."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import torch
from safetensors import safe_open

import sample_class_cond
from libs import export
from libs.errors import CheckpointError, MissingFileError
from libs.export import build_from_export, export_model, load_weights, read_export_meta
from libs.nnet import build_nnet
from tests.test_sample_scripts import cls_args, load_config, read_png, tiny  # noqa: F401 (tiny: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(name='uvit', img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=True, num_classes=5, conv=True)


def tiny_config(latent=False, **nnet):
    config = ml_collections.ConfigDict(dict(
        seed=1, diffusion='discrete', z_shape=(3, 8, 8) if latent else None,
        autoencoder=dict(pretrained_path='', scale_factor=0.25),
        nnet={**TINY, **nnet}, dataset=dict(name='toy', cfg=True, p_uncond=0.1),
        sample=dict(algorithm='dpm_solver', sample_steps=25, cfg=True, scale=0.4, n_samples=10)))
    return config


def trained_weights(config, seed=3):
    """A network with random (non-initial) weights, like a trained one."""
    torch.manual_seed(seed)
    nnet = build_nnet(config.nnet)
    with torch.no_grad():
        for p in nnet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return nnet


def save_checkpoint_dir(root, step, nnet):
    path = os.path.join(root, 'ckpts', f'{step}.ckpt')
    os.makedirs(path)
    torch.save(nnet.state_dict(), os.path.join(path, 'nnet_ema.pth'))
    torch.save(step, os.path.join(path, 'step.pth'))  # as libs.checkpoint.save_checkpoint writes it
    return path


def test_round_trip_gives_identical_outputs(tmp_path):
    config = tiny_config()
    nnet = trained_weights(config).eval()
    pth = tmp_path / 'nnet_ema.pth'
    torch.save(nnet.state_dict(), pth)
    folder = export_model(str(pth), tmp_path / 'export', config)

    state_dict, meta = load_weights(folder)
    assert state_dict.keys() == nnet.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in nnet.state_dict().items())
    rebuilt, _ = build_from_export(folder)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1., 500., 999.]), torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y=y), nnet(x, t, y=y))


def test_config_json_alone_rebuilds_the_network(tmp_path):
    config = tiny_config(latent=True)
    nnet = trained_weights(config)
    ckpt = save_checkpoint_dir(str(tmp_path / 'run'), 1200, nnet)
    folder = export_model(ckpt, tmp_path / 'export', config)
    with open(os.path.join(folder, 'config.json')) as f:
        meta = json.load(f)
    # The network from config.json only (no training config), then the weights from the safetensors file.
    fresh = build_nnet(meta['nnet'])
    with safe_open(os.path.join(folder, 'model.safetensors'), framework='pt') as f:
        fresh.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), nnet.state_dict().values()))
    assert meta['nnet'] == {**TINY}
    assert meta['diffusion'] == 'discrete'
    assert meta['null_class'] == TINY['num_classes'] - 1
    assert meta['autoencoder_scale_factor'] == 0.25 and meta['z_shape'] == [3, 8, 8]
    assert meta['step'] == 1200
    assert meta['sample']['scale'] == 0.4


def test_meta_of_pixel_unguided_and_default_diffusion(tmp_path):
    config = tiny_config(num_classes=-1)
    config.dataset.cfg = False
    del config['diffusion']  # configs written before the key existed are continuous-time
    nnet = trained_weights(config)
    torch.save(nnet.state_dict(), tmp_path / 'w.pth')
    meta = read_export_meta(export_model(str(tmp_path / 'w.pth'), tmp_path / 'e', config))
    assert meta['diffusion'] == 'continuous'
    assert meta['null_class'] is None and meta['autoencoder_scale_factor'] is None and meta['step'] is None


def test_folder_format(tmp_path):
    config = tiny_config()
    nnet = trained_weights(config)
    torch.save(nnet.state_dict(), tmp_path / 'w.pth')
    folder = export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', config, step=5)
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(os.listdir(tmp_path)) == ['export', 'w.pth']  # no temporaries left behind
    meta = json.load(open(os.path.join(folder, 'config.json')))
    assert meta['format'] == 'uvit-export' and meta['format_version'] == 1
    import hashlib
    assert meta['weights_sha256'] == hashlib.sha256(open(os.path.join(folder, 'model.safetensors'), 'rb').read()).hexdigest()
    with safe_open(os.path.join(folder, 'model.safetensors'), framework='pt') as f:
        assert f.metadata() == {'format': 'pt'}
        assert set(f.keys()) == set(nnet.state_dict())
    card = open(os.path.join(folder, 'README.md')).read()
    assert card.startswith('---\n') and 'arXiv 2209.12152' in card and 'null class 4' in card


def _one_line(e):
    msg = str(e.value)
    assert '\n' not in msg
    return msg


def test_missing_file_is_a_one_line_error(tmp_path):
    config = tiny_config()
    torch.save(trained_weights(config).state_dict(), tmp_path / 'w.pth')
    folder = export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', config)
    os.remove(os.path.join(folder, 'model.safetensors'))
    with pytest.raises(MissingFileError) as e:
        load_weights(folder)
    assert 'model.safetensors missing' in _one_line(e) and 'tools/export.py' in str(e.value)
    with pytest.raises(MissingFileError):
        load_weights(tmp_path / 'nowhere')


def test_replaced_weights_are_a_one_line_error(tmp_path):
    config = tiny_config()
    torch.save(trained_weights(config, seed=1).state_dict(), tmp_path / 'a.pth')
    torch.save(trained_weights(config, seed=2).state_dict(), tmp_path / 'b.pth')
    a = export_model(str(tmp_path / 'a.pth'), tmp_path / 'a', config)
    b = export_model(str(tmp_path / 'b.pth'), tmp_path / 'b', config)
    os.replace(os.path.join(b, 'model.safetensors'), os.path.join(a, 'model.safetensors'))
    with pytest.raises(CheckpointError) as e:
        load_weights(a)
    assert 'sha256 differs' in _one_line(e)


def test_config_that_does_not_fit_the_weights_is_a_one_line_error(tmp_path):
    config = tiny_config()
    torch.save(trained_weights(config).state_dict(), tmp_path / 'w.pth')
    folder = export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', config)
    path = os.path.join(folder, 'config.json')
    meta = json.load(open(path))
    meta['nnet']['num_classes'] = 7
    json.dump(meta, open(path, 'w'))
    with pytest.raises(CheckpointError) as e:
        build_from_export(folder)
    msg = _one_line(e)
    assert 'label_emb.weight checkpoint (5, 32) vs model (7, 32)' in msg and 'config.json' in msg


def test_export_checks_the_config_before_writing(tmp_path):
    config = tiny_config()
    torch.save(trained_weights(config).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(CheckpointError, match='does not match'):
        export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', tiny_config(embed_dim=64, num_heads=2))
    assert not (tmp_path / 'export').exists()


def test_existing_folders_are_not_clobbered(tmp_path, monkeypatch):
    config = tiny_config()
    torch.save(trained_weights(config).state_dict(), tmp_path / 'w.pth')
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    with pytest.raises(CheckpointError, match='already exists'):
        export_model(str(tmp_path / 'w.pth'), other, config)
    with pytest.raises(CheckpointError, match='not an exported model'):
        export_model(str(tmp_path / 'w.pth'), other, config, overwrite=True)
    assert (other / 'notes.txt').read_text() == 'keep me'

    folder = export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', config, step=1)
    # A failure mid-write leaves the earlier export whole.
    def broken(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(export, 'save_file', broken)
    with pytest.raises(OSError):
        export_model(str(tmp_path / 'w.pth'), folder, config, step=2, overwrite=True)
    assert read_export_meta(folder)['step'] == 1
    assert sorted(os.listdir(tmp_path)) == ['export', 'mine', 'w.pth']


def test_tool_exports_a_run_checkpoint_and_reports_errors_in_one_line(tmp_path):
    config = tiny_config()
    run = tmp_path / 'run'
    ckpt = save_checkpoint_dir(str(run), 40, trained_weights(config))
    (run / 'config.json').write_text(json.dumps(config.to_dict()))
    env = {**os.environ, 'PYTHONPATH': ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export.py'), ckpt, str(tmp_path / 'e')],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert read_export_meta(tmp_path / 'e')['step'] == 40

    bad = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export.py'), str(tmp_path / 'nope.pth'),
                          str(tmp_path / 'f')], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith('MissingFileError: checkpoint not found')
    assert 'Traceback' not in bad.stderr


def test_push_to_hub_uploads_the_folder_and_nothing_else(tmp_path, monkeypatch):
    # Offline: a stand-in for huggingface_hub.HfApi records what would be sent.
    import huggingface_hub

    from libs.export import push_to_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(('token', token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(('create', repo_id, kwargs['private']))
            return f'https://huggingface.co/{repo_id}'

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(('upload', sorted(os.listdir(folder_path)), repo_id))

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    config = tiny_config()
    torch.save(trained_weights(config).state_dict(), tmp_path / 'w.pth')
    folder = export_model(str(tmp_path / 'w.pth'), tmp_path / 'export', config)
    assert push_to_hub(folder, 'me/tiny', private=True) == 'https://huggingface.co/me/tiny'
    assert calls[1:] == [('create', 'me/tiny', True),
                         ('upload', ['README.md', 'config.json', 'model.safetensors'], 'me/tiny')]
    os.remove(os.path.join(folder, 'config.json'))
    calls.clear()
    with pytest.raises(MissingFileError):
        push_to_hub(folder, 'me/tiny')
    assert calls == []  # an incomplete folder is never uploaded


def test_every_loader_takes_an_exported_folder(tiny, tmp_path):
    """--nnet_path of the sample scripts (and eval*.py, --init_from, final evaluation: all through
    load_weights) given an exported folder: the same weights, the same images as from the .pth."""
    config_path, pth = tiny["cls"]
    folder = export_model(pth, tmp_path / 'export', load_config(config_path))
    weights, exported = torch.load(pth, weights_only=True), load_weights(folder)[0]
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    args = ['--class_ids=1', '--n_per_class=2']
    from_pth = sample_class_cond.main(cls_args(tiny, tmp_path / 'pth', *args))
    from_export = sample_class_cond.main([a if not a.startswith('--nnet_path=') else f'--nnet_path={folder}'
                                          for a in cls_args(tiny, tmp_path / 'export_out', *args)])
    assert len(from_pth) == len(from_export) == 2
    for p, q in zip(from_pth, from_export):
        np.testing.assert_array_equal(read_png(p), read_png(q))
