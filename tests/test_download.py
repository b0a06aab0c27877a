"""tools/download.py without a network: the name table against the release's facts and the configs,
the command line, the one-line failures, atomic placement with the checks, and gdown's resume."""
import collections
import hashlib
import importlib
import json
import os
import subprocess
import sys

import gdown
import pytest
import requests

from libs.errors import CheckpointError, InputError, MissingFileError
from tools import download as dl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ['cifar10_uvit_small', 'celeba64_uvit_small', 'imagenet64_uvit_mid', 'imagenet64_uvit_large',
                 'imagenet256_uvit_large', 'imagenet256_uvit_huge', 'imagenet512_uvit_large', 'imagenet512_uvit_huge',
                 'mscoco_uvit_small']


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'download.py'), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_names_and_targets_are_unique_and_under_assets():
    names = [f.name for f in dl.FILES]
    targets = [f.target for f in dl.FILES]
    assert len(set(names)) == len(names) == 18
    assert len(set(targets)) == len(targets)
    for f in dl.FILES:
        assert f.target.startswith('assets/') and not os.path.isabs(f.target) and '..' not in f.target.split('/')
        assert os.path.splitext(os.path.basename(f.target))[0] == f.name
        assert f.what
        assert f.drive_id is None or '/' not in f.drive_id  # ids, not links
        assert f.sha256 is None or len(f.sha256) == 64


def test_checkpoints_are_the_published_ones(reference_dir):
    with open(os.path.join(reference_dir, 'uvit_checkpoints.json')) as f:
        published = {name: c['published_checkpoint'] for name, c in json.load(f)['configs'].items()}
    ours = {f.name: os.path.basename(f.target) for f in dl.FILES if f.target.startswith(dl.CHECKPOINT_DIR + '/')}
    assert ours == published


def test_every_autoencoder_and_fid_statistics_path_is_covered(reference_dir):
    targets = {f.target for f in dl.FILES}
    with open(os.path.join(reference_dir, 'release_configs.json')) as f:
        rows = json.load(f)['data']
    # The release's table: "assets/fid_stats/x.npz (resolution 64)" or "—" for pixel-space autoencoders.
    wanted = {row['FID reference stats'].split()[0] for row in rows}
    wanted |= {row['autoencoder'] for row in rows if row['autoencoder'].startswith('assets/')}
    assert len(wanted) == 8
    # And this repository's configs, which may have grown keys since the release.
    for name in PAPER_CONFIGS:
        config = importlib.import_module(f'configs.{name}').get_config()
        if config.autoencoder.pretrained_path:
            wanted.add(config.autoencoder.pretrained_path)
    assert wanted <= targets
    assert {'assets/stable-diffusion/autoencoder_kl.pth', 'assets/stable-diffusion/autoencoder_kl_ema.pth'} <= wanted


def test_help_lists_every_name_and_target():
    out = run_tool('--help')  # absl's --help exits with status 1
    assert 'Traceback' not in out.stderr
    for f in dl.FILES:
        assert f.name in out.stdout and f.target in out.stdout
    assert '--id' in out.stdout and '--all' in out.stdout


def test_no_known_id_stops_with_one_line_before_any_download(tmp_path):
    out = run_tool('imagenet256_uvit_huge', f'--root={tmp_path}')
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert 'MissingFileError' in lines[0] and 'assets/ckpts/imagenet256_uvit_huge.pth' in lines[0]
    assert 'github.com/baofff/U-ViT' in lines[0] and '--id=' in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_all_without_ids_names_every_missing_file_once(tmp_path):
    (tmp_path / 'assets' / 'fid_stats').mkdir(parents=True)
    (tmp_path / 'assets' / 'fid_stats' / 'fid_stats_mscoco256_val.npz').write_bytes(b'PK')
    with pytest.raises(MissingFileError) as e:
        dl.download(everything=True, root=str(tmp_path), fetcher=pytest.fail)
    msg = str(e.value)
    assert '\n' not in msg and 'github.com/baofff/U-ViT' in msg
    assert all(f.name in msg for f in dl.FILES if f.name != 'fid_stats_mscoco256_val')
    assert 'fid_stats_mscoco256_val' not in msg  # already there


def test_offline_is_one_line(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, 'download', offline)
    with pytest.raises(MissingFileError) as e:
        dl.download(['cifar10_uvit_small'], source='1AbCdEf', root=str(tmp_path))
    msg = str(e.value)
    assert '\n' not in msg
    assert 'cannot reach Google Drive' in msg and 'assets/ckpts/cifar10_uvit_small.pth' in msg and 'baofff/U-ViT' in msg
    assert not (tmp_path / 'assets' / 'ckpts' / 'cifar10_uvit_small.pth').exists()


def test_drive_refusal_is_one_line(tmp_path, monkeypatch):
    def refused(**kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Failed to retrieve file url:\n\n\tToo many users ...")

    monkeypatch.setattr(gdown, 'download', refused)
    with pytest.raises(MissingFileError, match='refused autoencoder_kl .Failed to retrieve file url:.') as e:
        dl.download(['autoencoder_kl'], source='1AbCdEf', root=str(tmp_path))
    assert '\n' not in str(e.value)


def test_resume_and_link_parsing_reach_gdown(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gdown, 'download', lambda **kwargs: calls.append(kwargs))
    out = str(tmp_path / 'x.unverified')
    dl.drive_fetch('https://drive.google.com/file/d/1AbC-d_E/view?usp=sharing', out)
    dl.drive_fetch('1XyZ', out)
    assert [c['id'] for c in calls] == ['1AbC-d_E', '1XyZ']
    assert all(c['resume'] is True and c['output'] == out and c['quiet'] is False for c in calls)
    with pytest.raises(InputError, match='folder'):
        dl.drive_fetch('https://drive.google.com/drive/folders/1AbC', out)
    with pytest.raises(InputError, match='not a Google Drive file link'):
        dl.drive_fetch('https://example.com/model.pth', out)


def test_folder_link_finds_the_named_files_by_name(tmp_path, monkeypatch):
    Entry = collections.namedtuple('Entry', 'id path local_path')  # what gdown lists
    listing = [Entry('1Cifar', 'fid_stats/fid_stats_cifar10_train_pytorch.npz', 'x'),
               Entry('1Coco', 'fid_stats/fid_stats_mscoco256_val.npz', 'x'), Entry('1Other', 'notes.txt', 'x')]
    listed = []
    monkeypatch.setattr(gdown, 'download_folder', lambda **kw: listed.append(kw) or listing)
    link = 'https://drive.google.com/drive/folders/1FidStats?usp=sharing'
    seen = []
    paths = dl.download(['fid_stats_mscoco256_val', 'fid_stats_cifar10_train_pytorch'], source=link,
                        root=str(tmp_path), fetcher=writer(PAYLOAD, seen))
    assert [s for s, _ in seen] == ['1Coco', '1Cifar']
    assert paths == [str(tmp_path / 'assets' / 'fid_stats' / n) for n in
                     ('fid_stats_mscoco256_val.npz', 'fid_stats_cifar10_train_pytorch.npz')]
    assert listed[0]['url'] == link and listed[0]['skip_download'] is True  # listing only, no bulk download
    # Everything present: no network at all.
    monkeypatch.setattr(gdown, 'download_folder', pytest.fail)
    dl.download(['fid_stats_mscoco256_val'], source=link, root=str(tmp_path), fetcher=pytest.fail)
    # A folder without the named file says what it holds.
    monkeypatch.setattr(gdown, 'download_folder', lambda **kw: listing)
    with pytest.raises(InputError, match='holds fid_stats_cifar10_train_pytorch.npz, .*not fid_stats_imagenet64'):
        dl.download(['fid_stats_imagenet64_guided_diffusion'], source=link, root=str(tmp_path), fetcher=pytest.fail)


def test_folder_listing_offline_is_one_line(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise requests.exceptions.ConnectionError('Max retries exceeded')

    monkeypatch.setattr(gdown, 'download_folder', offline)
    with pytest.raises(MissingFileError, match='cannot reach Google Drive') as e:
        dl.download(['autoencoder_kl', 'autoencoder_kl_ema'], source='https://drive.google.com/drive/folders/1SD',
                    root=str(tmp_path))
    assert '\n' not in str(e.value) and 'autoencoder_kl_ema.pth' in str(e.value)


PAYLOAD = b'\x80\x02 pretend checkpoint bytes' * 100


def fake_file(**overrides):
    fields = dict(name='tiny', target='assets/ckpts/tiny.pth', what='a test file', drive_id='1Fake',
                  size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest())
    return dl.ReleaseFile(**{**fields, **overrides})


def writer(payload, seen):
    def fetcher(source, output):
        seen.append((source, output))
        assert not os.path.exists(output[:-len('.unverified')])  # the target appears only after the checks
        with open(output, 'wb') as f:
            f.write(payload)
    return fetcher


def test_atomic_placement_after_checks(tmp_path):
    seen = []
    path = dl.fetch(fake_file(), root=str(tmp_path), fetcher=writer(PAYLOAD, seen))
    target = tmp_path / 'assets' / 'ckpts' / 'tiny.pth'
    assert path == str(target) and target.read_bytes() == PAYLOAD
    assert seen == [('1Fake', str(target) + '.unverified')]  # same folder as the target: the rename is atomic
    assert sorted(os.listdir(target.parent)) == ['tiny.pth']
    # A present target is kept, not fetched again.
    assert dl.fetch(fake_file(), root=str(tmp_path), fetcher=pytest.fail) == str(target)


@pytest.mark.parametrize('payload,field,match', [
    (PAYLOAD[:-1], {}, 'bytes'),  # truncated
    (PAYLOAD[:-1] + b'!', {}, 'sha256'),  # same size, other bytes
    (b'  <!DOCTYPE html><html>quota exceeded</html>', {'size': None, 'sha256': None}, 'web page'),
])
def test_failed_check_leaves_no_file(tmp_path, payload, field, match):
    with pytest.raises(CheckpointError, match=match) as e:
        dl.fetch(fake_file(**field), root=str(tmp_path), fetcher=writer(payload, []))
    assert '\n' not in str(e.value) and 'assets/ckpts/tiny.pth' in str(e.value)
    assert os.listdir(tmp_path / 'assets' / 'ckpts') == []


def test_unknown_size_and_checksum_accept_any_real_file(tmp_path):
    dl.fetch(fake_file(size=None, sha256=None), root=str(tmp_path), fetcher=writer(PAYLOAD, []))
    assert (tmp_path / 'assets' / 'ckpts' / 'tiny.pth').read_bytes() == PAYLOAD


def test_command_line_mistakes():
    with pytest.raises(InputError, match='--all'):
        dl.download([])
    with pytest.raises(InputError, match='--all'):
        dl.download(['autoencoder_kl'], everything=True)
    with pytest.raises(InputError, match="cifar_uvit.*known: cifar10_uvit_small"):
        dl.download(['cifar_uvit'])
    with pytest.raises(InputError, match='exactly one name'):
        dl.download(['autoencoder_kl', 'autoencoder_kl_ema'], source='1AbC')
